"""Tests for unet.py: the paper's sizes, the timestep embedding, input checks that read nothing from the
device, and the configuration's own checks."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import unet
from unet import UNet, build, timestep_embedding

def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, expected", [("cifar10", 35_746_307), ("celebahq", 113_673_219),
                                              ("lsun", 113_673_219)])
def test_paper_parameter_counts(preset, expected):
    with torch.device("meta"):  # shapes only: no memory, no init, no forward
        assert n_params(build(preset)) == expected


def test_digits_preset_is_small():
    assert 300_000 <= n_params(build("digits")) <= 2_000_000


@pytest.mark.parametrize("preset, shape", [("cifar10", (2, 3, 32, 32)), ("digits", (5, 1, 8, 8))])
def test_output_shape_and_channels_last(preset, shape):
    torch.manual_seed(0)
    model = build(preset).eval()
    for p in model.parameters():  # undo the zero init, so the output depends on everything
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(shape), torch.full(shape[:1], 7)
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == shape and torch.isfinite(out).all() and out.std() > 0.01
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), 7)  # int t
        assert cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cl, out, rtol=1e-4, atol=1e-5)


def test_zero_init_output():
    # conv2 of each block, the attention projections and conv_out start at zero, as the authors'.
    model = build("digits")
    assert torch.count_nonzero(model(torch.randn(3, 1, 8, 8), 10)) == 0
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if n.endswith("conv1.weight"))


def test_timestep_embedding_formula():
    t = np.array([1, 2, 17, 500, 999, 1000])
    half = 64
    freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))  # 1 ... 1e-4
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    got = timestep_embedding(torch.tensor(t), 128).double().numpy()
    assert freqs[0] == 1 and math.isclose(freqs[-1], 1e-4)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 arguments up to 1000 rad


def test_t_offset_embeds_t_minus_offset():
    torch.manual_seed(0)
    a = build("digits", dropout=0.0).eval()
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b = UNet(**{**a.config, "t_offset": 1}).eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 50, 1000])
    with torch.no_grad():
        torch.testing.assert_close(b(x, t), a(x, t - 1))
        assert not torch.allclose(b(x, t), a(x, t))


def test_config_round_trip_through_json():
    model = build("digits", ch=64)
    rebuilt = UNet(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.randn(2, 1, 16, 16), 1), r"\[B, 1, 8, 8\]"),
    (lambda m: m(torch.randn(2, 1, 8, 4), 1), r"\[B, 1, 8, 8\]"),
    (lambda m: m(torch.randn(2, 3, 8, 8), 1), r"in_channels=1"),
    (lambda m: m(torch.randn(8, 8), 1), r"\[B, 1, 8, 8\]"),
    (lambda m: m(torch.randn(2, 1, 8, 8), 0), r"1\.\.1000"),
    (lambda m: m(torch.randn(2, 1, 8, 8), [5, 1001]), r"1\.\.1000"),
    (lambda m: m(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])), r"integer"),
    (lambda m: m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3])), r"shape \[2\]"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(build("digits"))


@pytest.mark.parametrize("make, match", [
    (lambda: build("mnist"), r"unknown preset 'mnist'.*cifar10.*digits"),
    (lambda: build("cifar10", image_size=36), r"divisible by .* = 8"),
    (lambda: build("digits", ch=48), r"multiple of 32"),
])
def test_bad_configuration_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_import_does_not_pull_in_diffusers():
    code = "import sys, unet; assert 'diffusers' not in sys.modules and 'safetensors' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=unet.__file__.rsplit("/", 1)[0])
