"""Train a DDPM: Algorithm 1 of the paper, with the authors' engineering (EMA, warm-up, clipping).

    python train.py                       # digits on this machine, a few minutes on a CPU
    python train.py --config cifar10      # the paper's CIFAR-10 recipe (GPU)
    torchrun --nproc_per_node=8 train.py --config cifar10    # the same on 8 GPUs
    python train.py --predict mean --objective vlb --sigma learned   # a row of the paper's Table 2

Writes runs/<config>/ (or a fresh runs/<config>-N): ckpt.pt (model, EMA, optimizer, step, RNG, settings),
samples.png, loss.csv and loss.png. `python train.py --resume` continues the latest run.
Exit codes: 0 done, 2 a usage mistake, 3 the loss or gradient diverged (NaN/inf), 128 + N stopped by
signal N and saved (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP): --resume continues it.
"""
import copy
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import figures
import runs
import unet
from cli import UsageError
from config import NETWORK, Config, parse_args, new_folder, settings
from data import batch_indices, grid_image, load_dataset, save_image, to_model_range
from ddpm import derive_seed, generate


FILES = [runs.CHECKPOINT, "loss.csv", "loss.png", "samples.png"]  # what a run folder holds (and samples_N.png)


# ---- the run's state --------------------------------------------------------------------------------
@dataclass
class Run:
    """A training run: its settings, the network and its EMA, the optimizer, the diffusion, the data, and
    where it is. Nothing here is read back from the device except at log, checkpoint and stop steps."""
    c: Config
    model: torch.nn.Module        # the weights being trained
    net: torch.nn.Module          # model as it is called: wrapped by DDP and/or torch.compile
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only; otherwise it passes everything through
    diffusion: object
    noise: torch.Generator        # t, eps and flips: Algorithm 1's randomness
    images: torch.Tensor          # the training set, uint8 [N, C, H, W], on the device
    levels: int
    device: torch.device
    amp: object                   # autocast dtype, or None for float32
    rank: int = 0
    world: int = 1
    step: int = 0
    seconds: float = 0.0          # training time so far, across sessions (--minutes)
    lr: float = 0.0               # this step's learning rate
    first_bad: torch.Tensor = None  # the first step whose loss or gradient was NaN/inf (0: none), on the device


def build(c, images, levels, device, procs):
    """A new run: network (seeded), EMA copy, Adam, the diffusion and the noise generator."""
    torch.manual_seed(c.seed)  # the initial weights, and dropout
    channels, size = images.shape[1], images.shape[2]
    out_channels = 2 * channels if c.sigma == "learned" else channels  # + a log-variance (Table 2)
    try:
        model = unet.build(c.preset, in_channels=channels, out_channels=out_channels, image_size=size, T=c.T,
                           **{k: getattr(c, k) for k in NETWORK}).to(device)
    except ValueError as e:
        raise UsageError(f"{e} (dataset {c.dataset} has {channels}x{size}x{size} images)") from None
    levels_sizes = [size // 2 ** i for i in range(len(c.ch_mult))]
    if unused := [a for a in c.attn_resolutions if a not in levels_sizes]:  # the authors' code ignores them
        raise UsageError(f"--attn-resolutions {unused[0]} is not a resolution of this network ({size}x{size} images "
                         f"give {', '.join(map(str, levels_sizes))}): pass some of those, or '' for none")
    amp = cli.pick_amp(c.amp, device)
    # fp16's loss scaler reads the device every step unless the optimizer takes its inf check: fused Adam does
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, **(dict(fused=True) if amp == torch.float16 else
                                                            dict(foreach=True)))
    return Run(c=c, model=model, net=model, ema=copy.deepcopy(model).requires_grad_(False).eval(), opt=opt,
               scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16), diffusion=runs.make_diffusion(asdict(c)),
               noise=torch.Generator(device).manual_seed(c.seed + 1), images=images.to(device), levels=levels,
               device=device, amp=amp, rank=procs[0], world=procs[1],
               first_bad=torch.zeros((), dtype=torch.long, device=device))


