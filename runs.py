"""Run folders and what is in them: atomic writes, one program per folder, files the programs own,
checkpoints, and loading a trained run.

The promises (docs/reliability.md): every file is written whole or not at all; one program writes a folder
at a time, and a killed one leaves no lock behind; a program writes only into an empty folder or over files
these programs wrote there (recorded in the folder's .written), never over anything else.
"""
import csv
import errno
import fcntl
import glob
import os
import shutil
import warnings
from contextlib import contextmanager

import torch

from cli import UsageError, first_line
from ddpm import Diffusion, linear_betas
from unet import UNet

RUNS = "runs"          # train.py writes runs/<config>[-N]/
CHECKPOINT = "ckpt.pt"
LOCK, WRITTEN = ".lock", ".written"  # bookkeeping in every folder the programs write


# ---- files ---------------------------------------------------------------------------------------
def write_atomic(path, write, mode="w"):
    """write(f) into a temporary file, then rename it over `path`: a crash, a signal or a full disk leaves
    the old file whole and no temporary file behind. A full disk is one line naming the file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        why = _write_failure(e, tmp)
        if os.path.exists(tmp):
            os.remove(tmp)
        if why:
            raise UsageError(f"cannot write {path}: {why}; nothing there was changed") from None
        raise


def _write_failure(e, tmp):
    """Why a write failed, for a one-line error; None for anything else (a bug or a signal stays as it is)."""
    if isinstance(e, OSError):
        return "no space left on device" if e.errno == errno.ENOSPC else e.strerror or first_line(e)
    full = _disk_full(tmp)
    if isinstance(e, RuntimeError) and (full or "unexpected pos" in str(e)):  # torch.save's words for both
        return "no space left on device" if full else "the write failed (a file size limit or a disk quota?)"
    return None


def _disk_full(path):
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20
    except OSError:
        return False


def make_folder(path):
    """os.makedirs, with a one-line error where the system refuses (/proc, a read-only disk, ...)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to {path}: {e.strerror or first_line(e)}") from None


def existing_parent(path):
    """`path` itself if it exists, else its nearest parent that does."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_writable(path):
    """Fail now, in one line, if the directory `path` (made later if missing) could not be written:
    before any expensive work, and without creating anything."""
    if not path:
        raise UsageError("an empty path is no folder: give one, or leave the flag out for the default")
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"cannot write to {path}: it is a broken symbolic link")
    existing = existing_parent(path)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot write to {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}: {existing} is not writable")
    return path


def check_memory(nbytes, what):
    """Refuse, before starting, what could not fit in the machine's memory."""
    try:
        with open("/proc/meminfo") as f:
            available = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > available:
        raise UsageError(f"{what} need {nbytes / 2**30:,.1f} GiB of memory; this machine has "
                         f"{available / 2**30:,.1f} GiB available: ask for less")


def check_disk(path, nbytes, what):
    """Refuse, before starting, what could not fit on the disk that `path` (or its nearest parent) is on."""
    existing = existing_parent(path)
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise UsageError(f"{what} need about {nbytes / 2**30:,.2f} GiB on disk; {existing} has "
                         f"{free / 2**30:,.2f} GiB free: ask for less, or free some space")


# ---- folders: one program at a time, and only over the programs' own files -------------------------
@contextmanager
def locked(folder):
    """Hold `folder` (made if missing) for this program: a second program that asks for it gets a one-line
    error. The OS drops the lock when the process ends, however it ends, so none is ever left stale."""
    make_folder(folder)
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"{folder} is being written by another program (process {holder}): wait for it to end, "
                         f"or write elsewhere") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield folder
    finally:
        os.close(fd)


def free_folder(base, usable):
    """base, or base-2, base-3, ...: the first that usable(path) accepts (a new run's or new samples' folder)."""
    path, n = base, 1
    while not usable(path):
        n += 1
        path = f"{base}-{n}"
    return path


def empty(path):
    """A folder that does not exist, or holds nothing but the programs' bookkeeping."""
    return not os.path.exists(path) or os.path.isdir(path) and not set(os.listdir(path)) - {LOCK, WRITTEN}


def written(folder):
    """The relative paths the programs recorded as theirs in `folder` (inside it: a hand-edited line that
    climbs out, like images/../../x, is ignored)."""
    try:
        with open(os.path.join(folder, WRITTEN), encoding="utf-8", errors="replace") as f:
            names = {line.rstrip("\n") for line in f if line.strip()}
    except FileNotFoundError:
        return set()
    return {n for n in names if not os.path.isabs(n) and ".." not in n.split("/")}


def check_claim(folder, names, force=False):
    """Before writing `names` (paths relative to `folder`): refuse a file there that these programs did not
    write, and one they did unless force."""
    ours, inside = written(folder), os.path.realpath(folder) + os.sep
    for name in names:
        if not os.path.realpath(os.path.join(folder, name)).startswith(inside):
            raise UsageError(f"{os.path.join(folder, name)} leads outside {folder} (a symbolic link?): it is never "
                             f"written through; write elsewhere")
        if os.path.lexists(os.path.join(folder, name)):
            if name not in ours:
                raise UsageError(f"{os.path.join(folder, name)} was not written by these programs: it is never "
                                 f"overwritten; move it away, or write elsewhere")
            if not force:
                raise UsageError(f"{os.path.join(folder, name)} exists: pass --force to replace it, or write "
                                 f"elsewhere")


