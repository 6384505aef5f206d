"""The paper's figures of Sections 4.3-4.4 and its appendix, for sample.py and evaluate.py.

Pictures of the reverse process (Figs. 6, 14), shared latents (Fig. 7), interpolation (Fig. 8),
coarse-to-fine interpolation (Fig. 9), nearest neighbours (Figs. 12, 15); plots of rate and
distortion (Fig. 5, Table 4) and of x0_hat's quality along the reverse process (Fig. 10).
The math is ddpm.py's; this file only runs it in the paper's arrangements and draws the result.
"""
import torch
from PIL import Image, ImageDraw

import runs
from data import grid_image

STRIP, GIF_SAMPLES = 4, 16  # samples shown in reverse.png / forward.png, and in denoising.gif
FIGURE_SIZE = 384           # the figures' minimum size (pixels)
LAMBDAS = [i / 10 for i in range(11)]  # Fig. 8's mixing weights: Rec. (0), 0.1 ... 0.9, Rec. (1)
LABEL_H, LABEL_W = 14, 48  # height of a column label, width of a row label (pixels)


def labelled(im, columns, rows=(), row_width=LABEL_W):
    """im with its columns named in a strip on top (and its rows on the left, if given)."""
    left = row_width if rows else 0
    out = Image.new(im.mode, (im.width + left, im.height + LABEL_H), "white")
    out.paste(im, (left, LABEL_H))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(columns):
        draw.text((left + im.width * (j + 0.5) / len(columns) - draw.textlength(text) / 2, 1), text, fill="black")
    for i, text in enumerate(rows):
        draw.text((2, LABEL_H + im.height * (i + 0.5) / len(rows) - 5), text, fill="black")
    return out


def timesteps(T):
    """The figures' columns: t = T, 3T/4, T/2, T/4, T/10, 1 (the paper's Fig. 6 style); fewer if T is small."""
    return sorted({T, round(3 * T / 4), round(T / 2), round(T / 4), round(T / 10), 1} - {0}, reverse=True)


# ---- the reverse and forward processes (Figs. 6, 14) ---------------------------------------------
def reverse_figure(recorded, x0, ts):
    """Per sample, a row of x_t and a row of the predicted x0_hat (Eq. 15) at t = T..1, then the final x_0."""
    tiles = []
    for i in range(len(x0)):
        for k in (0, 1):  # 0: x_t, 1: x0_hat
            tiles += [*(recorded[t][k][i] for t in ts), x0[i]]
    im = grid_image(torch.stack(tiles), nrow=len(ts) + 1, min_size=FIGURE_SIZE)
    return labelled(im, [f"t={t}" for t in ts] + ["x_0"], ["x_t", "x0_hat"] * len(x0))


def forward_figure(diffusion, x0, ts, seed):
    """The forward process: Eq. 2 iterated from x_0, one trajectory per image, shown at t = 1..T."""
    gen, x, kept = torch.Generator().manual_seed(seed), x0, {}
    for t in range(1, diffusion.T + 1):
        x = diffusion.q_step_sample(x, t, torch.randn(x.shape, generator=gen))
        if t in ts:
            kept[t] = x
    columns = [x0, *(kept[t] for t in reversed(ts))]
    im = grid_image(torch.stack(columns, 1).flatten(0, 1), nrow=len(columns), min_size=FIGURE_SIZE)
    return labelled(im, ["x_0"] + [f"t={t}" for t in reversed(ts)])


def gif_frame(x_t, x0_hat, title):
    """x_t and x0_hat side by side, each as a grid."""
    a, b = (grid_image(v, nrow=4) for v in (x_t, x0_hat))
    both = Image.new(a.mode, (2 * a.width + 8, a.height), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width + 8, 0))
    return labelled(both, [title, "predicted x_0"])


