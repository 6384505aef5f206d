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
Writes results.json first, then bound_terms.png and rate_distortion.png (and x0_quality.png, nearest.png),
to the run directory (or --out): a picture that cannot be written never costs the numbers.
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

import cli
import figures
import runs
from cli import UsageError, spread
from data import Dataset, load_dataset, save_image, to_model_range
from ddpm import generate, rate_distortion
from pretrained import Weights, load_weights
from quality import digit_metrics, dims, inception_metrics, load_samples, over_draws, quantize


def parse_args(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a run directory or ckpt.pt (default: the latest under runs/)")
    source.add_argument("--pretrained", help="the authors' weights, diffusers format (.safetensors, .bin, folder)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA (the paper used EMA)")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the checkpoint's (pretrained 3x32x32: "
                   "cifar10); a folder's test split is its test/ subfolder")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--n-test", type=cli.number(int, 0),
                   help="a fixed seeded subset of N test images (default all; 0: no bound)")
    p.add_argument("--batch-size", type=cli.positive(), default=256, help="images per network call (default 256)")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], help="sigma_t^2 (default: the checkpoint's)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0_hat to [-1, 1] "
                   "in the bound's means, as the authors' evaluation (default on)")
    p.add_argument("--n-samples", type=cli.number(int, 0), default=1000, help="samples per draw for the Frechet "
                   "distance (Algorithm 2 with clipping; default 1000; 0: no sample quality)")
    p.add_argument("--draws", type=cli.positive(), default=3, help="independent draws of --n-samples samples: "
                   "every quality number is their mean, with the range (default 3)")
    cli.add_device_flags(p, amp_help="autocast the network while sampling: auto (default) is bf16 on a CPU with "
                         "native bfloat16 (the bound is always float32)")
    p.add_argument("--samples", help="instead: sample.py's folder, an .npz (arr_0: uint8 NHWC) or PNGs folder")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed for the subset, the noise and the classifier")
    p.add_argument("--out", help="where results.json and the plots go (default: the run's, or the weights' directory)")
    p.add_argument("--force", action="store_true", help="replace results evaluate.py wrote there before")
    return p.parse_args(argv)


# ---- the bound (Eq. 5) --------------------------------------------------------------------------
def bound(model, diffusion, batches, levels, clip=False, generator=None):
    """bound_bpd over batches of test images [n, C, H, W], with a progress bar: total [N], prior [N], terms
    and mse [N, T] (on the CPU, float64)."""
    with tqdm(total=len(batches) * diffusion.T, desc="bound", unit="step") as bar:
        def ticking(steps):  # bound_bpd's progress: one tick per timestep
            for t in steps:
                yield t
                bar.update()
        parts = [diffusion.bound_bpd(model, x0, levels, clip, generator, ticking) for x0 in batches]
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


# ---- the program ------------------------------------------------------------------------------
FILES = dict(json="results.json", terms="bound_terms.png", rd="rate_distortion.png", x0="x0_quality.png",
             nearest="nearest.png")


@dataclass
class Evaluation:
    """What evaluate.py measures, on what, and where it writes: everything checked before any expensive work."""
    w: Weights
    name: str                   # the dataset
    test: Dataset
    train: Optional[Dataset]    # for the classifier and its floor (sample quality only)
    samples: Optional[torch.Tensor]  # --samples, uint8; else they are drawn
    n_test: int                 # images for the bound (0: none)
    by_classifier: bool         # grey labelled data: a classifier's numbers; otherwise FID/IS
    quality: bool               # whether sample quality is measured
    out: str
    device: torch.device = None
    amp: object = None
    pictures_failed: list = field(default_factory=list)

    def file(self, key):
        return os.path.join(self.out, FILES[key])


