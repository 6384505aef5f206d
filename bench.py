"""Benchmarks, each side by side with its baseline in one process. `python bench.py` runs every section;
`python bench.py train` just one.

train: train.py's own training step (cifar10 at batch 128 on a GPU, digits elsewhere) in the paper's float32
against bf16, channels-last, torch.compile, CUDA graphs and fused Adam: images/s, peak memory, TFLOP/s.
sample: the sampler against its network calls alone, and what 50,000 samples for FID would take.
unet: forward+backward images/s of our network against diffusers' UNet2DModel of the same
configuration (the format of the authors' ported weights), measured side by side in one
process with the repeats interleaved, so background load hits both alike; medians reported.
modes: our network's training step and sampling call in bf16 autocast and/or torch.compile,
as ratios against fp32 eager, interleaved in one process (and what compiling costs up front).
"""
import argparse
import ctypes
import gc
import os
import re
import statistics
import time

import torch

import cli
import train
import unet
from config import NETWORK, Config
from ddpm import Diffusion, generate, linear_betas

# (preset, batch) pairs for the unet section: cifar10 is 6 GMAC per image, so keep its batch small on CPU.
UNET_CASES = [("cifar10", 8), ("digits", 128)]


def warn_if_busy():
    load, cores = os.getloadavg()[0], os.cpu_count()
    if load > 0.5 * cores:
        print(f"  warning: load average {load:.1f} on {cores} cores: other processes compete, timings are noisy\n"
              f"  (busy-waiting OpenMP threads then slow torch down badly: try OMP_WAIT_POLICY=PASSIVE or --threads 1)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls, repeats, device, passes=1):
    """Seconds per pass of each call, `repeats` times with the calls taking turns, so that background
    load hits them all alike: {name: [seconds, ...]}."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(passes):
                call()
            sync(device)
            times[name].append((time.perf_counter() - start) / passes)
    return times


def inputs(config, batch, device):
    """Random x_t and t for a network of this config."""
    x = torch.randn(batch, config["in_channels"], config["image_size"], config["image_size"], device=device)
    return x, torch.randint(1, config["T"] + 1, (batch,), device=device)


def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # give freed memory back to the OS, so the next peak is this step's own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak


def peak_memory_mb(device):
    """CUDA: max_memory_allocated. CPU: the process's peak RSS (includes torch itself and every model)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024
    except (OSError, TypeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def diffusers_twin(config):
    """diffusers.UNet2DModel with the same architecture as unet.UNet(**config), or None without diffusers."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    res = [config["image_size"] // 2**i for i in range(len(config["ch_mult"]))]
    attn = [r in config["attn_resolutions"] for r in res]
    return UNet2DModel(
        sample_size=config["image_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
        block_out_channels=[config["ch"] * m for m in config["ch_mult"]], layers_per_block=config["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
        attention_head_dim=None, dropout=config["dropout"])


def fwd_bwd(module, forward, x, t, amp=None):
    """One forward+backward pass; `forward` takes the paper's t, as ours does. amp: autocast dtype or None."""
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        out = forward(x, t)
    out.float().square().mean().backward()


def bench_unet(args):
    device = cli.pick_device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    print(f"== unet: forward+backward on {device} ({torch.get_num_threads()} threads, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {args.amp or 'fp32'}), "
          f"median of {args.repeats} interleaved repeats")
    warn_if_busy()
    for preset, batch in UNET_CASES:
        batch = args.batch or batch
        ours = unet.build(preset).to(device).train()
        twin = diffusers_twin(ours.config)
        models = {"ours": (ours, ours)}
        if twin is not None:
            twin = twin.to(device).train()
            models["diffusers"] = (twin, lambda x, t: twin(x, t - 1).sample)  # diffusers: 0-based t
        x, t = inputs(ours.config, batch, device)
        if args.channels_last:  # NHWC: usually faster on GPUs (cuDNN) and with AMP
            ours.to(memory_format=torch.channels_last)
            if twin is not None:
                twin.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)

        memory, warm = {}, time.perf_counter()
        for name, model in models.items():  # warm up, and measure each model's own peak
            fwd_bwd(*model, x, t, amp)
            model[0].zero_grad(set_to_none=True)
            sync(device)
            reset_peak_memory(device)
            before = peak_memory_mb(device)
            fwd_bwd(*model, x, t, amp)
            sync(device)
            memory[name] = (peak_memory_mb(device), peak_memory_mb(device) - before)
        # Enough passes per repeat that one repeat takes about half a second.
        passes = max(1, round(0.5 / ((time.perf_counter() - warm) / (2 * len(models)))))
        times = interleaved({name: lambda m=model: fwd_bwd(*m, x, t, amp) for name, model in models.items()},
                            args.repeats, device, passes)

        params = sum(p.numel() for p in ours.parameters())
        print(f"{preset} ({params:,} parameters), batch {batch}:")
        rate = {name: batch / statistics.median(v) for name, v in times.items()}
        for name in models:
            print(f"  {name:10s} {rate[name]:9.1f} images/s  {rate[name] / batch:6.2f} steps/s  "
                  f"(best {batch / min(times[name]):.1f})  peak memory {memory[name][0]:,.0f} MB "
                  f"(+{memory[name][1]:,.0f} MB for the step)")
        if "diffusers" in rate:
            print(f"  ratio ours/diffusers: {rate['ours'] / rate['diffusers']:.2f} (higher is better)")
        else:
            print("  (diffusers not installed: ours only)")
        del ours, twin, models


def bench_sample(args):
    """The sampler (ddpm.generate, as sample.py calls it) against the same network calls alone, so the ratio is
    what the sampler adds around the network; and what 50,000 samples for FID would take at that rate."""
    device = cli.pick_device(args.device)
    preset = args.preset or ("cifar10" if device.type == "cuda" else "digits")
    batch, T = args.batch or (256 if device.type == "cuda" else 64), args.steps or 1000
    print(f"== sample: {batch} {preset} images x {T} steps on {device} ({torch.get_num_threads()} threads), "
          f"median of {max(1, args.repeats // 2)} interleaved repeats")
    warn_if_busy()
    torch.manual_seed(0)
    model, diffusion = unet.build(preset, T=T).to(device).eval(), Diffusion(linear_betas(T))
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, device=device)

    def network_alone():
        for t in range(diffusion.T, 0, -1):
            model(x, t)
    with torch.inference_mode():
        times = interleaved({"ddpm.generate": lambda: generate(model, diffusion, batch),
                             "network alone": network_alone}, max(1, args.repeats // 2), device)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:16s} {v:8.2f} s  {batch * T / v:10,.0f} image-steps/s")
    print(f"  ratio sampler/network: {med['ddpm.generate'] / med['network alone']:.3f} (1.0: no overhead)")
    print(f"  50,000 samples x 1,000 steps (FID) at this rate: {50_000 * 1000 / (batch * T / med['ddpm.generate']) / 3600:.1f} h")


# Dense peak TFLOP/s by NVIDIA's specifications (SXM parts), for the share of it a step achieves.
PEAK_TFLOPS = {"H100": dict(bf16=989, fp32=67), "H200": dict(bf16=989, fp32=67), "A100": dict(bf16=312, fp32=19.5)}


def train_variants(device):
    """The fast paths bench_train measures, each against the paper's float32 eager step. CUDA-only ones
    (CUDA graphs, fused Adam) are left out elsewhere."""
    cuda = device.type == "cuda"
    variants = {"fp32 eager (the paper's)": {}, "bf16": dict(amp="bf16"),
                "bf16 + channels-last": dict(amp="bf16", channels_last=True),
                "bf16 + compile": dict(amp="bf16", compile="on")}
    if cuda:
        variants.update({"bf16 + fused Adam": dict(amp="bf16", fused=True),
                         "bf16 + compile + CUDA graphs": dict(amp="bf16", compile="graphs"),
                         "bf16 + compile + fused + c-last": dict(amp="bf16", compile="on", fused=True,
                                                                   channels_last=True)})
    return variants


def train_run(preset, batch, device, variant):
    """A train.py Run (train.build, and train.compiled for compile) on random images of the preset's shape."""
    cfg = unet.PRESETS[preset]
    images = torch.randint(0, 256, (4 * batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"]),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    c = Config(preset=preset, batch_size=batch, steps=10**6, amp=variant.get("amp", "off"),
               compile=variant.get("compile", "off"), **{k: cfg[k] for k in NETWORK})
    r = train.build(c, images, 256, device, (0, 1))
    if variant.get("channels_last"):
        r.model.to(memory_format=torch.channels_last)
    if variant.get("fused"):
        r.opt = torch.optim.Adam(r.model.parameters(), lr=c.lr, fused=True)
    r.model.train()
    r.net = train.compiled(r)
    return r


def bench_train(args):
    """train.py's own training step (train.train_step) for a preset and batch: the paper's float32 eager
    against bf16 and each faster path, side by side in one process, repeats interleaved; with each one's
    peak memory and the TFLOP/s it achieves against the device's peak."""
    device = cli.pick_device(args.device)
    preset = args.preset or ("cifar10" if device.type == "cuda" else "digits")
    batch = args.batch or 128
    print(f"== train: train.py's step, {preset} at batch {batch} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
          f", median of {args.repeats} interleaved repeats")
    warn_if_busy()
    flops = train_flops(preset)
    runs_, memory, first = {}, {}, {}
    for name, variant in train_variants(device).items():
        start = time.perf_counter()
        try:
            r = runs_[name] = train_run(preset, batch, device, variant)
            reset_peak_memory(device)
            for _ in range(3):  # the first steps compile, capture and warm up
                train.train_step(r)
            sync(device)
        except Exception as e:  # a path this machine cannot take: one line, and the others go on
            print(f"  {name}: skipped ({cli.first_line(e, 120)})")
            runs_.pop(name, None)
            continue
        first[name], memory[name] = time.perf_counter() - start, peak_memory_mb(device)
    if not runs_:
        raise cli.UsageError(f"no training path could run on {device}")
    steps = max(1, round(0.5 / max(1e-3, min(first.values()) / 3)))  # about half a second per repeat
    times = interleaved({name: lambda r=r: train.train_step(r) for name, r in runs_.items()}, args.repeats,
                        device, steps)
    base = batch / statistics.median(times[next(iter(times))])  # float32 eager, or the first that ran
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)),
                None)
    print(f"  {flops / 1e9:.2f} GFLOP per training image (forward and backward of the network)")
    print(f"  {'path':32s} {'images/s':>9s} {'ratio':>6s} {'first 3 steps':>14s} {'peak memory':>12s} {'TFLOP/s':>8s}"
          + ("  of peak" if peak else ""))
    for name, t in times.items():
        rate = batch / statistics.median(t)
        tflops = rate * flops / 1e12
        share = f"  {tflops / peak['bf16' if 'bf16' in name else 'fp32']:7.1%}" if peak else ""
        print(f"  {name:32s} {rate:9,.0f} {rate / base:6.2f} {first[name]:12.1f} s {memory[name]:9,.0f} MB "
              f"{tflops:8.3f}{share}")


