"""The command line the programs share: one-line errors, exit codes and stop signals, argument types, devices
(and torchrun's processes) and autocast.

Exit codes: 0 done, 2 a mistake the user can fix (one line on stderr, never a traceback), 3 a training
run whose loss diverged, 128 + N a run stopped by signal N and saved (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""
import argparse
import math
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

DIVERGED = 3  # train.py's exit code when the loss or gradient becomes NaN or infinite (ablation.py reads it)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill / a scheduler, a closed terminal
SEED_MAX = 2**32 - 1  # seeds are combined with counters (ddpm.derive_seed) and must stay within 64 bits


class UsageError(Exception):
    """A mistake the user can fix (or a full disk): printed as one line, exit code 2, no traceback."""


class Stopped(KeyboardInterrupt):
    """A stop signal outside train.py's loop (which saves first): exit 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def first_line(e, limit=200):
    """An exception's first line, shortened: enough to say why, in a one-line error."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


def run(main):
    """Run a program's main(): a UsageError is one line and exit 2; SIGINT, SIGTERM and SIGHUP stop it
    like Ctrl-C, so that no half-written file is left behind (exit 128 + N)."""
    def stop(signum, _frame):
        raise Stopped(signum)
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    stdout, sys.stdout = sys.stdout, QuietWhenClosed(sys.stdout)
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: ask for less (a smaller --batch-size or --n)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        sys.stdout = stdout
        for s, handler in previous.items():
            signal.signal(s, handler)


class QuietWhenClosed:
    """sys.stdout that goes quiet when its reader has gone (`python evaluate.py | head -3`): the program
    still finishes and writes its files, instead of dying on a BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:  # from now on the output goes to /dev/null, also Python's last flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


class StopSignals:
    """Within it, Ctrl-C, SIGTERM (kill, cluster schedulers, `timeout`) and SIGHUP (a closed terminal) only set
    .signum: train.py's loop then finishes its step and saves, instead of being killed."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (no usage block) and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type for a finite number in a range, e.g. number(float, 0, 1, hi_open=True) is [0, 1)."""
    def parse(text):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value"
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
                or (hi is not None and (value >= hi if hi_open else value > hi)):
            if lo == 0 and lo_open:
                where = "positive" + (f" and at most {hi:,}" if hi is not None else "")
            elif hi is None:
                where = f"at least {lo}"
            else:
                where = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def positive(kind=int, hi=None):
    """argparse type for positive finite numbers (at most hi), so `--steps 0` or `--lr nan` fail clearly."""
    return number(kind, lo=0, hi=hi, lo_open=True)


seed = number(int, 0, SEED_MAX)  # argparse type of every --seed


def int_list(lo=1, allow_empty=False):
    """argparse type: '1,2,2' -> (1, 2, 2), every value >= lo; '' -> () where allowed."""
    def parse(text):
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = None
        if values is None or not values and not allow_empty or any(v < lo for v in values):
            what = "positive" if lo == 1 else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {'' if allow_empty else 'one or more '}{what} integers "
                                             f"separated by commas, got {text!r}")
        return values
    parse.__name__ = "list of integers"
    return parse


# ---- devices, processes and autocast ----------------------------------------------------------------
DEVICES = ("cpu", "cuda", "mps")  # what the programs run on; torch knows more (meta, xpu, ...), we do not
AMP = ("auto", "off", "bf16", "fp16")  # the programs' --amp choices


DEVICE_HELP = "auto (default: cuda > mps > cpu), cpu, cuda, cuda:N or mps"
AMP_HELP = "autocast the network: auto (default) is bf16 on a CPU with native bfloat16, else off (float32); fp16: CUDA only"


def add_device_flags(p, amp_help=AMP_HELP):
    """--device and --amp, with the same meaning in every program."""
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--amp", choices=AMP, help=amp_help)


def pick_device(name=None):
    """'cuda' if there is a GPU, else Apple's 'mps', else 'cpu'; or check the one asked for."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise UsageError(f"unknown or unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA GPU is available: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available: use --device cpu")
    return device


def start_processes(device_name):
    """(rank, world size, device): one process, or one per GPU when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    gpu = torch.cuda.is_available() and device_name != "cpu"
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)  # so that NCCL and stray allocations use this process's GPU
    dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def native_bf16(device):
    """Whether `device` computes in bfloat16 natively: CUDA GPUs from Ampere on, and CPUs with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo; elsewhere we do not assume it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def pick_amp(name, device):
    """The autocast dtype for --amp (None: float32). auto: bfloat16 on a CPU that has it natively (about
    1.3x faster there, docs/speed.md), else float32 -- GPUs keep the paper's float32 unless asked."""
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cpu" and native_bf16(device) else None
    if name == "off":
        return None
    if device.type not in ("cuda", "cpu") or (name == "fp16" and device.type == "cpu"):
        raise UsageError(f"--amp {name} is not supported on {device.type}: use --amp off"
                         + (" or bf16" if device.type == "cpu" else ""))
    if name == "bf16" and not native_bf16(device):
        print(f"note: this {device.type} has no native bfloat16; --amp bf16 will be emulated and may be slower")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def amp_name(amp):
    """'bfloat16', 'float16' or 'float32' (no autocast), for messages and results."""
    return str(amp).replace("torch.", "") if amp else "float32"


def spread(values, fmt):
    """'m' for one value; 'm (a-b)': the mean of several and their range (draws of samples, seeds)."""
    mean = fmt.format(sum(values) / len(values))
    return mean if len(values) < 2 else f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"
