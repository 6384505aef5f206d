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
import glob
import os
import time

import numpy as np
import torch
from PIL import Image

import common
import figures
from common import UsageError

STRIP, GIF, PAIRS = figures.STRIP, figures.GIF_SAMPLES, 3  # samples in reverse.png, denoising.gif; pairs in Fig. 8


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="ckpt.pt or run directory from train.py (default: the latest run)")
    source.add_argument("--pretrained", help="the authors' weights, diffusers format (.safetensors, .bin, folder)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of their EMA")
    p.add_argument("--n", type=common.positive(), default=64, help="number of images (default 64)")
    p.add_argument("--batch-size", type=common.positive(), help="images per network call (default 64; 4 above "
                   "64x64): bounds memory, does not change the images")
    p.add_argument("--seed", type=int, default=0, help="same seed and device, same images (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], help="sigma_t^2 of Sec. 3.2 (default: the "
                   "checkpoint's, else beta; pretrained: beta at 32x32, beta_tilde at 256x256, as the authors)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0_hat to [-1, 1] "
                   "(default on, as the authors' sampler; --no-clip is exactly Algorithm 2)")
    p.add_argument("--amp", choices=common.AMP, default="auto", help="autocast the network: auto "
                   "(default) is bf16 on a CPU with native bfloat16 (about 1.5x faster there), else off (float32)")
    p.add_argument("--figures", action="store_true", help="also write the paper's figures: reverse.png (Fig. 6), "
                   "forward.png, denoising.gif, shared_latent.png (Fig. 7), interpolation.png (8), "
                   "coarse_to_fine.png (9)")
    p.add_argument("--out", help="output directory (default <run>/samples, or a fresh samples-N)")
    p.add_argument("--force", action="store_true", help="write into an existing output directory")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are (for forward.png)")
    return p.parse_args(argv)


def load(args):
    """(network, Diffusion with the sampler's sigma, training config or None, directory of the weights)."""
    if args.pretrained:
        model, diffusion, where = common.load_pretrained_run(args.pretrained, args.sigma, args.no_ema)
        return model, diffusion, None, where
    path = args.checkpoint or common.latest_checkpoint()
    model, diffusion, ckpt = common.load_run(path, ema=not args.no_ema, sigma=args.sigma)
    return model, diffusion, ckpt["config"], path if os.path.isdir(path) else os.path.dirname(path)


def output_dir(args, run_dir):
    if args.out:
        if os.path.exists(args.out) and not (args.force and os.path.isdir(args.out)):
            raise UsageError(f"{args.out} exists: pass --force to write into it, or choose another --out")
        return common.check_writable(args.out)
    out, k = os.path.join(run_dir, "samples"), 1
    while os.path.exists(out) and not (args.force and os.path.isdir(out)):  # keep earlier samples
        k += 1
        out = os.path.join(run_dir, f"samples-{k}")
    return common.check_writable(out)


def write_samples(x, out):
    """grid.png, images/NNNNNN.png and samples.npz (arr_0: uint8 [N, H, W, C]), each written atomically."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for old in glob.glob(os.path.join(out, "images", "*.png")):  # --force: no stale images from a larger --n
        os.remove(old)
    common.save_image(common.grid_image(x[:64]), os.path.join(out, "grid.png"))
    nhwc = common.to_uint8(x).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(nhwc):
        common.save_image(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a),
                          os.path.join(out, "images", f"{i:06d}.png"))
    common.write_atomic(os.path.join(out, "samples.npz"), lambda f: np.savez(f, arr_0=nhwc), "wb")
    return ["grid.png", "images/", "samples.npz"]


class Figures:
    """What --figures records while sampling (a callback for common.generate), and the files it writes."""

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
        d, save = self.diffusion, lambda im, name: common.save_image(im, os.path.join(out, name))
        save(figures.reverse_figure(self.recorded, x[:STRIP], self.ts), "reverse.png")
        # Without training data (pretrained weights), the forward process starts from our own samples.
        x0 = self.data if self.data is not None else x[:STRIP]
        save(figures.forward_figure(d, x0, self.ts, self.seed), "forward.png")
        frames = [*self.frames, figures.gif_frame(x[:GIF], x[:GIF], "x_0")]
        common.write_atomic(os.path.join(out, "denoising.gif"), lambda f: frames[0].save(
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
        return ["reverse.png", "forward.png", "denoising.gif", "shared_latent.png", "interpolation.png",
                "coarse_to_fine.png"]


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
    images, _, levels = common.load_dataset(config["dataset"], "train", config.get("image_size"), args.data_root)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:STRIP]
    test = common.load_dataset(config["dataset"], "test", config.get("image_size"), args.data_root)[0]
    shuffled = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))]
    return common.to_model_range(images[pick], levels), pairs_of(common.to_model_range(shuffled, levels))


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    amp = common.pick_amp(args.amp, device)
    model, diffusion, config, run_dir = load(args)
    out = output_dir(args, run_dir)
    figs = Figures(diffusion, figure_data(args, config), args.seed) if args.figures else None
    batch_size = args.batch_size or (64 if model.image_size <= 64 else 4)  # 256x256 activations are large
    start = time.time()
    x = common.generate(model.to(device), diffusion, args.n, batch_size, args.seed, device, args.clip, figs, amp=amp)
    seconds = time.time() - start
    written = write_samples(x, out) + (figs.write(x, out, model, args.clip, device) if figs else [])
    weights = "pretrained" if args.pretrained else "raw" if args.no_ema else "EMA"
    print(f"{args.n} images in {seconds:.1f} s ({weights} weights, T={diffusion.T}, sigma^2={diffusion.sigma}, "
          f"clip {'on' if args.clip else 'off'}, seed {args.seed}, {device}, {common.amp_name(amp)}); "
          f"wrote {out}/: {', '.join(written)}")


if __name__ == "__main__":
    common.run(main)