def restore(r, ckpt, path):
    """Continue from a checkpoint: weights, optimizer, step, clock and random streams."""
    runs.restore(r.model, ckpt["model"], path)
    runs.restore(r.ema, ckpt["ema"], path, "EMA weights")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in r.opt.param_groups]
    runs.restore(r.opt, ckpt["optimizer"], path, "optimizer state")
    for group, values in zip(r.opt.param_groups, settings):  # the run's settings, not the checkpoint's
        group.update(values)
    r.step, r.seconds = ckpt["step"], ckpt.get("seconds", 0.0)
    if r.scaler.is_enabled() and ckpt.get("scaler"):
        r.scaler.load_state_dict(ckpt["scaler"])
    try:
        r.noise.set_state(ckpt["rng"]["noise"])
    except (RuntimeError, TypeError):  # a CPU generator's state does not fit a GPU's: a new stream, said once
        r.noise.manual_seed(derive_seed(r.c.seed + 1, r.step))
        print(f"note: {path} continues on {r.device.type}, another kind of device than it was trained on: "
              f"its noise restarts from a new seed (the run is no longer bit-reproducible)")
    torch.set_rng_state(ckpt["rng"]["torch"])
    if r.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], r.device)


def save(r, out):
    state = {"model": r.model.state_dict(), "ema": r.ema.state_dict(), "optimizer": r.opt.state_dict(),
             "step": r.step, "seconds": r.seconds, "config": asdict(r.c), "model_config": r.model.config,
             "scaler": r.scaler.state_dict(),
             "rng": {"noise": r.noise.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(r.device) if r.device.type == "cuda" else None}}
    runs.save_checkpoint(state, os.path.join(out, runs.CHECKPOINT))
    if rows := runs.read_rows(os.path.join(out, "loss.csv")):
        label = "L_simple (mean over dims)" if r.c.objective == "simple" else "T L_{t-1} (bits/dim)"
        figures.loss_plot([int(x["step"]) for x in rows], [float(x["loss"]) for x in rows], label,
                          os.path.join(out, "loss.png"))


# ---- Algorithm 1 ------------------------------------------------------------------------------------
def progress(r):
    """How far the run is, from 0 to 1: by optimizer steps, or by training time under --minutes."""
    return r.seconds / (60 * r.c.minutes) if r.c.minutes else r.step / r.c.steps


