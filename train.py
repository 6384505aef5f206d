"""Train a DDPM: Algorithm 1 of the paper, with the authors' engineering (EMA, warm-up, clipping).

    python train.py                       # digits on this machine, a few minutes on a CPU
    python train.py --config cifar10      # the paper's CIFAR-10 recipe (GPU)
    torchrun --nproc_per_node=8 train.py --config cifar10    # the same on 8 GPUs

Writes runs/<config>/: ckpt.pt (model, EMA, optimizer, step, RNG, config), samples.png,
loss.csv and loss.png. `python train.py --resume` continues the latest run.
"""
import argparse
import copy
import csv
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
from common import UsageError
from ddpm import Diffusion, linear_betas
import unet

# Every value can be overridden by a flag of the same name (see --help).
CONFIGS = {
    # Ours: sklearn's 8x8 digits on a laptop CPU. Chosen by measurement (README, "Training").
    "digits": dict(dataset="digits", preset="digits", image_size=None, steps=2000, batch_size=128, lr=2e-3,
                   warmup=200, grad_clip=1.0, ema_decay=0.999, dropout=0.0, T=1000, flip=False,
                   log_every=50, ckpt_every=1000, sample_every=0, n_samples=64, seed=0),
    # The paper's CIFAR-10 recipe (Appendix B and the authors' run_cifar.py).
    "cifar10": dict(dataset="cifar10", preset="cifar10", image_size=None, steps=800_000, batch_size=128, lr=2e-4,
                    warmup=5000, grad_clip=1.0, ema_decay=0.9999, dropout=0.1, T=1000, flip=True,
                    log_every=100, ckpt_every=10_000, sample_every=20_000, n_samples=64, seed=0),
}
NETWORK_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")  # None: the preset's value
for c in CONFIGS.values():
    c.update(dict.fromkeys(NETWORK_KEYS))
# What a checkpoint's weights depend on: a resumed run may not change these.
MODEL_KEYS = ("dataset", "preset", "image_size", "T", "dropout", *NETWORK_KEYS)


