"""The settings of a training run: one table (each setting's default, type, help, and what checkpoints
written before it existed meant), the command line built from it, and where a run's settings come from:
a recipe and the flags given, or the checkpoint of the run being resumed.

Adding a setting is one row of Config plus its use in train.py; the checkpoint stores them all.
"""
import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

import cli
import runs
import unet
from cli import UsageError, number, positive
from ddpm import OBJECTIVES, PREDICT, SIGMA


def setting(default, kind, help, before=MISSING, fixed=False):
    """A row of the table: its default (the digits recipe), argparse type (or choices, or bool) and help.
    before: what checkpoints written before the setting existed meant; every setting added after the first
    checkpoints needs one, or those checkpoints cannot resume. fixed: what the weights depend on (the
    network, T, the parameterisation), which a resumed run may not change."""
    return field(default=default, metadata=dict(kind=kind, help=help, before=before, fixed=fixed))


@dataclass
class Config:
    config: str = setting("digits", ("digits", "cifar10"), "the recipe the other settings start from")
    dataset: str = setting("digits", str, "digits, mnist, fashion-mnist, cifar10, or a folder of images", fixed=True)
    preset: str = setting("digits", tuple(unet.PRESETS), "the network (unet.PRESETS)", fixed=True)
    image_size: int = setting(None, positive(), "resize images to this square size (default: as stored)", fixed=True)
    # None: the preset's value; the checkpoint records the value used
    ch: int = setting(None, positive(), "network base channels", fixed=True)
    ch_mult: tuple = setting(None, cli.int_list(), "channel multiplier per resolution, e.g. 1,2,2", fixed=True)
    num_res_blocks: int = setting(None, positive(), "residual blocks per resolution", fixed=True)
    attn_resolutions: tuple = setting(None, cli.int_list(allow_empty=True), "resolutions with self-attention, "
                                      "e.g. 16 ('' for none)", fixed=True)
    dropout: float = setting(None, number(float, 0, 1, hi_open=True), "dropout in the residual blocks", fixed=True)
    T: int = setting(1000, positive(hi=100_000), "diffusion steps (linear betas scaled by 1000/T)", fixed=True)
    predict: str = setting("eps", PREDICT, "what the network outputs (Sec. 3.2): eps (Eq. 11), x0, or mean",
                           fixed=True)
    objective: str = setting("simple", OBJECTIVES, "simple (unweighted MSE on the network's target, Eq. 14 for "
                             "eps) or vlb (the bound of Eq. 5)", fixed=True)
    sigma: str = setting("beta", SIGMA, "reverse variance: beta, beta_tilde, or learned (needs --objective vlb)",
                         fixed=True)
    steps: int = setting(3000, positive(hi=10**9), "total optimizer steps")
    minutes: float = setting(None, positive(float, hi=10**6), "instead of --steps: train for this much wall-clock "
                             "time (the learning-rate schedule follows the time spent)", before=None)
    lr_schedule: str = setting("cosine", ("constant", "cosine"), "learning rate after warm-up: constant (the "
                               "paper's) or cosine (decays to 0 at the end of --steps or --minutes)", before="constant")
    batch_size: int = setting(128, positive(hi=2**20), "global batch size (split across GPUs)")
    lr: float = setting(2e-3, positive(float), "Adam learning rate after warm-up")
    warmup: int = setting(200, number(int, 0), "linear learning-rate warm-up steps")
    grad_clip: float = setting(1.0, positive(float), "clip the gradient norm to this")
    ema_decay: float = setting(0.999, number(float, 0, 1, hi_open=True), "EMA decay (warmed up as "
                               "min(decay, (1+k)/(10+k)))")
    flip: bool = setting(False, bool, "random horizontal flips")
    log_every: int = setting(50, positive(), "steps between loss.csv rows (and checks of the loss)")
    ckpt_every: int = setting(1000, positive(), "steps between checkpoints")
    sample_every: int = setting(0, number(int, 0), "steps between sample grids (0: only at the end)")
    n_samples: int = setting(64, positive(hi=10_000), "images in the final sample grid")
    seed: int = setting(0, cli.seed, "seed for the weights, data order, t and noise (and the final grid)")
    device: str = setting("auto", str, cli.DEVICE_HELP + "; --resume keeps the run's kind", before="auto")
    amp: str = setting("auto", cli.AMP, cli.AMP_HELP + "; --resume keeps the run's", before="off")
    compile: str = setting("off", ("off", "on", "graphs"), "torch.compile the network (graphs: with CUDA graphs, "
                           "mode reduce-overhead); falls back to eager with one line if it fails", before="off")


RECIPES = {  # the paper's CIFAR-10 recipe (Appendix B and the authors' run_cifar.py); digits is the table's
    "digits": {},
    "cifar10": dict(dataset="cifar10", preset="cifar10", steps=800_000, lr=2e-4, warmup=5000, lr_schedule="constant",
                    ema_decay=0.9999, flip=True, log_every=100, ckpt_every=10_000, sample_every=20_000),
}
RENAMED = {"schedule": "lr_schedule"}  # names in older checkpoints
NETWORK = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")


