"""The authors' released weights, and the one loader of trained networks that sample.py and evaluate.py share.

The Hugging Face ports of the authors' weights (google/ddpm-cifar10-32, google/ddpm-celebahq-256,
google/ddpm-church-256, ...) are in diffusers' UNet2DModel format; they load into unet.UNet without
diffusers. The configuration comes from the weights' own shapes, so a config.json can never make us
allocate more than the file holds; the repo's config.json, when present, must agree with them and
gives the image size.
"""
import json
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch

import runs
from cli import UsageError, first_line
from data import MAX_IMAGE_SIZE
from ddpm import Diffusion
from unet import UNet

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


def _config_from_json(cfg, source):
    """(image size, attention levels, the settings the weights must match) from a diffusers config.json."""
    if not isinstance(cfg, dict) or cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{source}: not a UNet2DModel config.json")
    for k, want in _DDPM_SETTINGS.items():
        if k in cfg and cfg[k] != want:
            raise ValueError(f"{source}: {k}={cfg[k]!r} is not the DDPM architecture (needs {want!r})")
    try:
        down, up, boc = cfg["down_block_types"], cfg["up_block_types"], cfg["block_out_channels"]
        size, ch = cfg["sample_size"], boc[0]
        size = size[0] if isinstance(size, (list, tuple)) else size
        claims = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], ch=ch,
                      ch_mult=tuple(c // ch for c in boc), num_res_blocks=cfg["layers_per_block"])
        levels = [i for i, b in enumerate(down) if "Attn" in b]
    except (KeyError, IndexError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{source}: not a UNet2DModel config (missing or bad {e})") from None
    if (set(down) - {"DownBlock2D", "AttnDownBlock2D"} or set(up) - {"UpBlock2D", "AttnUpBlock2D"}
            or ["Attn" in b for b in down] != ["Attn" in b for b in reversed(up)] or any(c % ch for c in boc)):
        raise ValueError(f"{source}: unsupported blocks {down} / {up} / block_out_channels {boc}")
    if not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"{source}: sample_size={size!r} must be an integer in 1..{MAX_IMAGE_SIZE}")
    return size, levels, claims


def _config_from_weights(sd, source):
    """Our constructor's settings that the weight shapes determine, and which levels have attention."""
    try:
        ch, in_channels = sd["conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")})
        ch_mult = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] // ch for i in levels)
        num_res_blocks = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
        attn = [i for i in levels if any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd)]
        out_channels = sd["conv_out.weight"].shape[0]
    except (KeyError, IndexError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ValueError(f"{source} does not look like a diffusers UNet2DModel state dict (no {e})") from None
    return dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                num_res_blocks=num_res_blocks), attn


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


def load_pretrained(path, config_path=None) -> UNet:
    """Load the authors' weights from a Hugging Face port (diffusers UNet2DModel format).

    path: `diffusion_pytorch_model.safetensors` or `.bin`, or the directory holding it (or its `unet/`).
    config_path: the repo's config.json; by default the one next to the weights. Without one, the image
    size is inferred from where the network attends (16x16 in every model of the paper). Returns the model
    in eval mode, with t_offset=1 because the authors trained on 0-based t: call it with the paper's t.
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
        sd = runs.load_tensors(path)
    else:
        raise ValueError(f"{path}: expected a .safetensors or .bin weights file")
    if not isinstance(sd, dict) or (bad := [k for k, v in sd.items() if not torch.is_tensor(v) or not v.is_floating_point()]):
        raise ValueError(f"{path}: holds {'no state dict' if not isinstance(sd, dict) else f'{bad[0]!r}, not floating-point weights'}")
    config, attn = _config_from_weights(sd, path)
    if config_path is None and (path.parent / "config.json").is_file():
        config_path = path.parent / "config.json"
    if config_path is not None:
        try:
            size, levels, claims = _config_from_json(json.loads(Path(config_path).read_text()), config_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {config_path}: {first_line(e, 120)}") from None
        if differ := [k for k in claims if claims[k] != config[k]] + (["attention"] if levels != attn else []):
            raise ValueError(f"{config_path} does not describe these weights: its {differ[0]} is "
                             f"{claims.get(differ[0], levels)}, the weights' {config.get(differ[0], attn)}")
    elif not attn:
        raise ValueError(f"{path}: cannot infer the image size of a network without attention: put the model's "
                         f"config.json next to the weights")
    else:
        size = 16 * 2 ** attn[0]  # every model in the paper attends at 16x16 (cifar10: 32, 256x256: 256)
    model = UNet(**config, attn_resolutions=tuple(size // 2 ** i for i in attn), dropout=0.0, image_size=size,
                 T=1000, t_offset=1)  # T: all the authors' models; t_offset: they embedded 0-based t = paper t - 1
    model.load_state_dict(_from_diffusers(sd, model.state_dict(), path))
    return model.eval()


def load_pretrained_run(path, sigma=None):
    """(network, Diffusion, folder of the weights) for the programs, with the authors' settings: T = 1000,
    linear betas, eps; sigma^2 = beta at 32x32 and beta~ at 256x256, as their samplers (the decoder's
    log beta~_2 at t = 1 is ddpm.py's for both)."""
    try:
        model = load_pretrained(path)
    except Exception as e:  # missing, corrupt (safetensors or pickle errors), or another architecture
        raise UsageError(f"cannot load --pretrained {path}: {first_line(e, 300)}") from None
    sigma = sigma or ("beta" if model.image_size <= 32 else "beta_tilde")
    return model, runs.make_diffusion({"T": model.T}, sigma), runs.run_folder(path)


@dataclass(frozen=True)
class Weights:
    """A network to sample from or evaluate, whichever kind of weights it came from."""
    model: UNet
    diffusion: Diffusion      # with the sampler's sigma
    config: Optional[dict]    # the training run's settings; None for the authors' weights
    folder: str               # where the weights are: results go there by default
    step: Optional[int]
    kind: str                 # "EMA", "raw" or "pretrained" weights


def load_weights(checkpoint=None, pretrained=None, no_ema=False, sigma=None):
    """The one loader of sample.py and evaluate.py: a train.py run (default: the latest), or the authors' weights."""
    if pretrained:
        if no_ema:
            raise UsageError("--no-ema needs a checkpoint from train.py (a weights file holds one set of weights)")
        model, diffusion, folder = load_pretrained_run(pretrained, sigma)
        return Weights(model, diffusion, None, folder, None, "pretrained")
    path = checkpoint or runs.latest_checkpoint()
    model, diffusion, ckpt = runs.load_run(path, ema=not no_ema, sigma=sigma)
    return Weights(model, diffusion, ckpt["config"], runs.run_folder(path), ckpt.get("step"), "raw" if no_ema else "EMA")