def train_flops(preset):
    """FLOPs of one training image through the network, forward and backward (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = unet.build(preset)
    x = torch.randn(1, model.in_channels, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.ones(1, dtype=torch.long)).sum().backward()
    return counter.get_total_flops()


def bench_modes(args):
    """fp32 eager (the baseline) against bf16 autocast, torch.compile, both (and channels-last on CUDA)
    for a training step (forward+backward, batch --batch or the unet case's) and a sampling call (no grad,
    a batch of 500 for digits): ratios of medians; compile's one-off cost; bf16's largest output error."""
    device = cli.pick_device(args.device)
    preset = args.preset or "digits"
    batch = args.batch or dict(UNET_CASES).get(preset, 8)
    print(f"== modes: the {preset} network on {device} ({torch.get_num_threads()} threads), train batch {batch}, "
          f"sampling batch {4 * batch if preset == 'digits' else batch}; median of {args.repeats} interleaved "
          f"repeats; native bf16: {cli.native_bf16(device)}")
    warn_if_busy()
    torch.manual_seed(0)
    model = unet.build(preset).to(device)
    with torch.no_grad():  # the zero-initialised output layers would make every output 0, and the error 0/0
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    x, t = inputs(model.config, batch, device)
    xs = torch.randn(4 * batch if preset == "digits" else batch, *x.shape[1:], device=device)
    ts = torch.full((len(xs),), model.config["T"] // 2, device=device)
    compiled = torch.compile(model)
    modes = {"fp32 eager": (model, None), "bf16 eager": (model, torch.bfloat16),
             "fp32 compile": (compiled, None), "bf16 compile": (compiled, torch.bfloat16)}

    @torch.inference_mode()
    def sample_call(net, amp):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return net(xs, ts).float()

    warmup = {}
    for name, (net, amp) in modes.items():  # the first calls compile (a training and an inference graph)
        start = time.perf_counter()
        fwd_bwd(net, net, x, t, amp)
        sample_call(net, amp)
        sync(device)
        warmup[name] = time.perf_counter() - start
    reference = sample_call(model, None)
    err = {name: ((sample_call(net, amp) - reference).abs().max() / reference.abs().max()).item()
           for name, (net, amp) in modes.items()}
    calls = {}
    for name, (net, amp) in modes.items():  # in turn: each mode's training step, then its sampling call
        calls[name, 0] = lambda net=net, amp=amp: fwd_bwd(net, net, x, t, amp)
        calls[name, 1] = lambda net=net, amp=amp: sample_call(net, amp)
    measured = interleaved(calls, args.repeats, device, passes=3)
    times = {name: (measured[name, 0], measured[name, 1]) for name in modes}
    base = [statistics.median(v) for v in times["fp32 eager"]]
    print(f"  {'mode':13s} {'train step':>12s} {'ratio':>6s} {'sampling call':>14s} {'ratio':>6s} "
          f"{'first calls':>12s}  largest error of the output, relative to its largest value")
    for name, (training, sampling) in times.items():
        tr, sa = statistics.median(training), statistics.median(sampling)
        print(f"  {name:13s} {1000 * tr:9.1f} ms {base[0] / tr:6.2f} {1000 * sa:11.1f} ms {base[1] / sa:6.2f} "
              f"{warmup[name]:10.1f} s  {err[name]:.1e}")


SECTIONS = {"train": bench_train, "sample": bench_sample, "modes": bench_modes, "unet": bench_unet}


def main(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", metavar="section", help=f"any of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--repeats", type=cli.positive(hi=1000), default=7, help="timed repeats per case (default 7)")
    p.add_argument("--batch", type=cli.positive(hi=2**16), help="override every case's batch size")
    p.add_argument("--steps", type=cli.positive(hi=10**5), help="sample: diffusion steps (default 1000)")
    p.add_argument("--threads", type=cli.positive(hi=1024), help="torch CPU threads (default: one per core)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="unet: autocast both networks (default: fp32)")
    p.add_argument("--preset", choices=list(unet.PRESETS), help="train, sample: the network (default cifar10 on a "
                   "GPU, else digits); modes: digits or cifar10")
    p.add_argument("--channels-last", action="store_true",
                   help="unet: run both networks in channels_last (NHWC); on this 2-core CPU it was no faster")
    args = p.parse_args(argv)
    if unknown := [s for s in args.sections if s not in SECTIONS]:
        raise cli.UsageError(f"unknown section {unknown[0]!r}: use some of {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    cli.run(main)
