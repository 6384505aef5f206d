"""The paper's Table 2 on a laptop: every parameterisation and objective of Sec. 3.2-3.4, trained on the
digits with one budget, then measured on the held-out test digits.

    python ablation.py                    # 7 rows, 1 seed: under an hour on a 2-core CPU
    python ablation.py --seeds 0,1        # each row with two seeds, to see the spread
    python ablation.py --steps 300 --T 100 --n-samples 200 --out runs/ablation-quick   # a quick look

Each row is a `python train.py` run, then `python evaluate.py` (the bound in bits/dim, all T terms, on the
test split; the Frechet distance and confident fraction of --n-samples samples) and `python sample.py`
(10 samples for the picture). Writes <out>/<row>-s<seed>/ (the runs), table.md, table.json and
samples.png. Finished rows are kept: run the same command again to continue after Ctrl-C. A row whose
loss or gradient becomes NaN or infinite is recorded as unstable (the paper's blank cells), and the
table goes on.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

import cli
import figures
import runs
from cli import UsageError, positive, spread
from data import grid_image, save_image

HERE = os.path.dirname(os.path.abspath(__file__))
NUMBERS = ("bound_bpd", "frechet", "floor", "confident", "confident_test")  # in every finished row's record
STRIP = 10    # samples per row in samples.png
# (directory name, parameterisation, objective, train.py flags, the paper's IS, FID, NLL (Tables 1, 2))
ROWS = [
    ("mean-vlb-learned", "μ̃ prediction", "L, learned diagonal Σ",
     ["--predict", "mean", "--objective", "vlb", "--sigma", "learned"], "7.28±0.10", "23.69", ""),
    ("mean-vlb-fixed", "μ̃ prediction", "L, fixed isotropic Σ", ["--predict", "mean", "--objective", "vlb"],
     "8.06±0.09", "13.22", ""),
    ("mean-mse", "μ̃ prediction", "‖μ̃ − μ̃_θ‖²", ["--predict", "mean", "--objective", "simple"], "–", "–", ""),
    ("eps-vlb-learned", "ε prediction", "L, learned diagonal Σ",
     ["--predict", "eps", "--objective", "vlb", "--sigma", "learned"], "–", "–", ""),
    ("eps-vlb-fixed", "ε prediction", "L, fixed isotropic Σ", ["--predict", "eps", "--objective", "vlb"],
     "7.67±0.13", "13.51", "≤ 3.70"),
    ("eps-simple", "ε prediction", "‖ε − ε_θ‖² (L_simple)", ["--predict", "eps", "--objective", "simple"],
     "9.46±0.11", "3.17", "≤ 3.75"),
    ("x0-mse", "x̂₀ prediction (§3.2)", "‖x₀ − x̂₀‖²", ["--predict", "x0", "--objective", "simple"],
     "not reported", "\"worse\"", ""),
]


def seed_list(text):
    """argparse type: '0,1' -> [0, 1]: distinct seeds."""
    seeds = list(cli.int_list(lo=0)(text))
    if len(set(seeds)) != len(seeds) or max(seeds) > cli.SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be distinct seeds in [0, {cli.SEED_MAX}], got {text!r}")
    return seeds


def parse_args(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive(), default=1500, help="training steps per row (default 1500)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="seeds per row, e.g. 0,1 (default 0). Finished "
                   "rows are read back: two terminals can run --seeds 0 and --seeds 1, then --seeds 0,1 makes the "
                   "table of both")
    p.add_argument("--T", type=positive(), default=1000, help="diffusion steps (default 1000, the paper's)")
    p.add_argument("--n-test", type=positive(), help="test images for the bound (default all 297)")
    p.add_argument("--n-samples", type=positive(), default=500, help="samples for the Frechet distance (default 500)")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(r[0] for r in ROWS)}")
    p.add_argument("--out", default=os.path.join(runs.RUNS, "ablation"), help="default runs/ablation")
    cli.add_device_flags(p)
    args = p.parse_args(argv)
    names = [r[0] for r in ROWS]
    wanted = args.rows.split(",") if args.rows else names
    if unknown := [w for w in wanted if w not in names]:
        raise UsageError(f"unknown row {unknown[0]!r}: use some of {', '.join(names)}")
    if args.n_samples < 2:
        raise UsageError("--n-samples must be at least 2 for a Frechet distance")
    args.rows = [r for r in ROWS if r[0] in wanted]
    return args


def call(program, *argv):
    """Run one of the programs and wait for it. A stop signal is passed on to it, and waited through (it saves
    first). Its progress bars pass through. Returns (exit code, the last line it wrote to stderr, signal)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, program), *map(str, argv)], stderr=subprocess.PIPE)
    signum, tail = 0, b""
    while True:
        try:
            while chunk := proc.stderr.read1(4096):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                tail = (tail + chunk)[-4000:]
            lines = [x.strip() for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
            return proc.wait(), lines[-1] if lines else "", signum
        except KeyboardInterrupt as e:  # Ctrl-C reaches the whole terminal; `kill` reaches only this process
            signum = getattr(e, "signum", signal.SIGINT)
            proc.send_signal(signum)


def run_row(row, seed, args, where):
    """Train, evaluate and sample one (row, seed), skipping what is already done; returns its record."""
    record_path, start = os.path.join(where, "ablation.json"), time.time()
    budget = dict(steps=args.steps, T=args.T, n_test=args.n_test, n_samples=args.n_samples)
    if os.path.exists(record_path):
        record = read_record(record_path)
        if record.get("budget") != budget:
            raise UsageError(f"{where} was run with {record.get('budget')}, not {budget}: pass the same flags, "
                             f"or another --out")
        return record
    ckpt = os.path.join(where, runs.CHECKPOINT)
    passed = [f for k in ("device", "amp") if getattr(args, k) for f in (f"--{k}", getattr(args, k))]
    if os.path.exists(ckpt):  # a row interrupted before its record: continue it only with the same flags
        c = runs.load_checkpoint(ckpt)["config"]
        if (c.get("T"), c.get("seed"), c.get("steps")) != (args.T, seed, args.steps):
            raise UsageError(f"{where} was trained with --T {c.get('T')}, seed {c.get('seed')} and --steps "
                             f"{c.get('steps')}, not --T {args.T}, seed {seed} and --steps {args.steps}: pass the "
                             f"same flags, or another --out")
    if os.path.exists(ckpt) and runs.load_checkpoint(ckpt)["step"] == args.steps \
            and os.path.exists(os.path.join(where, "samples.png")):
        code, last, stop = 0, "", 0
    elif os.path.exists(ckpt):
        code, last, stop = call("train.py", "--resume", where, *passed)
    else:
        code, last, stop = call("train.py", *row[3], "--steps", args.steps, "--seed", seed, "--T", args.T,
                                "--out", where, *passed)
    if stop or code > 128:
        raise cli.Stopped(stop or code - 128)
    if code == cli.DIVERGED:
        return save_record(record_path, dict(status="unstable", why=last, seconds=round(time.time() - start),
                                             budget=budget))
    if code != 0:
        raise UsageError(f"train.py failed on row {row[0]} (exit {code}): {last}")
    n_test = ["--n-test", args.n_test] if args.n_test else []
    for program, argv in [("evaluate.py", ["--checkpoint", where, *n_test, "--n-samples", args.n_samples,
                                           "--draws", 1, "--out", where, "--force", *passed]),
                          ("sample.py", ["--checkpoint", where, "--n", STRIP, "--out", os.path.join(where, "strip"),
                                         "--force", *passed])]:
        code, last, stop = call(program, *argv)
        if stop or code > 128:
            raise cli.Stopped(stop or code - 128)
        if code != 0:  # a diverged model's NaN is recorded below; a failure here is a mistake or a bug
            raise UsageError(f"{program} failed on row {row[0]} (exit {code}): {last}")
    with open(os.path.join(where, "results.json")) as f:
        r = json.load(f)
    b, q = r["bound"], r["quality"]
    numbers = dict(bound_bpd=b["total_bpd"], bound_se=b["total_bpd_se"], frechet=q["frechet_distance"],
                   floor=q["floor_train_vs_test"], confident=q["confident"], confident_test=q["confident_test"])
    finite = all(v is not None and math.isfinite(v) for v in numbers.values())
    numbers = {k: v if v is None or math.isfinite(v) else None for k, v in numbers.items()}  # JSON has no NaN
    return save_record(record_path, dict(status="ok" if finite else "unstable", why="" if finite else
                                         "non-finite bound or samples", step=r["step"], **numbers,
                                         seconds=round(time.time() - start), budget=budget))


def read_record(path):
    """A finished row's record; a damaged one (edited by hand, say) is one line, with what to do."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        ok = record["status"] == "unstable" or all(math.isfinite(record[k]) for k in NUMBERS)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UsageError(f"{path} is not a record ablation.py wrote (damaged or edited?): delete it, and the same "
                         f"command redoes that row")
    return record


def save_record(path, record):
    runs.claim(os.path.dirname(path), [os.path.basename(path)])
    runs.write_atomic(path, lambda f: json.dump(record, f, indent=1))
    return record


def table(records, args):
    """Markdown: ours beside the paper's (Table 2's IS/FID, Table 1's NLL)."""
    minutes = sum(r.get("seconds", 0) for rs in records.values() for r in rs) / 60
    lines = [f"Digits, {args.steps} steps per run, seeds {', '.join(map(str, args.seeds))}; bound on "
             f"{args.n_test or 'all 297'} test digits; {args.n_samples} samples per run; {minutes:.0f} min in all.",
             "", "| parameterisation | objective | ours: NLL bound (bits/dim) ↓ | ours: Fréchet ↓ | "
             "ours: confident ↑ | unstable runs | paper: IS | paper: FID | paper: NLL |", "|" + "---|" * 9]
    for row in args.rows:
        ok = [r for r in records[row[0]] if r["status"] == "ok"]
        bad = len(records[row[0]]) - len(ok)
        cell = lambda key, fmt, scale=1: spread([scale * r[key] for r in ok], fmt) if ok else "unstable"  # noqa: E731
        lines.append(f"| {row[1]} | {row[2]} | {cell('bound_bpd', '{:.3f}')} | {cell('frechet', '{:.2f}')} | "
                     f"{cell('confident', '{:.0f}%', 100)} | {bad} of {len(records[row[0]])} | "
                     f"{row[4]} | {row[5]} | {row[6]} |")
    ok = [r for rs in records.values() for r in rs if r["status"] == "ok"]
    if ok:
        lines += ["", f"Floor (training digits vs test digits): Fréchet {ok[0]['floor']:.2f}, confident "
                      f"{100 * ok[0]['confident_test']:.0f}% of test digits. Uniform over 17 grey levels: 4.09 bits/dim."]
    return "\n".join(lines) + "\n"


def picture(args):
    """One row of STRIP samples per configuration (the first seed), labelled."""
    tiles, names = [], []
    for row in args.rows:
        npz = os.path.join(args.out, f"{row[0]}-s{args.seeds[0]}", "strip", "samples.npz")
        if os.path.exists(npz):
            x = torch.from_numpy(np.load(npz)["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        else:  # unstable: an empty row
            x = torch.ones(STRIP, 1, 8, 8)
        tiles.append(x[:STRIP])
        names.append(row[0])
    im = grid_image(torch.cat(tiles), nrow=STRIP, min_size=400)
    return figures.labelled(im, [], names, row_width=110)


def main(argv=None):
    args = parse_args(argv)
    runs.check_writable(args.out)
    runs.check_claim(args.out, ["table.md", "table.json", "samples.png"], force=True)  # now, not after hours
    jobs = [(row, seed) for seed in args.seeds for row in args.rows]
    records, start, done = {row[0]: [] for row in args.rows}, time.time(), 0
    for i, (row, seed) in enumerate(jobs, 1):
        left = f"~{(time.time() - start) / done * (len(jobs) - i + 1) / 60:.0f} min left" if done else \
            "time left: known after this row"
        print(f"\n=== row {i}/{len(jobs)}: {row[1]}, {row[2]} (seed {seed}); {left} ===", flush=True)
        where = os.path.join(args.out, f"{row[0]}-s{seed}")
        fresh = not os.path.exists(os.path.join(where, "ablation.json"))
        try:
            records[row[0]].append(run_row(row, seed, args, where))
        except KeyboardInterrupt as e:
            print(f"stopped: finished rows are kept in {args.out}/; run the same command to continue", file=sys.stderr)
            raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
        done += fresh
        r = records[row[0]][-1]
        print(f"    {row[0]} seed {seed}: " + (f"unstable ({r['why']})" if r["status"] != "ok" else
              f"bound {r['bound_bpd']:.3f} bits/dim, Frechet {r['frechet']:.2f}, confident {r['confident']:.0%}"))
    text, files = table(records, args), ["table.md", "table.json", "samples.png"]
    with runs.locked(args.out):  # the rows lock their own folders; this, only while the table is written
        runs.check_claim(args.out, files, force=True)
        runs.claim(args.out, files)
        runs.write_atomic(os.path.join(args.out, "table.md"), lambda f: f.write(text))
        runs.write_atomic(os.path.join(args.out, "table.json"), lambda f: json.dump(records, f, indent=1))
        save_image(picture(args), os.path.join(args.out, "samples.png"))
    print("\n" + text + f"\nwrote {args.out}/table.md, table.json and samples.png")


if __name__ == "__main__":
    cli.run(main)
