"""Tests of sample.py on the CPU, with a tiny network and T = 20 so each run takes a second or two."""
import math
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import pretrained
import runs
import figures
import sample
from ddpm import Diffusion, linear_betas
from conftest import HERE, TINY, run_program, tiny_port

pytestmark = pytest.mark.usefixtures("one_thread")
import train

RUN = os.path.join(runs.RUNS, "r")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step train.py run (digits 8x8, T = 20), made once and copied into each test's directory."""
    where = tmp_path_factory.mktemp("train")
    cwd = os.getcwd()
    os.chdir(where)
    try:
        train.main([*TINY, "--steps", "3", "--out", "r"])
    finally:
        os.chdir(cwd)
    return where / "r"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, RUN)


def run(*argv):
    return run_program(sample.main, ["--device", "cpu", "--amp", "off", *argv])  # float32 on every CPU


def npz(out):
    with np.load(os.path.join(out, "samples.npz")) as f:
        return f["arr_0"]


def listing():
    return sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk(".") for f in fs)


def test_bf16_sampling_draws_the_same_images_up_to_rounding():
    """--amp bf16 changes only the network's arithmetic (about 3 significant digits): with the same noise,
    the chain ends at nearly the same images, returned in float32."""
    model, diffusion, _ = runs.load_run(RUN)
    x32, x16 = (ddpm.generate(model, diffusion, 16, seed=3, progress=False, amp=amp)
                for amp in (None, torch.bfloat16))
    assert x16.dtype == torch.float32 and not torch.equal(x32, x16)  # bf16 was really used
    assert (x32 - x16).abs().max() < 0.05  # on the [-1, 1] scale; a grey level of the digits is 0.125
    assert run("--n", "16", "--seed", "3", "--out", "b", "--amp", "bf16") == 0 and npz("b").shape == (16, 8, 8, 1)


def test_writes_grid_pngs_and_npz_and_never_overwrites():
    assert run("--n", "5", "--batch-size", "2") == 0
    out = os.path.join(RUN, "samples")
    a = npz(out)
    assert a.dtype == np.uint8 and a.shape == (5, 8, 8, 1)  # NHWC, grey digits keep one channel
    assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        with Image.open(os.path.join(out, "images", f"{i:06d}.png")) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), a[i, ..., 0])
    with Image.open(os.path.join(out, "grid.png")) as im:
        assert max(im.size) >= 256  # 8x8 digits, enlarged to be visible
    before = os.path.getmtime(os.path.join(out, "samples.npz"))
    assert run("--n", "2") == 0  # a second run takes a fresh directory
    assert npz(os.path.join(RUN, "samples-2")).shape == (2, 8, 8, 1)
    assert os.path.getmtime(os.path.join(out, "samples.npz")) == before
    assert run("--n", "3", "--force") == 0  # asked to: replaces, without stale images from the larger --n
    assert npz(out).shape[0] == 3 and len(os.listdir(os.path.join(out, "images"))) == 3