def learning_rate(c, step, done):
    """Linear warm-up to --lr over --warmup steps; then constant (the authors' schedule), or a cosine
    decay to 0 at done = 1 (the end of the run, by steps or by time)."""
    warm = min(1.0, (step + 1) / c.warmup) if c.warmup > 0 else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * min(done, 1.0))) if c.lr_schedule == "cosine" else 1.0
    return c.lr * warm * decay


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """EMA of the parameters only (never buffers), with the warm-up min(decay, (1+k)/(10+k))
    so that a short run's EMA has moved away from the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


def train_step(r):
    """One step of Algorithm 1 with the authors' engineering; returns the loss, a tensor: nothing is read
    back from the device, so a GPU never waits for the host."""
    c, B = r.c, r.c.batch_size
    # Lines 2-4: x_0 ~ q(x_0), t ~ Uniform({1..T}), eps ~ N(0, I), for the global batch; this process's share
    idx = batch_indices(r.step, len(r.images), B, c.seed, r.device)
    t = r.diffusion.sample_t(B, r.noise, r.device)
    eps = torch.randn((B, *r.images.shape[1:]), generator=r.noise, device=r.device)
    flip = torch.rand(B, generator=r.noise, device=r.device) < 0.5
    mine = slice(r.rank * B // r.world, (r.rank + 1) * B // r.world)
    x0 = to_model_range(r.images[idx[mine]], r.levels)
    if c.flip:
        x0 = torch.where(flip[mine, None, None, None], x0.flip(3), x0)
    # Line 5: a gradient step on the objective, with warm-up/decay, clipping and an EMA of the weights
    r.lr = learning_rate(c, r.step, progress(r))
    for group in r.opt.param_groups:
        group["lr"] = r.lr
    with torch.autocast(r.device.type, dtype=r.amp, enabled=r.amp is not None):
        loss = r.diffusion.training_loss(r.net, x0, t[mine], eps[mine], objective=c.objective, levels=r.levels)
    r.opt.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.unscale_(r.opt)
    norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), c.grad_clip)
    r.scaler.step(r.opt)
    r.scaler.update()
    ema_update(r.ema, r.model, c.ema_decay, r.step)
    r.step += 1
    bad = ~torch.isfinite(loss) if r.scaler.is_enabled() else ~(torch.isfinite(loss) & torch.isfinite(norm))
    r.first_bad = torch.where(bad & (r.first_bad == 0), r.step, r.first_bad)  # fp16's scaler skips inf steps
    return loss.detach()


def train(r, out):
    """Steps until --steps or --minutes, or a stop signal; the loss is read, checked and logged every
    --log-every steps, a checkpoint written every --ckpt-every. Returns the stop signal's number, or 0."""
    c, main = r.c, r.rank == 0
    if main and r.step == 0:
        save(r, out)  # first of all: a folder holding a started run can always be resumed
    log = runs.LossLog(os.path.join(out, "loss.csv"), keep_until=r.step) if main else None
    bar = tqdm(total=None if c.minutes else c.steps, initial=r.step, disable=not main, dynamic_ncols=True, unit="step")
    t0, seconds0, step0 = time.time(), r.seconds, r.step
    r.model.train()
    with cli.StopSignals() as stop, bar:  # the bar is closed however the loop ends, so errors start a line
        while progress(r) < 1:
            loss = train_step(r)
            if r.world == 1 or r.step % c.log_every == 0:  # process 0's clock, so all processes agree
                r.seconds = across(r, seconds0 + time.time() - t0, "first")
            end = progress(r) >= 1
            report = end or r.step % c.log_every == 0
            stopping = stop.signum
            if r.world > 1:  # processes agree to stop at a log step, so that they stop at the same step
                stopping = int(across(r, stop.signum, "max")) if report else 0
            if report or stopping or r.step % c.ckpt_every == 0:
                check_finite(r, out)
            if report:
                loss = across(r, loss, "mean")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{r.lr:.1e}")
                if main:
                    log.append(r.step, loss, r.lr, r.seconds)
            if main and (r.step % c.ckpt_every == 0 or end or stopping):
                save(r, out)
            bar.update()
            if stopping:
                return stopping
            if main and c.sample_every and r.step % c.sample_every == 0 and not end:
                runs.claim(out, [f"samples_{r.step:07d}.png"])
                sample_grid(r, 16, os.path.join(out, f"samples_{r.step:07d}.png"))
    print(f"trained {r.step - step0} steps in {time.time() - t0:.0f} s ({(r.step - step0) / (time.time() - t0):.1f} "
          f"steps/s), {r.step} in all; final loss {loss:.4f}")
    return 0


