"""Evaluate a DDPM: the paper's numbers (Table 1) and its Sec. 4.3 measurements, for your model or the authors'.

    python evaluate.py                              # the latest run, on its dataset's held-out test split
    python evaluate.py --n-test 50 --n-samples 0    # a quick look: the bound on 50 test images only
    python evaluate.py --samples samples.npz        # judge samples written by sample.py instead
    python evaluate.py --pretrained ddpm-cifar10-32 # Table 1's NLL for the authors' CIFAR-10 weights (GPU)

NLL: the bound of Eq. 5, L = L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim, all T terms evaluated (one x_t
per t and image), averaged over test images; the decoder L_0 uses the data's grey levels (17 for digits).
As the authors' evaluation: x0_hat clipped to [-1, 1] inside every term's mean (--no-clip: unclipped).
Rate and distortion (Sec. 4.3, Table 4, Fig. 5) come from the same evaluation of the bound.
Sample quality, grey labelled data (digits, mnist): the Frechet distance between samples and test images
in the features of a small classifier trained here on the training split, with train-vs-test as the
floor a perfect model reaches, and the fraction of samples it classifies with probability > 0.9; the
same for x0_hat along the reverse process (Fig. 10); nearest training images (Figs. 12, 15). It is FID's
formula, NOT the Inception FID: not comparable with published FIDs. RGB data (cifar10, folders): FID and
IS by torch-fidelity (pip install torch-fidelity; it downloads Inception weights once) of --samples
against the training split, as in Table 1.
Writes results.json, bound_terms.png and rate_distortion.png (and x0_quality.png, nearest.png) to the run
directory (or --out).
"""
import argparse
import json
import math
import os
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import figures
from common import UsageError
from ddpm import rate_distortion


def parse_args(argv=None):
    p = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a run directory or ckpt.pt (default: the latest under runs/)")
    source.add_argument("--pretrained", help="the authors' weights, diffusers format (.safetensors, .bin, folder)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA (the paper used EMA)")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the checkpoint's (pretrained 3x32x32: "
                   "cifar10); a folder's test split is its test/ subfolder")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--n-test", type=common.number(int, 0),
                   help="a fixed seeded subset of N test images (default all; 0: no bound)")
    p.add_argument("--batch-size", type=common.positive(), default=256, help="images per network call (default 256)")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], help="sigma_t^2 (default: the checkpoint's)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0_hat to [-1, 1] "
                   "in the bound's means, as the authors' evaluation (default on)")
    p.add_argument("--n-samples", type=common.number(int, 0), default=1000, help="samples per draw for the Frechet "
                   "distance (Algorithm 2 with clipping; default 1000; 0: no sample quality)")
    p.add_argument("--draws", type=common.positive(), default=3, help="independent draws of --n-samples samples: "
                   "every quality number is their mean, with the range (default 3)")
    p.add_argument("--amp", choices=common.AMP, default="auto", help="autocast the network while "
                   "sampling: auto is bf16 on a CPU with native bfloat16 (the bound is always float32)")
    p.add_argument("--samples", help="instead: sample.py's folder, an .npz (arr_0: uint8 NHWC) or PNGs folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the subset, the noise and the classifier")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="where results.json and the plots go (default: the run's, or the weights' directory)")
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
    """bound_bpd over x0 [N, C, H, W] in batches: total [N], prior [N], terms and mse [N, T] (CPU float64)."""
    parts = [diffusion.bound_bpd(model, b, levels, clip, generator, ticking(bar) if bar else None)
             for b in x0.split(batch_size)]
    b = {k: torch.cat([p[k].double().cpu() for p in parts]) for k in ("prior", "terms", "mse")}
    b["total"] = b["prior"] + b["terms"].sum(1)  # in float64, so that the parts add up to it exactly
    return b


def summarize(b, levels):
    """Means over images of the bound and its parts (bits/dim), with the standard error of the total; and the
    rate and distortion at every t (Sec. 4.3; RMSE on the data's integer scale: 0..255, or 0..16 for digits)."""
    n, total = len(b["total"]), b["total"]
    rate, distortion = rate_distortion(b["terms"], b["prior"], b["mse"], scale=(levels - 1) / 2)
    return dict(n_images=n, total_bpd=total.mean().item(),
                total_bpd_se=(total.std() / math.sqrt(n)).item() if n > 1 else None,
                L_T=b["prior"].mean().item(), sum_L_t_minus_1=b["terms"][:, 1:].sum(1).mean().item(),
                L_0=b["terms"][:, 0].mean().item(), terms_bpd=b["terms"].mean(0).tolist(),
                rate_bpd=rate.tolist(), distortion_rmse=distortion.tolist())


