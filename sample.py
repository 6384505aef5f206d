"""Sample from a trained DDPM (Algorithm 2), and draw the reverse process the way the paper does.

    python sample.py               # 64 images from the latest `python train.py` run (EMA weights)
    python sample.py --figures     # also the paper's figures of the reverse process (Figs. 6-9), see below
    python sample.py --pretrained ddpm-cifar10-32/diffusion_pytorch_model.safetensors   # the authors' weights

Writes <run>/samples/ (or a fresh samples-2, samples-3, ...): grid.png (the first 64, enlarged),
images/000000.png, ... (one PNG per image, actual size) and samples.npz (key arr_0: uint8 [N, H, W, C],
C = 1 for grey images), the inputs FID tools read. --figures adds reverse.png (Fig. 6: x_t and x0_hat over
t), forward.png, denoising.gif, shared_latent.png (Fig. 7), interpolation.png (Fig. 8: held-out pairs mixed
at t = T/2) and coarse_to_fine.png (Fig. 9: one pair mixed after 0, T/8, ..., T steps).
"""
import argparse
import os
import re
import time

import numpy as np
import torch
from PIL import Image

import cli
import figures
import runs
from cli import UsageError
from data import grid_image, load_dataset, save_image, to_model_range, to_uint8
from ddpm import generate
from pretrained import load_weights

STRIP, GIF, PAIRS = figures.STRIP, figures.GIF_SAMPLES, 3  # samples in reverse.png, denoising.gif; pairs in Fig. 8
FIGURES = ["reverse.png", "forward.png", "denoising.gif", "shared_latent.png", "interpolation.png",
           "coarse_to_fine.png"]


def parse_args(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="ckpt.pt or run directory from train.py (default: the latest run)")
    source.add_argument("--pretrained", help="the authors' weights, diffusers format (.safetensors, .bin, folder)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of their EMA")
    p.add_argument("--n", type=cli.positive(hi=10**7), default=64, help="number of images (default 64)")
    p.add_argument("--batch-size", type=cli.positive(), help="images per network call (default 256; 4 above "
                   "64x64): bounds memory, does not change the images")
    p.add_argument("--seed", type=cli.seed, default=0, help="same seed and device, same images (default 0)")
    cli.add_device_flags(p)
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], help="sigma_t^2 of Sec. 3.2 (default: the "
                   "checkpoint's, else beta; pretrained: beta at 32x32, beta_tilde at 256x256, as the authors)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0_hat to [-1, 1] "
                   "(default on, as the authors' sampler; --no-clip is exactly Algorithm 2)")
    p.add_argument("--figures", action="store_true", help="also write the paper's figures: reverse.png (Fig. 6), "
                   "forward.png, denoising.gif, shared_latent.png (Fig. 7), interpolation.png (8), "
                   "coarse_to_fine.png (9)")
    p.add_argument("--out", help="output directory (default <run>/samples, or a fresh samples-N)")
    p.add_argument("--force", action="store_true", help="write into an existing output directory, replacing the "
                   "files sample.py wrote there (never other files)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are (for forward.png)")
    return p.parse_args(argv)


def output_dir(args, run_dir):
    """--out (existing only with --force), or <run>/samples (with --force), or the first free <run>/samples-N."""
    if args.out and os.path.isfile(args.out):
        raise UsageError(f"{args.out} is a file: choose another --out")
    if args.out and os.path.exists(args.out) and not (args.force and os.path.isdir(args.out)):
        raise UsageError(f"{args.out} exists: pass --force to write into it (only files sample.py wrote there "
                         f"are replaced), or choose another --out")
    out = args.out or runs.free_folder(os.path.join(run_dir, "samples"), lambda path: not os.path.exists(path)
                                       or args.force and os.path.isdir(path))
    return runs.check_writable(out)


def image_names(n):
    return [f"images/{i:06d}.png" for i in range(n)]


def check_cost(args, w, out):
    """Refuse, before sampling, what memory or the disk could not hold; say what a large request costs."""
    m = w.model
    dims = m.in_channels * m.image_size ** 2
    what = f"{args.n:,} samples of {m.in_channels}x{m.image_size}x{m.image_size}"
    runs.check_memory(args.n * dims * 5, what)  # float32 on the host, then uint8
    runs.check_disk(out, args.n * (2 * dims + 200), what)  # PNGs and the .npz
    if args.n * w.diffusion.T > 10**7:
        print(f"{what} x T = {w.diffusion.T:,} steps: {args.n * w.diffusion.T:,} image-steps of the network")


def write_samples(x, out):
    """grid.png, images/NNNNNN.png and samples.npz (arr_0: uint8 [N, H, W, C]), each written atomically."""
    runs.make_folder(os.path.join(out, "images"))
    save_image(grid_image(x[:64]), os.path.join(out, "grid.png"))
    nhwc = to_uint8(x).permute(0, 2, 3, 1).numpy()
    for a, name in zip(nhwc, image_names(len(x))):
        save_image(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), os.path.join(out, name))
    runs.write_atomic(os.path.join(out, "samples.npz"), lambda f: np.savez(f, arr_0=nhwc), "wb")
    return ["grid.png", "images/", "samples.npz"]


