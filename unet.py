"""The DDPM noise-prediction network eps_theta(x_t, t) (Ho et al. 2020, Appendix B).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm, the Transformer sinusoidal
timestep embedding added inside every residual block, and single-head self-attention at
16x16. Structure, initialisation and parameter counts follow the authors' TF code
(diffusion_tf/models/unet.py): cifar10 has 35,746,307 parameters, the 256x256 models
113,673,219.

Timesteps: forward(x, t) takes the PAPER's t in {1..T}. The authors' code (and so their
released weights) used 0-based t; `load_pretrained` sets t_offset=1 so those networks
see t-1. Nothing else in this file knows about that.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's models (the authors' scripts/run_cifar.py, run_celebahq.py, run_lsun.py), and one of ours.
_PAPER = dict(in_channels=3, out_channels=3, ch=128, attn_resolutions=(16,), num_res_blocks=2, T=1000)
PRESETS = {
    "cifar10": dict(_PAPER, ch_mult=(1, 2, 2, 2), dropout=0.1, image_size=32),
    "celebahq": dict(_PAPER, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, image_size=256),
    "lsun": dict(_PAPER, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, image_size=256),
    # Ours, not the paper's: sklearn's 8x8 digits (1.06M parameters), sized to train in minutes on a
    # 2-core CPU. ch=32 is the least GroupNorm(32) allows; one block per level; attention only in the middle.
    "digits": dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(),
                   num_res_blocks=1, dropout=0.0, image_size=8, T=1000),
}


def build(preset: str, **overrides) -> "UNet":
    """A UNet from a named preset, e.g. build("cifar10") or build("digits", ch=64)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return UNet(**{**PRESETS[preset], **overrides})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding [sin(t f_k), cos(t f_k)], f_k = exp(-k ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    # Same operation order as diffusers (the format of the released weights): equal bit for bit.
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)  # tf.contrib.layers.group_norm defaults


class ResBlock(nn.Module):
    """Wide-ResNet block; the timestep enters as a per-channel bias after conv1."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # The authors' `nin` shortcut: a 1x1 conv only where the channel count changes.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb arrives already through SiLU (see UNet.forward).
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)  # the authors' three 1x1 `nin`s, fused into one matmul
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # [B, HW, C]; for channels_last input this is a free view.
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head: [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = self.proj_out(h.squeeze(1)).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class UNet(nn.Module):
    """eps_theta(x_t, t). Defaults are the paper's CIFAR10 model; see PRESETS for the others.

    t_offset: the network embeds t - t_offset. 0 for networks trained here (paper t);
    1 for the authors' released weights, which were trained on 0-based t (set by load_pretrained).
    """

    def __init__(self, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,),
                 num_res_blocks=2, dropout=0.1, image_size=32, T=1000, t_offset=0):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)  # lists from JSON are fine too
        # Plain values only, so a checkpoint can store this and rebuild with UNet(**config).
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                           attn_resolutions=attn_resolutions, num_res_blocks=num_res_blocks, dropout=dropout,
                           image_size=image_size, T=T, t_offset=t_offset)
        if ch % 32:
            raise ValueError(f"ch={ch} must be a multiple of 32 (GroupNorm uses 32 groups)")
        n_down = len(ch_mult) - 1
        if image_size % 2 ** n_down:
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(ch_mult)-1) = {2 ** n_down}")
        # As in the authors' code, a level has attention iff its resolution is listed (others are ignored,
        # so overriding image_size keeps working).
        resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
        self.in_channels, self.image_size, self.T, self.t_offset, self.ch = in_channels, image_size, T, t_offset, ch

        temb_ch = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path. skip_chs records the channels of every tensor the up path will concatenate.
        skip_chs, cur = [ch], ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level, out = nn.Module(), ch * mult
            level.res = nn.ModuleList(ResBlock(cur if j == 0 else out, out, temb_ch, dropout)
                                      for j in range(num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(out) for _ in range(num_res_blocks)
                                       if resolutions[i] in attn_resolutions)
            level.downsample = nn.Conv2d(out, out, 3, stride=2) if i < n_down else None  # padded in forward
            skip_chs += [out] * (num_res_blocks + (i < n_down))
            cur = out
            self.down.append(level)

        # Middle: res, attention, res (attention here at every configuration, as in the paper).
        self.mid_res1 = ResBlock(cur, cur, temb_ch, dropout)
        self.mid_attn = AttnBlock(cur)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, dropout)

        # Up path, in execution order (lowest resolution first): one extra block per level
        # so that every down-path activation, including conv_in's, is consumed once.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level, out = nn.Module(), ch * mult
            level.res = nn.ModuleList()
            for j in range(num_res_blocks + 1):
                level.res.append(ResBlock(cur + skip_chs.pop(), out, temb_ch, dropout))
                cur = out
            level.attn = nn.ModuleList(AttnBlock(out) for _ in range(num_res_blocks + 1)
                                       if resolutions[i] in attn_resolutions)
            level.upsample = nn.Conv2d(out, out, 3, padding=1) if i > 0 else None
            self.up.append(level)

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        # As the authors: Glorot-uniform weights, zero biases, and zero (TF: 1e-10) init for the last
        # layer of each residual branch and of the output, so every branch starts out contributing nothing.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)] + [self.conv_out]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_inputs(self, x: torch.Tensor, t) -> torch.Tensor:
        S, C = self.image_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != S or x.shape[3] != S:
            raise ValueError(f"expected images of shape [B, {C}, {S}, {S}] (in_channels={C}, image_size={S}; "
                             f"image_size must be divisible by {2 ** (len(self.down) - 1)}), got {list(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be an int or a tensor of shape [{x.shape[0]}], got shape {list(t.shape)}")
        if t.is_floating_point() or t.is_complex() or ((t < 1) | (t > self.T)).any():
            raise ValueError(f"t must hold integer timesteps in 1..{self.T} (the paper's convention), "
                             f"got {t.tolist() if t.numel() <= 8 else t}")
        return t

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Predict the noise in x [B, C, H, W] at paper timestep t in {1..T} (int or LongTensor [B])."""
        t = self._check_inputs(x, t)
        # Every block applies SiLU to temb before its projection; do it once here.
        temb = F.silu(self.time_mlp(timestep_embedding(t - self.t_offset, self.ch).to(x.dtype)))

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(hs[-1], temb)
                hs.append(level.attn[j](h) if level.attn else h)
            if level.downsample is not None:  # TF 'SAME' padding of a stride-2 conv: right and bottom only
                hs.append(level.downsample(F.pad(hs[-1], (0, 1, 0, 1))))

        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], temb)), temb)

        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(torch.cat([h, hs.pop()], dim=1), temb)
                h = level.attn[j](h) if level.attn else h
            if level.upsample is not None:  # nearest-neighbour x2, then a 3x3 conv
                h = level.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The authors' weights, as ported to Hugging Face (google/ddpm-cifar10-32, google/ddpm-celebahq-256,