# ---- sample quality ---------------------------------------------------------------------------
def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between feature sets [N, d]: the Frechet
    (2-Wasserstein) distance of Gaussians fitted to them -- the formula of FID (Heusel et al. 2017)."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):  # samples of a diverged model: no distance
        return math.nan
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # dead ReLU features make S singular; the root is still fine
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(s_a @ s_b).real
    return mean_term(a, b) + float(np.trace(s_a + s_b - 2 * root))


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
                         f"{common.first_line(e, 120)}; connect once so they are cached") from None
    return dict(fid=m["frechet_inception_distance"], inception_score=m["inception_score_mean"],
                inception_score_std=m["inception_score_std"])


# ---- the program ------------------------------------------------------------------------------
def dims(shape):
    return "x".join(map(str, shape))


def load_weights(args):
    """(network, Diffusion, checkpoint (or its stand-in), the directory results go to): a train.py run, or
    the authors' weights with their settings (common.load_pretrained_run)."""
    if not args.pretrained:
        path = args.checkpoint or common.latest_checkpoint()
        model, diffusion, ckpt = common.load_run(path, ema=not args.no_ema, sigma=args.sigma)
        return model, diffusion, ckpt, path if os.path.isdir(path) else os.path.dirname(path) or "."
    model, diffusion, where = common.load_pretrained_run(args.pretrained, args.sigma, args.no_ema)
    if not args.dataset and (model.in_channels, model.image_size) != (3, 32):
        raise UsageError(f"{args.pretrained} is a {dims((3, model.image_size, model.image_size))} model: pass "
                         f"--dataset (a folder with a test/ subfolder of its images)")
    return model, diffusion, dict(config=dict(dataset=args.dataset or "cifar10"), model_config=model.config), where


def setup(args):
    """Everything checked before any expensive work: the weights, the data, the samples, the outputs."""
    model, diffusion, ckpt, where = load_weights(args)
    cfg, mc = ckpt["config"], model.config
    name = args.dataset or cfg["dataset"]
    if args.pretrained and not common.has_split(name, "test"):
        raise UsageError(f"{name} has no test split (a test/ subfolder): Table 1 is measured on held-out images")
    size = cfg.get("image_size") or (mc["image_size"] if os.path.isdir(name) else None)  # as it was trained
    test, labels, levels = common.load_dataset(name, "test", size, args.data_root)
    shape = (mc["in_channels"], mc["image_size"], mc["image_size"])
    if tuple(test.shape[1:]) != shape:
        raise UsageError(f"{args.pretrained or args.checkpoint or 'the checkpoint'} is for {dims(shape)} images, "
                         f"but {name} has {dims(test.shape[1:])}")
    e = SimpleNamespace(path=args.pretrained or where, step=ckpt.get("step"), model=model, diffusion=diffusion,
                        name=name, test=test, labels=labels, levels=levels, seed=args.seed,
                        by_classifier=labels is not None and shape[0] == 1,
                        samples=load_samples(args.samples, shape) if args.samples else None)
    e.quality = e.samples is not None or (args.n_samples > 0 and e.by_classifier)
    if e.quality and e.samples is None and args.n_samples < 2:
        raise UsageError("--n-samples 1: a Frechet distance needs at least 2 samples (1,000 or more is good)")
    e.train, e.train_labels, _ = common.load_dataset(name, "train", size, args.data_root) if e.quality else (None,) * 3
    if e.quality and not e.by_classifier:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise UsageError("FID and IS of RGB data need torch-fidelity: pip install torch-fidelity") from None
    e.n_test = len(test) if args.n_test is None else args.n_test
    if e.n_test > len(test):
        raise UsageError(f"--n-test {e.n_test} is more than the {len(test)} test images of {name}")
    e.out = common.check_writable(args.out or where)
    e.files = {k: os.path.join(e.out, f) for k, f in [("json", "results.json"), ("terms", "bound_terms.png"),
               ("rd", "rate_distortion.png"), ("x0", "x0_quality.png"), ("nearest", "nearest.png")]}
    for f in [e.files["json"], *([e.files["terms"], e.files["rd"]] if e.n_test else [])]:
        if os.path.exists(f) and not args.force:
            raise UsageError(f"{f} exists: pass --force to overwrite it, or choose another --out")
    return e