class Figures:
    """What --figures records while sampling (a callback for ddpm.generate), and the files it writes."""

    def __init__(self, diffusion, data, seed):
        self.diffusion, (self.data, self.pairs), self.seed = diffusion, data, seed
        self.ts, self.every = figures.timesteps(diffusion.T), max(1, diffusion.T // 50)
        self.recorded, self.frames = {}, []

    def __call__(self, t, x_t, x0_hat):  # copies to the host at ~60 of the T steps
        if t in self.ts:
            self.recorded[t] = (x_t[:STRIP].cpu(), x0_hat[:STRIP].cpu())
        if (self.diffusion.T - t) % self.every == 0 or t == 1:
            self.frames.append(figures.gif_frame(x_t[:GIF], x0_hat[:GIF], f"x_t, t={t}"))

    def write(self, x, out, model, clip, device):
        """The reverse process (Fig. 6), forward process, GIF; shared latents (Fig. 7), interpolations (Figs. 8, 9)."""
        d, save = self.diffusion, lambda im, name: save_image(im, os.path.join(out, name))
        save(figures.reverse_figure(self.recorded, x[:STRIP], self.ts), "reverse.png")
        # Without training data (pretrained weights), the forward process starts from our own samples.
        x0 = self.data if self.data is not None else x[:STRIP]
        save(figures.forward_figure(d, x0, self.ts, self.seed), "forward.png")
        frames = [*self.frames, figures.gif_frame(x[:GIF], x[:GIF], "x_0")]
        runs.write_atomic(os.path.join(out, "denoising.gif"), lambda f: frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], loop=0,
            duration=[60] * (len(frames) - 1) + [2000]), "wb")  # hold the result for 2 s
        shape = (model.in_channels, model.image_size, model.image_size)
        save(figures.shared_latent_figure(figures.shared_latents(model, d, shape, self.seed, clip, device=device)),
             "shared_latent.png")
        a, b = (self.pairs if self.pairs is not None else pairs_of(x)).to(device)
        save(figures.interpolation_figure(a, b, figures.interpolate(model, d, a, b, d.T // 2, self.seed, clip)),
             "interpolation.png")
        save(figures.coarse_to_fine_figure(a, b, *figures.coarse_to_fine(model, d, a, b, self.seed, clip)),
             "coarse_to_fine.png")
        return FIGURES


def pairs_of(images):
    """Up to PAIRS pairs of images, as [2, P, C, H, W] (one image is paired with itself)."""
    images = images if len(images) > 1 else images.repeat(2, 1, 1, 1)
    p = min(PAIRS, len(images) // 2)
    return images[:2 * p].reshape(2, p, *images.shape[1:])


def figure_data(args, config):
    """STRIP training images for forward.png and PAIRS pairs of held-out images to interpolate, read BEFORE
    sampling: a download error should not waste a run. (None, None) for pretrained weights: own samples then."""
    if not args.figures or config is None:
        return None, None
    images, _, levels, _ = load_dataset(config["dataset"], "train", config.get("image_size"), args.data_root)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:STRIP]
    test = load_dataset(config["dataset"], "test", config.get("image_size"), args.data_root).images
    shuffled = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))]
    return to_model_range(images[pick], levels), pairs_of(to_model_range(shuffled, levels))


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    amp = cli.pick_amp(args.amp, device)
    w = load_weights(args.checkpoint, args.pretrained, args.no_ema, args.sigma)
    out = output_dir(args, w.folder)
    check_cost(args, w, out)
    names = ["grid.png", "samples.npz", *image_names(args.n), *(FIGURES if args.figures else [])]
    runs.check_claim(out, names, args.force)  # a file sample.py did not write stops us before sampling
    figs = Figures(w.diffusion, figure_data(args, w.config), args.seed) if args.figures else None
    batch_size = args.batch_size or (256 if w.model.image_size <= 64 else 4)  # 256x256 activations are large
    with runs.locked(out):
        runs.check_claim(out, names, args.force)
        stale = {f for f in runs.written(out) if re.fullmatch(r"images/\d{6}\.png", f)} - set(names)
        runs.claim(out, names, drop=stale)
        for name in stale:  # --force over a larger --n: its extra images were sample.py's own
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        start = time.time()
        x = generate(w.model.to(device), w.diffusion, args.n, args.seed, batch_size=batch_size, clip=args.clip,
                     amp=amp, callback=figs, progress=True)
        seconds = time.time() - start
        written = write_samples(x, out) + (figs.write(x, out, w.model, args.clip, device) if figs else [])
    print(f"{args.n} images in {seconds:.1f} s ({w.kind} weights, T={w.diffusion.T}, sigma^2={w.diffusion.sigma}, "
          f"clip {'on' if args.clip else 'off'}, seed {args.seed}, {device}, {cli.amp_name(amp)}); "
          f"wrote {out}/: {', '.join(written)}")


if __name__ == "__main__":
    cli.run(main)