# google/ddpm-church-256, ...) in diffusers' UNet2DModel format.

_DOWNLOAD_HINT = ("download it first, e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir "
                  "ddpm-cifar10-32` (newer huggingface_hub: `hf download ...`)")

# diffusers name -> ours, applied in order. q/k/v come out as `.q.`/`.k.`/`.v.` and are fused below.
# `query`/`key`/`value`/`proj_attn` are the deprecated names still stored in the original ports.
_RENAMES = [
    (r"^time_embedding\.linear_1\.", "time_mlp.0."), (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"^conv_norm_out\.", "norm_out."), (r"^mid_block\.resnets\.0\.", "mid_res1."),
    (r"^mid_block\.resnets\.1\.", "mid_res2."), (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"down.\1.downsample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"up.\1.upsample."),
    (r"\.time_emb_proj\.", ".temb_proj."), (r"\.conv_shortcut\.", ".skip."), (r"\.group_norm\.", ".norm."),
    (r"\.(to_out\.0|proj_attn)\.", ".proj_out."),
    (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."), (r"\.(to_v|value)\.", ".v."),
]

# diffusers UNet2DModel settings that must hold for the weights to be this architecture.
_DDPM_SETTINGS = dict(act_fn="silu", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_num_groups=32,
                      norm_eps=1e-6, time_embedding_type="positional", center_input_sample=False,
                      mid_block_scale_factor=1, resnet_time_scale_shift="default", attention_head_dim=None,
                      class_embed_type=None, num_class_embeds=None, add_attention=True)


def _config_from_json(cfg: dict, source) -> dict:
    """Our constructor kwargs from a diffusers UNet2DModel config.json."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{source}: _class_name={cfg['_class_name']!r}, expected 'UNet2DModel'")
    for k, want in _DDPM_SETTINGS.items():
        if k in cfg and cfg[k] != want:
            raise ValueError(f"{source}: {k}={cfg[k]!r} is not the DDPM architecture (needs {want!r})")
    try:
        down, up, boc = cfg["down_block_types"], cfg["up_block_types"], cfg["block_out_channels"]
        size, ch = cfg["sample_size"], boc[0]
        size = size[0] if isinstance(size, (list, tuple)) else size
        config = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], ch=ch,
                      ch_mult=tuple(c // ch for c in boc), num_res_blocks=cfg["layers_per_block"],
                      attn_resolutions=tuple(size // 2 ** i for i, b in enumerate(down) if "Attn" in b),
                      dropout=cfg.get("dropout", 0.0), image_size=size, T=1000)  # T: all the authors' models
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{source}: not a UNet2DModel config (missing or bad {e})") from None
    if (set(down) - {"DownBlock2D", "AttnDownBlock2D"} or set(up) - {"UpBlock2D", "AttnUpBlock2D"}
            or ["Attn" in b for b in down] != ["Attn" in b for b in reversed(up)] or any(c % ch for c in boc)):
        raise ValueError(f"{source}: unsupported blocks {down} / {up} / block_out_channels {boc}")
    return config


def _config_from_weights(sd: dict, source) -> dict:
    """Infer the configuration from the weight shapes when no config.json is available."""
    try:
        ch, in_channels = sd["conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
        ch_mult = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // ch for i in levels)
        num_res_blocks = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
        attn = [i for i in levels if any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd)]
        out_channels = sd["conv_out.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{source} does not look like a diffusers UNet2DModel state dict (no {e})") from None
    if not attn:
        raise ValueError(f"{source}: cannot infer image_size without attention layers; pass config_path")
    image_size = 16 * 2 ** attn[0]  # every model in the paper attends at 16x16 (cifar10: 32, 256x256: 256)
    return dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                attn_resolutions=tuple(image_size // 2 ** i for i in attn), num_res_blocks=num_res_blocks,
                dropout=0.0, image_size=image_size, T=1000)


def _from_diffusers(sd: dict, ours: dict, source) -> dict:
    """Rename a diffusers UNet2DModel state dict to ours, fusing q/k/v; every key and shape is checked."""
    out, qkv = {}, {}
    for key, w in sd.items():
        name = key
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        m = re.fullmatch(r"(.+)\.([qkv])\.(weight|bias)", name)
        target = f"{m[1]}.qkv.{m[3]}" if m else name
        if target not in ours:
            raise ValueError(f"{source}: unrecognised key {key!r}; it is not a parameter of the DDPM UNet")
        if m:
            if m[2] in qkv.setdefault(target, {}):
                raise ValueError(f"{source}: duplicate key {key!r} (both old and new attention names?)")
            qkv[target][m[2]] = w
        else:
            out[name] = w
    for target, parts in qkv.items():
        if len(parts) != 3:
            raise ValueError(f"{source}: missing attention part(s) {sorted({'q', 'k', 'v'} - set(parts))} of {target}")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]])  # our fused [q; k; v] layout
    if missing := [k for k in ours if k not in out]:
        raise ValueError(f"{source}: missing {len(missing)} parameter(s), e.g. {missing[0]!r} (our name)")
    for k, w in out.items():
        if w.shape != ours[k].shape:
            raise ValueError(f"{source}: shape {list(w.shape)} for {k!r} (our name), expected {list(ours[k].shape)}")
    return out


def load_tensors(path):
    """torch.load that never runs code from the file (weights_only=True), with a one-line ValueError that
    says what is wrong with the file (and never suggests trusting it) instead of PyTorch's advice."""
    import warnings
    with warnings.catch_warnings():  # the unpickler warns about protocols before it refuses
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            if "Unsupported global" in text:
                raise ValueError(f"{path} holds Python objects other than tensors and plain values: not loaded, "
                                 f"since loading it could run code; it is not a file of weights") from None
            why = "" if text.startswith("Weights only") else f": {text.splitlines()[0][:120]}" if text else ""
            raise ValueError(f"{path} is not a readable checkpoint or weights file (truncated or corrupt?){why}") \
                from None


def load_pretrained(path, config_path=None) -> UNet:
    """Load the authors' weights from a Hugging Face port (diffusers UNet2DModel format).

    path: `diffusion_pytorch_model.safetensors` or `.bin`, or the directory holding it (or its `unet/`).
    config_path: the repo's config.json; by default the one next to the weights, else the
    configuration is inferred from the weight shapes. Returns the model in eval mode, with
    t_offset=1 because the authors trained on 0-based t: call it with the paper's t in {1..T}.
    """
    path = Path(path)
    if path.is_dir():
        names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        found = [d / n for d in (path, path / "unet") for n in names if (d / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors/.bin in {path}; {_DOWNLOAD_HINT}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found; {_DOWNLOAD_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    elif path.suffix in (".bin", ".pt", ".pth"):
        sd = load_tensors(path)
    else:
        raise ValueError(f"{path}: expected a .safetensors or .bin weights file")
    if config_path is None and (path.parent / "config.json").is_file():
        config_path = path.parent / "config.json"
    if config_path is not None:
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"config file {config_path} not found; {_DOWNLOAD_HINT}")
        config = _config_from_json(json.loads(Path(config_path).read_text()), config_path)
    else:
        config = _config_from_weights(sd, path)

    model = UNet(**config, t_offset=1)  # the authors' networks embed 0-based t = paper t - 1
    model.load_state_dict(_from_diffusers(sd, model.state_dict(), path))
    return model.eval()
