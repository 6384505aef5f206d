"""Sample from a trained DDPM (Algorithm 2), and draw the reverse process the way the paper does.

    python sample.py               # 64 images from the latest `python train.py` run (EMA weights)
    python sample.py --figures     # also reverse.png (as the paper's Fig. 6), forward.png, denoising.gif
    python sample.py --pretrained ddpm-cifar10-32/diffusion_pytorch_model.safetensors   # the authors' weights

Writes <run>/samples/ (or a fresh samples-2, samples-3, ...): grid.png (the first 64, enlarged),
images/000000.png, ... (one PNG per image, actual size) and samples.npz (key arr_0: uint8 [N, H, W, C],
C = 1 for grey images), the inputs FID tools read.
"""
import argparse
import glob
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
from common import UsageError
import unet

STRIP, GIF_SAMPLES = 4, 16  # samples shown in reverse.png / forward.png, and in denoising.gif
FIGURE_SIZE = 384  # the figures' minimum size (pixels)


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
    p.add_argument("--figures", action="store_true", help="also write reverse.png, forward.png, denoising.gif")
    p.add_argument("--out", help="output directory (default <run>/samples, or a fresh samples-N)")
    p.add_argument("--force", action="store_true", help="write into an existing output directory")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are (for forward.png)")
    return p.parse_args(argv)


def load(args):
    """(network, Diffusion with the sampler's sigma, training config or None, directory of the weights)."""
    if args.pretrained:
        if args.no_ema:
            raise UsageError("--no-ema needs a checkpoint from train.py (a weights file holds one set of weights)")
        try:
            model = unet.load_pretrained(args.pretrained)
        except Exception as e:  # missing, corrupt (safetensors or pickle errors), or another architecture
            raise UsageError(f"cannot load --pretrained {args.pretrained}: {common.first_line(e, 300)}") from None
        # The authors sampled CIFAR-10 with sigma^2 = beta and the 256x256 models with beta~ (T = 1000, linear).
        sigma = args.sigma or ("beta" if model.image_size <= 32 else "beta_tilde")
        where = args.pretrained if os.path.isdir(args.pretrained) else os.path.dirname(args.pretrained)
        return model, common.make_diffusion({"T": model.T}, sigma), None, where
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


# ---- figures ------------------------------------------------------------------------------------------
def timesteps(T):
    """The figures' columns: t = T, 3T/4, T/2, T/4, T/10, 1 (the paper's Fig. 6 style); fewer if T is small."""
    return sorted({T, round(3 * T / 4), round(T / 2), round(T / 4), round(T / 10), 1} - {0}, reverse=True)


def reverse_figure(recorded, x0, ts):
    """Per sample, a row of x_t and a row of the predicted x0_hat (Eq. 15) at t = T..1, then the final x_0."""
    tiles = []
    for i in range(len(x0)):
        for k in (0, 1):  # 0: x_t, 1: x0_hat
            tiles += [*(recorded[t][k][i] for t in ts), x0[i]]
    im = common.grid_image(torch.stack(tiles), nrow=len(ts) + 1, min_size=FIGURE_SIZE)
    return common.labelled(im, [f"t={t}" for t in ts] + ["x_0"], ["x_t", "x0_hat"] * len(x0))


def forward_figure(diffusion, x0, ts, seed):
    """The forward process: Eq. 2 iterated from x_0, one trajectory per image, shown at t = 1..T."""
    gen, x, kept = torch.Generator().manual_seed(seed), x0, {}
    for t in range(1, diffusion.T + 1):
        x = diffusion.q_step_sample(x, t, torch.randn(x.shape, generator=gen))
        if t in ts:
            kept[t] = x
    columns = [x0, *(kept[t] for t in reversed(ts))]
    im = common.grid_image(torch.stack(columns, 1).flatten(0, 1), nrow=len(columns), min_size=FIGURE_SIZE)
    return common.labelled(im, ["x_0"] + [f"t={t}" for t in reversed(ts)])


def gif_frame(x_t, x0_hat, title):
    """x_t and x0_hat side by side, each as a grid."""
    a, b = (common.grid_image(v, nrow=4) for v in (x_t, x0_hat))
    both = Image.new(a.mode, (2 * a.width + 8, a.height), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width + 8, 0))
    return common.labelled(both, [title, "predicted x_0"])


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
        self.diffusion, self.data, self.seed = diffusion, data, seed
        self.ts, self.every = timesteps(diffusion.T), max(1, diffusion.T // 50)
        self.recorded, self.frames = {}, []

    def __call__(self, t, x_t, x0_hat):  # copies to the host at ~60 of the T steps
        if t in self.ts:
            self.recorded[t] = (x_t[:STRIP].cpu(), x0_hat[:STRIP].cpu())
        if (self.diffusion.T - t) % self.every == 0 or t == 1:
            self.frames.append(gif_frame(x_t[:GIF_SAMPLES], x0_hat[:GIF_SAMPLES], f"x_t, t={t}"))

    def write(self, x, out):
        common.save_image(reverse_figure(self.recorded, x[:STRIP], self.ts), os.path.join(out, "reverse.png"))
        # Without training data (pretrained weights), the forward process starts from our own samples.
        x0 = self.data if self.data is not None else x[:STRIP]
        common.save_image(forward_figure(self.diffusion, x0, self.ts, self.seed), os.path.join(out, "forward.png"))
        frames = [*self.frames, gif_frame(x[:GIF_SAMPLES], x[:GIF_SAMPLES], "x_0")]
        common.write_atomic(os.path.join(out, "denoising.gif"), lambda f: frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], loop=0,
            duration=[60] * (len(frames) - 1) + [2000]), "wb")  # hold the result for 2 s
        return ["reverse.png", "forward.png", "denoising.gif"]


def figure_data(args, config):
    """STRIP training images for forward.png, read BEFORE sampling: a download error should not waste a run."""
    if not args.figures or config is None:
        return None
    images, _, levels = common.load_dataset(config["dataset"], "train", config.get("image_size"), args.data_root)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:STRIP]
    return common.to_model_range(images[pick], levels)


def main(argv=None):
    args = parse_args(argv)
    device = common.pick_device(args.device)
    model, diffusion, config, run_dir = load(args)
    out = output_dir(args, run_dir)
    figures = Figures(diffusion, figure_data(args, config), args.seed) if args.figures else None
    batch_size = args.batch_size or (64 if model.image_size <= 64 else 4)  # 256x256 activations are large
    start = time.time()
    x = common.generate(model.to(device), diffusion, args.n, batch_size, args.seed, device, args.clip, figures)
    seconds = time.time() - start
    written = write_samples(x, out) + (figures.write(x, out) if figures else [])
    weights = "pretrained" if args.pretrained else "raw" if args.no_ema else "EMA"
    print(f"{args.n} images in {seconds:.1f} s ({weights} weights, T={diffusion.T}, sigma^2={diffusion.sigma}, "
          f"clip {'on' if args.clip else 'off'}, seed {args.seed}, {device}); wrote {out}/: {', '.join(written)}")


if __name__ == "__main__":
    common.run(main)