def setup(args):
    w = load_weights(args.checkpoint, args.pretrained, args.no_ema, args.sigma)
    mc = w.model.config
    if args.pretrained and not args.dataset and (mc["in_channels"], mc["image_size"]) != (3, 32):
        raise UsageError(f"{args.pretrained} is a {dims((3, mc['image_size'], mc['image_size']))} model: pass "
                         f"--dataset (a folder with a test/ subfolder of its images)")
    cfg = w.config or dict(dataset=args.dataset or "cifar10")
    name = args.dataset or cfg["dataset"]
    size = cfg.get("image_size") or (mc["image_size"] if os.path.isdir(name) else None)  # as it was trained
    test = load_dataset(name, "test", size, args.data_root)
    if args.pretrained and test.split != "test":
        raise UsageError(f"{name} has no test split (a test/ subfolder): Table 1 is measured on held-out images")
    shape = (mc["in_channels"], mc["image_size"], mc["image_size"])
    if tuple(test.images.shape[1:]) != shape:
        raise UsageError(f"{args.pretrained or args.checkpoint or 'the checkpoint'} is for {dims(shape)} images, "
                         f"but {name} has {dims(test.images.shape[1:])}")
    by_classifier = test.labels is not None and shape[0] == 1
    samples = load_samples(args.samples, shape) if args.samples else None
    quality = samples is not None or (args.n_samples > 0 and by_classifier)
    if quality and not by_classifier:
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise UsageError("FID and IS of RGB data need torch-fidelity: pip install torch-fidelity") from None
    n_test = len(test.images) if args.n_test is None else args.n_test
    if n_test > len(test.images):
        raise UsageError(f"--n-test {n_test} is more than the {len(test.images)} test images of {name}")
    if not n_test and not quality:
        raise UsageError("nothing to measure: --n-test 0 and no sample quality (pass --n-samples N for a grey "
                         "labelled dataset, or --samples for FID/IS)")
    if quality and samples is None:
        if args.n_samples < 2:
            raise UsageError("--n-samples 1: a Frechet distance needs at least 2 samples (1,000 or more is good)")
        runs.check_memory(args.draws * args.n_samples * math.prod(shape) * 8, f"{args.draws:,} draws of "
                          f"{args.n_samples:,} samples")
    e = Evaluation(w, name, test, load_dataset(name, "train", size, args.data_root) if quality else None, samples,
                   n_test, by_classifier, quality, runs.check_writable(args.out or w.folder))
    runs.check_claim(e.out, written_files(e), args.force)
    return e


def written_files(e):
    return [FILES[k] for k in ("json", *(("terms", "rd") if e.n_test else ()),
                                *(("nearest", "x0") if e.quality and e.by_classifier else ()))]


def picture(e, key, draw):
    """Draw one picture into its file; a failure (a full disk) is remembered, and the numbers are kept."""
    try:
        draw(e.file(key))
    except UsageError as err:
        e.pictures_failed.append(str(err))


def evaluate_bound(e, args):
    """Table 1's NLL and Table 4's rate and distortion: the bound on a fixed seeded subset of the test split."""
    start = time.time()
    T, test, levels = e.w.diffusion.T, e.test.images, e.test.levels
    print(f"the bound costs {e.n_test:,} images x T = {T:,} steps = {e.n_test * T:,} image-steps of the network "
          f"({-(-e.n_test // args.batch_size) * T:,} calls of up to {args.batch_size} images)")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:e.n_test].sort().values
    g = torch.Generator(e.device).manual_seed(args.seed)
    x0 = to_model_range(test[idx], levels).to(e.device)
    b = bound(e.w.model, e.w.diffusion, x0.split(args.batch_size), levels, args.clip, g)
    split = e.test.split if e.test.split != "all" else "all (this folder has no test/ split)"
    s = dict(split=split, n_test_split=len(test), **summarize(b, levels), seconds=round(time.time() - start, 1))
    se = f" ± {s['total_bpd_se']:.4f} (s.e.)" if s["total_bpd_se"] is not None else ""
    print(f"NLL bound (Eq. 5) on {e.n_test} of {len(test)} {split} images of {e.name}: T={T}, {e.w.kind} weights, "
          f"sigma^2={e.w.diffusion.sigma}, {'clipped' if args.clip else 'no clipping'}, {levels} levels\n"
          f"  total {s['total_bpd']:.4f}{se} bits/dim = L_T {s['L_T']:.2e} + sum L_t-1 (t>1) "
          f"{s['sum_L_t_minus_1']:.4f} + L_0 {s['L_0']:.4f}")
    print(f"rate and distortion (Sec. 4.3, Table 4): reverse time T-t+1, rate (bits/dim), RMSE on [0, {levels - 1}]")
    for r in figures.table4_rows(T):
        print(f"  {r:6d}  {s['rate_bpd'][T - r]:.5f}  {s['distortion_rmse'][T - r]:.5f}")
    return s


def bound_pictures(e, s):
    unit = f"[0, {e.test.levels - 1}]"
    picture(e, "terms", lambda path: figures.plot_terms(s["terms_bpd"], s["L_T"], path,
                                                        f"{e.name}: L = {s['total_bpd']:.3f} bits/dim"))
    picture(e, "rd", lambda path: figures.rate_distortion_plot(
        s["rate_bpd"], s["distortion_rmse"], unit, path, f"{e.name}: rate and distortion along the reverse process "
                                                          f"(Fig. 5)"))


