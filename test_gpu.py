"""Tests that need a CUDA GPU (skipped elsewhere, so in CI): the fast paths agree with float32, a step never
waits for the host, resume and sampling are reproducible. `bash gpu_check.sh` runs them with the rest."""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cli
import runs
import train
from conftest import TINY, run_program
from config import NETWORK, Config
from ddpm import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = [a if a != "cpu" else "cuda" for a in TINY]  # the tiny run, on the GPU


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def tiny_run(**settings):
    """A train.py Run of the digits network on the GPU, on random digits, its weights seeded the same."""
    images = torch.randint(0, 17, (4096, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    c = Config(**{**dict(steps=1000, lr_schedule="constant"), **settings})
    for k in NETWORK:
        setattr(c, k, train.unet.PRESETS["digits"][k])
    r = train.build(c, images, 17, torch.device("cuda"), (0, 1))
    r.net = train.compiled(r)
    return r


def test_a_training_step_never_waits_for_the_gpu():
    r = tiny_run()
    for _ in range(2):  # the first steps move the schedule's tables and the epoch's order (32 steps) to the GPU
        train.train_step(r)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that waits for the GPU raises
    try:
        for _ in range(5):
            train.train_step(r)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert r.step == 7


@pytest.mark.parametrize("fast", [dict(amp="bf16"), dict(compile="on"), dict(amp="bf16", compile="on")])
def test_bf16_and_compiled_steps_are_finite_and_close_to_float32(fast):
    losses = {}
    for name, settings in (("fp32", {}), ("fast", fast)):
        torch.manual_seed(0)
        r = tiny_run(**settings)
        losses[name] = torch.stack([train.train_step(r) for _ in range(5)]).float().cpu()
    assert torch.isfinite(losses["fast"]).all()
    assert torch.allclose(losses["fast"], losses["fp32"], rtol=0.05), losses  # bf16: ~3 significant digits


def test_resume_on_the_gpu_is_bitwise_exact():
    torch.use_deterministic_algorithms(True)  # an operation without a deterministic kernel raises
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels' backward uses atomics
            flags = [*GPU, "--dropout", "0.1", "--ckpt-every", "100", "--lr-schedule", "constant"]
            assert run_program(train.main, [*flags, "--steps", "16", "--out", "straight"]) == 0
            assert run_program(train.main, [*flags, "--steps", "9", "--out", "split"]) == 0
            assert run_program(train.main, ["--resume", "split", "--steps", "16"]) == 0  # stays on the GPU
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = runs.load_checkpoint("straight"), runs.load_checkpoint("split")
    assert b["config"]["device"] == "cuda"
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_cpu_run_resumes_on_the_cpu_and_moves_to_the_gpu_when_asked(capsys):
    assert run_program(train.main, [*TINY, "--steps", "3", "--out", "r"]) == 0
    assert run_program(train.main, ["--resume", "r", "--steps", "5"]) == 0  # no --device: the CPU again
    assert "cpu, 1 process" in capsys.readouterr().out
    assert run_program(train.main, ["--resume", "r", "--steps", "7", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "another kind of device" in out and "cuda" in out
    assert runs.load_checkpoint("r")["config"]["device"] == "cuda"


def test_the_sampler_draws_the_same_images_twice_with_one_seed():
    model, diffusion, _ = runs.load_run(make_run())
    model.cuda()
    a, b = (generate(model, diffusion, 16, seed=3) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (16, 1, 8, 8)


def make_run():
    assert run_program(train.main, [*GPU, "--steps", "3", "--out", "g"]) == 0
    return "g"


def test_cli_picks_the_gpu_by_default():
    assert cli.pick_device(None).type == "cuda" and os.environ.get("CUDA_VISIBLE_DEVICES") != ""