# ---- shared latents (Fig. 7) -------------------------------------------------------------------------
@torch.inference_mode()
def shared_latents(model, diffusion, shape, seed, clip=True, k=3, splits=None, device="cpu"):
    """One reverse chain from x_T, split at t in {T, 3T/4, T/2, T/4} into k independent continuations.
    Returns {t: (x_t [1, C, H, W], samples [k, C, H, W])}: what survives of x_t at each split."""
    T = diffusion.T
    splits = splits or [t for t in timesteps(T) if t >= round(T / 4)]  # T, 3T/4, T/2, T/4
    kept = {}

    def keep(t, x_t, x0_hat):
        if t in splits:
            kept[t] = x_t.clone()
    diffusion.p_sample_loop(model, (1, *shape), clip, torch.Generator(device).manual_seed(seed), device, keep)
    out = {}
    for t in splits:  # fresh noise after the split: each continuation its own
        gen = torch.Generator(device).manual_seed(seed + 1 + t)
        x = diffusion.p_sample_loop(model, None, clip, gen, device, xt=kept[t].repeat(k, 1, 1, 1), t_start=t)
        out[t] = (kept[t].cpu(), x.cpu())
    return out


def shared_latent_figure(groups):
    """A row per split: x_t, then its continuations (the paper's quadrants, laid out in a row)."""
    ts = list(groups)
    k = len(groups[ts[0]][1])
    tiles = torch.cat([torch.cat([x_t.clamp(-1, 1), samples]) for x_t, samples in groups.values()])
    im = grid_image(tiles, nrow=k + 1, min_size=FIGURE_SIZE)
    return labelled(im, ["x_t"] + [f"sample {i + 1}" for i in range(k)], [f"t={t}" for t in ts])


# ---- interpolation (Figs. 8, 9) ------------------------------------------------------------------
@torch.inference_mode()
def interpolate(model, diffusion, x0, x0_prime, t, seed, clip=True, lambdas=LAMBDAS):
    """Sec. 4.4: x_t, x'_t ~ q(x_t | x_0) with fixed noise, mixed as (1 - lambda) x_t + lambda x'_t and decoded by
    the reverse process from t with ONE noise sequence for every lambda. t = 0 mixes in pixel space.
    x0, x0_prime [P, C, H, W] -> [P, len(lambdas), C, H, W]."""
    gen, device = torch.Generator(x0.device).manual_seed(seed), x0.device
    xt, xt_prime = x0, x0_prime
    if t > 0:
        xt, xt_prime = (diffusion.q_sample(x, t, torch.randn(x.shape, generator=gen, device=device))
                        for x in (x0, x0_prime))
    lam = torch.tensor(lambdas, dtype=x0.dtype, device=device).reshape(1, -1, 1, 1, 1)
    x = ((1 - lam) * xt[:, None] + lam * xt_prime[:, None]).flatten(0, 1)  # pair-major: [P * L, C, H, W]
    for s in range(t, 0, -1):
        z = torch.randn(x0.shape, generator=gen, device=device).repeat_interleave(len(lambdas), 0)  # one per pair
        x, _ = diffusion.p_sample_step(model, x, s, clip, z=z)
    return x.reshape(len(x0), len(lambdas), *x.shape[1:]).cpu()


def interpolation_figure(x0, x0_prime, mixed):
    """Fig. 8's columns: Source, Rec., lambda = 0.1 ... 0.9, Rec., Source; a row per pair."""
    tiles = torch.cat([x0.cpu()[:, None], mixed.clamp(-1, 1), x0_prime.cpu()[:, None]], 1)
    im = grid_image(tiles.flatten(0, 1), nrow=tiles.shape[1], min_size=FIGURE_SIZE)
    names = [f"{v:.1f}" for v in LAMBDAS[1:-1]]
    return labelled(im, ["Source", "Rec.", *names, "Rec.", "Source"])


def coarse_to_fine(model, diffusion, x0, x0_prime, seed, clip=True):
    """Fig. 9: one pair interpolated after 0, T/8, 2T/8, ..., T diffusion steps. Returns (steps, rows)."""
    steps = [round(k * diffusion.T / 8) for k in range(9)]
    rows = [interpolate(model, diffusion, x0[:1], x0_prime[:1], t, seed, clip)[0] for t in steps]
    return steps, torch.stack(rows)


