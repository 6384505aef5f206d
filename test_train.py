"""Tests of train.py on the CPU, with a tiny network so each run takes seconds."""
import csv
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import config
import data
import ddpm
import runs
import train
import unet
from conftest import HERE, TINY, run_program

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and data/ land in the test's own directory


def run(*argv):
    return run_program(train.main, argv)


def rows(out):
    with open(os.path.join(out, "loss.csv")) as f:
        return list(csv.DictReader(f))


def test_short_digits_run_lowers_the_loss_and_writes_its_files():
    assert run(*TINY, "--steps", "60", "--lr", "2e-3", "--warmup", "10", "--sample-every", "30", "--out", "r") == 0
    assert os.path.exists("r/samples_0000030.png")  # a grid every --sample-every steps
    losses = [float(r["loss"]) for r in rows("r")]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2])
    ckpt = runs.load_checkpoint("r")
    assert ckpt["step"] == 60 and ckpt["config"]["dataset"] == "digits"
    model, diffusion, _ = runs.load_run("r")
    assert diffusion.T == 20 and model.config["ch"] == 32
    with Image.open("r/samples.png") as im:
        assert im.size[0] >= 256
    assert os.path.getsize("r/loss.png") > 1000


def test_resume_is_bitwise_exact():
    # dropout: the RNG state must be restored too. A constant learning rate: a decaying one follows --steps,
    # so 9 steps and then 7 more is another schedule than 16 (a Ctrl-C'd run resumes exactly either way).
    flags = [*TINY, "--dropout", "0.1", "--ckpt-every", "100", "--lr-schedule", "constant"]
    assert run(*flags, "--steps", "16", "--out", "straight") == 0
    assert run(*flags, "--steps", "9", "--out", "split") == 0
    assert run("--resume", "split", "--steps", "16") == 0
    a, b = runs.load_checkpoint("straight"), runs.load_checkpoint("split")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    split = {r["step"]: r["loss"] for r in rows("split")}  # has an extra row: the end of the first part
    assert all(split[r["step"]] == r["loss"] for r in rows("straight"))


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine_to_zero():
    c = config.Config(lr=2.0, warmup=10, lr_schedule="constant")
    assert train.learning_rate(c, 0, 0.0) == 0.2 and train.learning_rate(c, 4, 0.9) == 1.0
    assert train.learning_rate(c, 9, 0.0) == train.learning_rate(c, 500, 1.0) == 2.0
    c.lr_schedule = "cosine"
    for done, factor in [(0.0, 1.0), (0.25, (1 + 2 ** -0.5) / 2), (0.5, 0.5), (1.0, 0.0), (1.5, 0.0)]:
        assert abs(train.learning_rate(c, 100, done) - 2.0 * factor) < 1e-12
    assert abs(train.learning_rate(c, 4, 0.5) - 0.5) < 1e-12  # warm-up and decay multiply


def test_minutes_trains_for_the_time_spent_and_resumes_with_a_larger_budget(capsys):
    assert run(*TINY, "--minutes", "0.02", "--lr-schedule", "cosine", "--warmup", "2", "--out", "r") == 0
    first = runs.load_checkpoint("r")
    assert 1.2 <= first["seconds"] < 1.2 + 1.0 and first["step"] > 5 and first["config"]["minutes"] == 0.02
    assert float(rows("r")[-1]["lr"]) < 0.01 * config.Config.lr  # decayed to ~0 at the end
    capsys.readouterr()
    assert run("--resume", "r") == 2 and "pass a larger --minutes" in capsys.readouterr().err
    assert run("--resume", "r", "--minutes", "0.04") == 0
    second = runs.load_checkpoint("r")
    assert 2.4 <= second["seconds"] < 2.4 + 1.0 and second["step"] > first["step"]
    seconds = [float(r["seconds"]) for r in rows("r")]
    assert seconds == sorted(seconds) and seconds[-1] >= 2.4  # one clock across the two sessions
    assert run("--resume", "r", "--steps", str(second["step"] + 3)) == 0  # --steps turns it back into steps
    assert runs.load_checkpoint("r")["step"] == second["step"] + 3