def test_same_seed_same_images_whatever_the_batch_size():
    assert run("--n", "5", "--batch-size", "5", "--out", "a") == 0
    assert run("--n", "5", "--batch-size", "2", "--out", "b") == 0
    assert run("--n", "5", "--batch-size", "5", "--out", "c") == 0
    assert run("--n", "5", "--seed", "1", "--out", "d") == 0
    assert np.array_equal(npz("a"), npz("c"))
    assert np.abs(npz("a").astype(int) - npz("b")).max() <= 1  # at most float rounding of batched convs
    assert not np.array_equal(npz("a"), npz("d"))
    model, diffusion, _ = runs.load_run(RUN)
    x = [ddpm.generate(model, diffusion, 7, 3, batch_size=b) for b in (7, 3, 1)]
    torch.testing.assert_close(x[1], x[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(x[2], x[0], rtol=0, atol=1e-5)


def test_groups_have_their_own_generators(monkeypatch):
    model, diffusion, _ = runs.load_run(RUN)
    whole = ddpm.generate(model, diffusion, 5, seed=2)
    monkeypatch.setattr(ddpm, "GROUP", 2)  # groups of 2, 2, 1: the first group is the same images
    grouped = ddpm.generate(model, diffusion, 5, seed=2)
    first = ddpm.generate(model, diffusion, 2, seed=2)
    assert grouped.shape == whole.shape and torch.equal(grouped[:2], first)
    assert not torch.allclose(grouped[2:4], first)  # group 1 is seeded differently from group 0


def test_clipping_keeps_samples_in_range_and_no_clip_is_algorithm_2():
    model, diffusion, _ = runs.load_run(RUN)
    x = ddpm.generate(model, diffusion, 4)
    assert x.shape == (4, 1, 8, 8) and x.abs().max() <= 1  # at t = 1 the mean is x0_hat itself
    expected = diffusion.p_sample_loop(model, (4, 1, 8, 8), clip=False,
                                       generator=torch.Generator().manual_seed(0))  # group 0, seed 0
    assert torch.equal(ddpm.generate(model, diffusion, 4, clip=False), expected)


def test_sigma_flag_overrides_the_checkpoint():
    w = pretrained.load_weights(checkpoint=RUN)
    diffusion = w.diffusion
    assert diffusion.sigma == "beta" and diffusion.T == 20 and w.config["dataset"] == "digits" and w.folder == RUN
    other = pretrained.load_weights(checkpoint=RUN, sigma="beta_tilde").diffusion
    assert other.sigma == "beta_tilde" and torch.equal(other.beta, diffusion.beta)


def grid_size(rows, cols, tile, min_size):
    """data.grid_image's size: 1-pixel padding, enlarged by a whole factor to reach min_size."""
    w, h = cols * (tile + 1) + 1, rows * (tile + 1) + 1
    scale = max(1, math.ceil(min_size / max(w, h)))
    return w * scale, h * scale


def test_timesteps_of_the_figures():
    assert figures.timesteps(1000) == [1000, 750, 500, 250, 100, 1]
    assert figures.timesteps(20) == [20, 15, 10, 5, 2, 1]
    assert figures.timesteps(1) == [1]


def test_figures_have_the_expected_sizes_and_frames():
    assert run("--n", "5", "--figures", "--out", "f") == 0
    cols = len(figures.timesteps(20)) + 1  # t = 20, 15, 10, 5, 2, 1, and x_0
    w, h = grid_size(2 * figures.STRIP, cols, 8, figures.FIGURE_SIZE)  # rows: x_t and x0_hat per sample
    with Image.open("f/reverse.png") as im:
        assert im.size == (w + figures.LABEL_W, h + figures.LABEL_H)
    w, h = grid_size(figures.STRIP, cols, 8, figures.FIGURE_SIZE)
    with Image.open("f/forward.png") as im:
        assert im.size == (w, h + figures.LABEL_H)
    with Image.open("f/denoising.gif") as im:
        assert im.n_frames == 20 + 1  # every step (T // 50 < 1) and the final x_0
        im.seek(im.n_frames - 1)
        assert im.info["duration"] == 2000
    w, h = grid_size(4, 3 + 1, 8, figures.FIGURE_SIZE)  # splits at t = 20, 15, 10, 5: x_t and 3 samples
    with Image.open("f/shared_latent.png") as im:
        assert im.size == (w + figures.LABEL_W, h + figures.LABEL_H)
    w, h = grid_size(sample.PAIRS, 13, 8, figures.FIGURE_SIZE)  # Source, Rec., 0.1 ... 0.9, Rec., Source
    with Image.open("f/interpolation.png") as im:
        assert im.size == (w, h + figures.LABEL_H)
    w, h = grid_size(9, 13, 8, figures.FIGURE_SIZE)  # 0, T/8, ..., T steps
    with Image.open("f/coarse_to_fine.png") as im:
        assert im.size == (w + 64, h + figures.LABEL_H)


def test_figures_of_a_folder_with_a_tiny_test_split(monkeypatch):
    """Fig. 8 needs pairs of held-out images: a test/ split of one image still gives one (itself)."""
    for split, n in (("train", 40), ("test", 1)):
        os.makedirs(f"imgs/{split}")
        for i in range(n):
            Image.fromarray(np.full((8, 8), 6 * i, np.uint8)).save(f"imgs/{split}/{i}.png")
    assert run_program(train.main, [*TINY, "--dataset", "imgs", "--image-size", "8", "--steps", "2",
                                    "--out", "f"]) == 0
    assert run("--checkpoint", "f", "--n", "2", "--figures", "--out", "s") == 0
    with Image.open("s/interpolation.png") as im:
        assert im.size[1] == grid_size(1, 13, 8, figures.FIGURE_SIZE)[1] + figures.LABEL_H


def linear_model(x, t):
    """A float64 stand-in network: eps_theta = 0.3 x + t / 100, exact in any batch."""
    return 0.3 * x + t.reshape(-1, 1, 1, 1).double() / 100


def test_interpolation_columns_are_the_reconstructions_and_zero_steps_mix_pixels():
    d, g = Diffusion(linear_betas(20)), torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    mixed = figures.interpolate(linear_model, d, a, b, 10, seed=3)
    assert mixed.shape == (2, 11, 1, 4, 4)
    alone_a = figures.interpolate(linear_model, d, a, a, 10, seed=3, lambdas=[0.0])[:, 0]
    alone_b = figures.interpolate(linear_model, d, b, b, 10, seed=3, lambdas=[1.0])[:, 0]
    assert torch.equal(mixed[:, 0], alone_a) and torch.equal(mixed[:, -1], alone_b)
    assert not torch.allclose(mixed[:, 0], mixed[:, 1])
    pixels = figures.interpolate(linear_model, d, a, b, 0, seed=3)
    lam = torch.tensor(figures.LAMBDAS, dtype=torch.float64).reshape(1, -1, 1, 1, 1)
    assert torch.allclose(pixels, (1 - lam) * a[:, None] + lam * b[:, None], rtol=0, atol=1e-15)


def test_shared_latent_continuations_share_x_t_and_differ_after():
    d, chain = Diffusion(linear_betas(20)), {}
    groups = figures.shared_latents(linear_model, d, (1, 4, 4), seed=7, k=3)
    assert list(groups) == [20, 15, 10, 5]
    d.p_sample_loop(linear_model, (1, 1, 4, 4), True, torch.Generator().manual_seed(7),
                    callback=lambda t, x_t, x0_hat: chain.update({t: x_t.clone()}))
    for t, (x_t, samples) in groups.items():
        assert torch.equal(x_t, chain[t])  # the same chain down to the split
        assert samples.shape == (3, 1, 4, 4)
        assert all(not torch.allclose(samples[i], samples[j]) for i in range(3) for j in range(i))


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", None)  # every mistake is found before any image is drawn
    with open("corrupt.pt", "wb") as f:
        f.write(b"not a checkpoint")
    with open("pickle.bin", "wb") as f:
        pickle.dump({"a": 1}, f)
    open("a-file", "w").close()
    ckpt = runs.load_checkpoint(RUN)
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "ch": 64}}, "wrong_shapes.pt")
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "heads": 4}}, "unknown_key.pt")
    os.makedirs("taken")
    with open("taken/mine.txt", "w") as f:
        f.write("keep")
    before = listing()
    cases = {
        ("--n", "0"): "must be positive", ("--n", "-3"): "must be positive", ("--batch-size", "0"): "positive",
        ("--n", "many"): "invalid", ("--sigma", "big"): "invalid choice", ("--device", "tpu"): "unknown or unsupported device",
        ("--checkpoint", "nowhere"): "train.py", ("--checkpoint", "corrupt.pt"): "not a readable checkpoint",
        ("--checkpoint", "wrong_shapes.pt"): "do not fit", ("--checkpoint", "unknown_key.pt"): "heads",
        ("--out", "taken"): "exists", ("--pretrained", "missing.safetensors"): "huggingface-cli download",
        ("--pretrained", "corrupt.pt"): "cannot load --pretrained corrupt.pt",
        ("--pretrained", RUN, "--no-ema"): "--no-ema", ("--pretrained", "x", "--checkpoint", RUN): "not allowed",
        ("--pretrained", "pickle.bin"): "cannot load --pretrained pickle.bin", ("--out", "a-file/x"): "cannot write",
    }
    for argv, message in cases.items():
        capsys.readouterr()
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "weights_only" not in err, (argv, err)
    assert listing() == before  # nothing written, nothing overwritten
    shutil.rmtree(runs.RUNS)
    assert run() == 2 and "run `python train.py` first" in capsys.readouterr().err