def check_finite(r, out):
    """Stop, without saving, if any step since the last check had a NaN or infinite loss or gradient."""
    if first := int(across(r, r.first_bad, "max")):
        where = os.path.join(out, runs.CHECKPOINT)
        raise Diverged(f"the loss or its gradient became NaN or infinite at step {first}; stopped without saving. "
                       f"Last good checkpoint: {where if os.path.exists(where) else 'none'}. Try a lower --lr.")


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite."""


def sample_grid(r, n, path):
    """The run's samples as `python sample.py --seed <the run's seed> --n n` (same --amp) draws them."""
    x = generate(r.ema, r.diffusion, n, seed=r.c.seed, amp=r.amp)
    save_image(grid_image(x[:64]), path)


# ---- processes (torchrun) -------------------------------------------------------------------------
def across(r, value, how):
    """A number made the same on every process and read on the host: "mean" (the loss), "max" (a flag) or
    "first" (process 0's clock). Called at log steps only, since reading a device value waits for it."""
    if r.world > 1:
        value = torch.as_tensor(value, dtype=torch.float64, device=r.device).clone()
        if how == "first":
            dist.broadcast(value, 0)
        else:
            dist.all_reduce(value, dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
        value = value / r.world if how == "mean" else value
    return float(value)


def compiled(r):
    """r.net under torch.compile, compiled now on one batch (its cost printed); eager with a note if it fails."""
    if r.c.compile == "off":
        return r.net
    net, start = torch.compile(r.net, mode="reduce-overhead" if r.c.compile == "graphs" else None), time.time()
    try:
        with torch.random.fork_rng(devices=[r.device] if r.device.type == "cuda" else []):
            x = torch.zeros(r.c.batch_size // r.world, *r.images.shape[1:], device=r.device)  # the steps' shape
            t = torch.randint(1, r.c.T + 1, (len(x),), device=r.device)
            with torch.autocast(r.device.type, dtype=r.amp, enabled=r.amp is not None):
                net(x, t).float().sum().backward()
        r.model.zero_grad(set_to_none=True)
    except Exception as e:  # a missing compiler, an unsupported operation, ...
        r.model.zero_grad(set_to_none=True)
        print(f"note: torch.compile failed ({cli.first_line(e, 120)}); training without it")
        return r.net
    print(f"compiled the network in {time.time() - start:.0f} s")
    return net


def main(argv=None):
    given, flags = parse_args(argv, __doc__)
    c, out, ckpt = settings(given, flags)
    if ckpt is not None and "device" not in given and c.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{out} was trained on a GPU and this machine has none: pass --device cpu to continue it "
                         f"on the CPU")
    rank, world, device = cli.start_processes(c.device)
    c.device = device.type  # --resume continues on this kind of device unless --device says otherwise
    if c.batch_size % world:
        raise UsageError(f"--batch-size {c.batch_size} must be divisible by the number of processes ({world})")
    if rank:  # process 0 downloads a dataset first; the others then read its files
        dist.barrier()
    images, _, levels, _ = load_dataset(c.dataset, "train", c.image_size, flags["data_root"])
    if world > 1 and rank == 0:
        dist.barrier()
    if len(images) < c.batch_size:
        raise UsageError(f"--batch-size {c.batch_size} is larger than the dataset ({len(images)} images)")
    r = build(c, images, levels, device, (rank, world))
    if ckpt is not None:
        restore(r, ckpt, flags["resume"])
    if rank:  # dropout masks of its own for each process (the checkpoint holds process 0's random state)
        torch.manual_seed(derive_seed(c.seed, rank * 10_007 + r.step))
    grid = os.path.join(out, "samples.png")
    if progress(r) >= 1 and os.path.exists(grid):
        budget = f"{r.seconds / 60:.1f} minutes: pass a larger --minutes" if c.minutes else \
            f"step {r.step}: pass a larger --steps"
        raise UsageError(f"{out} is already trained to {budget} to continue")
    with runs.locked(out) if rank == 0 else nullcontext():
        if rank == 0 and ckpt is None:
            new_folder(out, c.config)  # still empty now that we hold it (another program may have started there)
        if rank == 0 and ckpt is not None and runs.stamp(ckpt["read"][0]) != ckpt["read"][1]:
            raise UsageError(f"{out} was saved by another program while this one started: run the same command again")
        if rank == 0:
            runs.claim(out, FILES)
        if progress(r) < 1:
            run_training(r, out)
        if rank == 0:  # also reached by --resume of a finished run that lost its grid
            print(f"drawing {c.n_samples} samples from the EMA model...")
            sample_grid(r, c.n_samples, grid)
            print(f"wrote {out}/{runs.CHECKPOINT}, {grid}, loss.csv and loss.png")


def run_training(r, out):
    """Wrap the network (DDP, compile), train, and turn a divergence or a stop signal into an exit code."""
    c = r.c
    if r.rank == 0:
        print(f"{c.dataset}: {len(r.images)} training images {'x'.join(map(str, r.images.shape[1:]))}; "
              f"{c.preset} network {sum(p.numel() for p in r.model.parameters()):,} parameters; {c.predict}, "
              f"{c.objective}, sigma^2 {c.sigma}; {r.device}, {r.world} process(es), {cli.amp_name(r.amp)}; "
              f"writing {out}/")
    if r.world > 1:
        r.net = torch.nn.parallel.DistributedDataParallel(
            r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    r.net = compiled(r)
    try:
        signum = train(r, out)
    except Diverged as e:
        if r.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(cli.DIVERGED) from None
    finally:
        if r.world > 1:
            dist.destroy_process_group()
    if signum:
        if r.rank == 0:
            print(f"stopped by {signal.Signals(signum).name}: saved step {r.step} to {out}/{runs.CHECKPOINT}; "
                  f"continue with python train.py --resume {out}")
        raise SystemExit(128 + signum)


if __name__ == "__main__":
    cli.run(main)