def test_bf16_autocast_trains_on_the_cpu(capsys):
    assert run(*TINY, "--steps", "20", "--lr", "2e-3", "--warmup", "5", "--amp", "bf16", "--out", "r") == 0
    assert "bfloat16" in capsys.readouterr().out
    losses = [float(r["loss"]) for r in rows("r")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(v.dtype == torch.float32 for v in runs.load_checkpoint("r")["model"].values())  # weights stay fp32
    assert run("--resume", "r", "--steps", "22") == 0 and "bfloat16" in capsys.readouterr().out  # kept on resume
    assert run("--resume", "r", "--steps", "24", "--amp", "off") == 0 and "float32" in capsys.readouterr().out


def test_amp_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cli, "native_bf16", lambda device: True)
    assert cli.pick_amp("auto", cpu) == torch.bfloat16 and cli.pick_amp("off", cpu) is None
    monkeypatch.setattr(cli, "native_bf16", lambda device: False)
    assert cli.pick_amp("auto", cpu) is None and cli.pick_amp("bf16", cpu) == torch.bfloat16


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_tmp(monkeypatch, capsys):
    assert run(*TINY, "--steps", "5", "--out", "r") == 0
    before = runs.load_checkpoint("r")["step"]

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_halfway)
        assert run("--resume", "r", "--steps", "10") == 2
    assert "error: cannot write r/ckpt.pt: disk full; nothing there was changed" in capsys.readouterr().err
    assert runs.load_checkpoint("r")["step"] == before and not [f for f in os.listdir("r") if f.endswith(".tmp")]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(monkeypatch, capsys):
    assert run(*TINY, "--steps", "5", "--out", "r") == 0
    real = ddpm.Diffusion.training_loss
    calls = {"n": 0}

    def goes_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ddpm.Diffusion, "training_loss", goes_nan)
    capsys.readouterr()
    assert run("--resume", "r", "--steps", "10") == cli.DIVERGED
    err = capsys.readouterr().err
    assert "became NaN or infinite at step 8" in err and "r/ckpt.pt" in err
    assert runs.load_checkpoint("r")["step"] == 5


def test_a_kill_while_loss_csv_is_rewritten_loses_no_row_and_a_torn_row_is_harmless(monkeypatch):
    assert run(*TINY, "--steps", "20", "--out", "r") == 0
    before = rows("r")
    assert len(before) == 4

    def killed(self, f, rows, header=False):  # the header is out, then the process dies
        f.write("step,loss,lr,seconds\n")
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(runs.LossLog, "_write", killed)
        with pytest.raises(RuntimeError):
            run("--resume", "r", "--steps", "30")
    assert rows("r") == before
    with open("r/loss.csv", "a") as f:
        f.write("25,0.1")  # a kill in the middle of an append
    assert run("--resume", "r", "--steps", "30") == 0
    after = rows("r")
    assert after[:4] == before and [r["step"] for r in after] == ["5", "10", "15", "20", "25", "30"]


def test_a_finished_run_without_its_grid_gets_it_on_resume(capsys):
    assert run(*TINY, "--steps", "3", "--out", "r") == 0
    os.remove("r/samples.png")
    assert run("--resume", "r") == 0 and os.path.exists("r/samples.png")
    assert runs.load_checkpoint("r")["step"] == 3
    capsys.readouterr()
    assert run("--resume", "r") == 2 and "already trained" in capsys.readouterr().err


