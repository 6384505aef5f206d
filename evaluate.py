"""Evaluate a DDPM checkpoint: the paper's numbers (Table 1) for your model.

    python evaluate.py                              # the latest run, on its dataset's held-out test split
    python evaluate.py --n-test 50 --n-samples 0    # a quick look: the bound on 50 test images only
    python evaluate.py --samples samples.npz        # judge samples written by sample.py instead

NLL: the bound of Eq. 5, L = L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim, all T terms evaluated (one x_t
per t and image), averaged over test images; the decoder L_0 uses the data's grey levels (17 for digits).
Sample quality, grey labelled data (digits, mnist): the Frechet distance between samples and test images
in the features of a small classifier trained here on the training split, with train-vs-test as the
floor a perfect model reaches. It is FID's formula, NOT the Inception FID: not comparable with published
FIDs. RGB data (cifar10, folders): FID and IS by torch-fidelity (pip install torch-fidelity; it downloads
Inception weights once) of --samples against the training split, as in Table 1.
Writes results.json and bound_terms.png to the run directory (or --out).
"""
import argparse
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import sample
from common import UsageError
from ddpm import Diffusion


def count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def parse_args(argv=None):
    p = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run directory or ckpt.pt (default: the latest under runs/)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA (the paper used EMA)")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the checkpoint's")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--n-test", type=count, help="a fixed seeded subset of N test images (default all; 0: no bound)")
    p.add_argument("--batch-size", type=common.positive(), default=256, help="images per network call (default 256)")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], help="sigma_t^2 (default: the checkpoint's)")
    p.add_argument("--clip", action="store_true", help="clip x0_hat to [-1, 1] in the bound's means (default off)")
    p.add_argument("--n-samples", type=count, default=1000, help="samples to generate for the Frechet distance "
                   "(Algorithm 2 with clipping; default 1000; 0: no sample quality)")
    p.add_argument("--samples", help="instead: sample.py's folder, an .npz (arr_0: uint8 NHWC) or PNGs folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the subset, the noise and the classifier")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="where results.json and bound_terms.png go (default: the run directory)")
    p.add_argument("--force", action="store_true", help="overwrite results already there")
    return p.parse_args(argv)


# ---- the bound (Eq. 5) --------------------------------------------------------------------------
def ticking(bar):
    """A progress= callable for bound_bpd that advances `bar` once per timestep."""
    def wrap(steps):
        for t in steps:
            yield t
            bar.update()
    return wrap


def bound(model, diffusion, x0, levels, batch_size, clip=False, generator=None, bar=None):
    """bound_bpd over x0 [N, C, H, W] in batches: dict of total [N], prior [N], terms [N, T] (CPU float64)."""
    parts = [diffusion.bound_bpd(model, b, levels, clip, generator, ticking(bar) if bar else None)
             for b in x0.split(batch_size)]
    b = {k: torch.cat([p[k].double().cpu() for p in parts]) for k in ("prior", "terms")}
    b["total"] = b["prior"] + b["terms"].sum(1)  # in float64, so that the parts add up to it exactly
    return b


def summarize(b):
    """Means over images of the bound and its parts (bits/dim), with the standard error of the total."""
    n, total = len(b["total"]), b["total"]
    return dict(n_images=n, total_bpd=total.mean().item(),
                total_bpd_se=(total.std() / math.sqrt(n)).item() if n > 1 else None,
                L_T=b["prior"].mean().item(), sum_L_t_minus_1=b["terms"][:, 1:].sum(1).mean().item(),
                L_0=b["terms"][:, 0].mean().item(), terms_bpd=b["terms"].mean(0).tolist())