def evaluate_quality(e, args):
    """Sample quality: a classifier's numbers (grey labelled data) with Figs. 10, 12 and 15; else FID/IS.
    Returns (numbers, pictures to draw once the numbers are saved)."""
    t0, steps, T = time.time(), {}, e.w.diffusion.T
    every = max(1, T // 20)  # Fig. 10: x0_hat at 20 points of one sampling run (and t = 1)

    def record(t, x_t, x0_hat):
        if (T - t) % every == 0 or t == 1:  # keyed by the reverse steps taken to reach x_t
            steps[T - t] = x0_hat.cpu()
    if e.samples is None:  # the authors' sampler, with the weights evaluated above; draw k has seed + 1 + k
        print(f"sampling {args.draws} x {args.n_samples:,} images x T = {T:,} steps")
        draws = [generate(e.w.model, e.w.diffusion, args.n_samples, args.seed + 1 + k, batch_size=args.batch_size,
                          amp=e.amp, callback=record if e.by_classifier and k == 0 else None, progress=True)
                 for k in range(args.draws)]
        source = f"generated: Algorithm 2 with clipping, {e.w.kind} weights"
    else:
        draws, source = [to_model_range(e.samples, 256)], args.samples
    x = draws[0]
    q = dict(samples=source, n_samples=len(x), draws=len(draws), sampling_seconds=round(time.time() - t0, 1))
    if not e.by_classifier:
        q.update(metric="torch-fidelity FID and IS (Inception-v3), against the training split",
                 **inception_metrics(e.samples, e.train.images, e.device))
        print(f"{len(x)} samples vs the {len(e.train.images)} training images: FID {q['fid']:.2f}, "
              f"IS {q['inception_score']:.2f} ± {q['inception_score_std']:.2f}")
        return dict(q, seconds=round(time.time() - t0, 1)), []
    measure, base = digit_metrics(e.train, e.test, args.seed, len(x))
    q.update(base, **over_draws([measure(d) for d in draws]),
             metric="Frechet distance in digit-classifier features (not Inception FID)")
    show = lambda name, fmt: spread(q.get(f"{name}_draws", [q[name]]), fmt)  # noqa: E731
    print(f"Frechet distance in the features of a classifier trained here (test accuracy "
          f"{q['classifier_test_accuracy']:.1%}; NOT the Inception FID), {len(draws)} draw(s) of {len(x)} samples vs "
          f"{len(e.test.images)} test images: {show('frechet_distance', '{:.3f}')}, of which the mean term "
          f"{show('frechet_mean_term', '{:.3f}')}; floor ({q['floor_n_train']} training images vs test) "
          f"{show('floor_train_vs_test', '{:.3f}')}\nconfidently classified (p > 0.9): samples "
          f"{show('confident', '{:.1%}')}, test images {q['confident_test']:.1%}")
    levels = e.test.levels
    train, test = (to_model_range(v.images, levels) for v in (e.train, e.test))
    q["memorisation"] = figures.memorisation(quantize(torch.cat(draws), levels), train, test)
    print(f"median distance to the nearest training image: samples / test images = "
          f"{q['memorisation']['ratio']:.2f} (well below 1 would mean copying)")
    pictures = [("nearest", lambda path: save_image(figures.nearest_figure(quantize(x, levels), train), path))]
    if steps:
        q["x0_hat_quality"] = [dict(reverse_steps=r, **{k: measure(v)[k] for k in ("frechet_distance", "confident")})
                               for r, v in sorted(steps.items())]
        pictures.append(("x0", lambda path: figures.progressive_plot(
            q["x0_hat_quality"], path, f"{e.name}: x̂₀ along the reverse process (Fig. 10), "
                                       f"{len(steps[min(steps)])} samples")))
    return dict(q, seconds=round(time.time() - t0, 1)), pictures


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    e = setup(args)
    e.device, e.amp = device, cli.pick_amp(args.amp, device)
    e.w.model.to(e.device)
    results = dict(checkpoint=args.pretrained or e.w.folder, step=e.w.step, dataset=e.name, T=e.w.diffusion.T,
                   levels=e.test.levels, ema=not args.no_ema and not args.pretrained, predict=e.w.diffusion.predict,
                   sigma=e.w.diffusion.sigma, clip=args.clip, seed=args.seed, device=str(e.device),
                   amp_sampling=cli.amp_name(e.amp))
    start = time.time()
    with runs.locked(e.out):
        runs.check_claim(e.out, written_files(e), args.force)
        runs.claim(e.out, written_files(e))
        if e.n_test:
            results["bound"] = evaluate_bound(e, args)
            write_results(results, start, e.file("json"))  # the numbers first, kept whatever follows
            bound_pictures(e, results["bound"])
        if e.quality:
            results["quality"], pictures = evaluate_quality(e, args)
            write_results(results, start, e.file("json"))
            for key, draw in pictures:
                picture(e, key, draw)
        elif not e.by_classifier and args.n_samples:
            print(f"sample quality of {e.name}: pass --samples DIR written by sample.py (FID/IS by torch-fidelity)")
    if e.pictures_failed:
        raise UsageError(f"{e.pictures_failed[0]} (results.json holds every number)")
    print(f"wrote {e.out}/: {', '.join(written_files(e))}")


def write_results(results, start, path):
    results["seconds"] = round(time.time() - start, 1)
    runs.write_atomic(path, lambda f: json.dump(results, f, indent=1))


if __name__ == "__main__":
    cli.run(main)