def evaluate_bound(e, args, device):
    """Table 1's NLL and Table 4's rate and distortion: the bound on a fixed seeded subset of the test split."""
    start, weights = time.time(), "pretrained" if args.pretrained else "raw" if args.no_ema else "EMA"
    T = e.diffusion.T
    print(f"the bound costs {e.n_test:,} images x T = {T:,} steps = {e.n_test * T:,} image-steps of the network "
          f"({-(-e.n_test // args.batch_size) * T:,} calls of up to {args.batch_size} images)")
    idx = torch.randperm(len(e.test), generator=torch.Generator().manual_seed(args.seed))[:e.n_test].sort().values
    g = torch.Generator(device).manual_seed(args.seed)
    with tqdm(total=-(-e.n_test // args.batch_size) * T, desc="bound", unit="step") as bar:
        b = bound(e.model, e.diffusion, common.to_model_range(e.test[idx], e.levels).to(device), e.levels,
                  args.batch_size, args.clip, g, bar)
    split = "test" if common.has_split(e.name, "test") else "all (this folder has no test/ split)"
    s = dict(split=split, n_test_split=len(e.test), **summarize(b, e.levels), seconds=round(time.time() - start, 1))
    se = f" ± {s['total_bpd_se']:.4f} (s.e.)" if s["total_bpd_se"] is not None else ""
    print(f"NLL bound (Eq. 5) on {e.n_test} of {len(e.test)} {split} images of {e.name}: T={T}, {weights} weights, "
          f"sigma^2={e.diffusion.sigma}, {'clipped' if args.clip else 'no clipping'}, {e.levels} levels\n"
          f"  total {s['total_bpd']:.4f}{se} bits/dim = L_T {s['L_T']:.2e} + sum L_t-1 (t>1) "
          f"{s['sum_L_t_minus_1']:.4f} + L_0 {s['L_0']:.4f}")
    unit = f"[0, {e.levels - 1}]"
    print(f"rate and distortion (Sec. 4.3, Table 4): reverse time T-t+1, rate (bits/dim), RMSE on {unit}")
    for r in figures.table4_rows(T):
        print(f"  {r:6d}  {s['rate_bpd'][T - r]:.5f}  {s['distortion_rmse'][T - r]:.5f}")
    figures.plot_terms(s["terms_bpd"], s["L_T"], e.files["terms"], f"{e.name}: L = {s['total_bpd']:.3f} bits/dim")
    figures.rate_distortion_plot(s["rate_bpd"], s["distortion_rmse"], unit, e.files["rd"],
                                 f"{e.name}: rate and distortion along the reverse process (Fig. 5)")
    return s


def evaluate_quality(e, args, device):
    """Sample quality: a classifier's numbers (grey labelled data) with Figs. 10, 12 and 15; else FID/IS."""
    t0, steps = time.time(), {}
    every = max(1, e.diffusion.T // 20)  # Fig. 10: x0_hat at 20 points of one sampling run (and t = 1)

    def record(t, x_t, x0_hat):
        if (e.diffusion.T - t) % every == 0 or t == 1:  # keyed by the reverse steps taken to reach x_t
            steps[e.diffusion.T - t] = x0_hat.cpu()
    if e.samples is None:  # the authors' sampler, with the weights evaluated above; draw k has seed + 1 + k
        draws = [common.generate(e.model, e.diffusion, args.n_samples, args.batch_size, args.seed + 1 + k, device,
                                 clip=True, callback=record if e.by_classifier and k == 0 else None, amp=e.amp)
                 for k in range(args.draws)]
        source = f"generated: Algorithm 2 with clipping, {'raw' if args.no_ema else 'EMA'} weights"
    else:
        draws, source = [common.to_model_range(e.samples, 256)], args.samples
    x = draws[0]
    q = dict(samples=source, n_samples=len(x), draws=len(draws), sampling_seconds=round(time.time() - t0, 1))
    if not e.by_classifier:
        q.update(metric="torch-fidelity FID and IS (Inception-v3), against the training split",
                 **inception_metrics(e.samples, e.train, device))
        print(f"{len(x)} samples vs the {len(e.train)} training images: FID {q['fid']:.2f}, "
              f"IS {q['inception_score']:.2f} ± {q['inception_score_std']:.2f}")
        return dict(q, seconds=round(time.time() - t0, 1))
    measure, base = digit_metrics(e, len(x))
    q.update(base, **over_draws([measure(d) for d in draws]),
             metric="Frechet distance in digit-classifier features (not Inception FID)")
    print(f"Frechet distance in the features of a classifier trained here (test accuracy "
          f"{q['classifier_test_accuracy']:.1%}; NOT the Inception FID), {len(draws)} draw(s) of {len(x)} samples vs "
          f"{len(e.test)} test images: {spread(q, 'frechet_distance', '{:.3f}')}, of which the mean term "
          f"{spread(q, 'frechet_mean_term', '{:.3f}')}; floor ({q['floor_n_train']} training images vs test) "
          f"{spread(q, 'floor_train_vs_test', '{:.3f}')}\nconfidently classified (p > 0.9): samples "
          f"{spread(q, 'confident', '{:.1%}')}, test images {q['confident_test']:.1%}")
    train, test = (common.to_model_range(v, e.levels) for v in (e.train, e.test))
    q["memorisation"] = figures.memorisation(quantize(torch.cat(draws), e.levels), train, test)
    print(f"median distance to the nearest training image: samples / test images = "
          f"{q['memorisation']['ratio']:.2f} (well below 1 would mean copying)")
    common.save_image(figures.nearest_figure(quantize(x, e.levels), train), e.files["nearest"])
    if steps:
        q["x0_hat_quality"] = [dict(reverse_steps=r, **{k: measure(v)[k] for k in ("frechet_distance", "confident")})
                               for r, v in sorted(steps.items())]
        figures.progressive_plot(q["x0_hat_quality"], e.files["x0"], f"{e.name}: x̂₀ along the reverse process "
                                 f"(Fig. 10), {len(steps[min(steps)])} samples")
    return dict(q, seconds=round(time.time() - t0, 1))


FLOOR_SETS = 20  # random sets of training images the floor is averaged over (it costs no sampling)


def digit_metrics(e, n):
    """(measure, base): measure(x) gives a classifier's numbers for samples x in [-1, 1] (the classifier is
    trained once, here): Frechet distance, its mean term, the confident fraction. base: the floor -- the
    Frechet distance of FLOOR_SETS random sets of n training images (all of them if fewer) to the test
    images, since the distance of a finite set grows as it shrinks -- the confident fraction of test
    images and the classifier's test accuracy."""
    x_tr, x_te = common.to_model_range(e.train, e.levels), common.to_model_range(e.test, e.levels)
    features, head = train_classifier(x_tr, e.train_labels, e.seed)
    n = min(n, len(x_tr))
    g = torch.Generator().manual_seed(e.seed)
    with torch.no_grad():
        f_tr, f_te = features(x_tr).numpy(), features(x_te).numpy()
        floors = [frechet_distance(f_tr[torch.randperm(len(f_tr), generator=g)[:n].numpy()], f_te)
                  for _ in range(FLOOR_SETS if n < len(x_tr) else 1)]
        base = dict(floor_train_vs_test=float(np.mean(floors)), floor_train_vs_test_draws=floors, floor_n_train=n,
                    confident_test=confident(head, features, x_te),
                    classifier_test_accuracy=(head(features(x_te)).argmax(1) == e.labels).float().mean().item())

    @torch.no_grad()
    def measure(x):
        x = quantize(x, e.levels)
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


def spread(q, name, fmt):
    """'mean' for one draw; 'mean (lo-hi)' over several."""
    values = q.get(f"{name}_draws", [q[name]])
    mean = fmt.format(q[name])
    return mean if len(values) < 2 else f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main(argv=None):
    args = parse_args(argv)
    e = setup(args)
    device = common.pick_device(args.device)
    e.amp = common.pick_amp(args.amp, device)
    e.model.to(device)
    results = dict(checkpoint=e.path, step=e.step, dataset=e.name, T=e.diffusion.T, levels=e.levels,
                   ema=not args.no_ema and not args.pretrained, predict=e.diffusion.predict,
                   sigma=e.diffusion.sigma, clip=args.clip, seed=args.seed, device=str(device),
                   amp_sampling=common.amp_name(e.amp))
    os.makedirs(e.out, exist_ok=True)
    start = time.time()
    if e.n_test:
        results["bound"] = evaluate_bound(e, args, device)
        write_results(results, start, e.files["json"])  # kept even if what follows fails
    if e.quality:
        results["quality"] = evaluate_quality(e, args, device)
    elif not e.by_classifier and args.n_samples:
        print(f"sample quality of {e.name}: pass --samples DIR written by sample.py (FID/IS by torch-fidelity)")
    write_results(results, start, e.files["json"])
    print(f"wrote {e.out}/: results.json" + (", bound_terms.png, rate_distortion.png" if e.n_test else "")
          + (", nearest.png, x0_quality.png" if e.quality and e.by_classifier else ""))


def write_results(results, start, path):
    results["seconds"] = round(time.time() - start, 1)
    common.write_atomic(path, lambda f: json.dump(results, f, indent=1))


if __name__ == "__main__":
    common.run(main)
