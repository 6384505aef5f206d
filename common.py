"""What train.py, sample.py and evaluate.py share: errors, devices, files, checkpoints, data, pictures,
and the sampler all three call.

Nothing here is diffusion math (that is ddpm.py) or network (unet.py).
"""
import argparse
import glob
import math
import os
import re
import sys

import numpy as np
import torch

RUNS = "runs"          # train.py writes runs/<config>[-N]/
CHECKPOINT = "ckpt.pt"
DIVERGED = 3  # train.py's exit code when the loss or gradient becomes NaN or infinite (ablation.py reads it)
DIGITS_TEST_SIZE = 297  # the held-out digits: 1,797 = 1,500 train + 297 test


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


def first_line(e, limit=200):
    """An exception's first line, shortened: enough to say why, in a one-line error."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]


def run(main):
    """Run a program's main(), turning UsageError into 'error: ...' and exit code 2 (Ctrl-C: 130)."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside train.py's loop (which saves first): no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (no usage block) and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive(kind=int):
    """argparse type for positive finite numbers, so `--steps 0` or `--lr nan` fails with a clear message."""
    return number(kind, lo=0, lo_open=True)


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type for a finite number in a range, e.g. number(float, 0, 1, hi_open=True) is [0, 1)."""
    def parse(text):
        value = kind(text)  # a ValueError becomes argparse's "invalid int value"
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
                or (hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"must be {_range_text(lo, hi, lo_open, hi_open)}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _range_text(lo, hi, lo_open, hi_open):
    if hi is None:
        return "positive" if lo == 0 and lo_open else f"at least {lo}" if lo is not None else "a finite number"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


# ---- devices ------------------------------------------------------------------------------------
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
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available: use --device cpu")
    return device


def native_bf16(device):
    """Whether `device` computes in bfloat16 natively: CUDA GPUs from Ampere on, and CPUs with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo; elsewhere we do not assume it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


AMP = ("auto", "off", "bf16", "fp16")  # the programs' --amp choices


def pick_amp(name, device):
    """The autocast dtype for --amp (None: float32). auto: bfloat16 on a CPU that has it natively (about
    1.5x faster there, README "Speed"), else float32 -- GPUs keep the paper's float32 unless asked."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and native_bf16(device) else None
    if name in (None, "off"):
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


# ---- files ---------------------------------------------------------------------------------------
def check_writable(path):
    """Fail now, in one line, if the directory `path` (made later if missing) could not be written:
    before any expensive work, and without creating anything."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot write to {path}: {existing} is a file, not a directory; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}: {existing} is not writable; choose another --out")
    return path


def write_atomic(path, write, mode="w"):
    """write(f) into a temporary file, then rename it over `path`: a crash leaves the old file whole."""
    tmp = f"{path}.tmp"
    with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def load_checkpoint(path, needs=("T", "dataset")):
    """Load a checkpoint written by train.py (safely: weights_only=True), checking its config has `needs`."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}: run `python train.py` first, or pass an existing file")
    from unet import load_tensors
    try:
        ckpt = load_tensors(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: its {what} do not fit its own configuration ({first_line(e, 150)})") from None


def make_diffusion(config, sigma=None):
    """The one place a run's configuration becomes its Diffusion: the paper's linear schedule over
    config["T"], its sigma (or `sigma` instead) and its parameterisation (older runs: eps, beta)."""
    from ddpm import Diffusion, linear_betas
    return Diffusion(linear_betas(config["T"]), sigma=sigma or config.get("sigma", "beta"),
                     predict=config.get("predict", "eps"))


def load_run(path, ema=True, sigma=None):
    """(network in eval mode, its Diffusion, the checkpoint) of a train.py run, needing no flags: the one
    loader of sample.py and evaluate.py. sigma: sample with another fixed variance than the run's."""
    from unet import UNet
    ckpt = load_checkpoint(path)
    if sigma and ckpt["config"].get("sigma") == "learned":
        raise UsageError(f"{path} learned its variance (--sigma learned): leave --sigma out")
    try:
        model = UNet(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path} does not fit this version of unet.py: {first_line(e, 150)}") from None
    restore(model, ckpt["ema" if ema else "model"], path, "EMA weights" if ema else "weights")
    return model.eval(), make_diffusion(ckpt["config"], sigma), ckpt


def load_pretrained_run(path, sigma=None, no_ema=False):
    """(network, Diffusion, directory of the weights) for the authors' released weights (unet.load_pretrained),
    with their settings: T = 1000, linear betas, eps; sigma^2 = beta at 32x32 and beta~ at 256x256, as their
    samplers (the decoder's log beta~_2 at t = 1 is ddpm.py's for both)."""
    from unet import load_pretrained
    if no_ema:
        raise UsageError("--no-ema needs a checkpoint from train.py (a weights file holds one set of weights)")
    try:
        model = load_pretrained(path)
    except Exception as e:  # missing, corrupt (safetensors or pickle errors), or another architecture
        raise UsageError(f"cannot load --pretrained {path}: {first_line(e, 300)}") from None
    sigma = sigma or ("beta" if model.image_size <= 32 else "beta_tilde")
    where = path if os.path.isdir(path) else os.path.dirname(path) or "."
    return model, make_diffusion({"T": model.T}, sigma), where


# ---- data -----------------------------------------------------------------------------------------
# A dataset here is (images uint8 [N, C, H, W] with values 0..levels-1, labels or None, levels).
# Everything is loaded into memory once: small and fast for digits/MNIST/CIFAR-sized data.
TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
DATASETS = ["digits", *TORCHVISION]


