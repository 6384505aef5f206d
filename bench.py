"""Benchmarks. `python bench.py` runs every section; `python bench.py unet` just one.

unet: forward+backward images/s of our network against diffusers' UNet2DModel of the same
configuration (the format of the authors' ported weights), measured side by side in one
process with the repeats interleaved, so background load hits both alike; medians reported.
modes: our network's training step and sampling call in bf16 autocast and/or torch.compile,
as ratios against fp32 eager, interleaved in one process (and what compiling costs up front).
sample: the sampler's overhead around the network.
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
import unet
from ddpm import Diffusion, generate

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
    device = cli.pick_device(args.device or "auto")
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
        cfg = ours.config
        x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], device=device)
        t = torch.randint(1, cfg["T"] + 1, (batch,), device=device)
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
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(passes):
                    fwd_bwd(*model, x, t, amp)
                sync(device)
                times[name].append((time.perf_counter() - start) / passes)

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
    """sample.py's Algorithm 2: 64 digits, all 1,000 steps, against its baseline, the same 1,000
    network calls alone, so the ratio is what the sampler adds around the network."""
    device = cli.pick_device(args.device or "auto")
    print(f"== sample: 64 digits x 1000 steps on {device} ({torch.get_num_threads()} threads), "
          f"median of {max(1, args.repeats // 2)} interleaved repeats")
    warn_if_busy()
    torch.manual_seed(0)
    model, diffusion = unet.build("digits").to(device).eval(), Diffusion()
    x = torch.randn(64, 1, 8, 8, device=device)
    times = {"ddpm.generate": [], "network alone": []}
    with torch.inference_mode():
        for _ in range(max(1, args.repeats // 2)):
            start = time.perf_counter()
            generate(model, diffusion, 64)
            sync(device)
            times["ddpm.generate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for t in range(diffusion.T, 0, -1):
                model(x, t)
            sync(device)
            times["network alone"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:16s} {v:6.1f} s")
    print(f"  ratio sampler/network: {med['ddpm.generate'] / med['network alone']:.3f} (1.0: no overhead)")


def bench_modes(args):
    """fp32 eager (the baseline) against bf16 autocast, torch.compile, both (and channels-last on CUDA)
    for a training step (forward+backward, batch --batch or the unet case's) and a sampling call (no grad,
    a batch of 500 for digits): ratios of medians; compile's one-off cost; bf16's largest output error."""
    device = cli.pick_device(args.device or "auto")
    preset = args.preset or "digits"
    batch = args.batch or dict(UNET_CASES)[preset]
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
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], device=device)
    t = torch.randint(1, cfg["T"] + 1, (batch,), device=device)
    xs = torch.randn(4 * batch if preset == "digits" else batch, *x.shape[1:], device=device)
    ts = torch.full((len(xs),), cfg["T"] // 2, device=device)
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
    times = {name: ([], []) for name in modes}
    for _ in range(args.repeats):
        for name, (net, amp) in modes.items():
            for k, call in enumerate((lambda: fwd_bwd(net, net, x, t, amp), lambda: sample_call(net, amp))):
                start = time.perf_counter()
                for _ in range(3):
                    call()
                sync(device)
                times[name][k].append((time.perf_counter() - start) / 3)
    base = [statistics.median(v) for v in times["fp32 eager"]]
    print(f"  {'mode':13s} {'train step':>12s} {'ratio':>6s} {'sampling call':>14s} {'ratio':>6s} "
          f"{'first calls':>12s}  largest error of the output, relative to its largest value")
    for name, (train, sampling) in times.items():
        tr, sa = statistics.median(train), statistics.median(sampling)
        print(f"  {name:13s} {1000 * tr:9.1f} ms {base[0] / tr:6.2f} {1000 * sa:11.1f} ms {base[1] / sa:6.2f} "
              f"{warmup[name]:10.1f} s  {err[name]:.1e}")


SECTIONS = {"unet": bench_unet, "modes": bench_modes, "sample": bench_sample}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", metavar="section", help=f"any of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per model (default 7)")
    p.add_argument("--batch", type=int, help="override every case's batch size")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="unet: autocast both networks (default: fp32)")
    p.add_argument("--preset", choices=list(dict(UNET_CASES)), help="modes: the network (default digits)")
    p.add_argument("--channels-last", action="store_true",
                   help="run both networks in channels_last (NHWC); on this 2-core CPU it was no faster")
    args = p.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