def int_tuple(text):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="digits", help=f"starting values: {', '.join(CONFIGS)} (default digits)")
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist, cifar10, or a folder of images")
    p.add_argument("--preset", help=f"network preset from unet.py: {', '.join(unet.PRESETS)}")
    p.add_argument("--ch", type=common.positive(), help="network base channels (default: the preset's)")
    p.add_argument("--ch-mult", type=int_tuple, help="channel multiplier per resolution, e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=common.positive(), help="residual blocks per resolution")
    p.add_argument("--attn-resolutions", type=int_tuple, help="resolutions with self-attention, e.g. 16 ('' for none)")
    p.add_argument("--image-size", type=common.positive(),
                   help="resize images to this square size (default: as stored)")
    p.add_argument("--steps", type=common.positive(), help="total optimizer steps")
    p.add_argument("--batch-size", type=common.positive(), help="global batch size (split across GPUs)")
    p.add_argument("--lr", type=common.positive(float), help="Adam learning rate after warm-up")
    p.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=common.positive(float), help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, help="EMA decay (warmed up as min(decay, (1+k)/(10+k)))")
    p.add_argument("--dropout", type=float, help="dropout in the residual blocks")
    p.add_argument("--T", type=common.positive(), help="diffusion steps (linear betas scaled by 1000/T)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    p.add_argument("--log-every", type=common.positive(), help="steps between loss.csv rows")
    p.add_argument("--ckpt-every", type=common.positive(), help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, help="steps between sample grids (0: only at the end)")
    p.add_argument("--n-samples", type=common.positive(), help="images in each sample grid")
    p.add_argument("--seed", type=int, help="seed for data order, t and noise")
    p.add_argument("--out", help="run directory (default runs/<config>, or a fresh runs/<config>-N)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue a run: its directory or ckpt.pt "
                   "(default: the latest run)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    args = p.parse_args(argv)
    if args.config not in CONFIGS:
        raise UsageError(f"unknown config {args.config!r}: use one of {', '.join(CONFIGS)}")
    given = {k: v for k, v in vars(args).items() if k in CONFIGS["digits"] and v is not None}
    return args, given


def resolve_config(args, given):
    """The run's configuration and directory; on --resume, the checkpoint's (checked against flags)."""
    if args.resume:
        path = common.latest_checkpoint() if args.resume == "latest" else args.resume
        ckpt = common.load_checkpoint(path)
        for k in MODEL_KEYS:
            if k in given and given[k] != ckpt["config"][k]:
                raise UsageError(f"the checkpoint {path} was trained with --{k.replace('_', '-')} "
                                 f"{ckpt['config'][k]}, not {given[k]}: start a new run with another --out")
        config = {**ckpt["config"], **given}
        out = os.path.dirname(path) if path.endswith(".pt") else path
        return config, out, ckpt
    config = {**CONFIGS[args.config], "config": args.config, **given}
    out = args.out or os.path.join(common.RUNS, args.config)
    if args.out is None:  # never overwrite a finished run: take a fresh directory
        n = 1
        while os.path.exists(os.path.join(out, common.CHECKPOINT)):
            n += 1
            out = os.path.join(common.RUNS, f"{args.config}-{n}")
    elif os.path.exists(os.path.join(out, common.CHECKPOINT)):
        raise UsageError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    return config, out, None


def global_batch(step, n, batch_size, seed):
    """Indices of the images in optimizer step `step`: epochs of a seeded permutation.

    The whole global batch is decided here and each process takes its slice, so a run
    does not depend on the number of GPUs, and resuming at a step needs no loader state.
    """
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """EMA of the parameters only (never buffers), with the warm-up min(decay, (1+k)/(10+k))
    so that a short run's EMA has moved away from the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


def sample_grid(diffusion, ema, config, shape, device, path):
    g = torch.Generator(device).manual_seed(config["seed"])
    x = diffusion.p_sample_loop(ema, shape, clip=True, generator=g, device=device)
    common.save_image(common.grid_image(x), path)


def write_loss_plot(csv_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(xlabel="step", ylabel="L_simple (mean over dims)", yscale="log", title="training loss")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args, given = parse_args(argv)
    config, out, ckpt = resolve_config(args, given)
    distributed = "RANK" in os.environ
    if distributed:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() \
            and args.device != "cpu" else torch.device("cpu")
    else:
        rank, world, device = 0, 1, common.pick_device(args.device)
    B = config["batch_size"]
    if B % world:
        raise UsageError(f"--batch-size {B} must be divisible by the number of processes ({world})")

    images, _, levels = common.load_dataset(config["dataset"], "train", config.get("image_size"), args.data_root)
    if len(images) < B:
        raise UsageError(f"--batch-size {B} is larger than the dataset ({len(images)} images)")
    C, H = images.shape[1], images.shape[2]
    torch.manual_seed(config["seed"])  # the initial weights, and dropout
    try:
        network = {k: config[k] for k in NETWORK_KEYS if config[k] is not None}
        model = unet.build(config["preset"], in_channels=C, out_channels=C, image_size=H,
                           dropout=config["dropout"], T=config["T"], **network)
    except ValueError as e:
        raise UsageError(f"{e} (dataset {config['dataset']} has {C}x{H}x{H} images)") from None
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = Diffusion(linear_betas(config["T"]))
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"], foreach=True)
    noise_gen = torch.Generator(device).manual_seed(config["seed"] + 1)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        noise_gen.set_state(ckpt["rng"]["noise"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if step >= config["steps"]:
            raise UsageError(f"{out} is already trained to step {step}: pass a larger --steps to continue")
    net = model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if args.compile:
        net = torch.compile(net)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    images = images.to(device)

    def save(at_step):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "step": at_step, "config": config, "model_config": model.config,
                 "rng": {"noise": noise_gen.get_state(), "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        common.save_checkpoint(state, os.path.join(out, common.CHECKPOINT))

    log_path = os.path.join(out, "loss.csv")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        rows = []
        if os.path.exists(log_path):  # keep what was logged up to the checkpoint we resume from
            with open(log_path) as f:
                rows = [r for r in csv.DictReader(f) if ckpt is not None and int(r["step"]) <= step]
        with open(log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
            w.writeheader()
            w.writerows(rows)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{config['dataset']}: {len(images)} training images {C}x{H}x{H}; {config['preset']} network "
              f"{n_params:,} parameters; {device}, {world} process(es); writing {out}/")

    stop = {"flag": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))  # finish the step, save, exit
    bar = tqdm(total=config["steps"], initial=step, disable=rank != 0, dynamic_ncols=True, unit="step")
    b, t0, done_ok = B // world, time.time(), True
    model.train()
    while step < config["steps"]:
        idx = global_batch(step, len(images), B, config["seed"])
        t = torch.randint(1, config["T"] + 1, (B,), generator=noise_gen, device=device)
        noise = torch.randn((B, *images.shape[1:]), generator=noise_gen, device=device)
        flips = torch.rand(B, generator=noise_gen, device=device) < 0.5
        mine = slice(rank * b, (rank + 1) * b)
        x0 = common.to_model_range(images[idx[mine].to(device)], levels)
        if config["flip"]:
            x0 = torch.where(flips[mine, None, None, None], x0.flip(3), x0)
        lr = config["lr"] * min(1.0, (step + 1) / config["warmup"]) if config["warmup"] > 0 else config["lr"]
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = diffusion.training_loss(net, x0, t[mine], noise[mine])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        status = torch.stack([loss.detach().float(), torch.tensor(float(stop["flag"]), device=device)])
        if distributed:
            dist.all_reduce(status)
            status[0] /= world
        loss_value, stopping = status[0].item(), status[1].item() > 0
        if not math.isfinite(loss_value):
            where = f"{out}/{common.CHECKPOINT}" if os.path.exists(os.path.join(out, common.CHECKPOINT)) else "none yet"
            bar.close()
            raise SystemExit(f"error: the loss became {loss_value} at step {step + 1}; stopped without "
                             f"saving. Last good checkpoint: {where}. Try a lower --lr.")
        scaler.step(opt)
        scaler.update()
        ema_update(ema, model, config["ema_decay"], step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        if rank == 0:
            if step % config["log_every"] == 0 or step == config["steps"]:
                with open(log_path, "a", newline="") as f:
                    csv.writer(f).writerow([step, f"{loss_value:.6f}", f"{lr:.3g}", f"{time.time() - t0:.1f}"])
            if step % config["ckpt_every"] == 0 or step == config["steps"] or stopping:
                save(step)
                write_loss_plot(log_path, os.path.join(out, "loss.png"))
            if config["sample_every"] and step % config["sample_every"] == 0 and step < config["steps"]:
                path = os.path.join(out, f"samples_{step:07d}.png")
                sample_grid(diffusion, ema.eval(), config, (16, C, H, H), device, path)
        if stopping:
            bar.close()
            if rank == 0:
                print(f"interrupted: saved step {step} to {out}/{common.CHECKPOINT}; continue with "
                      f"python train.py --resume {out}")
            done_ok = False
            break
    bar.close()
    if rank == 0 and done_ok:
        print(f"trained {step} steps in {time.time() - t0:.0f} s; final loss {loss_value:.4f}; "
              f"drawing {config['n_samples']} samples from the EMA model...")
        path = os.path.join(out, "samples.png")
        sample_grid(diffusion, ema.eval(), config, (config["n_samples"], C, H, H), device, path)
        print(f"wrote {out}/{common.CHECKPOINT}, {path}, {log_path} and loss.png")
    if distributed:
        dist.destroy_process_group()
    if not done_ok:
        raise SystemExit(130)


if __name__ == "__main__":
    common.run(main)