def load_dataset(name, split="train", image_size=None, root="data"):
    """'digits' (scikit-learn, no download), 'mnist', 'fashion-mnist', 'cifar10' (torchvision),
    or a path to a folder of images (its `split` subfolder if it has one, see has_split).
    Returns (images uint8 [N,C,H,W], labels or None, levels)."""
    if name in DATASETS:
        images, labels, levels = _digits(split) if name == "digits" else _torchvision(name, split, root)
        if image_size and image_size != images.shape[-1]:
            images = _resize(images, image_size, levels)
        return images, labels, levels
    if os.path.sep in name or os.path.isdir(name):
        return _folder(os.path.join(name, split) if has_split(name, split) else name, image_size)
    raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a folder of images")


def has_split(name, split):
    """Named datasets have train and test splits; a folder has them as train/ and test/ subfolders
    (without them, all its images serve as both)."""
    return name in DATASETS or os.path.isdir(os.path.join(name, split))


def _resize(images, size, levels):
    """Antialiased bilinear resize of a whole uint8 dataset, keeping its grey levels."""
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, levels - 1).to(torch.uint8)


def _digits(split):
    """scikit-learn's 8x8 digits (17 grey levels, 0..16). The test split is a fixed, stratified
    297 images (random_state=0) that train.py never sees; evaluate.py measures on it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = data.images.astype(np.uint8)[:, None]
    train, test = train_test_split(np.arange(len(images)), test_size=DIGITS_TEST_SIZE,
                                   random_state=0, stratify=data.target)
    idx = train if split == "train" else test
    return torch.from_numpy(images[idx]), torch.from_numpy(data.target[idx]), 17


def _torchvision(name, split, root):
    try:
        import torchvision
    except ImportError:
        raise UsageError(f"dataset {name!r} needs torchvision: pip install torchvision") from None
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    try:
        ds = cls(root, train=(split == "train"), download=True)
    except Exception as e:  # offline, or the mirror is down
        raise UsageError(f"could not download {name} into {root}/ ({first_line(e, 120)}); "
                         f"connect to the internet once, or copy the files there") from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # NHWC -> NCHW
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets)), 256


def _folder(path, image_size):
    """Every image in a folder (recursively), centre-cropped to a square and resized with Pillow."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isdir(path):
        raise UsageError(f"image folder {path} does not exist")
    if not image_size:
        raise UsageError("a folder of images needs --image-size (e.g. --image-size 32)")
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.lower().endswith(exts))
    if not files:
        raise UsageError(f"no images ({', '.join(exts)}) in {path}")
    images, mode = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                mode = mode or ("L" if im.mode in ("L", "LA", "I", "I;16", "1") else "RGB")
                im = im.convert(mode)
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                im = im.resize((image_size, image_size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, -1))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"cannot read image {f}: {e}") from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), None, 256


def to_model_range(images, levels):
    """Integers 0..levels-1 -> [-1, 1] (paper Sec. 3.3; for 8-bit data this is x / 127.5 - 1)."""
    return images.float() * (2.0 / (levels - 1)) - 1.0


def to_uint8(x):
    """[-1, 1] -> uint8 0..255 for image files (values outside are clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---- pictures -------------------------------------------------------------------------------------
def grid_image(x, nrow=8, min_size=256, pad=1):
    """Images in [-1, 1] [N,C,H,W] -> one PIL image, tiles upscaled (nearest) to be visible."""
    from PIL import Image
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    canvas = torch.full((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, img in enumerate(to_uint8(x.detach().cpu().float())):
        r, k = divmod(i, ncol)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    array = canvas.permute(1, 2, 0).numpy()
    im = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, -(-min_size // max(im.size)))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def save_image(im, path, force=True):
    """Save a PIL image atomically; refuse to replace an existing file unless force."""
    if os.path.exists(path) and not force:
        raise UsageError(f"{path} exists: pass --force to overwrite it, or choose another --out")
    fmt = (os.path.splitext(path)[1][1:] or "png").upper().replace("JPG", "JPEG")
    write_atomic(path, lambda f: im.save(f, format=fmt), "wb")


# ---- sampling ---------------------------------------------------------------------------------------
GROUP = 1000  # images per run of Algorithm 2: bounds the memory x_t takes when n is large (FID: 50,000)


@torch.inference_mode()
def generate(model, diffusion, n, batch_size=64, seed=0, device="cpu", clip=True, callback=None, progress=True,
             amp=None):
    """Algorithm 2 for n images, as every program draws them; returns x_0 [n, C, H, W] on the CPU.

    Randomness: the images come in groups of GROUP, each group from its own generator seeded with
    (seed, group index), which draws x_T for the whole group and then each step's z, in order. The network
    sees the group in chunks of batch_size, so batch_size changes memory, not the images (up to float
    rounding in batched convolutions). callback(t, x_t, x0_hat) is called at each step of the first group.
    amp: the network's autocast dtype (None: float32); the sampler's own arithmetic stays float32.
    """
    def chunked(x, t):  # at most batch_size images per network call
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            out = [model(xb, tb) for xb, tb in zip(x.split(batch_size), t.split(batch_size))]
        return torch.cat(out).float()

    def step(t, x_t, x0_hat):
        bar.update()  # reads no tensor, so a GPU never waits for the host
        if callback is not None and not out:  # the first group only
            callback(t, x_t, x0_hat)

    from tqdm import tqdm
    shape = (model.in_channels, model.image_size, model.image_size)
    groups = range(0, n, GROUP)
    bar = tqdm(total=len(groups) * diffusion.T, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    out = []
    for g, start in enumerate(groups):
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + g)
        x = diffusion.p_sample_loop(chunked, (min(GROUP, n - start), *shape), clip, gen, device, step)
        out.append(x.cpu())
    bar.close()
    return torch.cat(out)
