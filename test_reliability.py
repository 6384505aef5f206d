"""Nothing a user has is ever lost (docs/reliability.md): stop signals save a run, one program writes a folder
at a time, outputs never replace files the programs did not write, numbers are written before pictures, image
folders are read as meant, and absurd or damaged inputs are one line. Each test names the finding it covers."""
import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ablation
import cli
import data
import evaluate
import pretrained
import runs
import sample
import train
from conftest import HERE, TINY, run_program, tiny_port

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.strip() and "step/s" not in line and "%|" not in line]  # bars aside
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0]


def trained(out="r", *flags):
    assert run_program(train.main, [*TINY, "--steps", "3", "--out", out, *flags]) == 0
    return out


def listing(folder="."):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---- stop signals save the run (finding 3) -----------------------------------------------------------
def start_training(*flags):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--steps", "100000",
                             "--log-every", "2", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (os.path.exists("r/loss.csv") and len(runs.read_rows("r/loss.csv")) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_run_like_ctrl_c(signum):
    proc = start_training("--out", "r")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    step = runs.load_checkpoint("r")["step"]
    assert step >= 4 and f"stopped by {signal.Signals(signum).name}: saved step {step}" in out
    assert run_program(train.main, ["--resume", "r", "--steps", str(step + 2)]) == 0


def test_a_run_killed_at_any_moment_can_be_resumed():
    """SIGKILL cannot be caught: the checkpoint written before the first step makes the folder resumable."""
    proc = start_training("--out", "r")
    proc.kill()
    proc.wait()
    assert runs.load_checkpoint("r")["step"] >= 0 and not [f for f in os.listdir("r") if f.endswith(".tmp")]
    assert run_program(train.main, ["--resume", "r", "--steps", "30"]) == 0


# ---- one program per folder, and no stale lock (finding 4) -------------------------------------------
def test_a_second_program_on_the_same_folder_is_refused_until_the_first_ends(capsys):
    trained()
    with runs.locked("r"):  # another program holds the run
        for program, argv in [(train.main, ["--resume", "r", "--steps", "5"]),
                              (evaluate.main, ["--checkpoint", "r", "--n-test", "4", "--n-samples", "0"]),
                              (sample.main, ["--checkpoint", "r", "--out", "r", "--force", "--n", "2"])]:
            capsys.readouterr()
            assert run_program(program, argv) == 2
            one_line_error(capsys, "r is being written by another program (process")
    assert runs.load_checkpoint("r")["step"] == 3
    assert run_program(train.main, ["--resume", "r", "--steps", "5"]) == 0  # released: no stale lock


def test_a_killed_program_leaves_no_lock_behind():
    os.makedirs("r")
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {HERE!r}); import runs\n"
                               "with runs.locked('r'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(cli.UsageError, match="being written by another program"):
        with runs.locked("r"):
            pass
    holder.kill()
    holder.wait()
    with runs.locked("r"):  # the OS dropped the lock with the process
        pass


# ---- the default folder, --force and files the programs did not write (findings 1, 2) ----------------
def test_the_default_folder_is_never_one_that_holds_other_files(capsys):
    os.makedirs("runs/digits")
    open("runs/digits/notes.txt", "w").close()  # a folder the user made, or a run killed long ago
    assert run_program(train.main, [*TINY, "--steps", "2"]) == 0
    assert listing("runs/digits") == ["notes.txt"] and runs.load_checkpoint("runs/digits-2")["step"] == 2
    os.makedirs("runs/empty")  # an empty folder is a new one
    assert run_program(train.main, [*TINY, "--steps", "2", "--out", "runs/empty"]) == 0


