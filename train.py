"""Train a DDPM: Algorithm 1 of the paper, with the authors' engineering (EMA, warm-up, clipping).

    python train.py                       # digits on this machine, a few minutes on a CPU
    python train.py --config cifar10      # the paper's CIFAR-10 recipe (GPU)
    torchrun --nproc_per_node=8 train.py --config cifar10    # the same on 8 GPUs
    python train.py --predict mean --objective vlb --sigma learned   # a row of the paper's Table 2

Writes runs/<config>/: ckpt.pt (model, EMA, optimizer, step, RNG, config), samples.png,
loss.csv and loss.png. `python train.py --resume` continues the latest run.
Exit codes: 0 done, 2 a usage mistake, 3 the loss or gradient diverged (NaN/inf), 130 Ctrl-C.
"""
import argparse
import copy
import csv
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import figures
from common import UsageError, number, positive
from ddpm import OBJECTIVES, PREDICT, SIGMA
import unet

# Every value can be overridden by a flag of the same name (see --help).
CONFIGS = {
    # Ours: sklearn's 8x8 digits on a laptop CPU. Chosen by measurement (README, "Training").
    "digits": dict(dataset="digits", preset="digits", image_size=None, steps=3000, batch_size=128, lr=2e-3,
                   warmup=200, schedule="cosine", grad_clip=1.0, ema_decay=0.999, T=1000, flip=False,
                   log_every=50, ckpt_every=1000, sample_every=0, n_samples=64, seed=0),
    # The paper's CIFAR-10 recipe (Appendix B and the authors' run_cifar.py).
    "cifar10": dict(dataset="cifar10", preset="cifar10", image_size=None, steps=800_000, batch_size=128, lr=2e-4,
                    warmup=5000, grad_clip=1.0, ema_decay=0.9999, T=1000, flip=True,
                    log_every=100, ckpt_every=10_000, sample_every=20_000, n_samples=64, seed=0),
}
# None: the network preset's value (unet.PRESETS is the one source for them).
NETWORK_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
for c in CONFIGS.values():  # the paper's choices (Sec. 3.2, Table 2's last row) unless a flag says otherwise
    c.update(dict.fromkeys(NETWORK_KEYS), predict="eps", objective="simple", sigma="beta")
    c.setdefault("minutes", None)  # a wall-clock budget instead of --steps
    c.setdefault("schedule", "constant")  # the paper's; digits decays (README, "Better digits per CPU-minute")
    c["amp"] = "auto"  # recorded, so that --resume keeps the run's arithmetic
LATER_KEYS = dict(minutes=None, schedule="constant", amp="off")  # what checkpoints written before these flags meant
# What a checkpoint's weights depend on: a resumed run may not change these.
MODEL_KEYS = ("dataset", "preset", "image_size", "T", "predict", "objective", "sigma", *NETWORK_KEYS)
SCHEDULES = ("constant", "cosine")
DIVERGED = common.DIVERGED  # exit code for a NaN or infinite loss or gradient (ablation.py: "unstable")