def plot_terms(terms, prior, path, title):
    """L_{t-1} against t, log scale: which steps the bits are spent on (Secs. 3.4, 4.3); t = 1 is L_0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(terms) + 1), terms, lw=1, label="$L_{t-1}$ ($t = 1$: decoder $L_0$)")
    ax.axhline(prior, color="grey", ls=":", label=f"$L_T$ = {prior:.2g}")
    ax.set(xlabel="t", ylabel="bits/dim", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- sample quality ---------------------------------------------------------------------------
def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets [N, d]: the Frechet
    (2-Wasserstein) distance of Gaussians fitted to them -- the formula of FID (Heusel et al. 2017)."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # dead ReLU features make S singular; the root is still fine
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(s_a @ s_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


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


def quantize(x, levels):
    """[-1, 1] -> the nearest of the data's grey levels, so samples are images of the same kind as the data."""
    return common.to_model_range(((x.clamp(-1, 1) + 1) * (levels - 1) / 2).round(), levels)


def load_samples(path, shape):
    """Images from sample.py, an .npz (arr_0: uint8 [N, H, W, C]) or a folder of PNGs -> uint8 [N, C, H, W]."""
    if os.path.isfile(os.path.join(path, "samples.npz")):  # sample.py's folder: not its grid.png and figures
        path = os.path.join(path, "samples.npz")
    if path.endswith(".npz") and os.path.isfile(path):
        try:
            arr = np.load(path)["arr_0"]
        except Exception as e:
            raise UsageError(f"{path} is not an .npz with arr_0: {common.first_line(e, 120)}") from None
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise UsageError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {arr.dtype} {list(arr.shape)}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    elif os.path.isdir(path):
        x = common.load_dataset(os.path.join(path, ""), image_size=shape[-1])[0]  # the "/" marks a folder
    else:
        raise UsageError(f"no sample folder or .npz file at {path}: write one with `python sample.py`")
    if tuple(x.shape[1:]) != tuple(shape):
        raise UsageError(f"{path} holds {dims(x.shape[1:])} images, the model makes {dims(shape)}")
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
                         f"{common.first_line(e, 120)}; connect once so they are cached") from None
    return dict(fid=m["frechet_inception_distance"], inception_score=m["inception_score_mean"],
                inception_score_std=m["inception_score_std"])


# ---- the program ------------------------------------------------------------------------------
def dims(shape):
    return "x".join(map(str, shape))


