"""Datasets as uint8 tensors in memory, their grey levels and train/test splits; images to and from files.

A dataset is Dataset(images uint8 [N, C, H, W] with values 0..levels-1, labels or None, levels, split),
loaded into memory once: small and fast for digits-, MNIST- and CIFAR-sized data. `split` says what was
read: "train", "test", or "all" (a folder without train/ and test/ subfolders serves all its images).
"""
import functools
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

import runs
from cli import UsageError, first_line
from ddpm import derive_seed

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
DATASETS = ["digits", *TORCHVISION]
DIGITS_TEST_SIZE = 297  # the held-out digits: 1,797 = 1,500 train + 297 test
# Pillow picks a decoder by a file's content, not its name, and some (EPS, PostScript) run an external
# program: only these pure image codecs may read a dataset's files.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_SIZE = 1024  # --image-size: the paper's largest is 256


class Dataset(NamedTuple):
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    levels: int
    split: str


def load_dataset(name, split="train", image_size=None, root="data"):
    """'digits' (scikit-learn, no download), 'mnist', 'fashion-mnist', 'cifar10' (torchvision), or a path
    to a folder of images (see folder_split). image_size: resize to this square size."""
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size {image_size} is out of range: use 1 to {MAX_IMAGE_SIZE}")
    if name in DATASETS:
        images, labels, levels = _digits(split) if name == "digits" else _torchvision(name, split, root)
        if image_size and image_size != images.shape[-1]:
            runs.check_memory(images[:1].numel() * len(images) * 5 * (image_size / images.shape[-1]) ** 2,
                              f"{len(images):,} images resized to {image_size}x{image_size}")  # uint8 and float32
            images = _resize(images, image_size, levels)
        return Dataset(images, labels, levels, split)
    if os.path.sep in name or os.path.isdir(name):
        path, read = folder_split(name, split)
        return Dataset(_folder(path, image_size), None, 256, read)
    raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a folder of images")


def folder_split(path, split):
    """(folder to read, split it holds) for a folder of images. With train/ or test/ subfolders, each split
    is its own subfolder, and a test split is never trained on; without them, every image serves both."""
    if not os.path.isdir(path):
        raise UsageError(f"image folder {path} {'is a file' if os.path.isfile(path) else 'does not exist'}")
    parts = [s for s in ("train", "test") if os.path.isdir(os.path.join(path, s))]
    if not parts:
        return path, "all"
    if split in parts:
        return os.path.join(path, split), split
    if split == "train":
        raise UsageError(f"{path} has a test/ folder but no train/: put the training images in "
                         f"{os.path.join(path, 'train')}/ (a test split is never trained on)")
    return os.path.join(path, "train"), "train"  # asked for test, the folder has only train/


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


# ---- folders of images -----------------------------------------------------------------------------
def image_files(path):
    """Every image file under path, sorted; symlinked folders are followed, each real folder and file once
    (a symlink loop is entered at most once)."""
    folders, files = set(), {}
    for root, dirs, names in os.walk(path, followlinks=True):
        if os.path.realpath(root) in folders:
            dirs.clear()
            continue
        folders.add(os.path.realpath(root))
        for name in names:
            full = os.path.join(root, name)
            if name.lower().endswith(EXTENSIONS) and os.path.isfile(full):
                files.setdefault(os.path.realpath(full), full)
    return sorted(files.values())


def _folder(path, image_size):
    """Every image in a folder (recursively), centre-cropped to a square and resized with Pillow. Grey
    and colour images mixed: all become colour (a grey image is the same in RGB)."""
    if not image_size:
        raise UsageError("a folder of images needs --image-size (e.g. --image-size 32)")
    files = image_files(path)
    if not files:
        raise UsageError(f"no images ({', '.join(EXTENSIONS)}) in {path}")
    runs.check_memory(len(files) * 3 * image_size ** 2, f"{len(files):,} images of {image_size}x{image_size}")
    arrays = [_read_image(f, image_size) for f in files]
    channels = max(a.shape[-1] for a in arrays)
    arrays = [np.repeat(a, channels // a.shape[-1], axis=-1) for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _read_image(f, size):
    """One file -> uint8 [size, size, C], C = 1 for grey images (16-bit ones scaled to 8 bits), else 3."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f, formats=IMAGE_FORMATS) as im:
                if im.mode.startswith("I"):  # 16-bit grey (I;16, or I with values up to 65535)
                    im = Image.fromarray((np.asarray(im, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
                im = im.convert("L" if im.mode in ("1", "L", "LA", "La") else "RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                return np.asarray(im, dtype=np.uint8).reshape(size, size, -1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"{f} has more pixels than Pillow's limit ({Image.MAX_IMAGE_PIXELS:,}): a decompression "
                         f"bomb, or an image far larger than a dataset needs; remove it") from None
    except Exception as e:  # UnidentifiedImageError (also for EPS and other refused formats), truncated files, ...
        raise UsageError(f"cannot read image {f}: {first_line(e, 150)}") from None


# ---- value ranges, batches and pictures --------------------------------------------------------------
def to_model_range(images, levels):
    """Integers 0..levels-1 -> [-1, 1] (paper Sec. 3.3; for 8-bit data this is x / 127.5 - 1)."""
    return images.float() * (2.0 / (levels - 1)) - 1.0


def to_uint8(x):
    """[-1, 1] -> uint8 0..255 for image files (values outside are clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def batch_indices(step, n, batch_size, seed, device="cpu"):
    """Indices (on `device`) of the images in optimizer step `step`: epochs of a seeded permutation.

    The whole global batch is decided here and each process takes its slice, so a run does not depend
    on the number of GPUs, and resuming at a step needs no loader state.
    """
    epoch, k = divmod(step, n // batch_size)
    return _epoch_order(epoch, n, seed, torch.device(device))[k * batch_size:(k + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(epoch, n, seed, device):
    """An epoch's permutation, drawn on the CPU (the same on every device) and moved once per epoch: a copy
    each step would make the GPU drain its queue every step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))).to(device)


def grid_image(x, nrow=8, min_size=256, pad=1):
    """Images in [-1, 1] [N,C,H,W] -> one PIL image, tiles upscaled (nearest) to be visible."""
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


def save_image(im, path):
    """Save a PIL image atomically, in the format its extension names."""
    fmt = (os.path.splitext(path)[1][1:] or "png").upper().replace("JPG", "JPEG")
    runs.write_atomic(path, lambda f: im.save(f, format=fmt), "wb")