def int_tuple(allow_empty):
    """argparse type: '1,2,2' -> (1, 2, 2), every value positive; '' -> () where allowed."""
    def parse(text):
        values = tuple(int(v) for v in text.split(",") if v.strip())
        if not values and not allow_empty or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"must be {'' if allow_empty else 'one or more '}positive integers "
                                             f"separated by commas, got {text!r}")
        return values
    parse.__name__ = "list of integers"
    return parse


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help=f"starting values: {', '.join(CONFIGS)} (default digits)")
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist, cifar10, or a folder of images")
    p.add_argument("--preset", help=f"network preset from unet.py: {', '.join(unet.PRESETS)}")
    p.add_argument("--ch", type=positive(), help="network base channels (default: the preset's)")
    p.add_argument("--ch-mult", type=int_tuple(False), help="channel multiplier per resolution, e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=positive(), help="residual blocks per resolution")
    p.add_argument("--attn-resolutions", type=int_tuple(True), help="resolutions with self-attention, e.g. 16 "
                   "('' for none)")
    p.add_argument("--dropout", type=number(float, 0, 1, hi_open=True), help="dropout in the residual blocks")
    p.add_argument("--image-size", type=positive(), help="resize images to this square size (default: as stored)")
    p.add_argument("--predict", choices=PREDICT, help="what the network outputs (Sec. 3.2): eps (default, Eq. 11),"
                   " x0, or mean (mu_theta itself)")
    p.add_argument("--objective", choices=OBJECTIVES, help="simple (default: unweighted MSE on the network's "
                   "target, Eq. 14 for eps) or vlb (the bound of Eq. 5)")
    p.add_argument("--sigma", choices=SIGMA, help="reverse variance: beta (default), beta_tilde, or learned "
                   "(needs --objective vlb)")
    p.add_argument("--steps", type=positive(), help="total optimizer steps")
    p.add_argument("--minutes", type=positive(float), help="instead of --steps: train for this much wall-clock time "
                   "(the learning-rate schedule follows the time spent)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate after warm-up: constant (the paper's) or "
                   "cosine (decays to 0 at the end of --steps or --minutes)")
    p.add_argument("--batch-size", type=positive(), help="global batch size (split across GPUs)")
    p.add_argument("--lr", type=positive(float), help="Adam learning rate after warm-up")
    p.add_argument("--warmup", type=number(int, 0), help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=positive(float), help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=number(float, 0, 1, hi_open=True),
                   help="EMA decay in [0, 1) (warmed up as min(decay, (1+k)/(10+k)))")
    p.add_argument("--T", type=positive(), help="diffusion steps (linear betas scaled by 1000/T)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    p.add_argument("--log-every", type=positive(), help="steps between loss.csv rows")
    p.add_argument("--ckpt-every", type=positive(), help="steps between checkpoints")
    p.add_argument("--sample-every", type=number(int, 0), help="steps between sample grids (0: only at the end)")
    p.add_argument("--n-samples", type=positive(), help="images in each sample grid")
    p.add_argument("--seed", type=int, help="seed for the weights, data order, t and noise (and the final grid)")
    p.add_argument("--out", help="run directory (default runs/<config>, or a fresh runs/<config>-N)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue a run: its directory or ckpt.pt "
                   "(default: the latest run)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=common.AMP, help="autocast the network: auto (default) is bf16 on a CPU "
                   "with native bfloat16, else off (float32); fp16: CUDA only. --resume keeps the run's")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    args = p.parse_args(argv)
    if args.config is not None and args.config not in CONFIGS:
        raise UsageError(f"unknown config {args.config!r}: use one of {', '.join(CONFIGS)}")
    given = {k: v for k, v in vars(args).items() if k in CONFIGS["digits"] and v is not None}
    return args, given


def resolve_config(args, given):
    """The run's configuration and directory; on --resume, the checkpoint's (checked against flags)."""
    if args.resume:
        if args.out or args.config:
            raise UsageError("--resume continues a run where it is, with its own config: leave out --out and --config")
        path = common.latest_checkpoint() if args.resume == "latest" else args.resume
        ckpt = common.load_checkpoint(path, needs=CONFIGS["digits"].keys() - LATER_KEYS.keys())
        if missing := [k for k in ("optimizer", "step", "rng") if k not in ckpt]:
            raise UsageError(f"{path} cannot be resumed: it holds no {', '.join(missing)} (not written by train.py?)")
        for k in MODEL_KEYS:
            if k in given and given[k] != ckpt["config"][k]:
                raise UsageError(f"the checkpoint {path} was trained with --{k.replace('_', '-')} "
                                 f"{ckpt['config'][k]}, not {given[k]}: start a new run with another --out")
        out = (os.path.dirname(path) or ".") if path.endswith(".pt") else path
        config = {**LATER_KEYS, **ckpt["config"], **given}
        if "steps" in given and "minutes" not in given:  # --steps turns a --minutes run back into a step count
            config["minutes"] = None
        return config, out, ckpt
    args.config = args.config or "digits"
    if "steps" in given and "minutes" in given:
        raise UsageError("--minutes replaces --steps: give one of them")
    config = {**CONFIGS[args.config], "config": args.config, **given}
    if config["preset"] not in unet.PRESETS:
        raise UsageError(f"unknown preset {config['preset']!r}: use one of {', '.join(unet.PRESETS)}")
    for k in NETWORK_KEYS:  # record the values used, so the checkpoint says what was trained
        config[k] = unet.PRESETS[config["preset"]][k] if config[k] is None else config[k]
    if config["sigma"] == "learned" and config["objective"] == "simple":
        raise UsageError("--sigma learned needs --objective vlb: an unweighted MSE does not train a variance "
                         "(no row of the paper's Table 2 pairs them)")
    out = args.out or os.path.join(common.RUNS, args.config)
    if args.out is None:  # never overwrite a finished run: take a fresh directory
        n = 1
        while os.path.exists(os.path.join(out, common.CHECKPOINT)):
            n += 1
            out = os.path.join(common.RUNS, f"{args.config}-{n}")
    elif os.path.exists(os.path.join(out, common.CHECKPOINT)):
        raise UsageError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    elif taken := [f for f in ("loss.csv", "loss.png", "samples.png") if os.path.exists(os.path.join(out, f))]:
        raise UsageError(f"{out} already holds {taken[0]}, which this run would overwrite: choose another --out")
    return config, out, None


# ---- processes ------------------------------------------------------------------------------------
def start_processes(args):
    """(rank, world size, device): one process, or one per GPU when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, common.pick_device(args.device)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)  # so that NCCL and stray allocations use this process's GPU
    dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def mean_over_processes(value, world):
    """The batch's loss, averaged over processes, as a float (every process gets the same number)."""
    value = value.detach().float()
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value.item()


def any_process(flag, device, world):
    """True on every process if it is true on any (so all of them stop at the same step)."""
    if world == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


# ---- the run's state -----------------------------------------------------------------------------
def build(config, ckpt, device, images, levels, rank, path=None):
    """Network, EMA copy, optimizer, diffusion and noise generator; restored from ckpt (read from path)."""
    channels, size = images.shape[1], images.shape[2]
    torch.manual_seed(config["seed"])  # the initial weights, and dropout
    out_channels = 2 * channels if config["sigma"] == "learned" else channels  # + a log-variance (Table 2)
    try:
        model = unet.build(config["preset"], in_channels=channels, out_channels=out_channels, image_size=size,
                           T=config["T"], **{k: config[k] for k in NETWORK_KEYS})
    except ValueError as e:
        raise UsageError(f"{e} (dataset {config['dataset']} has {channels}x{size}x{size} images)") from None
    model.to(device)
    s = SimpleNamespace(model=model, ema=copy.deepcopy(model).requires_grad_(False).eval(), step=0, seconds=0.0,
                        levels=levels,
                        diffusion=common.make_diffusion(config),
                        opt=torch.optim.Adam(model.parameters(), lr=config["lr"], foreach=True),
                        noise_gen=torch.Generator(device).manual_seed(config["seed"] + 1))
    if ckpt is not None:
        common.restore(s.model, ckpt["model"], path)
        common.restore(s.ema, ckpt["ema"], path, "EMA weights")
        common.restore(s.opt, ckpt["optimizer"], path, "optimizer state")
        s.step, s.seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        try:
            s.noise_gen.set_state(ckpt["rng"]["noise"])
        except RuntimeError:
            raise UsageError(f"{path} was trained on another kind of device than {device.type}: resume it with "
                             f"the --device it was trained on") from None
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    if rank:  # dropout masks of its own for each process (the checkpoint holds process 0's generator)
        torch.manual_seed(config["seed"] * 1_000_003 + rank * 10_007 + s.step)
    return s


def save(s, config, out, device):
    state = {"model": s.model.state_dict(), "ema": s.ema.state_dict(), "optimizer": s.opt.state_dict(),
             "step": s.step, "seconds": s.seconds, "config": config, "model_config": s.model.config,
             "rng": {"noise": s.noise_gen.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    common.save_checkpoint(state, os.path.join(out, common.CHECKPOINT))


class LossLog:
    """loss.csv: one row every --log-every steps. On resume the rows after the checkpoint are dropped by
    an atomic rewrite, so a kill at any moment loses no row; a torn row (a kill mid-append) is skipped."""
    FIELDS = ["step", "loss", "lr", "seconds"]

    def __init__(self, path, keep_until):
        self.path = path
        kept = [r for r in read_rows(path) if int(r["step"]) <= keep_until]
        common.write_atomic(path, lambda f: self._write(f, kept, header=True))

    def _write(self, f, rows, header=False):
        w = csv.DictWriter(f, fieldnames=self.FIELDS)
        if header:
            w.writeheader()
        w.writerows(rows)

    def append(self, step, loss, lr, seconds):
        with open(self.path, "a", newline="") as f:
            self._write(f, [dict(step=step, loss=f"{loss:.6f}", lr=f"{lr:.3g}", seconds=f"{seconds:.1f}")])


def read_rows(path):
    """The whole, well-formed rows of a loss.csv (none if it is missing; a row torn by a kill is skipped)."""
    def whole(r):
        try:
            int(r["step"]), float(r["loss"])
            return True
        except (TypeError, ValueError, KeyError):
            return False
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if whole(r)]


def write_loss_plot(csv_path, png_path, objective="simple"):
    if rows := read_rows(csv_path):
        label = "L_simple (mean over dims)" if objective == "simple" else "T L_{t-1} (bits/dim)"
        figures.loss_plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label, png_path)


# ---- Algorithm 1 ----------------------------------------------------------------------------------
def global_batch(step, n, batch_size, seed):
    """Indices of the images in optimizer step `step`: epochs of a seeded permutation.

    The whole global batch is decided here and each process takes its slice, so a run
    does not depend on the number of GPUs, and resuming at a step needs no loader state.
    """
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def draw_batch(s, config, images, levels, rank, world, device):
    """x_0 ~ q(x_0), t ~ Uniform{1..T}, eps ~ N(0, I) for the global batch; returns this process's slice."""
    B = config["batch_size"]
    idx = global_batch(s.step, len(images), B, config["seed"])
    t = torch.randint(1, config["T"] + 1, (B,), generator=s.noise_gen, device=device)
    noise = torch.randn((B, *images.shape[1:]), generator=s.noise_gen, device=device)
    flips = torch.rand(B, generator=s.noise_gen, device=device) < 0.5
    mine = slice(rank * B // world, (rank + 1) * B // world)
    x0 = common.to_model_range(images[idx[mine].to(device)], levels)
    if config["flip"]:
        x0 = torch.where(flips[mine, None, None, None], x0.flip(3), x0)
    return x0, t[mine], noise[mine]


def progress(s, config):
    """How far the run is, from 0 to 1: by optimizer steps, or by training time under --minutes."""
    return s.seconds / (60 * config["minutes"]) if config["minutes"] else s.step / config["steps"]


def learning_rate(config, step, done):
    """Linear warm-up to --lr over --warmup steps; then constant (the authors' schedule), or a cosine
    decay to 0 at done = 1 (the end of the run, by steps or by time)."""
    warm = min(1.0, (step + 1) / config["warmup"]) if config["warmup"] > 0 else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * min(done, 1.0))) if config["schedule"] == "cosine" else 1.0
    return config["lr"] * warm * decay


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """EMA of the parameters only (never buffers), with the warm-up min(decay, (1+k)/(10+k))
    so that a short run's EMA has moved away from the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite."""


def train_step(s, net, config, batch, amp, scaler, world):
    """One gradient step of Algorithm 1 on the objective; returns the batch's loss (averaged over processes)."""
    x0, t, noise = batch
    lr = learning_rate(config, s.step, progress(s, config))
    for group in s.opt.param_groups:
        group["lr"] = lr
    with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
        loss = s.diffusion.training_loss(net, x0, t, noise, objective=config["objective"], levels=s.levels)
    loss_value = mean_over_processes(loss, world)
    if not math.isfinite(loss_value):
        raise Diverged(f"the loss became {loss_value}")
    s.opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(s.opt)
    norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), config["grad_clip"])
    if not scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
        raise Diverged(f"the gradient norm became {norm.item()}")
    scaler.step(s.opt)
    scaler.update()
    ema_update(s.ema, s.model, config["ema_decay"], s.step)
    s.step += 1
    return loss_value, lr