def test_force_replaces_only_what_sample_py_wrote(capsys):
    trained()
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "3", "--out", "s", "--amp", "off"]) == 0
    Image.new("L", (8, 8)).save("s/images/holiday.png")  # the user's own files, beside ours
    open("s/notes.txt", "w").close()
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "2", "--out", "s", "--force", "--amp", "off"]) == 0
    assert listing("s") == sorted([".lock", ".written", "grid.png", "images/000000.png", "images/000001.png",
                                   "images/holiday.png", "notes.txt", "samples.npz"])  # 000002.png was ours
    Image.new("L", (8, 8)).save("s/images/000002.png")  # a user's file where sample.py would write
    capsys.readouterr()
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "3", "--out", "s", "--force", "--amp", "off"]) == 2
    one_line_error(capsys, "s/images/000002.png was not written by these programs")


# ---- results before pictures (finding 5) ---------------------------------------------------------------
def test_a_picture_that_cannot_be_written_keeps_the_numbers(monkeypatch, capsys):
    trained()

    def disk_full(*args):
        raise cli.UsageError("cannot write r/bound_terms.png: no space left on device; nothing there was changed")
    monkeypatch.setattr(evaluate.figures, "plot_terms", disk_full)
    capsys.readouterr()
    assert run_program(evaluate.main, ["--checkpoint", "r", "--n-test", "4", "--n-samples", "0", "--device", "cpu"]) == 2
    one_line_error(capsys, "cannot write r/bound_terms.png: no space left on device")
    assert json.load(open("r/results.json"))["bound"]["n_images"] == 4
    assert os.path.exists("r/rate_distortion.png")  # the other picture is still drawn


# ---- image folders read as a user means them (findings 6-10) -------------------------------------------
def digits_folder(path, n=4, mode="L", size=8):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(f"{path}/{i}.png")