def test_the_grid_is_the_one_sample_py_draws_with_the_run_seed():
    import sample
    assert run(*TINY, "--steps", "3", "--seed", "5", "--out", "r") == 0
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "4", "--seed", "5", "--out", "s", "--amp", "off"]) == 0
    with Image.open("r/samples.png") as a, Image.open("s/grid.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_checkpoint_records_the_presets_dropout():
    assert run(*TINY, "--steps", "1", "--out", "r") == 0
    assert runs.load_checkpoint("r")["config"]["dropout"] == unet.PRESETS["digits"]["dropout"]
    assert config.Config.dropout is None  # one source: unet.PRESETS


def test_folder_of_images(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs("imgs/sub")
    for i in range(40):  # mixed sizes and a subfolder; grey images
        size = (12 + i % 5, 10 + i % 3)
        Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(f"imgs{'/sub' if i % 2 else ''}/{i}.png")
    images, labels, levels, split = data.load_dataset("imgs", image_size=8)
    assert images.shape == (40, 1, 8, 8) and images.dtype == torch.uint8 and levels == 256 and split == "all"
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save("rgb.png")
    os.makedirs("rgbs")
    os.rename("rgb.png", "rgbs/a.jpg")
    assert data.load_dataset("rgbs", image_size=4)[0].shape == (1, 3, 4, 4)
    assert run(*TINY, "--dataset", "imgs", "--image-size", "8", "--steps", "3", "--out", "f") == 0
    assert runs.load_checkpoint("f")["model_config"]["image_size"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--config", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "no/such/folder", "--image-size", "8"], "does not exist"),
    (["--dataset", "empty/", "--image-size", "8"], "no images"),
    (["--dataset", "broken/", "--image-size", "8"], "cannot read image"),
    (["--image-size", "10", "--ch-mult", "1,2,2"], "image"),
    (["--batch-size", "0"], "must be positive"),
    (["--steps", "-3"], "must be positive"),
    (["--steps", "many"], "invalid int value"),
    (["--resume", "r", "--T", "50"], "was trained with --T 20"),
    (["--resume", "corrupt.pt"], "not a readable checkpoint"),
    (["--resume", "nothing-here"], "no checkpoint"),
    (["--out", "r"], "already holds a run"),
    (["--lr", "nan"], "must be positive"), (["--lr", "inf"], "must be positive"),
    (["--ch-mult", ""], "one or more positive integers"), (["--ch-mult", "0,1"], "positive integers"),
    (["--attn-resolutions", "-4"], "positive integers"), (["--ema-decay", "-1"], "must be in [0, 1)"),
    (["--ema-decay", "1"], "must be in [0, 1)"), (["--warmup", "-3"], "must be at least 0"),
    (["--sample-every", "-1"], "must be at least 0"), (["--dropout", "2"], "must be in [0, 1)"),
    (["--resume", "misfit.pt"], "do not fit its own configuration"),
    (["--resume", "old.pt"], "lacks"),
    (["--resume", "malicious.pt"], "holds Python objects"),
    (["--out", "a-file/run"], "cannot write to a-file/run: "),
    (["--sigma", "learned"], "needs --objective vlb"),
    (["--predict", "xprev"], "invalid choice"),
    (["--resume", "r", "--out", "elsewhere"], "leave out --out and --config"),
    (["--out", "logs"], "logs is not empty (loss.csv, ...) and a run writes only into a new or empty folder"),
    (["--resume", "no-optimizer.pt"], "cannot be resumed: it holds no optimizer"),
    (["--minutes", "0"], "must be positive"), (["--minutes", "nan"], "must be positive"),
    (["--minutes", "1"], "--minutes replaces --steps"),
    (["--amp", "fp16"], "--amp fp16 is not supported on cpu"),
    (["--lr-schedule", "linear"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert run(*TINY, "--steps", "2", "--out", "r") == 0
    os.makedirs("empty")
    os.makedirs("broken")
    with open("broken/x.png", "wb") as f:
        f.write(b"not a png")
    with open("corrupt.pt", "wb") as f:
        f.write(b"\x00garbage")
    open("a-file", "w").close()
    ckpt = runs.load_checkpoint("r")
    torch.save({**ckpt, "ema": dict(list(ckpt["ema"].items())[1:])}, "misfit.pt")  # a tensor missing
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "lr"}}, "old.pt")
    torch.save({**ckpt, "extra": torch.nn.Linear(2, 2)}, "malicious.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, "no-optimizer.pt")
    os.makedirs("logs")
    open("logs/loss.csv", "w").close()
    before = open("r/ckpt.pt", "rb").read()
    capsys.readouterr()
    assert run(*TINY, "--steps", "4", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert "weights_only" not in err  # never PyTorch's advice to load an untrusted file unsafely
    assert open("r/ckpt.pt", "rb").read() == before  # nothing the user had is touched


def test_command_line_exit_code():
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset", "imagenet"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: unknown dataset")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process():
    """DDP on CPU (gloo): 2 processes x 16 images == 1 process x 32 images, same data and noise."""
    flags = [*TINY, "--steps", "6", "--lr", "1e-3", "--warmup", "1", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port (a fixed one failed once in CI, its reason hidden by the capture)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "train.py"), *flags, "--out", "ddp"], env=env, capture_output=True,
                         text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *flags, "--out", "one"], check=True, env=env,
                   capture_output=True)
    assert np.allclose([float(r["loss"]) for r in rows("ddp")], [float(r["loss"]) for r in rows("one")], rtol=1e-5)
    # Float rounding differs (gradients are averaged across processes), and Adam divides by
    # sqrt(v): near-zero gradients (behind the zero-initialised output conv) turn rounding into
    # steps of a fraction of lr. Measured: 2e-5 = lr / 50. A different batch would move by ~lr.
    a, b = runs.load_checkpoint("ddp")["model"], runs.load_checkpoint("one")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--steps", "100000",
                             "--out", "r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (os.path.exists("r/loss.csv") and len(rows("r")) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    step = runs.load_checkpoint("r")["step"]
    assert step >= 10 and f"saved step {step}" in out
    assert run("--resume", "r", "--steps", str(step + 2)) == 0