def sample_grid(s, config, n, path, device, amp):
    """The run's samples as `python sample.py --seed <the run's seed> --n n` (same --amp) draws them."""
    x = common.generate(s.ema, s.diffusion, n, seed=config["seed"], device=device, progress=False, amp=amp)
    common.save_image(common.grid_image(x[:64]), path)


def shared_clock(seconds, device, world):
    """Process 0's training time on every process: under --minutes all of them must take the same
    learning rate and stop at the same step."""
    if world == 1:
        return seconds
    seconds = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.broadcast(seconds, 0)
    return seconds.item()


def train(s, net, config, out, images, rank, world, device, amp):
    """Steps until --steps (or --minutes) or Ctrl-C, logging, checkpointing and drawing grids on the way.
    Returns True when interrupted."""
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    log = LossLog(os.path.join(out, "loss.csv"), keep_until=s.step) if rank == 0 else None
    stop = {"flag": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))  # finish the step, save, exit
    bar = tqdm(total=None if config["minutes"] else config["steps"], initial=s.step, disable=rank != 0,
               dynamic_ncols=True, unit="step")
    t0, seconds0, step0 = time.time(), s.seconds, s.step
    s.model.train()
    try:
        while progress(s, config) < 1:
            batch = draw_batch(s, config, images, s.levels, rank, world, device)
            loss, lr = train_step(s, net, config, batch, amp, scaler, world)
            s.seconds = shared_clock(seconds0 + time.time() - t0, device, world)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
            stopping = any_process(stop["flag"], device, world)
            if rank == 0:
                end = progress(s, config) >= 1
                if s.step % config["log_every"] == 0 or end:
                    log.append(s.step, loss, lr, s.seconds)
                if s.step % config["ckpt_every"] == 0 or end or stopping:
                    save(s, config, out, device)
                    write_loss_plot(log.path, os.path.join(out, "loss.png"), config["objective"])
                if config["sample_every"] and s.step % config["sample_every"] == 0 and not end:
                    sample_grid(s, config, 16, os.path.join(out, f"samples_{s.step:07d}.png"), device, amp)
            if stopping:
                return True
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    print(f"trained {s.step - step0} steps in {time.time() - t0:.0f} s ({(s.step - step0) / (time.time() - t0):.1f} "
          f"steps/s), {s.step} in all; final loss {loss:.4f}")
    return False


