"""Tests of evaluate.py on the CPU: a tiny network with T = 20, so each takes seconds.

The bound's arithmetic is checked against scipy and against a Monte Carlo estimate over random t;
the Frechet distance against closed forms; the program end to end and on bad input.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import cli
import data
import pretrained
import quality
import runs
from ddpm import Diffusion
import evaluate
from conftest import HERE, TINY, run_program, tiny_port

pytestmark = pytest.mark.usefixtures("one_thread")
import train
import unet

FAST = ["--n-test", "16", "--n-samples", "16", "--batch-size", "16", "--device", "cpu", "--amp", "off"]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    """A digits checkpoint after 3 training steps, written once for the whole module."""
    out = tmp_path_factory.mktemp("trained") / "r"
    cli.run(lambda: train.main([*TINY, "--steps", "3", "--out", str(out)]))
    return str(out / runs.CHECKPOINT)


@pytest.fixture
def tiny(ckpt_path):
    """(model, diffusion, x0): the tiny network and 8 test digits in [-1, 1] (17 grey levels)."""
    model, diffusion, _ = runs.load_run(ckpt_path)
    test, _, levels, _ = data.load_dataset("digits", "test")
    assert levels == 17 and diffusion.T == 20
    return model, diffusion, data.to_model_range(test[:8], levels)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(*argv):
    return run_program(evaluate.main, argv)


# ---- the bound ---------------------------------------------------------------------------------
def test_parts_of_the_bound_add_up_to_the_total(tiny):
    model, diffusion, x0 = tiny
    b = evaluate.bound(model, diffusion, x0.split(3), 17, generator=torch.Generator().manual_seed(0))
    assert b["terms"].shape == (8, 20) and (b["terms"] > 0).all() and (b["prior"] >= 0).all()
    assert torch.equal(b["total"], b["prior"] + b["terms"].sum(1))
    with torch.no_grad():  # the same numbers as ddpm.py's own total, one batch at a time
        direct = diffusion.bound_bpd(model, x0[:3], 17, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(b["total"][:3], direct["total"].double(), rtol=1e-6)
    s = evaluate.summarize(b, 17)
    assert math.isclose(s["total_bpd"], s["L_T"] + s["sum_L_t_minus_1"] + s["L_0"], rel_tol=1e-12)
    assert math.isclose(s["L_0"] + s["sum_L_t_minus_1"], sum(s["terms_bpd"]), rel_tol=1e-12)
    assert math.isclose(s["total_bpd_se"], b["total"].std().item() / math.sqrt(8), rel_tol=1e-12)


def test_bits_per_dim_against_scipy(tiny):
    """One decoder term and one KL term, in nats computed independently, / (ln 2 * dims) == bits/dim."""
    model, diffusion, x0 = tiny
    D, half = x0[0].numel(), 1.0 / 16  # 64 pixels; bins of width 2/16 around 17 grey levels
    betas = np.linspace(1e-4 * 50, 0.02 * 50, 20).clip(max=0.999)
    a_bar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    # L_0 at t = 1: -log of the Gaussian N(mu_theta(x_1), beta_1) integrated over each pixel's bin (Eq. 13)
    x1 = diffusion.q_sample(x0, 1, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    with torch.no_grad():
        mean = diffusion.p_mean_var(model, x1, 1)[0].numpy()
        bpd = diffusion.vb_term_bpd(model, x0, x1, 1, levels=17).numpy()
    # The decoder's variance is beta~_2, not beta_1, as the authors' (see ddpm.Diffusion).
    x, sd = x0.double().numpy(), math.sqrt((1 - a_bar[0]) / (1 - a_bar[1]) * betas[1])
    upper = np.where(x > 1 - half, 1.0, stats.norm.cdf(x + half, mean, sd))
    lower = np.where(x < -1 + half, 0.0, stats.norm.cdf(x - half, mean, sd))
    nats = -np.log(upper - lower).reshape(8, -1).sum(1)
    assert np.allclose(bpd, nats / (math.log(2) * D), rtol=1e-4)  # float32 network
    # L_{t-1} at t = 5: KL(q(x_4 | x_5, x_0) || p_theta(x_4 | x_5)) with the posterior of Eq. 7 in numpy
    t = 5
    x5 = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    with torch.no_grad():
        mean = diffusion.p_mean_var(model, x5, t)[0].numpy()
        bpd = diffusion.vb_term_bpd(model, x0, x5, t, levels=17).numpy()
    ab, ab_prev, beta = a_bar[t - 1], a_bar[t - 2], betas[t - 1]
    mu_q = (math.sqrt(ab_prev) * beta * x + math.sqrt(1 - beta) * (1 - ab_prev) * x5.double().numpy()) / (1 - ab)
    var_q, var_p = (1 - ab_prev) / (1 - ab) * beta, beta
    kl = 0.5 * (np.log(var_p / var_q) + var_q / var_p + (mu_q - mean) ** 2 / var_p - 1)
    assert np.allclose(bpd, kl.reshape(8, -1).sum(1) / (math.log(2) * D), rtol=1e-4)


def test_exact_bound_agrees_with_monte_carlo_over_t(tiny):
    """L = L_T + T * E_{t ~ U{1..T}}[L_{t-1}], estimated from uniformly drawn t, agrees with the sum of all T."""
    model, _, x0 = tiny
    # A gentler 20-step schedule than linear_betas(20), whose capped beta_T = 0.999 makes the last
    # term dwarf the others (and so the Monte Carlo variance). The identity holds for any schedule.
    diffusion = Diffusion(torch.linspace(0.005, 0.3, 20, dtype=torch.float64))
    T, K, R = diffusion.T, 2000, 8
    g = torch.Generator().manual_seed(2)
    exact = evaluate.bound(model, diffusion, x0.repeat(R, 1, 1, 1).split(128), 17, generator=g)["total"]
    images = torch.randint(len(x0), (K,), generator=g)
    ts = torch.randint(1, T + 1, (K,), generator=g)
    values = torch.empty(K, dtype=torch.float64)
    with torch.no_grad():
        for t in ts.unique().tolist():
            k = (ts == t).nonzero().squeeze(1)
            x = x0[images[k]]
            xt = diffusion.q_sample(x, t, torch.randn(x.shape, generator=g))
            values[k] = (diffusion.prior_bpd(x) + T * diffusion.vb_term_bpd(model, x, xt, t, 17)).double()
    se = math.sqrt(exact.var().item() / len(exact) + values.var().item() / K)
    assert se < 0.03 * exact.mean().item()  # precise enough to mean something
    assert abs(exact.mean().item() - values.mean().item()) < 4 * se


# ---- the Frechet distance ------------------------------------------------------------------------
def exact_moments(n, d, rng):
    """n points in R^d whose sample mean is exactly 0 and sample covariance exactly I."""
    x = rng.normal(size=(n, d))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = exact_moments(500, 6, rng)
    mu = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    assert abs(quality.frechet_distance(a, a)) < 1e-8
    assert math.isclose(quality.frechet_distance(a, a + mu), mu @ mu, rel_tol=1e-9)  # N(0,I) vs N(mu,I)
    b = exact_moments(300, 6, rng)  # another set with the same moments: distance 0
    assert abs(quality.frechet_distance(a, b)) < 1e-8
    assert math.isclose(quality.frechet_distance(a, 2 * b + mu), mu @ mu + 6 * (2 - 1) ** 2, rel_tol=1e-9)
    # random samples from N(0, I) and N(mu, I): ||mu||^2 up to sampling error; grows with the shift
    x, y = rng.normal(size=(20000, 6)), rng.normal(size=(20000, 6))
    assert abs(quality.frechet_distance(x, y)) < 0.01
    sd = 2 * math.sqrt(mu @ mu) * math.sqrt(2 / 20000)  # of the cross term 2 mu.(mean_x - mean_y)
    assert abs(quality.frechet_distance(x, y + mu) - mu @ mu) < 4 * sd + 0.01
    shifts = [quality.frechet_distance(x, y + s) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(np.diff(shifts) > 0)
    assert math.isclose(quality.frechet_distance(x[:, :1], y[:, :1] + 3), 9, abs_tol=0.1)  # d = 1 works


def test_classifier_is_deterministic_and_accurate():
    train_x, train_y, levels, _ = data.load_dataset("digits", "train")
    test_x, test_y, _, _ = data.load_dataset("digits", "test")
    train_x, test_x = data.to_model_range(train_x, levels), data.to_model_range(test_x, levels)
    (f1, h1), (f2, _) = (quality.train_classifier(train_x, train_y, seed=0, steps=300) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(f1.parameters(), f2.parameters()))
    with torch.no_grad():
        assert (h1(f1(test_x)).argmax(1) == test_y).float().mean() > 0.9
        floor = quality.frechet_distance(f1(train_x).numpy(), f1(test_x).numpy())
        noise = quality.frechet_distance(f1(torch.rand_like(test_x) * 2 - 1).numpy(), f1(test_x).numpy())
    assert 0 < floor < noise / 10


def test_the_floor_is_measured_at_the_samples_size_and_falls_as_it_grows():
    """The Frechet distance of a finite set is biased upward, more for fewer images, so the floor a
    perfect model reaches is the training images' distance at the samples' own number."""
    train, test = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    floors = {n: quality.digit_metrics(train, test, 0, n)[1] for n in (100, 400, 1500, 5000)}
    assert floors[100]["floor_train_vs_test"] > floors[400]["floor_train_vs_test"] > floors[1500]["floor_train_vs_test"]
    assert len(set(floors[400]["floor_train_vs_test_draws"])) == quality.FLOOR_SETS  # different sets of 400
    assert floors[5000]["floor_n_train"] == 1500 and floors[5000]["floor_train_vs_test_draws"] == \
        floors[1500]["floor_train_vs_test_draws"]  # all 1,500: one set
    assert quality.over_draws([dict(a=1.0), dict(a=3.0)]) == dict(a=2.0, a_draws=[1.0, 3.0])
    assert cli.spread([1.0, 3.0], "{:.1f}") == "2.0 (1.0-3.0)" and cli.spread([2.0], "{:.1f}") == "2.0"


# ---- the program ---------------------------------------------------------------------------------
def test_end_to_end_writes_results_and_plot(ckpt_path, capsys):
    assert run("--checkpoint", ckpt_path, "--out", "o", *FAST) == 0
    r = json.load(open("o/results.json"))
    b, q = r["bound"], r["quality"]
    assert b["n_images"] == 16 and len(b["terms_bpd"]) == 20 and r["levels"] == 17 and r["ema"]
    assert math.isclose(b["total_bpd"], b["L_T"] + b["sum_L_t_minus_1"] + b["L_0"], rel_tol=1e-9)
    assert b["total_bpd_se"] > 0 and q["n_samples"] == 16 and q["frechet_distance"] > q["floor_train_vs_test"] > 0
    assert q["classifier_test_accuracy"] > 0.9 and 0 <= q["confident"] <= 1 and q["confident_test"] > 0.8
    assert len(b["rate_bpd"]) == len(b["distortion_rmse"]) == 20  # Sec. 4.3, at every t
    assert b["rate_bpd"][0] + b["L_0"] == pytest.approx(b["total_bpd"], rel=1e-9)
    assert 0 < b["distortion_rmse"][0] < b["distortion_rmse"][-1] <= 16  # RMSE on the digits' 0..16 scale
    assert [p["reverse_steps"] for p in q["x0_hat_quality"]] == list(range(20))  # Fig. 10: T // 20 = 1
    assert q["draws"] == 3 and len(set(q["frechet_distance_draws"])) == 3  # three independent draws (seeds)
    for name in ("frechet_distance", "frechet_mean_term", "confident", "floor_train_vs_test"):  # mean of draws
        assert q[name] == pytest.approx(np.mean(q[f"{name}_draws"]), rel=1e-12)
    assert all(0 < m < f for m, f in zip(q["frechet_mean_term_draws"], q["frechet_distance_draws"]))
    assert q["floor_n_train"] == 16  # the floor at the samples' own size
    assert q["memorisation"]["ratio"] > 0 and q["memorisation"]["median_test_to_train"] > 0
    for f in ("rate_distortion.png", "x0_quality.png", "nearest.png"):
        assert os.path.getsize(os.path.join("o", f)) > 1000, f
    with Image.open("o/bound_terms.png") as im:
        assert im.size[0] > 300
    assert "NOT the Inception FID" in capsys.readouterr().out
    # samples from sample.py instead: the test digits themselves, as uint8 NHWC 0..255, come closest
    test = data.load_dataset("digits", "test").images
    np.savez("s.npz", (test.permute(0, 2, 3, 1).float() * 255 / 16).round().to(torch.uint8).numpy())
    assert run("--checkpoint", ckpt_path, "--out", "o", *FAST, "--samples", "s.npz", "--n-test", "0") == 2  # exists
    assert run("--checkpoint", ckpt_path, "--out", "o", *FAST, "--samples", "s.npz", "--n-test", "0", "--force") == 0
    r = json.load(open("o/results.json"))
    assert "bound" not in r and r["quality"]["n_samples"] == 297 and abs(r["quality"]["frechet_distance"]) < 1e-4
    assert r["quality"]["draws"] == 1 and r["quality"]["floor_n_train"] == 297  # given samples: one draw
    os.makedirs("pngs")  # or a folder of PNGs
    for i, digit in enumerate(test[:20, 0]):
        Image.fromarray((digit.float() * 255 / 16).round().to(torch.uint8).numpy()).save(f"pngs/{i:03d}.png")
    assert run("--checkpoint", ckpt_path, "--out", "p", *FAST, "--samples", "pngs", "--n-test", "0") == 0
    assert json.load(open("p/results.json"))["quality"]["n_samples"] == 20
    os.rename("s.npz", "pngs/samples.npz")  # sample.py's folder: its samples.npz is read, not grid.png & co.
    Image.new("L", (300, 300)).save("pngs/grid.png")
    assert run("--checkpoint", ckpt_path, "--out", "p", *FAST, "--samples", "pngs", "--n-test", "0", "--force") == 0
    assert json.load(open("p/results.json"))["quality"]["n_samples"] == 297


def test_a_failure_after_the_bound_keeps_the_bound(ckpt_path, monkeypatch):
    def fails(*args):
        raise RuntimeError("out of memory while sampling")
    monkeypatch.setattr(evaluate, "evaluate_quality", fails)
    with pytest.raises(RuntimeError):
        run("--checkpoint", ckpt_path, "--out", "o", *FAST)
    assert json.load(open("o/results.json"))["bound"]["n_images"] == 16


def rgb_folder(path, n, size=8):
    """A tiny folder of RGB images with train/ and test/ splits."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        os.makedirs(os.path.join(path, split))
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{path}/{split}/{i}.png")


