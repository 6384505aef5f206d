"""Sample quality: the Frechet distance in the features of a small digit classifier trained here (with the
floor real images reach), the fraction of confidently classified samples, and FID/IS by torch-fidelity.

The Frechet distance is FID's formula (Heusel et al. 2017) in other features: not comparable with published FIDs.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from cli import UsageError, first_line
from data import load_dataset, to_model_range


def dims(shape):
    return "x".join(map(str, shape))


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets [N, d]: the Frechet
    (2-Wasserstein) distance of Gaussians fitted to them -- the formula of FID (Heusel et al. 2017).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of S_a S_b's eigenvalues, which are real and >= 0
    (S_a S_b is similar to S_b^(1/2) S_a S_b^(1/2)): unlike a matrix square root, this stays finite when
    few samples (or dead features) make the covariances singular."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # samples of a diverged model: no distance
        return math.nan
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_trace = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(min=0)).sum()
    return mean_term(a, b) + float(np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


def train_classifier(x, y, seed, steps=1000, batch=128):
    """A small MLP classifier on x [N, C, H, W] in [-1, 1]: seeded, on the CPU, a few seconds.
    Returns (features, head); `features` (the 64-unit penultimate layer) is the Frechet space."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 64), torch.nn.ReLU())
        head = torch.nn.Linear(64, int(y.max()) + 1)
    opt = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(head(features(x[idx])), y[idx].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return features.eval().requires_grad_(False), head.eval().requires_grad_(False)


def confident(head, features, x, threshold=0.9):
    """The fraction of images the classifier labels with probability > threshold: well-formed digits."""
    return (torch.softmax(head(features(x)), 1).max(1).values > threshold).float().mean().item()


def quantize(x, levels):
    """[-1, 1] -> the nearest of the data's grey levels, so samples are images of the same kind as the data."""
    return to_model_range(((x.clamp(-1, 1) + 1) * (levels - 1) / 2).round(), levels)


def load_samples(path, shape):
    """Images from sample.py, an .npz (arr_0: uint8 [N, H, W, C]) or a folder of PNGs -> uint8 [N, C, H, W]."""
    if os.path.isfile(os.path.join(path, "samples.npz")):  # sample.py's folder: not its grid.png and figures
        path = os.path.join(path, "samples.npz")
    if path.endswith(".npz") and os.path.isfile(path):
        try:
            arr = np.load(path, allow_pickle=False)["arr_0"]
        except Exception:  # not a zip, no arr_0, or objects in it (never unpickled)
            raise UsageError(f"{path} is not an .npz of images (arr_0: uint8 [N, H, W, C]), as sample.py writes") \
                from None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise UsageError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {arr.dtype} {list(arr.shape)}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    elif os.path.isdir(path):
        x = load_dataset(os.path.join(path, ""), image_size=shape[-1])[0]  # the "/" marks a folder
    else:
        raise UsageError(f"no sample folder or .npz file at {path}: write one with `python sample.py`")
    if tuple(x.shape[1:]) != tuple(shape):
        raise UsageError(f"{path} holds {dims(x.shape[1:])} images, the model makes {dims(shape)}")
    if len(x) < 2:
        raise UsageError(f"{path} holds {len(x)} image: a Frechet distance needs at least 2 (1,000 or more is good)")
    return x


class Images(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] as torch-fidelity wants them: 3 x H x W uint8 tensors."""
    def __init__(self, u8):
        self.u8 = u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8

    def __len__(self):
        return len(self.u8)

    def __getitem__(self, i):
        return self.u8[i]


def inception_metrics(samples, reference, device):
    """FID and IS by torch-fidelity (an established implementation; never a hand-written Inception)."""
    import torch_fidelity
    try:
        m = torch_fidelity.calculate_metrics(input1=Images(samples), input2=Images(reference), fid=True, isc=True,
                                             cuda=device.type == "cuda", verbose=False)
    except OSError as e:  # URLError, ConnectionError: the Inception weights are downloaded on first use
        raise UsageError(f"torch-fidelity could not fetch its Inception weights (offline?): "
                         f"{first_line(e, 120)}; connect once so they are cached") from None
    return dict(fid=m["frechet_inception_distance"], inception_score=m["inception_score_mean"],
                inception_score_std=m["inception_score_std"])


FLOOR_SETS = 20  # random sets of training images the floor is averaged over (it costs no sampling)


def digit_metrics(train, test, seed, n):
    """(measure, base): measure(x) gives a classifier's numbers for samples x in [-1, 1] (the classifier is
    trained once, here): Frechet distance, its mean term, the confident fraction. base: the floor -- the
    Frechet distance of FLOOR_SETS random sets of n training images (all of them if fewer) to the test
    images, since the distance of a finite set grows as it shrinks -- the confident fraction of test
    images and the classifier's test accuracy."""
    levels = test.levels
    x_tr, x_te = to_model_range(train.images, levels), to_model_range(test.images, levels)
    features, head = train_classifier(x_tr, train.labels, seed)
    n = min(n, len(x_tr))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f_tr, f_te = features(x_tr).numpy(), features(x_te).numpy()
        floors = [frechet_distance(f_tr[torch.randperm(len(f_tr), generator=g)[:n].numpy()], f_te)
                  for _ in range(FLOOR_SETS if n < len(x_tr) else 1)]
        base = dict(floor_train_vs_test=float(np.mean(floors)), floor_train_vs_test_draws=floors, floor_n_train=n,
                    confident_test=confident(head, features, x_te),
                    classifier_test_accuracy=(head(features(x_te)).argmax(1) == test.labels).float().mean().item())

    @torch.no_grad()
    def measure(x):
        x = quantize(x, levels)
        f = features(x).numpy()
        return dict(frechet_distance=frechet_distance(f, f_te), frechet_mean_term=mean_term(f, f_te),
                    confident=confident(head, features, x))
    return measure, base


def mean_term(a, b):
    """||mu_a - mu_b||^2, the part of the Frechet distance that the average features make."""
    return float(((np.asarray(a, np.float64).mean(0) - np.asarray(b, np.float64).mean(0)) ** 2).sum())


def over_draws(results):
    """Each number's mean over independent draws, and the list of draws as <name>_draws."""
    return {k: v for name in results[0] for k, v in
            [(name, float(np.mean([r[name] for r in results]))), (f"{name}_draws", [r[name] for r in results])]}