def test_a_file_that_is_not_a_plain_image_never_reaches_an_external_program(monkeypatch, capsys):
    from PIL import EpsImagePlugin
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("the EPS decoder ran"))
    digits_folder("imgs")
    with open("imgs/x.png", "w") as f:  # PostScript, named as a PNG
        f.write("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(cli.UsageError, match="cannot read image imgs/x.png"):
        data.load_dataset("imgs", image_size=8)


def test_a_decompression_bomb_is_refused(monkeypatch):
    digits_folder("imgs", size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image is then "too large", as a real bomb is
    with pytest.raises(cli.UsageError, match="more pixels than Pillow's limit"):
        data.load_dataset("imgs", image_size=8)


def test_a_test_split_is_never_trained_on(capsys):
    digits_folder("only-test/test", n=40)
    capsys.readouterr()
    assert run_program(train.main, [*TINY, "--dataset", "only-test", "--image-size", "8", "--out", "o"]) == 2
    one_line_error(capsys, "only-test has a test/ folder but no train/")
    assert not os.path.exists("o")
    digits_folder("both/train", n=40)
    digits_folder("both/test", n=5)
    assert data.load_dataset("both", "train", 8).split == "train" and len(data.load_dataset("both", "test", 8)[0]) == 5
    digits_folder("only-train/train", n=40)  # evaluate.py then says it is not a test split
    assert data.load_dataset("only-train", "test", 8).split == "train"


def test_a_mixed_folder_is_read_in_the_richer_mode():
    digits_folder("mixed", n=3, mode="RGB")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save("mixed/0-grey.png")  # sorted first
    images = data.load_dataset("mixed", image_size=8).images
    assert images.shape == (4, 3, 8, 8) and (images[0] == 77).all()  # grey is the same in RGB
    assert len({tuple(images[i, :, 0, 0].tolist()) for i in range(1, 4)}) == 3


def test_16_bit_images_are_scaled_not_clipped():
    os.makedirs("deep")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save("deep/a.png")
    x = data.load_dataset("deep", image_size=8).images[0, 0].numpy()
    assert np.array_equal(x, np.round(np.arange(64).reshape(8, 8) * 1000 / 257).astype(np.uint8))


def test_symlink_loops_are_followed_once():
    digits_folder("loops/a", n=3)
    os.symlink("..", "loops/a/up")  # two loops: a/up -> loops, and loops/self -> loops
    os.symlink(".", "loops/self")
    os.symlink("a/0.png", "loops/same.png")  # the same file twice
    assert len(data.load_dataset("loops", image_size=8).images) == 3


# ---- runs that resume only as they were (findings 11, 12) -------------------------------------------
def test_ablation_never_records_a_row_under_another_t(monkeypatch, capsys):
    assert run_program(train.main, [*TINY, "--T", "10", "--steps", "2", "--out", "a/eps-simple-s0"]) == 0
    monkeypatch.setattr(ablation, "call", lambda *a: pytest.fail("must not run"))
    capsys.readouterr()
    assert run_program(ablation.main, ["--rows", "eps-simple", "--T", "20", "--steps", "2", "--out", "a"]) == 2
    one_line_error(capsys, "a/eps-simple-s0 was trained with --T 10, seed 0 and --steps 2, not --T 20")
    capsys.readouterr()  # nor a row trained for another number of steps (its schedule was another)
    assert run_program(ablation.main, ["--rows", "eps-simple", "--T", "10", "--steps", "3", "--out", "a"]) == 2
    one_line_error(capsys, "and --steps 2, not --T 10, seed 0 and --steps 3")


def test_a_damaged_ablation_record_is_one_line(capsys, monkeypatch):
    os.makedirs("a/eps-simple-s0")
    with open("a/eps-simple-s0/ablation.json", "w") as f:
        f.write('{"status": "ok", "bound_bpd": ')
    monkeypatch.setattr(ablation, "call", lambda *a: pytest.fail("must not run"))
    assert run_program(ablation.main, ["--rows", "eps-simple", "--out", "a"]) == 2
    one_line_error(capsys, "a/eps-simple-s0/ablation.json is not a record ablation.py wrote")


def test_steps_and_minutes_together_are_refused_on_resume_too(capsys):
    trained()
    capsys.readouterr()
    assert run_program(train.main, ["--resume", "r", "--steps", "10", "--minutes", "1"]) == 2
    one_line_error(capsys, "--minutes replaces --steps")


# ---- weights checked before anything is allocated (finding 13) ------------------------------------------
def test_a_config_json_that_does_not_describe_the_weights_is_refused_at_once():
    pytest.importorskip("diffusers")
    port = tiny_port("port", 8)
    config = json.load(open("port/config.json"))
    for bad, message in [(dict(block_out_channels=[32000, 64000]), "does not describe these weights"),
                         (dict(sample_size=0), "sample_size=0"), (dict(sample_size=-8), "sample_size=-8"),
                         (dict(sample_size=10**9), "sample_size=1000000000"), (dict(layers_per_block=0), "describe")]:
        json.dump({**config, **bad}, open("port/config.json", "w"))
        start = time.time()
        with pytest.raises(ValueError, match=message):
            pretrained.load_pretrained(port)
        assert time.time() - start < 5  # nothing large was built
    os.remove("port/config.json")
    model = pretrained.load_pretrained(port)  # without config.json: from the weights
    assert model.config["ch"] == 32


def test_checkpoints_whose_weights_are_not_weights_are_refused(capsys):
    trained()
    ckpt = runs.load_checkpoint("r")
    torch.save({**ckpt, "ema": {k: v.long() for k, v in ckpt["ema"].items()}}, "ints.pt")
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "ch": 32 * 4096}}, "huge.pt")
    for name, message in [("ints.pt", "non-floating-point"), ("huge.pt", "do not fit its own configuration")]:
        capsys.readouterr()
        assert run_program(sample.main, ["--checkpoint", name, "--out", "s"]) == 2
        one_line_error(capsys, message)