@pytest.mark.slow
def test_pretrained_bound_equals_the_same_network_through_a_checkpoint(capsys):
    """The authors' weights (a tiny diffusers port here) on a folder's test split: the bound is the bound of
    the same network saved as train.py saves its runs (t_offset = 1 travels in model_config)."""
    pytest.importorskip("diffusers")
    port, flags = tiny_port("port", 8), ["--n-test", "4", "--n-samples", "0", "--batch-size", "4", "--device", "cpu"]
    rgb_folder("imgs", 4)
    assert run("--pretrained", port, "--dataset", "imgs", *flags) == 0
    assert "images x T = 1,000 steps = 4,000 image-steps" in capsys.readouterr().out  # the cost, up front
    a = json.load(open("port/results.json"))
    assert a["sigma"] == "beta" and a["clip"] and a["T"] == 1000 and a["bound"]["split"] == "test"
    model = pretrained.load_pretrained(port)
    torch.save(dict(model=model.state_dict(), ema=model.state_dict(), step=0, model_config=model.config,
                    config=dict(dataset="imgs", T=1000, image_size=8)), "ckpt.pt")
    assert run("--checkpoint", "ckpt.pt", "--out", "same", *flags) == 0
    b = json.load(open("same/results.json"))
    assert b["bound"]["total_bpd"] == pytest.approx(a["bound"]["total_bpd"], rel=1e-6)
    assert b["bound"]["rate_bpd"] == pytest.approx(a["bound"]["rate_bpd"], rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "digits"], "is for 3x8x8 images, but digits has 1x8x8"),
    (["--dataset", "flat"], "flat has no test split"),
    ([], "pass --dataset"),
    (["--no-ema"], "--no-ema needs a checkpoint"),
    (["--checkpoint", "x"], "not allowed with argument"),
])
def test_pretrained_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setattr(evaluate, "bound", None)
    port = tiny_port("port", 8)
    os.makedirs("flat")
    Image.new("RGB", (8, 8)).save("flat/a.png")
    assert run("--pretrained", port, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def forge(path, ckpt_path, **model_config):
    """A checkpoint like the tiny one, with other model_config values (fresh weights if channels change)."""
    ckpt = runs.load_checkpoint(ckpt_path)
    ckpt["model_config"] = {**ckpt["model_config"], **model_config}
    if "in_channels" in model_config:
        ckpt["model"] = ckpt["ema"] = unet.UNet(**ckpt["model_config"]).state_dict()
        ckpt["config"] = {**ckpt["config"], "dataset": "rgb", "image_size": 8}
    torch.save(ckpt, path)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "nothing-here"], "no checkpoint at nothing-here"),
    ([], "no checkpoint found under runs/"),
    (["--checkpoint", "big.pt"], "is for 1x16x16 images, but digits has 1x8x8"),
    (["--checkpoint", "CKPT", "--dataset", "rgb"], "is for 1x8x8 images, but rgb has 3x8x8"),
    (["--checkpoint", "CKPT", "--samples", "missing.npz"], "no sample folder or .npz file at missing.npz"),
    (["--checkpoint", "CKPT", "--samples", "missing/"], "no sample folder"),
    (["--checkpoint", "CKPT", "--samples", "rgb.npz"], "holds 3x8x8 images, the model makes 1x8x8"),
    (["--checkpoint", "CKPT", "--n-test", "300"], "more than the 297 test images"),
    (["--checkpoint", "CKPT", "--n-test", "-1"], "must be at least 0"),
    (["--checkpoint", "CKPT", "--sigma", "huge"], "invalid choice"),
    (["--checkpoint", "CKPT", "--out", "done"], "done/results.json was not written by these programs"),
    (["--checkpoint", "rgb.pt", "--samples", "missing"], "no sample folder"),
    (["--checkpoint", "rgb.pt", "--samples", "rgb"], "pip install torch-fidelity"),
    (["--checkpoint", "CKPT", "--samples", "one.npz"], "holds 1 image: a Frechet distance needs at least 2"),
    (["--checkpoint", "CKPT", "--n-samples", "1"], "needs at least 2 samples"),
    (["--checkpoint", "CKPT", "--out", "a-file/o"], "cannot write to a-file/o"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, ckpt_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed (it is an optional extra)
    forge("big.pt", ckpt_path, image_size=16)
    forge("rgb.pt", ckpt_path, in_channels=3, out_channels=3)
    os.makedirs("rgb")
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(f"rgb/{i}.png")
    np.savez("rgb.npz", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez("one.npz", np.zeros((1, 8, 8, 1), np.uint8))
    open("a-file", "w").close()
    monkeypatch.setattr(evaluate, "bound", None)  # every mistake is found before the bound is computed
    os.makedirs("done")
    open("done/results.json", "w").close()
    capsys.readouterr()
    assert run(*FAST, *[ckpt_path if a == "CKPT" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert os.path.getsize("done/results.json") == 0  # nothing the user had is touched


def test_command_line_exit_code():
    result = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--checkpoint", "nothing.pt"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: no checkpoint at nothing.pt: run `python train.py` first, or pass an existing file"