def main(argv=None):
    args, given = parse_args(argv)
    config, out, ckpt = resolve_config(args, given)
    common.check_writable(out)
    rank, world, device = start_processes(args)
    amp = common.pick_amp(config["amp"], device)
    if config["batch_size"] % world:
        raise UsageError(f"--batch-size {config['batch_size']} must be divisible by the number of processes ({world})")
    images, _, levels = common.load_dataset(config["dataset"], "train", config.get("image_size"), args.data_root)
    if len(images) < config["batch_size"]:
        raise UsageError(f"--batch-size {config['batch_size']} is larger than the dataset ({len(images)} images)")
    s = build(config, ckpt, device, images, levels, rank, out)
    grid = os.path.join(out, "samples.png")
    if progress(s, config) >= 1 and os.path.exists(grid):
        budget = f"{s.seconds / 60:.1f} minutes: pass a larger --minutes" if config["minutes"] else \
            f"step {s.step}: pass a larger --steps"
        raise UsageError(f"{out} is already trained to {budget} to continue")
    if progress(s, config) < 1:
        run_training(s, args, config, out, images, rank, world, device, amp)
    if rank == 0:  # also reached by --resume of a finished run that lost its grid
        print(f"drawing {config['n_samples']} samples from the EMA model...")
        sample_grid(s, config, config["n_samples"], grid, device, amp)
        print(f"wrote {out}/{common.CHECKPOINT}, {grid}, loss.csv and loss.png")