# ---- absurd numbers and names: one line, before any work ----------------------------------------------
@pytest.mark.parametrize("program, argv, message", [
    (train.main, ["--seed", "1e16"], "invalid int value"),
    (train.main, ["--seed", "10000000000000000"], "must be in [0, 4294967295]"),
    (train.main, ["--minutes", "1e308"], "must be positive and at most 1,000,000"),
    (train.main, ["--image-size", "100000", "--dataset", "imgs"], "--image-size 100000 is out of range"),
    (train.main, ["--device", "meta"], "unsupported device 'meta'"),
    (train.main, ["--device", "xpu"], "unsupported device 'xpu'"),
    (train.main, ["--device", "hpu"], "unsupported device 'hpu'"),
    (sample.main, ["--n", "2000000000"], "must be positive and at most 10,000,000"),
    (sample.main, ["--seed", "-1"], "must be in [0, 4294967295]"),
    (evaluate.main, ["--draws", "100000000", "--n-test", "0"], "GiB of memory"),
    (evaluate.main, ["--n-test", "0", "--n-samples", "0"], "nothing to measure"),
    (evaluate.main, ["--seed", "99999999999"], "must be in [0, 4294967295]"),
])
def test_absurd_requests_are_one_line_before_any_work(program, argv, message, capsys):
    digits_folder("imgs")
    if program is not train.main:
        trained("runs/r")
    capsys.readouterr()
    assert run_program(program, [*argv, "--device", "cpu"] if "--device" not in argv else argv) == 2
    one_line_error(capsys, message)


def test_a_garbled_loss_csv_does_not_stop_a_resume():
    trained()
    with open("r/loss.csv", "ab") as f:
        f.write(b"7,0.5\xff\xfe,1e-3,1.0\n")  # not UTF-8
    assert run_program(train.main, ["--resume", "r", "--steps", "5"]) == 0


def test_bench_flags_are_checked():
    for argv, message in [(["--repeats", "0"], "must be positive"), (["nosuch"], "unknown section 'nosuch'"),
                          (["--batch", "-1"], "must be positive")]:
        p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *argv], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


# ---- a full disk: one line naming the file, no .tmp, nothing lost -------------------------------------
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(monkeypatch, capsys):
    trained()
    before = open("r/ckpt.pt", "rb").read()
    real_save = torch.save

    def torch_full(obj, f):  # what torch.save does on a full disk: a cryptic RuntimeError
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(runs, "_disk_full", lambda path: True)
    capsys.readouterr()
    assert run_program(train.main, ["--resume", "r", "--steps", "5"]) == 2
    one_line_error(capsys, "cannot write r/ckpt.pt: no space left on device")
    assert open("r/ckpt.pt", "rb").read() == before and not [f for f in listing() if f.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)

    def numpy_full(f, **arrays):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sample.np, "savez", numpy_full)
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "2", "--out", "s", "--amp", "off"]) == 2
    one_line_error(capsys, "cannot write s/samples.npz: no space left on device")
    assert not [f for f in listing() if f.endswith(".tmp")]


