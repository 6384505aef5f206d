"""Tests for pretrained.py: exact agreement with diffusers' UNet2DModel (the format of the authors' ported
weights), configurations read from the weights and checked against config.json, and bad files."""
import json
import math

import pytest
import torch

import unet
from pretrained import load_pretrained

# google/ddpm-cifar10-32 and google/ddpm-church-256 / ddpm-celebahq-256, as UNet2DModel configs.
HF_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=[128, 256, 256, 256],
                  down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
                  act_fn="silu", attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1,
                  time_embedding_type="positional")
HF_256 = {**HF_CIFAR10, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
          "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
          "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}



def n_params(model):
    return sum(p.numel() for p in model.parameters())


def random_diffusers(config, seed=0):
    """A UNet2DModel with every parameter random (none left at zero), so a wrong mapping shows."""
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return model


def save_port(model, directory, fmt="safetensors", old_names=False, config=True):
    """Write the model as the Hugging Face ports are laid out: weights (+ config.json)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_names:  # the deprecated attention names stored in the original google/ddpm-* files
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            sd = {k.replace(f".{new}.", f".{old}."): v for k, v in sd.items()}
    directory.mkdir(exist_ok=True)
    path = directory / f"diffusion_pytorch_model.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    if config:
        model.save_config(directory)
    return path


def reference_case(ref, batch, size, seed=0):
    """Random inputs, paper timesteps t (both ends included) and diffusers' output at t - 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ref.config.in_channels, size, size, generator=g)
    t = torch.randint(1, 1001, (batch,), generator=g)
    t[0], t[-1] = 1, 1000
    with torch.no_grad():
        expected = ref(x, t - 1).sample  # diffusers takes the authors' 0-based t
    assert expected.std() > 0.1, "degenerate reference output"
    return x, t, expected


def assert_same_outputs(model, case):
    x, t, expected = case
    with torch.no_grad():
        got = model(x, t)  # we take the paper's t
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def cifar_port():
    pytest.importorskip("diffusers")
    ref = random_diffusers(HF_CIFAR10)
    return ref, reference_case(ref, batch=3, size=32)


@pytest.mark.parametrize("fmt, old_names", [("safetensors", False), ("bin", True)])
def test_load_pretrained_matches_diffusers(cifar_port, tmp_path, fmt, old_names):
    ref, case = cifar_port
    path = save_port(ref, tmp_path / "ddpm-cifar10-32", fmt, old_names)
    model = load_pretrained(path.parent if old_names else path)  # the directory works too
    assert not model.training and model.t_offset == 1
    assert model.config["ch_mult"] == (1, 2, 2, 2) and model.config["attn_resolutions"] == (16,)
    assert_same_outputs(model, case)
    if not old_names:  # the test can fail: embedding the paper's t unshifted changes the output
        model.t_offset = 0
        with pytest.raises(AssertionError):
            assert_same_outputs(model, case)


def test_load_pretrained_infers_config_from_weights(cifar_port, tmp_path):
    ref, case = cifar_port
    model = load_pretrained(save_port(ref, tmp_path / "w", config=False))
    assert {k: v for k, v in model.config.items() if k not in ("dropout", "t_offset")} == \
        {k: v for k, v in unet.PRESETS["cifar10"].items() if k != "dropout"}
    assert_same_outputs(model, case)


def test_load_pretrained_rejects_bad_files(cifar_port, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download google/ddpm-cifar10-32"):
        load_pretrained(tmp_path / "nowhere" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_pretrained(tmp_path)  # a directory without weights
    sd = {k: v.contiguous() for k, v in cifar_port[0].state_dict().items()}
    cases = {
        "extra": ({**sd, "down_blocks.0.resnets.0.extra.weight": torch.zeros(1)}, r"unrecognised key 'down_blocks\.0"),
        "missing": ({k: v for k, v in sd.items() if not k.startswith("conv_norm_out.")}, r"missing 2 parameter"),
        "qkv": ({k: v for k, v in sd.items() if k != "mid_block.attentions.0.to_v.weight"}, r"missing attention"),
        "shape": ({**sd, "conv_out.bias": torch.zeros(4)}, r"shape \[4\] for 'conv_out.bias'"),
    }
    for name, (bad, match) in cases.items():
        path = tmp_path / f"{name}.bin"
        torch.save(bad, path)
        with pytest.raises(ValueError, match=match):
            load_pretrained(path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**HF_CIFAR10, "flip_sin_to_cos": True}))
    with pytest.raises(ValueError, match="flip_sin_to_cos=True is not the DDPM architecture"):
        load_pretrained(tmp_path / "extra.bin", config_path=config)


@pytest.mark.slow
def test_load_pretrained_matches_diffusers_256(tmp_path):
    pytest.importorskip("diffusers")
    ref = random_diffusers(HF_256)
    model = load_pretrained(save_port(ref, tmp_path / "ddpm-church-256"))
    assert n_params(model) == 113_673_219 and model.config["attn_resolutions"] == (16,)
    assert_same_outputs(model, reference_case(ref, batch=1, size=256))
    del model
    # Without config.json the 256x256 configuration is recognised from the weights alone.
    (tmp_path / "ddpm-church-256" / "config.json").unlink()
    assert load_pretrained(tmp_path / "ddpm-church-256").config["image_size"] == 256