def run_training(s, args, config, out, images, rank, world, device, amp):
    """Wrap the network (DDP, compile), train, and turn a divergence or Ctrl-C into an exit code."""
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print(f"{config['dataset']}: {len(images)} training images {'x'.join(map(str, images.shape[1:]))}; "
              f"{config['preset']} network {sum(p.numel() for p in s.model.parameters()):,} parameters; "
              f"{config['predict']}, {config['objective']}, sigma^2 {config['sigma']}; {device}, {world} "
              f"process(es), {common.amp_name(amp)}; writing {out}/")
    net = torch.nn.parallel.DistributedDataParallel(
        s.model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else s.model
    net = torch.compile(net) if args.compile else net
    try:
        interrupted = train(s, net, config, out, images.to(device), rank, world, device, amp)
    except Diverged as e:
        where = os.path.join(out, common.CHECKPOINT)
        print(f"error: {e} at step {s.step + 1}; stopped without saving. Last good checkpoint: "
              f"{where if os.path.exists(where) else 'none yet'}. Try a lower --lr.", file=sys.stderr)
        raise SystemExit(DIVERGED) from None
    finally:
        if world > 1:
            dist.destroy_process_group()
    if interrupted:
        if rank == 0:
            print(f"interrupted: saved step {s.step} to {out}/{common.CHECKPOINT}; continue with "
                  f"python train.py --resume {out}")
        raise SystemExit(130)


if __name__ == "__main__":
    common.run(main)