def test_a_signal_to_ablation_alone_reaches_the_row_it_is_training():
    """`kill <ablation's pid>` (not the whole process group, as Ctrl-C is): the row's train.py saves too."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "ablation.py"), "--rows", "eps-simple", "--steps",
                             "100000", "--T", "10", "--device", "cpu", "--amp", "off", "--out", "a"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists("a/eps-simple-s0/loss.csv") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert runs.load_checkpoint("a/eps-simple-s0")["step"] > 0  # train.py got the signal and saved


# ---- a second round of hostile use ----------------------------------------------------------------------
def test_sample_never_writes_through_a_symlink_or_a_forged_record(capsys):
    trained()
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "2", "--out", "s", "--amp", "off"]) == 0
    os.makedirs("photos")
    Image.new("L", (8, 8)).save("photos/000000.png")
    os.rename("s/images", "s/old-images")
    os.symlink(os.path.abspath("photos"), "s/images")  # images/ now leads to the user's photos
    capsys.readouterr()
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "2", "--out", "s", "--force", "--amp", "off"]) == 2
    one_line_error(capsys, "leads outside s (a symbolic link?)")
    os.remove("s/images")
    os.rename("s/old-images", "s/images")
    open("victim.txt", "w").close()
    with open("s/.written", "a") as f:
        f.write("images/../../victim.txt\n")  # a hand-edited record that climbs out
    assert run_program(sample.main, ["--checkpoint", "r", "--n", "1", "--out", "s", "--force", "--amp", "off"]) == 0
    assert os.path.exists("victim.txt") and os.path.exists("photos/000000.png")


def test_outputs_that_cannot_be_folders_are_one_line(capsys):
    trained()
    open("afile.txt", "w").close()
    os.symlink("nowhere", "dangling")
    cases = [(sample.main, ["--checkpoint", "r", "--out", "afile.txt", "--force"], "afile.txt is a file"),
             (sample.main, ["--checkpoint", "r", "--out", "dangling"], "dangling: it is a broken symbolic link"),
             (train.main, [*TINY, "--out", "dangling"], "dangling: it is a broken symbolic link"),
             (evaluate.main, ["--checkpoint", "r", "--out", "dangling", "--device", "cpu"], "broken symbolic link")]
    if os.path.isdir("/proc/self"):
        cases.append((train.main, [*TINY, "--steps", "2", "--out", "/proc/ddpm-run"], "cannot write to /proc/ddpm-run"))
    for program, argv, message in cases:
        capsys.readouterr()
        assert run_program(program, argv) == 2, argv
        one_line_error(capsys, message)
    assert run_program(train.main, [*TINY, "--steps", "2", "--out", ""]) == 0  # empty: the default folder
    assert os.path.exists("runs/digits/ckpt.pt")


def test_a_closed_stdout_does_not_cost_the_results():
    flags = " ".join(f"'{a}'" for a in TINY)
    p = subprocess.run(f"{sys.executable} {HERE}/train.py {flags} --steps 3 --out r | head -c 5", shell=True,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in p.stderr and os.path.exists("r/samples.png")
    p = subprocess.run(f"{sys.executable} {HERE}/evaluate.py --checkpoint r --n-test 4 --n-samples 0 --device cpu "
                       f"| head -c 1", shell=True, capture_output=True, text=True)
    assert "Traceback" not in p.stderr and json.load(open("r/results.json"))["bound"]["n_images"] == 4


def test_a_file_size_limit_is_one_line():
    """What a disk quota does (EFBIG): torch.save says only 'unexpected pos'."""
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))  # noqa: E731  1 MiB
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--steps", "2", "--out", "r"],
                       capture_output=True, text=True, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "cannot write r/ckpt.pt: the write failed (a file size limit or a disk quota?)" in p.stderr
    assert not [f for f in listing() if f.endswith(".tmp")]


def test_small_t_attention_and_samples_files_are_checked(capsys):
    capsys.readouterr()  # attention at a resolution the network does not have: refused, not ignored
    assert run_program(train.main, [*TINY, "--attn-resolutions", "3", "--out", "a"]) == 2
    one_line_error(capsys, "--attn-resolutions 3 is not a resolution of this network (8x8 images give 8, 4)")
    assert run_program(train.main, [*TINY, "--T", "2", "--steps", "2", "--out", "t2"]) == 0  # Table 4 for T < 10
    assert run_program(evaluate.main, ["--checkpoint", "t2", "--n-test", "4", "--n-samples", "0", "--device", "cpu"]) == 0
    with open("garbage.npz", "wb") as f:
        f.write(os.urandom(500))
    capsys.readouterr()
    assert run_program(evaluate.main, ["--checkpoint", "t2", "--samples", "garbage.npz", "--n-test", "0"]) == 2
    one_line_error(capsys, "garbage.npz is not an .npz of images")


def test_a_run_on_a_folder_finds_it_from_anywhere():
    digits_folder("here/imgs", n=40)
    os.chdir("here")
    assert run_program(train.main, [*TINY, "--dataset", "imgs", "--image-size", "8", "--steps", "2", "--out", "r"]) == 0
    os.chdir("..")
    assert run_program(sample.main, ["--checkpoint", "here/r", "--n", "2", "--figures", "--amp", "off"]) == 0


@pytest.mark.parametrize("program", ["train", "sample", "evaluate", "ablation", "bench"])
def test_every_program_has_help_that_opens_with_its_own_docstring(program, capsys):
    module = importlib.import_module(program)
    assert run_program(module.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert module.__doc__.split("\n")[0] in out and "usage:" in out  # train.py once showed config.py's line