def claim(folder, names, drop=()):
    """Record `names` as the programs' own files in `folder` (and forget `drop`), before writing them."""
    kept = sorted((written(folder) - set(drop)) | set(names))
    make_folder(folder)
    write_atomic(os.path.join(folder, WRITTEN), lambda f: f.write("".join(n + "\n" for n in kept)))


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def load_tensors(path):
    """torch.load that never runs code from the file (weights_only=True), with a one-line error that says
    what is wrong with the file (and never suggests trusting it) instead of PyTorch's advice."""
    with warnings.catch_warnings():  # the unpickler warns about protocols before it refuses
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            if "Unsupported global" in text:
                raise UsageError(f"{path} holds Python objects other than tensors and plain values: not loaded, "
                                 f"since loading it could run code; it is not a file of weights") from None
            why = "" if text.startswith("Weights only") else f": {text.splitlines()[0][:120]}" if text else ""
            raise UsageError(f"{path} is not a readable checkpoint or weights file (truncated or corrupt?){why}") \
                from None


def checkpoint_file(path):
    """A checkpoint given as its file or its run's folder -> the file."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def stamp(path):
    """When a checkpoint was last written (its file's modification time, in ns)."""
    return os.stat(checkpoint_file(path)).st_mtime_ns


def load_checkpoint(path, needs=("T", "dataset")):
    """Load a checkpoint written by train.py (safely: weights_only=True), checking its config has `needs`."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: run `python train.py` first, or pass an existing file")
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or not {"model", "ema", "config", "model_config"} <= ckpt.keys():
        raise UsageError(f"{path} is not a checkpoint written by train.py (missing model/ema/config)")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model_config"], dict) \
            or (missing := [k for k in needs if k not in ckpt["config"]]):
        raise UsageError(f"{path} was written by another version of train.py: its config lacks "
                         f"{', '.join(missing) if isinstance(ckpt['config'], dict) else 'everything'}")
    return ckpt


def latest_checkpoint():
    """The most recently written runs/*/ckpt.pt, or a message telling the user to train first."""
    found = glob.glob(os.path.join(RUNS, "*", CHECKPOINT))
    if not found:
        raise UsageError(f"no checkpoint found under {RUNS}/: run `python train.py` first")
    return max(found, key=os.path.getmtime)


def restore(module, state, path, what="weights"):
    """module.load_state_dict(state), with a one-line error when the checkpoint does not fit."""
    if isinstance(module, torch.nn.Module) and isinstance(state, dict) and \
            (bad := [k for k, v in state.items() if torch.is_tensor(v) and not v.is_floating_point()]):
        raise UsageError(f"{path}: its {what} hold non-floating-point tensors (e.g. {bad[0]}): not weights")
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UsageError(f"{path}: its {what} do not fit its own configuration ({first_line(e, 150)})") from None


def make_diffusion(config, sigma=None):
    """The one place a run's configuration becomes its Diffusion: the paper's linear schedule over
    config["T"], its sigma (or `sigma` instead) and its parameterisation (older runs: eps, beta)."""
    return Diffusion(linear_betas(config["T"]), sigma=sigma or config.get("sigma", "beta"),
                     predict=config.get("predict", "eps"))


def check_fits(model_config, state, path):
    """That weights `state` are those of UNet(**model_config), found on the meta device (allocating nothing):
    a hand-edited configuration could otherwise ask for any amount of memory before failing."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in UNet(**model_config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path} does not fit this version of unet.py: {first_line(e, 150)}") from None
    given = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if shapes != given:
        wrong = sorted(set(shapes) ^ set(given)) or [k for k in shapes if shapes[k] != given[k]]
        raise UsageError(f"{path}: its weights do not fit its own configuration (e.g. {wrong[0]})")


def load_run(path, ema=True, sigma=None):
    """(network in eval mode, its Diffusion, the checkpoint) of a train.py run, needing no flags.
    sigma: sample with another fixed variance than the run's."""
    ckpt = load_checkpoint(path)
    if sigma and ckpt["config"].get("sigma") == "learned":
        raise UsageError(f"{path} learned its variance (--sigma learned): leave --sigma out")
    state = ckpt["ema" if ema else "model"]
    check_fits(ckpt["model_config"], state, path)
    model = UNet(**ckpt["model_config"])
    restore(model, state, path, "EMA weights" if ema else "weights")
    return model.eval(), make_diffusion(ckpt["config"], sigma), ckpt


def run_folder(path):
    """The folder of a run given as its folder or its ckpt.pt."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


class LossLog:
    """A run's loss.csv: one row every --log-every steps. On resume the rows after the checkpoint are dropped
    by an atomic rewrite, so a kill at any moment loses no row; a torn row (a kill mid-append) is skipped."""
    FIELDS = ["step", "loss", "lr", "seconds"]

    def __init__(self, path, keep_until):
        self.path = path
        kept = [r for r in read_rows(path) if int(r["step"]) <= keep_until]
        write_atomic(path, lambda f: self._write(f, kept, header=True))

    def _write(self, f, rows, header=False):
        w = csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore")
        if header:
            w.writeheader()
        w.writerows(rows)

    def append(self, step, loss, lr, seconds):
        try:
            with open(self.path, "a", newline="") as f:
                self._write(f, [dict(step=step, loss=f"{loss:.6f}", lr=f"{lr:.3g}", seconds=f"{seconds:.1f}")])
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror}; the last checkpoint is kept") from None


def read_rows(path):
    """The whole, well-formed rows of a loss.csv (none if it is missing); a torn or garbled row is skipped."""
    def whole(r):
        try:
            int(r["step"]), float(r["loss"])
            return True
        except (TypeError, ValueError, KeyError):
            return False
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [r for r in csv.DictReader(f) if whole(r)]