def test_torchvision_dataset_without_torchvision_or_internet_is_one_line(capsys):
    """No torchvision here: a message to install it; with torchvision but offline: a download message."""
    assert run(*TINY, "--dataset", "mnist", "--steps", "2", "--out", "m") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("pip install torchvision" in err or "could not download" in err)
    assert not os.path.exists("m")


def count_reads(monkeypatch):
    """Counts the project's own reads of tensor values on the host (on a GPU each waits for the queue).
    torch's are not counted: Adam reads its step counts, which live on the host even for a GPU."""
    reads = {"n": 0, "on": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), **kwargs):
            reads["n"] += reads["on"] and os.path.dirname(sys._getframe(1).f_code.co_filename) == HERE
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_the_training_loop_reads_the_device_only_at_log_steps(monkeypatch):
    """Issue 17: no host reads inside a training step; the loss and the NaN check every --log-every steps."""
    reads, real_train = count_reads(monkeypatch), train.train

    def counted(r, out):
        reads["on"] = True
        try:
            return real_train(r, out)
        finally:
            reads["on"] = False
    monkeypatch.setattr(train, "train", counted)
    assert run(*TINY, "--steps", "200", "--log-every", "20", "--ckpt-every", "100", "--out", "r") == 0
    assert reads["n"] / 200 <= 0.1, reads["n"]  # two per log step: the loss, and the first non-finite step
    monkeypatch.setattr(train, "train_step", lambda r: pytest.fail("must not train"))
    model, diffusion, _ = runs.load_run("r")
    reads["on"] = True
    ddpm.generate(model, diffusion, 8, seed=0)  # all T steps of Algorithm 2
    assert reads["n"] / 200 <= 0.1, "the sampler read the device"


def test_every_flag_reaches_the_settings():
    """Each row of Config is a flag, and the value given is the run's setting (the checkpoint stores asdict)."""
    values = dict(config="cifar10", dataset="elsewhere", preset="cifar10", image_size=16, ch=64, ch_mult=(1, 2),
                  num_res_blocks=3, attn_resolutions=(4,), dropout=0.2, T=50, predict="x0", objective="vlb",
                  sigma="beta_tilde", steps=7, minutes=None, lr_schedule="constant", batch_size=16, lr=1e-3,
                  warmup=3, grad_clip=0.5, ema_decay=0.99, flip=True, log_every=3, ckpt_every=4, sample_every=5,
                  n_samples=6, seed=7, device="cpu", amp="bf16", compile="on")
    assert set(values) == {f.name for f in dataclasses.fields(config.Config)}, "a new setting needs a value here"
    argv = [a for k, v in values.items() if v is not None for a in
            ([f"--{k.replace('_', '-')}" if v else f"--no-{k}"] if isinstance(v, bool) else
             [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)])]
    c, out, _ = config.settings(*config.parse_args(argv))
    assert dataclasses.asdict(c) == values and out == os.path.join("runs", "cifar10")
    given, _ = config.parse_args(["--minutes", "2.5"])
    assert config.settings(given, dict(out=None, resume=None))[0].minutes == 2.5


def test_a_checkpoint_from_before_a_setting_resumes():
    """A checkpoint of the first train.py with settings (these keys only) resumes: every setting added since
    says what such checkpoints meant (and an old name still reads)."""
    first = ("config", "dataset", "preset", "image_size", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
             "dropout", "T", "predict", "objective", "sigma", "steps", "batch_size", "lr", "warmup", "grad_clip",
             "ema_decay", "flip", "log_every", "ckpt_every", "sample_every", "n_samples", "seed")
    assert run(*TINY, "--steps", "4", "--out", "r") == 0
    ckpt = runs.load_checkpoint("r")
    old = {k: v for k, v in ckpt["config"].items() if k in first}
    torch.save({**ckpt, "config": {**old, "schedule": "cosine"}}, "r/ckpt.pt")  # the old name of lr_schedule
    assert run("--resume", "r", "--steps", "6") == 0
    c = runs.load_checkpoint("r")["config"]
    assert c["lr_schedule"] == "cosine" and c["amp"] == "off" and c["compile"] == "off"
    assert c["minutes"] is None and "schedule" not in c
