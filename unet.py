"""The DDPM noise-prediction network eps_theta(x_t, t) (Ho et al. 2020, Appendix B).

A PixelCNN++-style U-Net of Wide-ResNet blocks with GroupNorm, the Transformer sinusoidal
timestep embedding added inside every residual block, and single-head self-attention at
16x16. Structure, initialisation and parameter counts follow the authors' TF code
(diffusion_tf/models/unet.py): cifar10 has 35,746,307 parameters, the 256x256 models
113,673,219.

Timesteps: forward(x, t) takes the PAPER's t in {1..T}. The authors' code (and so their
released weights) used 0-based t; pretrained.py's loader sets t_offset=1 so those networks
see t-1. Nothing else in this file knows about that.
"""
import math

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


def check_config(c):
    """ValueError unless a UNet configuration (perhaps read from a file) can build a network."""
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "image_size", "T"):
        if not whole(c[name]):
            raise ValueError(f"{name}={c[name]!r} must be an integer >= 1")
    if not c["ch_mult"] or not all(map(whole, c["ch_mult"])) or not all(map(whole, c["attn_resolutions"])):
        raise ValueError(f"ch_mult={c['ch_mult']!r} and attn_resolutions={c['attn_resolutions']!r} must hold "
                         f"integers >= 1")
    if not 0 <= c["dropout"] < 1 or c["t_offset"] not in (0, 1):
        raise ValueError(f"dropout={c['dropout']!r} must be in [0, 1) and t_offset={c['t_offset']!r} 0 or 1")
    if c["ch"] % 32:
        raise ValueError(f"ch={c['ch']} must be a multiple of 32 (GroupNorm uses 32 groups)")
    if c["image_size"] % 2 ** (len(c["ch_mult"]) - 1):
        raise ValueError(f"image_size={c['image_size']} must be divisible by 2**(len(ch_mult)-1) = "
                         f"{2 ** (len(c['ch_mult']) - 1)}")


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
        check_config(self.config)
        n_down = len(ch_mult) - 1
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
        """Shapes and dtypes always; t's values where they are on the host (an int, a list). A tensor's values
        are not read: that would make a GPU wait for every call (ddpm.py always passes t in 1..T)."""
        S, C = self.image_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != S or x.shape[3] != S:
            raise ValueError(f"expected images of shape [B, {C}, {S}, {S}] (in_channels={C}, image_size={S}; "
                             f"image_size must be divisible by {2 ** (len(self.down) - 1)}), got {list(x.shape)}")
        if not torch.is_tensor(t):
            values = [t] if isinstance(t, int) else list(t)
            if not all(isinstance(v, int) and 1 <= v <= self.T for v in values):
                raise ValueError(f"t must hold integer timesteps in 1..{self.T} (the paper's convention), got {t}")
            t = torch.full((x.shape[0],), t, device=x.device) if isinstance(t, int) else torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be an int or a tensor of shape [{x.shape[0]}], got shape {list(t.shape)}")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"t must hold integer timesteps in 1..{self.T}, got a tensor of {t.dtype}")
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