def main(argv=None):
    args = parse_args(argv)
    path = args.checkpoint or common.latest_checkpoint()
    ckpt = common.load_checkpoint(path)
    model, diffusion = common.model_from_checkpoint(ckpt, ema=not args.no_ema)
    if args.sigma:
        diffusion = Diffusion(diffusion.beta[1:], sigma=args.sigma)
    cfg, mc, weights = ckpt["config"], model.config, "raw" if args.no_ema else "EMA"
    name = args.dataset or cfg["dataset"]
    size = cfg.get("image_size") or (mc["image_size"] if os.path.isdir(name) else None)  # as it was trained
    test, labels, levels = common.load_dataset(name, "test", size, args.data_root)
    shape = (mc["in_channels"], mc["image_size"], mc["image_size"])
    if tuple(test.shape[1:]) != shape:
        raise UsageError(f"the checkpoint {path} is for {dims(shape)} images, but {name} has {dims(test.shape[1:])}")
    by_classifier = labels is not None and shape[0] == 1
    quality = args.samples is not None or (args.n_samples > 0 and by_classifier)
    samples = load_samples(args.samples, shape) if args.samples else None
    train, train_labels, _ = common.load_dataset(name, "train", size, args.data_root) if quality else (None,) * 3
    if quality and not by_classifier:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise UsageError("FID and IS of RGB data need torch-fidelity: pip install torch-fidelity") from None
    n_test = len(test) if args.n_test is None else args.n_test
    if n_test > len(test):
        raise UsageError(f"--n-test {n_test} is more than the {len(test)} test images of {name}")
    out = args.out or (path if os.path.isdir(path) else os.path.dirname(path) or ".")
    json_path, plot_path = os.path.join(out, "results.json"), os.path.join(out, "bound_terms.png")
    for f in [json_path, plot_path][:2 if n_test else 1]:
        if os.path.exists(f) and not args.force:
            raise UsageError(f"{f} exists: pass --force to overwrite it, or choose another --out")
    device = common.pick_device(args.device)
    model.to(device)
    results = dict(checkpoint=path, step=ckpt.get("step"), dataset=name, T=diffusion.T, levels=levels,
                   ema=not args.no_ema, sigma=diffusion.sigma, clip=args.clip, seed=args.seed, device=str(device))
    os.makedirs(out, exist_ok=True)
    start = time.time()

    if n_test:  # a fixed seeded subset, in the split's order
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:n_test].sort().values
        g = torch.Generator(device).manual_seed(args.seed)
        with tqdm(total=-(-n_test // args.batch_size) * diffusion.T, desc="bound", unit="step") as bar:
            b = bound(model, diffusion, common.to_model_range(test[idx], levels).to(device), levels,
                      args.batch_size, args.clip, g, bar)
        split = "test" if name in common.DATASETS else "all (a folder has no test split)"
        s = results["bound"] = dict(split=split, n_test_split=len(test), **summarize(b),
                                    seconds=round(time.time() - start, 1))
        se = f" ± {s['total_bpd_se']:.4f} (s.e.)" if s["total_bpd_se"] is not None else ""
        print(f"NLL bound (Eq. 5) on {n_test} of {len(test)} test images of {name}: T={diffusion.T}, {weights} "
              f"weights, sigma^2={diffusion.sigma}, {'clipped' if args.clip else 'no clipping'}, {levels} levels\n"
              f"  total {s['total_bpd']:.4f}{se} bits/dim = L_T {s['L_T']:.2e} + sum L_t-1 (t>1) "
              f"{s['sum_L_t_minus_1']:.4f} + L_0 {s['L_0']:.4f}")
        plot_terms(s["terms_bpd"], s["L_T"], plot_path, f"{name}: L = {s['total_bpd']:.3f} bits/dim")

    if quality:
        t0 = time.time()
        if samples is None:  # the authors' sampler, with the weights evaluated above
            x = sample.generate(model, diffusion, args.n_samples, args.batch_size, args.seed + 1, device, clip=True)
            source = f"generated: Algorithm 2 with clipping, {weights} weights"
        else:
            x, source = common.to_model_range(samples, 256), args.samples
        q = results["quality"] = dict(samples=source, n_samples=len(x), sampling_seconds=round(time.time() - t0, 1))
        if by_classifier:
            t1 = time.time()
            x_tr, x_te = common.to_model_range(train, levels), common.to_model_range(test, levels)
            features, head = train_classifier(x_tr, train_labels, args.seed)
            with torch.no_grad():
                accuracy = (head(features(x_te)).argmax(1) == labels).float().mean().item()
                f_gen, f_tr, f_te = (features(v).numpy() for v in (quantize(x, levels), x_tr, x_te))
            q.update(metric="Frechet distance in digit-classifier features (not Inception FID)",
                     frechet_distance=frechet_distance(f_gen, f_te), floor_train_vs_test=frechet_distance(f_tr, f_te),
                     classifier_test_accuracy=accuracy, classifier_seconds=round(time.time() - t1, 1))
            print(f"Frechet distance in the features of a classifier trained here (test accuracy {accuracy:.1%}; NOT "
                  f"the Inception FID): {len(x)} samples vs {len(test)} test images {q['frechet_distance']:.3f}, "
                  f"floor (train vs test) {q['floor_train_vs_test']:.3f}")
        else:
            q.update(metric="torch-fidelity FID and IS (Inception-v3), against the training split",
                     **inception_metrics(samples, train, device))
            print(f"{len(x)} samples vs the {len(train)} training images: FID {q['fid']:.2f}, "
                  f"IS {q['inception_score']:.2f} ± {q['inception_score_std']:.2f}")
        q["seconds"] = round(time.time() - t0, 1)
    elif not by_classifier and args.n_samples:
        print(f"sample quality of {name}: pass --samples DIR written by sample.py (FID/IS by torch-fidelity)")

    results["seconds"] = round(time.time() - start, 1)
    with open(json_path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    print(f"wrote {json_path}" + (f" and {plot_path}" if n_test else ""))


if __name__ == "__main__":
    common.run(main)