def coarse_to_fine_figure(x0, x0_prime, steps, rows):
    """Fig. 9: a row per number of diffusion steps before mixing (0: pixel space), Fig. 8's columns."""
    x0, x0_prime = x0.cpu(), x0_prime.cpu()
    tiles = torch.cat([x0[:1].expand(len(rows), -1, -1, -1)[:, None], rows.clamp(-1, 1),
                       x0_prime[:1].expand(len(rows), -1, -1, -1)[:, None]], 1)
    im = grid_image(tiles.flatten(0, 1), nrow=tiles.shape[1], min_size=FIGURE_SIZE)
    return labelled(im, ["Source", "Rec.", *[f"{v:.1f}" for v in LAMBDAS[1:-1]], "Rec.", "Source"],
                           [f"{t} steps" for t in steps], row_width=64)


# ---- nearest neighbours (Figs. 12, 15) ---------------------------------------------------------------
def nearest(x, train, k):
    """Distances (pixel space, L2) and indices of each image's k nearest training images."""
    d = torch.cdist(x.flatten(1).double(), train.flatten(1).double())
    return d.topk(k, largest=False)


def memorisation(samples, train, test):
    """Median distance of samples to their nearest training image, over that of real test images:
    about 1 for a model that generalises, well below 1 for one that copies its training data."""
    s, r = nearest(samples, train, 1).values.median().item(), nearest(test, train, 1).values.median().item()
    return dict(median_sample_to_train=s, median_test_to_train=r, ratio=s / r)


def nearest_figure(samples, train, k=5, n=8):
    """A generated sample in the first column, its k nearest training images to the right."""
    idx = nearest(samples[:n], train, k).indices
    tiles = torch.cat([samples[:n, None], train[idx]], 1)
    im = grid_image(tiles.flatten(0, 1), nrow=k + 1, min_size=FIGURE_SIZE)
    return labelled(im, ["sample"] + [f"{i + 1}st" if i == 0 else f"{i + 1}" for i in range(k)])


# ---- plots (Figs. 5, 10) ---------------------------------------------------------------------------------
def table4_rows(T):
    """Table 4's ten rows: reverse time T - t + 1 = T/10, 2T/10, ..., T (100, ..., 1000 for T = 1000)."""
    return sorted({max(1, round(k * T / 10)) for k in range(1, 11)})  # fewer for T < 10


def save_plot(fig, path):
    runs.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), "wb")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_terms(terms, prior, path, title):
    """L_{t-1} against t, log scale: which steps the bits are spent on (Secs. 3.4, 4.3); t = 1 is L_0."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(terms) + 1), terms, lw=1, label="$L_{t-1}$ ($t = 1$: decoder $L_0$)")
    ax.axhline(prior, color="grey", ls=":", label=f"$L_T$ = {prior:.2g}")
    ax.set(xlabel="t", ylabel="bits/dim", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, path)
    plt.close(fig)


def loss_plot(steps, losses, ylabel, path):
    """The training loss against optimizer steps (log scale while it is positive)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel=ylabel, yscale="log" if min(losses) > 0 else "linear", title="training loss")
    fig.tight_layout()
    save_plot(fig, path)
    plt.close(fig)


def rate_distortion_plot(rate, distortion, unit, path, title):
    """Fig. 5's three panels: distortion and rate against reverse steps T - t, and distortion against rate."""
    plt = pyplot()
    T = len(rate)
    steps = [T - t for t in range(1, T + 1)]  # reverse steps taken when x_t is reached
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(steps, distortion)
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel=f"distortion (RMSE, {unit})")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="rate (bits/dim)")
    axes[2].plot(rate, distortion)
    axes[2].set(xlabel="rate (bits/dim)", ylabel=f"distortion (RMSE, {unit})")
    fig.suptitle(title)
    fig.tight_layout()
    save_plot(fig, path)
    plt.close(fig)


def progressive_plot(points, path, title):
    """Fig. 10: the quality of x0_hat against reverse-process steps (Frechet distance and confident fraction)."""
    plt = pyplot()
    steps = [p["reverse_steps"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(steps, [p["frechet_distance"] for p in points], marker="o")
    axes[0].set(xlabel="reverse process steps (T - t)", ylabel="Fréchet distance of x̂₀", yscale="log")
    axes[1].plot(steps, [100 * p["confident"] for p in points], marker="o")
    axes[1].set(xlabel="reverse process steps (T - t)", ylabel="x̂₀ confidently classified (%)")
    fig.suptitle(title)
    fig.tight_layout()
    save_plot(fig, path)
    plt.close(fig)