def parse_args(argv=None, doc=None):
    """(the settings given on the command line, and --out, --resume, --data-root): flags built from Config.
    doc: the program's docstring, shown by --help."""
    p = cli.Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kind = f.metadata["kind"]
        if isinstance(kind, tuple):
            how = dict(choices=kind)
        elif kind is bool:
            how = dict(action=argparse.BooleanOptionalAction)
        else:
            how = dict(type=kind)
        p.add_argument(f"--{f.name.replace('_', '-')}", default=argparse.SUPPRESS, help=f.metadata["help"]
                       + default_text(f), **how)
    p.add_argument("--out", help="run folder (default runs/<config>, or a fresh runs/<config>-N)")
    p.add_argument("--resume", nargs="?", const="latest", help="continue a run: its folder or ckpt.pt (default: "
                   "the latest run)")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are downloaded")
    given = vars(p.parse_args(argv))
    flags = {k: given.pop(k) for k in ("out", "resume", "data_root")}
    if "steps" in given and "minutes" in given:
        raise UsageError("--minutes replaces --steps: give one of them")
    return given, flags


def default_text(f):
    """' (default X)', with each recipe's value where they differ; '' where None means "the preset's"."""
    values = {name: recipe.get(f.name, f.default) for name, recipe in RECIPES.items()}
    if f.default is None:
        return ""
    if len({repr(v) for v in values.values()}) == 1:
        return f" (default {f.default})"
    return f" (default {', '.join(f'{name}: {v}' for name, v in values.items())})"


def settings(given, flags):
    """(Config, run folder, checkpoint or None): a recipe with the flags given, or a run's own settings."""
    if flags["resume"]:
        return resumed(given, flags)
    c = Config(**{**RECIPES[given.get("config", "digits")], **given})
    for k in NETWORK:  # record the values used, so the checkpoint says what was trained
        setattr(c, k, unet.PRESETS[c.preset][k] if getattr(c, k) is None else getattr(c, k))
    if os.path.isdir(c.dataset):  # a folder, found again from any working directory (sample.py --figures)
        c.dataset = os.path.abspath(c.dataset)
    if c.sigma == "learned" and c.objective == "simple":
        raise UsageError("--sigma learned needs --objective vlb: an unweighted MSE does not train a variance "
                         "(no row of the paper's Table 2 pairs them)")
    return c, new_folder(flags["out"], c.config), None


def resumed(given, flags):
    if flags["out"] or "config" in given:
        raise UsageError("--resume continues a run in its own folder with its own recipe: leave out --out and --config")
    path = runs.latest_checkpoint() if flags["resume"] == "latest" else flags["resume"]
    ckpt = runs.load_checkpoint(path, needs=[f.name for f in fields(Config) if f.metadata["before"] is MISSING])
    ckpt["read"] = path, runs.stamp(path)  # train.py checks, once it holds the folder, that no one saved since
    if missing := [k for k in ("optimizer", "step", "rng") if k not in ckpt]:
        raise UsageError(f"{path} cannot be resumed: it holds no {', '.join(missing)} (not written by train.py?)")
    runs.check_fits(ckpt["model_config"], ckpt["model"], path)  # before anything is allocated
    names = {f.name for f in fields(Config)}
    stored = {RENAMED.get(k, k): v for k, v in ckpt["config"].items() if RENAMED.get(k, k) in names}
    for f in fields(Config):
        if f.metadata["fixed"] and f.name in given and given[f.name] != stored[f.name]:
            raise UsageError(f"{path} was trained with --{f.name.replace('_', '-')} {stored[f.name]}, not "
                             f"{given[f.name]}: a run cannot change it; start a new one without --resume")
    before = {f.name: f.metadata["before"] for f in fields(Config) if f.metadata["before"] is not MISSING}
    c = Config(**{**before, **stored, **given})
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    if wrong := [k for k in (*NETWORK, "T") if norm(getattr(c, k)) != norm(ckpt["model_config"].get(k))]:
        raise UsageError(f"{path}: its settings and its network disagree on {wrong[0]} (edited by hand?)")
    if "steps" in given:  # --steps turns a --minutes run back into a step count
        c.minutes = None
    return c, runs.run_folder(path), ckpt


def new_folder(out, recipe):
    """--out if it is new or empty; by default runs/<recipe>, or the first runs/<recipe>-N that is."""
    if not out:
        return runs.free_folder(os.path.join(runs.RUNS, recipe), runs.empty)
    if os.path.exists(os.path.join(out, runs.CHECKPOINT)):
        raise UsageError(f"{out} already holds a run: continue it with --resume {out}, or choose another --out")
    if os.path.isfile(out):
        raise UsageError(f"{out} is a file: choose another --out")
    if not runs.empty(out):
        raise UsageError(f"{out} is not empty ({sorted(os.listdir(out))[0]}, ...) and a run writes only into a new "
                         f"or empty folder: choose another --out")
    return runs.check_writable(out)