def test_command_line_without_a_checkpoint():
    shutil.rmtree(runs.RUNS)
    p = subprocess.run([sys.executable, os.path.join(HERE, "sample.py")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "python train.py" in p.stderr


# ---- the authors' weights, through pretrained.load_pretrained ----------------------------------------------
@pytest.mark.slow
def test_pretrained_uses_the_authors_sampler_settings():
    pytest.importorskip("diffusers")
    small, large = tiny_port("port32", 8), tiny_port("port256", 64)
    w = pretrained.load_weights(pretrained=small)
    assert (w.diffusion.T, w.diffusion.sigma, w.config, w.folder) == (1000, "beta", None, "port32")
    assert pretrained.load_weights(pretrained=large).diffusion.sigma == "beta_tilde"
    assert pretrained.load_weights(pretrained=large, sigma="beta").diffusion.sigma == "beta"
    assert run("--pretrained", small, "--n", "2", "--figures") == 0  # all 1,000 steps of a tiny network
    a = npz("port32/samples")
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    with Image.open("port32/samples/denoising.gif") as im:
        assert im.n_frames == 50 + 1 + 1  # t = 1000, 980, ..., 20; t = 1; x_0
    assert os.path.isfile("port32/samples/forward.png")  # from its own samples: no dataset to download


def test_pretrained_pickle_is_one_line_without_pytorch_warnings():
    """pytest would swallow the unpickler's warnings: run the command line, as a user does."""
    with open("pickle.bin", "wb") as f:
        pickle.dump({"a": 1}, f)
    p = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--pretrained", "pickle.bin"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "weights_only" not in p.stderr, p.stderr
