"""Infrastructure shared by every script of the suite: data, architectures, checkpoints, runs,
precision helpers and the per-epoch robustness monitor. No method logic lives here.

Specification: docs/common.md (section numbers below refer to it) and docs/conventions.md.
Every model takes inputs in [0,1]; a model that needs normalisation does it inside `forward`.
Importing this module has no side effects.
"""

import argparse
import atexit
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import platform
import random
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ======================================================================================
# Errors and argument parsing
# ======================================================================================

def fail(msg, status=2):
    """One-line error for the user and exit. Status 2 (argparse's) for bad input; 1 for a run that diverged.
    Under torchrun every rank exits, rank 0 alone prints."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def parse_float(text):
    """'8/255', '0.031' or '2e-4' -> a finite float: a number or one fraction a/b; for argparse `type=`."""
    parts = str(text).strip().split("/")
    try:
        if len(parts) > 2:  # '8/255/2' is no fraction: Fraction('255/2') would read it as 16/255
            raise ValueError
        value = float(Fraction(parts[0]) / Fraction(parts[1])) if len(parts) == 2 else float(text)  # '0.5/255'
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or one fraction a/b: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _int_at_least(text, low, rule):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{rule}: {text!r}")
    return value


def positive_int(text):
    return _int_at_least(text, 1, "must be positive")


def _positive(v):
    return v > 0


# Allowed values of the flags every script shares, checked in one place (`parse`) before anything is
# loaded or written. A script adds its own with `parse(..., rules=...)`. Non-finite floats never get
# here: `parse_float` refuses them.
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SEED = 2 ** 32 - 1 - 1024  # numpy's seeds end at 2**32 - 1; under torchrun rank r uses seed + r

VALUE_RULES = {
    "eps": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "attack_step": ("a positive number", _positive),
    "lr": ("a positive number below 3.4e38 (float32)", lambda v: 0 < v < FLOAT32_MAX),
    "wd": ("a number >= 0 below 3.4e38 (float32)", lambda v: 0 <= v < FLOAT32_MAX),
    "seed": (f"an integer in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED),
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "temp": ("a positive number", _positive),
    "kl_scale": ("a positive number", _positive),
}


def check_values(args, rules=None):
    """Refuse a flag value outside its allowed range: one line naming the flag, exit status 2."""
    for dest, (allowed, ok) in {**VALUE_RULES, **(rules or {})}.items():
        value = getattr(args, dest, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            fail(f"--{dest.replace('_', '-')} must be {allowed}, got {value:g}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):  # description and epilog as written
    """Appends "(default: X)" once, and only where the help text does not already state the default:
    flags whose default is resolved after parsing (None here) say their resolved value in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, script, *a, **k):
        super().__init__(*a, prog=f"{script}.py", **k)
        self.script = script
        self.resume_may_change = set(RESUME_MAY_CHANGE)  # flags --resume lets the user give again

    def error(self, message):  # one line and exit status 2, like every other error of the suite
        fail(f"{message} (see --help)")


def parser(script, description, **kwargs):
    """The argument parser of `script`.py: one-line errors with exit status 2, each default shown once, no
    abbreviated flags (a later flag could change what `--epoch` means)."""
    return _Parser(script, description=description, formatter_class=_HelpFormatter, allow_abbrev=False, **kwargs)


def positive_float(text):
    """A positive finite number or fraction; for argparse `type=`."""
    value = parse_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_int(text):
    return _int_at_least(text, 0, "must be >= 0")


# Flags that may differ from the saved run on --resume: where things are (a moved data folder or
# teacher file), where it runs, and a longer run. Everything else is the saved run's.
RESUME_MAY_CHANGE = ("resume", "device", "epochs", "data_dir", "runs_dir", "unsafe_load", "compile", "compile_mode",
                     "progress_every", "tensorboard")


def _given_flags(p, argv):
    """dest -> value of the flags typed on the command line (read from argv, not by comparing defaults)."""
    if "-h" in argv or "--help" in argv:
        p.parse_args(argv)  # prints the help with the real defaults, and exits
    saved = [(a, a.default, a.required) for a in p._actions]
    try:
        for a, _, _ in saved:
            a.default, a.required = argparse.SUPPRESS, False
        given = vars(p.parse_args(argv))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
    return given


def _flag(dest):
    return "--" + dest.replace("_", "-")


def parse(p, argv=None, resolve=None, rules=None, unused=None):
    """Parse a training script's flags. With --resume, the saved run's flags come back from its last.pt
    and only the flags in `p.resume_may_change` may be typed with a new value; any other flag typed
    with a value that differs from the saved one is refused. `resolve(args)` then fills the defaults
    that depend on other flags (a no-op for a resumed run, whose values are already resolved), and
    every value is range-checked before anything is loaded or written. `unused(args)` returns
    {dest: why} for the flags this configuration does not read: typing one of them is an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for a in p._actions:
        if a.dest == "resume":
            a.help = ("continue a killed run from its last.pt, in its folder, with its saved flags; only "
                      + ", ".join(_flag(d) for d in sorted(p.resume_may_change - {"resume"})) + " may be given again")
    given = _given_flags(p, argv)
    if given.get("resume") is None:
        args = p.parse_args(argv)
        args._resumed_changes = None
    else:
        args = _resumed_args(p, given)
    args._test_batch_cpu = getattr(p, "test_batch_cpu", None)
    for dest in getattr(p, "path_flags", ()):  # as typed they would mean another file from another folder
        value = getattr(args, dest, None)
        if value == "":
            fail(f"{_flag(dest)} is empty; give a path")
        if isinstance(value, str):
            setattr(args, dest, os.path.abspath(os.path.expanduser(value)))
    if unused is not None:
        for dest, why in unused(args).items():
            if dest in given and dest != "resume":
                fail(f"{_flag(dest)} {why}")
    if resolve is not None:
        resolve(args)
    check_values(args, rules)
    return args


def _resumed_args(p, given):
    path = given["resume"]
    ck = load_checkpoint(path, unsafe=False)
    if not (isinstance(ck, dict) and ck.get("kind") == "last" and "optimizer" in ck and isinstance(ck.get("args"), dict)):
        fail(f"{path} is not a last.pt written by this suite; --resume needs one")
    saved = ck["args"]
    if saved.get("script") not in (None, p.script):
        fail(f"{path} was written by {saved.get('script')}.py, not {p.script}.py")
    changed = [d for d, v in given.items() if d not in p.resume_may_change and _jsonable(v) != saved.get(d)]
    if changed:
        fail("--resume continues the saved run with its saved flags; "
             + ", ".join(f"{_flag(d)} {_jsonable(given[d])} differs from the saved {saved.get(d)}" for d in changed)
             + "; only " + ", ".join(_flag(d) for d in sorted(p.resume_may_change - {"resume"})) + " may change")
    args = argparse.Namespace()
    for a in p._actions:  # flags the saved run predates keep their default
        if a.dest != "help":
            default = a.default
            if isinstance(default, str) and a.type is not None:
                default = a.type(default)
            setattr(args, a.dest, default)
    for k, v in saved.items():
        if k not in ("script", "env"):
            setattr(args, k, v)
    args._resumed_changes = {d: _jsonable(v) for d, v in given.items() if d != "resume" and _jsonable(v) != saved.get(d)}
    for d, v in given.items():
        setattr(args, d, v)
    return args


def add_run_args(p, *, monitors, monitor, eval_every=1, eval_all_from=None, eval_first=False, seed=0,
                 test_batch_size=128):
    """Infrastructure flags every training script shares (data, device, precision, run folder,
    monitor schedule). Method hyperparameters stay in the method's own file."""
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), help="training and test data")
    g.add_argument("--data-dir", default="./data",
                   help="folder holding the standard layout (cifar-10-batches-py/, cifar-100-python/, "
                        "train_32x32.mat); downloaded there through torchvision when absent")
    g.add_argument("--train-subset", type=positive_int, default=None, help="use the first N training images (smoke runs)")
    g.add_argument("--test-subset", type=positive_int, default=None, help="monitor on the first N test images (smoke runs)")
    g.add_argument("--test-batch-size", type=positive_int, default=None,
                   help=f"batch size of the monitor (default: {test_batch_size} on the CPU, as the official code; "
                        f"{GPU_TEST_BATCH} on a GPU, where a small batch leaves most of the device idle; the monitor's "
                        "accuracies do not depend on it except through the random start's draws)")
    p.test_batch_cpu = test_batch_size  # parse() hands it to setup_device through args
    p.path_flags = getattr(p, "path_flags", ()) + ("data_dir", "runs_dir")  # stored absolute by parse()
    g.add_argument("--seed", type=int, default=seed, help="seed of torch, numpy and random")
    g.add_argument("--runs-dir", default="runs", help="parent folder of the run folder")
    g.add_argument("--resume", default=None, metavar="LAST_PT", help="(set in parse)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write every number of metrics.jsonl as a TensorBoard scalar into the run folder "
                        "(needs pip install tensorboard)")
    g.add_argument("--unsafe-load", action="store_true",
                   help="allow checkpoints that need pickle execution (torch.load(weights_only=False)); only for files you trust")
    g.add_argument("--override-record", action="store_true",
                   help="use --dataset and the --*-norm flags even where a suite checkpoint records another data set "
                        "or normalisation (refused otherwise)")
    g = p.add_argument_group("speed and precision")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="bf16 autocast around network forwards only; attack iterates, losses and the monitor stay fp32")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for models and batches")
    g.add_argument("--compile", action="store_true", help="torch.compile the models (student and teachers)")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode; reduce-overhead records CUDA graphs")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN kernels and torch.use_deterministic_algorithms (slower)")
    g.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls/convolutions during training")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm); default: "
                        "per rank, with rank 0's running statistics kept, as nn.DataParallel in the official runs")
    g.add_argument("--progress-every", type=float, default=60.0,
                   help="seconds between progress lines inside an epoch (images/s, ETA); 0: none")
    g = p.add_argument_group("robustness monitor and checkpoint selection (docs/common.md §7)")
    g.add_argument("--monitor", default=monitor, choices=sorted(monitors),
                   help="test-set attack that scores each monitored epoch (the script's MONITORS)")
    g.add_argument("--eval-every", type=positive_int, default=eval_every, help="monitor at epochs divisible by N")
    g.add_argument("--eval-all-from", type=positive_int, default=eval_all_from, help="and at every epoch >= E")
    g.add_argument("--eval-first", action=argparse.BooleanOptionalAction, default=eval_first,
                   help=f"and at epoch 1 (default: {'on' if eval_first else 'off'})")
    g.add_argument("--eval-last", action=argparse.BooleanOptionalAction, default=True,
                   help="and at the final epoch (default: on)")
    g.add_argument("--monitor-tf32", action="store_true",
                   help="run the monitor with TF32 matmuls and convolutions (CUDA, Ampere and later): several times "
                        "faster than fp32, but its logits move by ~1e-3 relative, so near-ties can flip and best.pt "
                        "may select another epoch than the fp32 monitor would (default: fp32)")
    return p


def add_teacher_args(p, g, prefix="teacher", *, what="teacher", arch_help, norm_help, required=True, help=None):
    """--<prefix> (alias --<prefix>-ckpt), --<prefix>-arch, --<prefix>-norm, --<prefix>-shortcut-from, and once
    per parser --rb-model-dir. --<prefix> is a file or rb:NAME, a RobustBench zoo model (docs/common.md §4.1).
    The checkpoint path may change on --resume (a moved file); load_teacher checks it is the same file."""
    flag = prefix.replace("_", "-")
    text = help or f"{what} checkpoint (the suite's format or any format docs/common.md §3 lists)"
    if RB_PREFIX not in text:
        text += f"; or {RB_PREFIX}NAME, a RobustBench CIFAR L-inf zoo model (docs/common.md §4.1)"
    g.add_argument(f"--{flag}", f"--{flag}-ckpt", required=required, metavar="CKPT", type=_teacher_source(flag),
                   help=text)
    g.add_argument(f"--{flag}-arch", choices=ARCHS, default=None,
                   help=f"{what} architecture when the file does not say ({arch_help})")
    g.add_argument(f"--{flag}-norm", choices=["none", "cifar10", "cifar100"], default=None,
                   help=f"{what}'s input normalisation ({norm_help})")
    g.add_argument(f"--{flag}-shortcut-from", choices=["act", "input"], default=None,
                   help=f"a preact_resnet18 {what} file not written by the suite: what feeds its projection shortcuts, "
                        "relu(bn1(x)) (act: IAD/ARD layout) or x (input: fast_adversarial, RobustBench) (docs/common.md §4)")
    if not any(a.dest == "rb_model_dir" for a in p._actions):  # one cache for every teacher of the script
        g.add_argument("--rb-model-dir", default=None, metavar="DIR",
                       help=f"RobustBench's model cache for {RB_PREFIX}NAME teachers: the file is "
                            f"DIR/<dataset>/Linf/NAME.pt, downloaded there when absent (default: {RB_MODEL_DIR}, "
                            "RobustBench's own; may be given again on --resume, a moved cache)")
        p.resume_may_change.add("rb_model_dir")
        p.path_flags = getattr(p, "path_flags", ()) + ("rb_model_dir",)  # stored absolute by parse()
    p.resume_may_change.add(prefix)  # stored absolute by _teacher_source (parse() would mangle rb:NAME)


def _teacher_source(flag):
    """argparse `type` of --<flag>: rb:NAME as typed; a path absolute, as parse() stores its path flags (a
    resumed run may start from another folder); an empty value is the same one-line error as theirs."""
    def source(text):
        if is_rb_source(text):
            return text
        if text == "":
            fail(f"--{flag} is empty; give a path")
        return os.path.abspath(os.path.expanduser(text))
    return source


def is_monitor_epoch(args, epoch):
    return (epoch % args.eval_every == 0
            or (args.eval_all_from is not None and epoch >= args.eval_all_from)
            or (args.eval_first and epoch == 1)
            or (args.eval_last and epoch == args.epochs))


# ======================================================================================
# Data (docs/common.md §6)
# ======================================================================================

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}

# The monitor's batch on a GPU: PGD through a WRN-70-16 teacher (measure_teacher) at 256 images holds about
# 20 GB of activations in fp32, which fits a 40 GB device; the ResNet-18 students keep an H100 busy at it.
GPU_TEST_BATCH = 256

NORMS = {  # docs/common.md §2
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _read_cifar(dataset, root, train):
    folder, train_files, test_files, label_key = _CIFAR_FILES[dataset]
    files = [root / folder / f for f in (train_files if train else test_files)]
    present = [f for f in files if f.is_file()]
    if not present:
        return None
    if len(present) < len(files):
        print(f"warning: {root / folder} lacks {', '.join(f.name for f in files if f not in present)}; "
              "reading the files that are there", file=sys.stderr)
    xs, ys = [], []
    for f in present:
        try:
            with open(f, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data, labels = np.asarray(entry[b"data"]), np.asarray(entry[label_key])
        except PermissionError as e:
            fail(f"cannot read {f}: {e.strerror}")
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            fail(f"cannot read {f} as a CIFAR pickle ({type(e).__name__}: {e})")
        x, y = _checked_split(f, data.reshape(len(data), -1) if data.ndim > 1 else data, labels, DATASETS[dataset])
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _checked_split(f, x, y, num_classes):
    """The images (uint8 rows of 3*32*32 values) and labels of one data file, checked before use: as many
    labels as images, the dtype and shape of the standard layout, every label a class of the data set.
    A shifted or damaged file would otherwise train or evaluate on wrong labels without a word."""
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        fail(f"{f}: images are {x.dtype} {'x'.join(map(str, x.shape))}, expected uint8 rows of 3x32x32 values")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        fail(f"{f}: labels are {y.dtype} {'x'.join(map(str, y.shape))}, expected one integer per image")
    if len(x) != len(y):
        fail(f"{f} holds {len(x)} images but {len(y)} labels; the file is damaged (re-download it)")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        fail(f"{f}: label {int(y[i])} at index {i} is not one of the {num_classes} classes (0..{num_classes - 1})")
    return x, y.astype(np.int64)


def _read_svhn(root, train):
    f = root / ("train_32x32.mat" if train else "test_32x32.mat")
    if not f.is_file():
        return None
    try:
        import scipy.io
    except ImportError:
        fail("reading SVHN needs scipy: pip install scipy")
    try:
        m = scipy.io.loadmat(str(f))
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    except PermissionError as e:
        fail(f"cannot read {f}: {e.strerror}")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        fail(f"cannot read {f} as an SVHN .mat file ({type(e).__name__}: {e})")
    if np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)):  # MATLAB doubles
        y = y.astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        fail(f"{f}: X is {'x'.join(map(str, x.shape))}, expected 32x32x3xN")
    x = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # HWCN -> NCHW
    if np.issubdtype(y.dtype, np.integer) and ((y < 1) | (y > 10)).any():  # SVHN stores the digits 1..10
        i = int(np.flatnonzero((y < 1) | (y > 10))[0])
        fail(f"{f}: label {int(y[i])} at index {i} is not an SVHN label (1..10, 10 for the digit 0)")
    x, y = _checked_split(f, x.reshape(len(x), -1), y % 10, 10)  # torchvision maps label 10 to 0
    return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)


def _download(dataset, root, train):
    import torchvision
    kind = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
            "svhn": torchvision.datasets.SVHN}[dataset]
    kwargs = {"split": "train" if train else "test"} if dataset == "svhn" else {"train": train}
    kind(root=str(root), download=True, **kwargs)


def load_split(dataset, data_dir, train, subset=None, download=True):
    """The whole split as (uint8 [N,3,32,32], int64 [N]) on the CPU, read from the standard layout."""
    if dataset not in DATASETS:
        fail(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    root = Path(data_dir)
    read = (lambda: _read_svhn(root, train)) if dataset == "svhn" else (lambda: _read_cifar(dataset, root, train))
    data = read()
    if data is None and download:
        existed = root.exists()
        try:
            _download(dataset, root, train)
        except Exception as e:  # noqa: BLE001 - no network, read-only folder, ...
            if not existed:  # the folder is ours: no empty ./data (or half a download) left behind
                shutil.rmtree(root, ignore_errors=True)
            fail(f"{dataset} is not in {root} and the download failed ({type(e).__name__}); "
                 "pass --data-dir pointing at a folder in the standard layout")
        data = read()
    if data is None:
        fail(f"{dataset} {'train' if train else 'test'} split not found in {root}; "
             "pass --data-dir pointing at a folder in the standard layout")
    x, y = data
    if subset is not None:
        if subset > len(y) and is_main():
            print(f"warning: the first {subset} images were asked for, but the {dataset} "
                  f"{'train' if train else 'test'} split in {root} has {len(y)}; using all {len(y)}",
                  file=sys.stderr)
        x, y = x[:subset], y[:subset]
    return x, y


def crop_flip_params(n, pad, flip, device, generator=None):
    """Offsets independent and uniform in {0, ..., 2*pad} per axis (torchvision's RandomCrop.get_params)
    and a flip per image with probability 0.5: (top [n,1], left [n,1], flipped [n,1] or None)."""
    top = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), device=device, generator=generator)
    flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5 if flip else None
    return top, left, flipped


def random_crop_flip(x, pad, flip, params=None, generator=None):
    """RandomCrop(32, padding=pad) with zero fill + RandomHorizontalFlip(0.5), per image, on x's device;
    a flipped image reads its crop window right to left. `params` from crop_flip_params, else drawn."""
    n, c, h, w = x.shape
    dev = x.device
    top, left, flipped = params if params is not None else crop_flip_params(n, pad, flip, dev, generator)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = top + torch.arange(h, device=dev)
    cols = left + torch.arange(w, device=dev)
    if flipped is not None:
        cols = torch.where(flipped, cols.flip(1), cols)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def epoch_seed(seed, epoch):
    """The seed of one epoch's data order (and of one monitor pass): the same on every rank."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2 ** 63


class DeviceLoader:
    """The whole split resident on `device`; a fresh permutation and fresh augmentation each epoch.

    Yields float32 batches in [0,1] and int64 labels. No worker processes and no host-to-device
    copies inside the loop. `train=False` gives the split in order, unaugmented.

    Training batches come from `epoch(e)`: permutation and augmentation are drawn from a generator
    seeded with (seed, e) alone, so that a resumed run and every rank of a torchrun job draw the same
    global batches, whatever else consumed random numbers. Under torchrun each rank yields its
    contiguous slice of every global batch (the global batch stays `batch_size`).
    """

    def __init__(self, x, y, batch_size, *, train, flip=True, pad=4, drop_last=False, device="cpu",
                 channels_last=False, seed=0):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.train, self.flip, self.pad = batch_size, train, flip, pad
        self.drop_last, self.device, self.seed = drop_last, torch.device(device), seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._epochs = 0

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if self.train:
            self._epochs += 1
            return self.epoch(self._epochs)
        return self._ordered()

    def _ordered(self):
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._float(self.x[sl]), self.y[sl]

    def _float(self, x):
        return x.float().div_(255).contiguous(memory_format=self.memory_format)

    def epoch(self, epoch):
        """The training batches of 1-indexed `epoch` (this rank's slices of them under torchrun)."""
        rank, world_size = world()
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(len(self.y), device=self.device, generator=g)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            params = crop_flip_params(len(idx), self.pad, self.flip, self.device, g)  # drawn for the global batch
            if world_size > 1:
                if len(idx) < world_size:  # too few images to give every rank one: skipped on every rank
                    continue
                keep = torch.tensor_split(torch.arange(len(idx), device=self.device), world_size)[rank]
                idx, params = idx[keep], tuple(None if t is None else t[keep] for t in params)
            yield self._float(random_crop_flip(self.x[idx], self.pad, self.flip, params)), self.y[idx]


def default_test_batch(args, device):
    """The monitor's batch when --test-batch-size is not given: GPU_TEST_BATCH on a GPU, else the official code's."""
    return GPU_TEST_BATCH if torch.device(device).type == "cuda" else getattr(args, "_test_batch_cpu", None) or 128


def check_data(args, split, x, y):
    """The sha256 of a split's images and labels, recorded in args.data_sha256 (args.json, last.pt); a
    resumed run refuses other bytes, as it refuses another teacher file (a moved folder is fine)."""
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    digest, recorded = h.hexdigest(), dict(getattr(args, "data_sha256", None) or {})
    if recorded.get(split) not in (None, digest):
        fail(f"the {split} data in {args.data_dir} is not the data the run started with (sha256 {digest[:12]}… vs "
             f"{recorded[split][:12]}…); pass the --data-dir it started with")
    args.data_sha256 = {**recorded, split: digest}


def train_loader(args, batch_size, *, device, drop_last=False, pad=4):
    """Training loader from the shared flags (SVHN is cropped, never flipped: docs/common.md §6)."""
    x, y = load_split(args.dataset, args.data_dir, train=True, subset=args.train_subset)
    check_data(args, "train", x, y)
    return DeviceLoader(x, y, batch_size, train=True, flip=args.dataset != "svhn", pad=pad, drop_last=drop_last,
                        device=device, channels_last=args.channels_last, seed=args.seed)


def test_loader(args, *, device, batch_size=None):
    x, y = load_split(args.dataset, args.data_dir, train=False, subset=args.test_subset)
    check_data(args, "test", x, y)
    batch_size = batch_size or args.test_batch_size or default_test_batch(args, device)
    return DeviceLoader(x, y, batch_size, train=False, device=device, channels_last=args.channels_last)


# ======================================================================================
# Architectures (docs/common.md §1-2)
# ======================================================================================

def resolve_norm(norm):
    """None/'none', 'cifar10', 'cifar100', a (mean, std) pair or {'mean', 'std'} -> None or (mean, std)."""
    if norm is None or norm == "none":
        return None
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of: none, {', '.join(NORMS)}, or a (mean, std) pair")
        return NORMS[norm]
    if isinstance(norm, dict) and set(norm) == {"mean", "std"}:
        norm = (norm["mean"], norm["std"])
    try:
        mean, std = (tuple(float(v) for v in t) for t in norm)
    except (TypeError, ValueError):
        mean = std = ()
    if not (len(mean) == len(std) == 3 and min(std) > 0):
        raise ValueError(f"bad norm {norm!r}; choose one of: none, {', '.join(NORMS)}, "
                         "or a (mean, std) pair of 3 floats each")
    return mean, std


class _Net(nn.Module):
    """Holds `mean`/`std` as non-persistent buffers (None when the model does not normalise): docs/common.md §2.

    `model(x)` returns the logits; `model(x, stages=names)` returns ([the output of each named module], logits)
    from the same single pass. The outputs are collected by the forward itself, not by hooks, so that a
    compiled or DDP-wrapped model returns them too (torch.compile does not guard on hooks). The modules a
    forward can report: the stem convolution, every stage, every block of a stage (`layer1.0`), the head."""
    stage_names = ()

    def __init__(self, norm=None):
        super().__init__()
        norm = resolve_norm(norm)
        self.norm = None if norm is None else {"mean": list(norm[0]), "std": list(norm[1])}
        for name, v in zip(("mean", "std"), norm or (None, None)):
            self.register_buffer(name, None if v is None else torch.tensor(v).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x):
        return x if self.mean is None else (x - self.mean) / self.std

    def _stages(self, taps, x):
        """The stages in order (each a child module named in stage_names)."""
        for name in self.stage_names:
            x = _run(taps, name, self._modules[name], x)
        return x

    def _result(self, logits, taps):
        if taps is None:
            return logits
        missing = [n for n in taps["names"] if n not in taps["out"]]
        if missing:
            raise ValueError(f"{type(self).__name__} cannot report the output of {', '.join(missing)}; its stages: "
                             f"{', '.join(self.stage_names)} (also: the stem, a block such as {self.stage_names[0]}.0, "
                             "the head)")
        return [taps["out"][n] for n in taps["names"]], logits


def _taps(stages):
    """What `forward(x, stages=...)` collects: None for a plain forward."""
    return None if not stages else {"names": tuple(stages), "out": {}}


def _run(taps, name, module, x):
    """module(x), keeping the output under `name` when asked for; an nn.Sequential (or _Group) is run block
    by block when one of its blocks (`name.i`) is asked for."""
    if taps is not None and any(n.startswith(name + ".") for n in taps["names"]):
        children = [(module.child, module._modules[module.child])] if isinstance(module, _Group) else (
            list(module.named_children()) if isinstance(module, nn.Sequential) else [])
        for child_name, child in children:
            x = _run(taps, f"{name}.{child_name}", child, x)
        if not children:
            x = module(x)
    else:
        x = module(x)
    if taps is not None and name in taps["names"]:
        taps["out"][name] = x
    return x


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _proj(cin, cout, stride, bn=True):
    """1x1 projection shortcut; keys `0.weight` (+ `1.*` with BN)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), *([nn.BatchNorm2d(cout)] if bn else []))


def _stage(block, cin, planes, n, stride, **kw):
    """n blocks, the first with `stride` and `cin` inputs; returns (nn.Sequential, output channels)."""
    cout = planes * getattr(block, "expansion", 1)
    blocks = [block(cin if i == 0 else cout, planes, stride if i == 0 else 1, **kw) for i in range(n)]
    return nn.Sequential(*blocks), cout


class _Group(nn.Module):
    """One nn.Sequential under the child name the checkpoints use (`layer`, `block`)."""

    def __init__(self, child, seq):
        super().__init__()
        self.child = child
        self.add_module(child, seq)

    def forward(self, x):
        return self._modules[self.child](x)


# ---- ResNet-18/50/152 (§1.1) and ResNet-56 (§1.6) -------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, proj="shortcut"):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes), nn.BatchNorm2d(planes)
        self.proj = proj  # MTARD CifarResNet names it `downsample`
        needs_proj = stride != 1 or cin != planes
        self.add_module(proj, _proj(cin, planes, stride) if needs_proj else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._modules[self.proj](x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = 4 * planes
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = _proj(cin, cout, stride) if stride != 1 or cin != cout else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(_Net):
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block, num_blocks, num_classes=10, norm=None):
        super().__init__(norm)
        self.conv1, self.bn1 = _conv3(3, 64), nn.BatchNorm2d(64)
        c = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stage, c = _stage(block, c, planes, n, 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = F.relu(self.bn1(_run(taps, "conv1", self.conv1, self.normalize(x))))
        out = self._stages(taps, out)
        return self._result(_run(taps, "linear", self.linear, F.avg_pool2d(out, 4).flatten(1)), taps)


class CifarResNet(_Net):
    """ResNet-56: MTARD cifar10_nat_teacher_models/resnet.py CifarResNet(BasicBlock, [9, 9, 9])."""
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes=10, norm=None, num_blocks=(9, 9, 9)):
        super().__init__(norm)
        self.conv1, self.bn1 = _conv3(3, 16), nn.BatchNorm2d(16)
        c = 16
        for i, (planes, n) in enumerate(zip((16, 32, 64), num_blocks)):
            stage, c = _stage(BasicBlock, c, planes, n, 1 if i == 0 else 2, proj="downsample")
            self.add_module(f"layer{i + 1}", stage)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = F.relu(self.bn1(_run(taps, "conv1", self.conv1, self.normalize(x))))
        out = self._stages(taps, out)
        return self._result(_run(taps, "fc", self.fc, F.adaptive_avg_pool2d(out, 1).flatten(1)), taps)


# ---- PreActResNet-18 (§1.2) -----------------------------------------------------------------------

class PreActBlock(nn.Module):
    def __init__(self, cin, planes, stride=1, shortcut_from="act"):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3(cin, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), _conv3(planes, planes)
        self.shortcut = _proj(cin, planes, stride, bn=False) if stride != 1 or cin != planes else None
        self.shortcut_from = shortcut_from

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            sc = x
        else:  # fast_adversarial CIFAR10/preact_resnet.py feeds x; IAD/ARD feed relu(bn1(x))
            sc = self.shortcut(out if self.shortcut_from == "act" else x)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + sc


class PreActResNet18(_Net):
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes=10, norm=None, shortcut_from="act", final_bn=False):
        super().__init__(norm)
        if shortcut_from not in ("act", "input"):
            raise ValueError(f"shortcut_from must be 'act' or 'input', got {shortcut_from!r}")
        self.conv1 = _conv3(3, 64)
        c = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stage, c = _stage(PreActBlock, c, planes, 2, 1 if i == 0 else 2, shortcut_from=shortcut_from)
            self.add_module(f"layer{i + 1}", stage)
        self.bn = nn.BatchNorm2d(c) if final_bn else None
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = _run(taps, "conv1", self.conv1, self.normalize(x))
        out = self._stages(taps, out)
        if self.bn is not None:
            out = F.relu(_run(taps, "bn", self.bn, out))
        return self._result(_run(taps, "linear", self.linear, F.avg_pool2d(out, 4).flatten(1)), taps)


# ---- MobileNetV2, CIFAR variant (§1.3) ------------------------------------------------------------

class MBBlock(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        planes = expansion * cin
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride = stride
        self.shortcut = _proj(cin, cout, 1) if stride == 1 and cin != cout else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(_Net):
    # (expansion t, out c, repeats n, first stride s); second row stride 1 (ImageNet: 2)
    cfg = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    # last block at each spatial size: 24x32x32, 32x16x16, 96x8x8, 320x4x4
    stage_names = ("layers.2", "layers.5", "layers.12", "layers.16")

    def __init__(self, num_classes=10, norm=None):
        super().__init__(norm)
        self.conv1, self.bn1 = _conv3(3, 32), nn.BatchNorm2d(32)
        blocks, c = [], 32
        for t, cout, n, s in self.cfg:
            stage, c = _stage(MBBlock, c, cout, n, s, expansion=t)
            blocks += list(stage)
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = F.relu(self.bn1(_run(taps, "conv1", self.conv1, self.normalize(x))))
        out = _run(taps, "layers", self.layers, out)  # the stages are blocks of `layers`
        out = F.relu(self.bn2(_run(taps, "conv2", self.conv2, out)))
        return self._result(_run(taps, "linear", self.linear, F.avg_pool2d(out, 4).flatten(1)), taps)


# ---- WideResNet-34-10, TRADES flavour (§1.4) ------------------------------------------------------

class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3(cout, cout)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        if self.convShortcut is not None:
            x = o  # TRADES models/wideresnet.py: the activated input feeds the shortcut when in != out
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return (x if self.convShortcut is None else self.convShortcut(x)) + o


class WideResNet(_Net):
    stage_names = ("block1", "block2", "block3")

    def __init__(self, num_classes=10, norm=None, depth=34, widen_factor=10, sub_block1=True):
        super().__init__(norm)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n, w = (depth - 4) // 6, (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3(3, 16)
        self.block1 = _Group("layer", _stage(WideBlock, w[0], w[1], n, 1)[0])
        if sub_block1:  # TRADES models/wideresnet.py: sub_block1 is never called in forward
            self.sub_block1 = _Group("layer", _stage(WideBlock, w[0], w[1], n, 1)[0])
        self.block2 = _Group("layer", _stage(WideBlock, w[1], w[2], n, 2)[0])
        self.block3 = _Group("layer", _stage(WideBlock, w[2], w[3], n, 2)[0])
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():  # TRADES models/wideresnet.py init
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()
        if sub_block1:  # no forward uses it: it takes no gradient (and DDP then expects none), as in TRADES' runs
            self.sub_block1.requires_grad_(False)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = _run(taps, "conv1", self.conv1, self.normalize(x))
        out = self._stages(taps, out)  # sub_block1 is not among them: never called
        out = F.relu(self.bn1(out))
        return self._result(_run(taps, "fc", self.fc, F.avg_pool2d(out, 8).flatten(1)), taps)


# ---- WideResNet, DeepMind flavour (§1.5) ----------------------------------------------------------

_ACTIVATIONS = {"swish": F.silu, "relu": F.relu}


class DMBlock(nn.Module):
    def __init__(self, cin, cout, stride, activation="swish"):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.conv_1 = _conv3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None
        self.stride, self.act = stride, _ACTIVATIONS[activation]

    def forward(self, x):
        o = self.act(self.batchnorm_0(x))
        if self.shortcut is not None:
            x = o
        # DeepMind model_zoo.py: manual TF "SAME" padding, right/bottom only at stride 2
        o = F.pad(o, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        o = self.conv_1(self.act(self.batchnorm_1(self.conv_0(o))))
        return (x if self.shortcut is None else self.shortcut(x)) + o


class DMWideResNet(_Net):
    stage_names = ("layer.0", "layer.1", "layer.2")

    def __init__(self, depth=28, width=10, num_classes=10, norm="cifar10", padding=0, activation="swish"):
        super().__init__(norm)
        if (depth - 4) % 6 or activation not in _ACTIVATIONS:
            raise ValueError(f"DM WideResNet needs depth 6n+4 and activation in {', '.join(_ACTIVATIONS)}; "
                             f"got {depth}, {activation!r}")
        n, w = (depth - 4) // 6, (16, 16 * width, 32 * width, 64 * width)
        self.padding = padding
        self.init_conv = _conv3(3, 16)
        self.layer = nn.Sequential(*[_Group("block", _stage(DMBlock, w[i], w[i + 1], n, 1 if i == 0 else 2,
                                                           activation=activation)[0]) for i in range(3)])
        self.batchnorm = nn.BatchNorm2d(w[3])
        self.logits = nn.Linear(w[3], num_classes)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x, stages=()):
        taps = _taps(stages)
        if self.padding > 0:  # DeepMind pads before normalising
            x = F.pad(x, (self.padding,) * 4)
        out = _run(taps, "init_conv", self.init_conv, self.normalize(x))
        out = _run(taps, "layer", self.layer, out)  # the stages are layer.0, layer.1, layer.2
        out = self.act(self.batchnorm(out))
        return self._result(_run(taps, "logits", self.logits, F.avg_pool2d(out, 8).flatten(1)), taps)


# ---- cnn_small: suite-only model for CPU demos and tests ------------------------------------------

class SmallCNN(_Net):
    """Three conv-BN-ReLU-maxpool stages and a linear head (~34k parameters): trains on 2 CPU cores."""
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes=10, norm=None, widths=(16, 32, 64)):
        super().__init__(norm)
        c = 3
        for i, w in enumerate(widths):
            self.add_module(f"layer{i + 1}", nn.Sequential(_conv3(c, w), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)))
            c = w
        self.linear = nn.Linear(c * (32 >> len(widths)) ** 2, num_classes)

    def forward(self, x, stages=()):
        taps = _taps(stages)
        out = self.normalize(x)
        out = self._stages(taps, out)
        return self._result(_run(taps, "linear", self.linear, out.flatten(1)), taps)


# ---- registry -------------------------------------------------------------------------------------

def _dm(depth, width):
    return lambda **kw: DMWideResNet(depth, width, **kw)


# name -> (constructor, switches with their defaults)
_REGISTRY = {
    "resnet18": (lambda **kw: ResNet(BasicBlock, (2, 2, 2, 2), **kw), {}),
    "resnet50": (lambda **kw: ResNet(Bottleneck, (3, 4, 6, 3), **kw), {}),
    "resnet152": (lambda **kw: ResNet(Bottleneck, (3, 8, 36, 3), **kw), {}),
    "preact_resnet18": (PreActResNet18, {"shortcut_from": "act", "final_bn": False}),
    "mobilenet_v2": (MobileNetV2, {}),
    "wrn34_10": (WideResNet, {"depth": 34, "widen_factor": 10, "sub_block1": True}),
    "wrn34_20": (WideResNet, {"depth": 34, "widen_factor": 20, "sub_block1": False}),  # Chen2021LTD_WRN34_20 (AdaAD)
    "dm_wrn70_16": (_dm(70, 16), {"padding": 0, "activation": "swish"}),
    "dm_wrn28_10": (_dm(28, 10), {"padding": 0, "activation": "swish"}),
    "dm_wrn34_20": (_dm(34, 20), {"padding": 0, "activation": "swish"}),
    "dm_wrn22_6": (_dm(22, 6), {"padding": 0, "activation": "swish"}),
    "resnet56": (CifarResNet, {}),
    "cnn_small": (SmallCNN, {}),
}
ARCHS = tuple(_REGISTRY)


def build_model(arch, num_classes=10, norm="default", **arch_kwargs):
    """Suite architecture by name; norm 'default' = cifar10 for dm_wrn*, none otherwise (docs/common.md §2)."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    ctor, defaults = _REGISTRY[arch]
    unknown = sorted(set(arch_kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"{arch} has no option {', '.join(unknown)}; its options: {', '.join(defaults) or 'none'}")
    if norm == "default":
        norm = "cifar10" if arch.startswith("dm_wrn") else None
    kwargs = {**defaults, **arch_kwargs}
    model = ctor(num_classes=num_classes, norm=norm, **kwargs)
    model.arch, model.arch_kwargs, model.num_classes = arch, kwargs, num_classes
    return model


def stage_outputs(model, x, names=None):
    """One forward of `model` on x; returns ([output of each module in `names`], logits), through any
    torch.compile or DDP wrapper (`model(x, stages=names)`, docs/common.md §1.2).

    `names` defaults to model.stage_names; the stem (e.g. 'conv1'), a block ('layer1.0') and the head work too."""
    root = unwrap(model)
    names = tuple(root.stage_names if names is None else names)
    for name in names:
        try:
            root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(root).__name__} has no module {name!r}; "
                             f"its stages: {', '.join(root.stage_names)}") from None
    return model(x, stages=names)


# ======================================================================================
# Checkpoints (docs/common.md §3-5)
# ======================================================================================

def _write_error(path, e):
    fail(f"cannot write {path}: {e.strerror or e} (nothing was replaced: a file already there is intact)")


def save_checkpoint(path, obj):
    """Atomic write: a temp file in the same folder, then rename, so a crash or a full disk never
    leaves half a file and never touches the previous one. A write error is one line, exit status 2."""
    buf = io.BytesIO()
    torch.save(obj, buf)  # serialise in memory: torch's zip writer turns a failed write into a RuntimeError
    _atomic_write(Path(path), buf.getbuffer())


def write_text(path, text, append=False):
    """Write (or append) a small text file; a write error is one line, exit status 2. A full write
    goes through a temp file and a rename, like the checkpoints."""
    path = Path(path)
    if not append:
        return _atomic_write(path, text.encode())
    try:
        with open(path, "a") as fh:
            fh.write(text)
    except OSError as e:
        _write_error(path, e)


def _umask():
    """The process's umask, read without changing it where Linux says it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path, data):
    """`data` into a temp file beside `path`, fsynced, then renamed over it; the temp file never outlives
    a failure (an OSError ends in one line, anything else is re-raised). The file gets the mode a plain
    open() would give it (0666 less the umask), not mkstemp's 0600, so that others in a lab can read a run."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        _write_error(path, e)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp):
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_writable(folder):
    """Fail now, before hours of work, if `folder` cannot be created or written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        fail(f"cannot write to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fail(f"cannot write to {folder}: {e.strerror or e}")


def load_checkpoint(path, unsafe=False):
    """torch.load(weights_only=True); anything needing pickle execution is refused unless `unsafe`."""
    if str(path) == "":
        fail("the checkpoint path is empty; give a file")
    path = Path(path)
    if path.is_dir():
        fail(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        fail(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        fail(f"cannot read {path}: {e.strerror}")
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # e.g. "Unsupported operand": not a pickle at all
            fail(f"{path} is not a checkpoint (not a file torch.save wrote, or corrupt)")
        if not unsafe:
            fail(f"{path} needs pickle execution to load (it stores Python objects, not only tensors); "
                 "pass --unsafe-load if you trust the file")
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors all mean the same to the user
        fail(f"{path} is not a checkpoint (not a file torch.save wrote, or corrupt or truncated: {type(e).__name__})")
    print(f"warning: loading {path} with pickle execution (--unsafe-load)", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def checkpoint_dict(model, *, kind, epoch, dataset, args, metrics=None, select=None, optimizer=None,
                    extra=None, peer=None):
    """The suite's own checkpoint format (docs/common.md §5): tensors and primitives only. `peer` is
    a second trained model saved next to the first (AODT's online peer)."""
    model = unwrap(model)  # no _orig_mod. prefix from torch.compile
    ckpt = {
        "model": _cpu_state(model),
        "arch": model.arch, "arch_kwargs": dict(model.arch_kwargs), "num_classes": model.num_classes,
        "dataset": dataset, "norm": model.norm, "epoch": epoch, "kind": kind, "select": select,
        "metrics": metrics or {}, "args": args,
    }
    if peer is not None:
        peer = unwrap(peer)
        ckpt.update(peer=_cpu_state(peer), peer_arch=peer.arch, peer_arch_kwargs=dict(peer.arch_kwargs),
                    peer_norm=peer.norm)
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if extra is not None:
        ckpt["extra"] = extra
    return ckpt


def _cpu_state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj):
    """Container key and state_dict of a file met in the wild (docs/common.md §4 step 2). A whole
    pickled nn.Module (plain torch.save(model), readable with --unsafe-load only) gives its state_dict."""
    if isinstance(obj, nn.Module):
        return "nn.Module", obj.state_dict()
    if _is_state_dict(obj):
        return None, obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net", "student", "last"):
            value = obj.get(key)
            if isinstance(value, nn.Module):
                return f"{key} (nn.Module)", value.state_dict()
            if _is_state_dict(value):
                return key, value
    return None, None


def _state_dict_of(path, obj):
    """Container key and state_dict of a loaded file (`_unwrap`); a file holding none stops the run."""
    container, sd = _unwrap(obj)
    if sd is None:
        fail(f"{path} holds no state_dict (looked for a dict of tensors, or one under "
             "'model', 'state_dict', 'net', 'student', 'last')")
    return container, sd


def _check_finite(path, sd):
    """A NaN or inf weight would evaluate, or teach, as a constant without a word: refuse it."""
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            fail(f"{path}: {key} holds {'NaN' if bool(torch.isnan(tensor).any()) else 'inf'} values; the model "
                 "is broken (a diverged run?)")


def _load_state(model, sd, mismatch, strict=True):
    """load_state_dict whose shape errors become one line: `mismatch`, then the first size mismatches."""
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        sizes = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        fail(f"{mismatch}: {'; '.join(sizes[:3]) or str(e).splitlines()[0]}")


def _strip_prefixes(sd, allow_model_prefix):
    """Strip prefixes shared by *every* key, repeatedly (docs/common.md §4 step 3); never substrings."""
    stripped = []
    while True:
        for p in ("module.", "_orig_mod.") + (("model.",) if allow_model_prefix else ()):
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                break
        else:
            return sd, stripped


def _head_width(model, sd):
    """Number of classes a state_dict was trained for: rows of the model's last Linear weight."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    w = sd.get(f"{name}.weight")
    return None if w is None else w.shape[0]


def load_model(path, arch=None, num_classes=None, norm="auto", device="cpu", unsafe=False, arch_kwargs=None,
               arch_flag="--arch", default_arch=None, shortcut_flag="--shortcut-from", dataset=None,
               norm_flag="--norm", override_record=False):
    """Build and strictly load any checkpoint the suite meets (docs/common.md §4).

    Returns the model in eval() mode on `device` and a dict saying what was done. The suite's own
    checkpoints say their architecture; other files take `arch`, else `default_arch`. `norm='auto'`
    takes the suite checkpoint's recorded normalisation, else the architecture's default. Where a suite
    checkpoint records another data set than `dataset`, or another normalisation than an explicit
    `norm`, it is refused unless `override_record`; every weight must be finite.
    """
    obj = load_checkpoint(path, unsafe)
    suite = isinstance(obj, dict) and isinstance(obj.get("arch"), str) and _is_state_dict(obj.get("model"))
    guessed = False  # the architecture is the caller's default, not the file's or the user's
    if suite:
        if arch is not None and arch != obj["arch"]:
            fail(f"{path} holds a {obj['arch']}, not a {arch}; drop {arch_flag} or pass {_arch_hint(arch_flag, obj['arch'])}")
        recorded_ds = obj.get("dataset")
        if dataset is not None and recorded_ds not in (None, dataset) and not override_record:
            fail(f"{path} was trained on {recorded_ds}, not {dataset}; check --dataset (--override-record to use "
                 "it anyway)")
        recorded_norm = None if obj.get("norm") is None else (tuple(obj["norm"]["mean"]), tuple(obj["norm"]["std"]))
        if norm != "auto" and resolve_norm(norm) != recorded_norm and not override_record:
            fail(f"{path} records the normalisation {norm_name(obj.get('norm'))}, not "
                 f"{'none' if norm is None else norm if isinstance(norm, str) else 'custom'}; drop {norm_flag} "
                 "(--override-record to use it anyway)")
        arch, container, sd = obj["arch"], "model", obj["model"]
        recorded = obj.get("arch_kwargs", {})
        for k, v in (arch_kwargs or {}).items():
            if k in recorded and recorded[k] != v:
                fail(f"{path} records {k}={recorded[k]!r} for its {arch}; drop the flag that asks for {v!r}")
        arch_kwargs = {**recorded, **(arch_kwargs or {})}
        if norm == "auto":
            norm = None if obj.get("norm") is None else (tuple(obj["norm"]["mean"]), tuple(obj["norm"]["std"]))
    else:
        container, sd = _state_dict_of(path, obj)
        guessed = arch is None and default_arch is not None
        arch = arch or default_arch
        if arch is None:
            fail(f"{path} does not say which architecture it holds; pass {arch_flag} (one of {', '.join(ARCHS)})")
        arch_kwargs = dict(arch_kwargs or {})
        if arch == "preact_resnet18" and "shortcut_from" not in arch_kwargs:
            fail(f"{path}: a PreActResNet-18's shortcut source cannot be read from its keys; pass {shortcut_flag} "
                 "act (IAD, ARD: relu(bn1(x)) feeds the projection shortcuts) or input (fast_adversarial, "
                 "RobustBench: x does)")
        if norm == "auto":
            norm = "default"
    if arch not in ARCHS:
        fail(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    _check_finite(path, sd)
    try:
        with torch.device("meta"):  # module names only, no memory
            skeleton = build_model(arch, 10, None, **arch_kwargs)
    except ValueError as e:
        fail(str(e))
    sd, stripped = _strip_prefixes(dict(sd), allow_model_prefix=not hasattr(skeleton, "model"))
    arch_kwargs = _detect_switches(arch, sd, arch_kwargs)
    found = _head_width(skeleton, sd)
    if num_classes is not None and found is not None and found != num_classes:
        fail(f"{path} has a {found}-class head but this run needs {num_classes} classes (check --dataset)")
    num_classes = num_classes or found or 10
    try:
        model = build_model(arch, num_classes, norm, **arch_kwargs)
    except ValueError as e:
        fail(str(e))
    missing, unexpected = _key_mismatch(model, sd)
    if (missing or unexpected) and guessed:
        fail(f"{path} does not say which architecture it holds, and its keys do not fit the default {arch}; "
             f"pass {arch_flag} (one of {', '.join(ARCHS)})")
    if missing or unexpected:
        fail(f"{path} does not match {arch} {arch_kwargs or ''}: missing keys {missing[:10]}, "
             f"unexpected keys {unexpected[:10]}")
    _load_state(model, sd, f"{path} does not match {arch}")
    info = {"path": str(path), "suite": suite, "container": container, "prefixes": stripped, "arch": arch,
            "arch_kwargs": dict(model.arch_kwargs), "num_classes": num_classes, "norm": model.norm,
            "dataset": obj.get("dataset") if suite else None}
    return model.to(device).eval(), info


def _arch_hint(arch_flag, arch):
    """How the user names `arch`: '--teacher-arch resnet18', or 'ARCH:CKPT' forms as '--teacher resnet18:CKPT'."""
    flag, _, form = arch_flag.partition(" ")
    return f"{flag} {form.replace('ARCH', arch)}" if "ARCH" in form else f"{arch_flag} {arch}"


def norm_name(norm):
    """'none', 'cifar10', 'cifar100' or 'custom' for a model's `norm` attribute."""
    if norm is None:
        return "none"
    pair = (tuple(norm["mean"]), tuple(norm["std"]))
    return next((name for name, value in NORMS.items() if value == pair), "custom")


def parse_model_spec(text, flag):
    """'ARCH:CKPT[:NORM]' or 'CKPT[:NORM]' (a command-line model: --teacher of adt_aodt.py, --transfer-from
    of eval_attacks.py) -> (arch or None, absolute path, norm for load_model: "auto", None or a data set)."""
    arch, sep, rest = text.partition(":")
    if not sep or arch not in ARCHS:
        arch, rest = None, text
    norm = "auto"
    head, _, tail = rest.rpartition(":")
    if head and tail in ("auto", "none", "cifar10", "cifar100"):
        rest, norm = head, (None if tail == "none" else tail)
    elif head and not Path(rest).exists() and Path(head).exists():
        fail(f"{flag} {text!r}: {tail!r} is not a normalisation (auto, none, cifar10, cifar100)")
    if not rest:
        fail(f"{flag} {text!r}: expected ARCH:CKPT[:NORM]")
    return arch, os.path.abspath(rest), norm  # absolute: a resumed run may start from another folder


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(args, device, default_arch, prefix="teacher"):
    """Load, freeze (docs/conventions.md "Teachers") and place the model of `--<prefix>`. Returns it and
    what the loader found: load_model's info with the normalisation's name ("norm") and the file's
    "sha256"; `Run.begin(teachers=...)` records arch, norm and sha256 in args.json. On --resume the file
    may have moved, but it must hold the same bytes as when the run started."""
    flag = prefix.replace("_", "-")
    path = getattr(args, prefix)
    norm = getattr(args, f"{prefix}_norm")
    shortcut = getattr(args, f"{prefix}_shortcut_from", None)
    if is_rb_source(path):  # a RobustBench zoo model: its entry fixes architecture and normalisation (§4.1)
        arch = getattr(args, f"{prefix}_arch")
        for name, value, recorded in (("arch", arch, path), ("norm", norm, RB_NORM), ("shortcut-from", shortcut, None)):
            if name == "arch" and is_rb_source(value) and value != path:
                fail(f"--{flag} {path}: the run started with --{flag} {value}")
            if value not in (None, recorded):  # recorded: what args.json holds for a resumed run
                fail(f"--{flag}-{name} does not apply to --{flag} {path}: the RobustBench entry fixes the "
                     "architecture and the model normalises inside itself")
        model, info = load_robustbench(path, args.dataset, getattr(args, "rb_model_dir", None),
                                       unsafe=args.unsafe_load, device=device, flag=f"--{flag}")
        path, shown = info["path"], f"{path} ({info['path']})"
    else:
        shown = path
        norm = "auto" if norm in (None, "custom") else (None if norm == "none" else norm)  # custom: a resumed record
        model, info = load_model(path, arch=getattr(args, f"{prefix}_arch"), num_classes=DATASETS[args.dataset],
                                 norm=norm, device=device, unsafe=args.unsafe_load,
                                 arch_kwargs=None if shortcut is None else {"shortcut_from": shortcut},
                                 arch_flag=f"--{flag}-arch", default_arch=default_arch,
                                 shortcut_flag=f"--{flag}-shortcut-from", dataset=args.dataset,
                                 norm_flag=f"--{flag}-norm", override_record=getattr(args, "override_record", False))
        if not info["suite"] and getattr(args, f"{prefix}_sha256", None) is None:
            warn_unrecorded(path, args.dataset, info)
        info = {**info, "norm": norm_name(info["norm"])}
    digest, saved = file_sha256(path), getattr(args, f"{prefix}_sha256", None)
    if saved is not None and digest != saved:
        fail(f"--{flag} {shown} is not the file the run started with (sha256 {digest[:12]}… vs {saved[:12]}…)")
    info = {**info, "sha256": digest}
    say(f"{prefix}: {info['path']} -> {info['arch']} {info['arch_kwargs'] or ''} norm {info['norm']}"
        f" (container {info['container']}, stripped {info['prefixes'] or 'nothing'})")
    return prepare_model(freeze(model), args, device), info


def warn_unrecorded(path, dataset, info):
    """One line where a checkpoint (not the suite's) does not say what it was trained on."""
    if is_main():
        print(f"warning: {path} does not record its data set or normalisation (not a suite checkpoint); taken as "
              f"a {dataset} model with normalisation {norm_name(info['norm'])}", file=sys.stderr, flush=True)


# ---- RobustBench zoo models: --teacher rb:NAME, eval_attacks.py rb:NAME (docs/common.md §4.1) ----------------

RB_PREFIX = "rb:"
RB_MODEL_DIR = "./models"  # RobustBench's own default cache
RB_NORM = "in-model"  # what args.json records: a zoo model takes [0, 1] inputs and normalises inside itself if it does
RB_INSTALL = "pip install -r requirements-robustbench.txt"


def is_rb_source(text):
    """True for a model source naming a RobustBench zoo model, rb:NAME."""
    return isinstance(text, str) and text.startswith(RB_PREFIX)


def _alias_autoattack():
    """robustbench 1.1.1 imports `autoattack` and `autoattack.state`, the module names of the GitHub code
    (fra31/auto-attack), but its PyPI dependency pyautoattack installs that code as `pyautoattack`. Where only
    the latter exists, register it under the former names so that `import robustbench` works."""
    import importlib
    import importlib.util
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    if importlib.util.find_spec("pyautoattack") is None:
        return  # robustbench's own import then names the missing module
    sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")


def import_robustbench(what="rb:NAME"):
    """robustbench's `utils` and `model_zoo` modules (imported on first use only: an optional extra), or a
    one-line error saying what to install (exit status 2)."""
    import warnings
    _alias_autoattack()
    try:
        with warnings.catch_warnings():  # two import-time deprecation notes of robustbench's dependencies
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")
            import robustbench
            from robustbench import model_zoo, utils
    except ImportError as e:
        missing = f" (no module {e.name})" if e.name and not e.name.startswith("robustbench") else ""
        fail(f"{what} needs the robustbench package{missing}: {RB_INSTALL}")
    return robustbench, utils, model_zoo


class RobustBenchModel(nn.Module):
    """A RobustBench zoo network as the suite uses a model: `model(x)` the logits of [0, 1] inputs (the zoo
    network normalises inside itself where it needs to), `arch` 'rb:NAME', no suite normalisation constants
    (`mean` None: measure_norms has nothing to swap) and no intermediate outputs (`stage_names` empty)."""
    stage_names = ()

    def __init__(self, net, name, num_classes):
        super().__init__()
        self.net = net
        self.mean = self.std = self.norm = None
        self.arch, self.arch_kwargs, self.num_classes = f"{RB_PREFIX}{name}", {}, num_classes

    def forward(self, x, stages=()):
        if stages:
            raise ValueError(f"{self.arch} reports no intermediate outputs (a RobustBench zoo model); use a suite "
                             "architecture for a feature-level term")
        return self.net(x)


def _served_by_timm(name, dataset):
    """RobustBench serves some entries through timm (weights fetched by timm, no file in its cache): those
    whose lower-cased name, data set and threat model form a timm model name."""
    import timm
    return timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_linf")


def _download_rb(utils, gdrive_id, path, what):
    """Fetch a missing zoo file through robustbench's downloader (gdown); on failure, one line saying where
    the file is expected, and no empty folder or partial file of ours left behind."""
    created = [d for d in (path.parent, path.parent.parent, path.parent.parent.parent) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{what}: cannot create the cache folder {path.parent} ({e.strerror or e}); pass --rb-model-dir")
    say(f"{what}: {path} is not there; downloading it through robustbench")
    error = None
    try:
        utils.download_gdrive_new(gdrive_id, path)
    except Exception as e:  # noqa: BLE001 - no network, quota, a changed Google Drive page: the same to the user
        error = type(e).__name__
    except KeyboardInterrupt:
        error = "interrupted"
    if error is None and path.is_file():
        return
    with contextlib.suppress(OSError):
        path.unlink()
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()
    fail(f"{what}: {path} is missing and the download failed ({error or 'no file written'}); download Google "
         f"Drive file {gdrive_id} elsewhere and put it there (or pass --rb-model-dir)")


def load_robustbench(source, dataset, model_dir=None, *, unsafe=False, device="cpu", flag="--teacher"):
    """Build and strictly load the RobustBench zoo model `source` ('rb:NAME') of `dataset` (cifar10 or
    cifar100), threat model Linf, from RobustBench's cache `model_dir`/<dataset>/Linf/NAME.pt (downloaded
    there through robustbench when absent). The architecture comes from robustbench's model zoo; the file is
    read by load_checkpoint (weights_only=True unless `unsafe`) and loaded by the recipe of docs/common.md §4
    (container, true prefixes, strict keys, finite weights), not by robustbench.utils.load_model.
    Returns the model (RobustBenchModel) in eval() mode on `device` and a dict like load_model's."""
    what = f"{flag} {source}" if flag else source
    name = source[len(RB_PREFIX):]
    if not name:
        fail(f"{what}: name a RobustBench model, e.g. {RB_PREFIX}Chen2021LTD_WRN34_20")
    if dataset not in ("cifar10", "cifar100"):
        fail(f"{what}: RobustBench has no {dataset} models; {RB_PREFIX}NAME needs --dataset cifar10 or cifar100")
    _, utils, model_zoo = import_robustbench(what)
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    bench_ds, threat = BenchmarkDataset(dataset), ThreatModel.Linf
    zoo = model_zoo.model_dicts[bench_ds][threat]
    if name not in zoo:
        import difflib
        close = difflib.get_close_matches(name, list(zoo), n=1)
        fail(f"{what}: not a RobustBench {dataset} Linf model"
             + (f" (did you mean {RB_PREFIX}{close[0]}?)" if close else "")
             + f"; see robustbench.model_zoo.{dataset}.linf for the names")
    entry = zoo[name]
    if _served_by_timm(name, dataset):
        fail(f"{what}: this zoo entry is served by timm, with no file in RobustBench's cache; not supported")
    if entry["gdrive_id"] is None:
        fail(f"{what}: this zoo entry has no file to download; not supported")
    if isinstance(entry["gdrive_id"], (list, tuple)):
        fail(f"{what}: this zoo entry is an ensemble of {len(entry['gdrive_id'])} networks; not supported "
             "(name a single model)")
    path = Path(model_dir or RB_MODEL_DIR).expanduser().absolute() / bench_ds.value / threat.value / f"{name}.pt"
    if not path.is_file():
        _download_rb(utils, entry["gdrive_id"], path, what)
    container, sd = _state_dict_of(path, load_checkpoint(path, unsafe))
    _check_finite(path, sd)
    net = entry["model"]()
    sd, stripped = _strip_prefixes(dict(sd), allow_model_prefix=not isinstance(getattr(net, "model", None), nn.Module))
    missing, unexpected = _key_mismatch(net, sd)
    # Constants some zoo constructors set and some zoo files lack (Rice2020Overfitting's mu, sigma): the
    # constructor's values are the model's, as robustbench has them. Any other missing or extra key is refused.
    buffers = {n for n, _ in net.named_buffers()}
    kept = [k for k in missing if k in buffers and k.rsplit(".", 1)[-1] in ("mu", "sigma", "mean", "std")]
    missing = [k for k in missing if k not in kept]
    mismatch = f"{path} does not match the zoo architecture of {source}"
    if missing or unexpected:
        fail(f"{mismatch}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    _load_state(net, sd, mismatch, strict=not kept)
    num_classes = DATASETS[dataset]
    model = RobustBenchModel(net, name, num_classes)
    info = {"path": str(path), "suite": False, "container": container, "prefixes": stripped, "arch": model.arch,
            "arch_kwargs": {}, "num_classes": num_classes, "norm": RB_NORM, "dataset": dataset,
            "threat_model": threat.value, "kept_constants": kept}
    return model.to(device).eval(), info


def _detect_switches(arch, sd, arch_kwargs):
    """Constructor switches that keys reveal (docs/common.md §4 step 4); explicit ones win."""
    kw = dict(arch_kwargs)
    if arch in ("wrn34_10", "wrn34_20"):
        kw.setdefault("sub_block1", any(k.startswith("sub_block1.") for k in sd))
    if arch == "preact_resnet18":
        kw.setdefault("final_bn", any(k.startswith("bn.") for k in sd))
    return kw


def _key_mismatch(model, sd):
    # BatchNorm accepts a missing num_batches_tracked (old checkpoints), as load_state_dict does
    want = set(model.state_dict())
    missing = sorted(k for k in want - set(sd) if not k.endswith("num_batches_tracked"))
    return missing, sorted(set(sd) - want)


# ======================================================================================
# Device, precision and compilation
# ======================================================================================

def seed_everything(seed):
    """Seeds Python, NumPy and torch. Under torchrun rank r uses seed + r, so that attack noise differs
    between ranks; data order and the monitor use their own generators (`epoch_seed`), equal on all."""
    seed = seed + world()[0]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def setup_device(args):
    """The device of --device and its kernels: TF32 unless --no-tf32; cuDNN autotuning (benchmark), or with
    --deterministic deterministic kernels only. Called once in main(). Under torchrun (WORLD_SIZE > 1) it
    joins the process group (NCCL on CUDA, gloo on CPU) and takes the device of LOCAL_RANK."""
    name = join_process_group(str(parse_device(args.device)))
    if name.startswith("cuda"):  # TF32 exists on CUDA only; leaving the flags alone elsewhere spares recompiles
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    set_deterministic(args.deterministic)
    if getattr(args, "test_batch_size", 0) is None:  # --test-batch-size sized for the device (docs/common.md §7)
        args.test_batch_size = default_test_batch(args, name)
    return torch.device(name)


def set_deterministic(on):
    """on: deterministic cuDNN and torch kernels (slower); off: cuDNN picks the fastest kernel per shape."""
    if on:  # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made (later)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, not on


def parse_device(name):
    """--device as a torch.device (default: cuda when available, else cpu); one line for a bad name."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name} is not a device; use cuda, cuda:N or cpu")
    if device.type not in ("cuda", "cpu"):
        fail(f"--device {name}: the suite runs on cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} asked for, but CUDA is not available; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)")
    return device


def autocast(amp, device):
    """bf16 autocast around network forwards when --amp bf16; a no-op context otherwise."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")


# torch.compile's backend. Tests on CPU set "aot_eager" (the same Dynamo capture and AOTAutograd graphs,
# no code generation); every user-facing run keeps inductor.
COMPILE_BACKEND = "inductor"


def compile_model(model, args):
    """torch.compile with --compile-mode and static shapes (dynamic=False): a batch of another size (the
    last partial training batch) gets a graph of its own instead of turning every graph dynamic, and the
    monitor pads its last batch (`monitor`), so a run compiles a bounded set of graphs, each once. The
    modes of one forward code (teacher and student, train and eval BatchNorm, attack passes without
    parameter gradients, loss passes with them, the last partial batch) stay cached side by side: the
    recompile limit is raised from torch's eight so that none falls back to eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 512)
    elif hasattr(config, "accumulated_cache_size_limit"):
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 512)
    mode = None if args.compile_mode == "default" or COMPILE_BACKEND != "inductor" else args.compile_mode
    return torch.compile(model, backend=COMPILE_BACKEND, mode=mode, dynamic=False)


def prepare_model(model, args, device):
    """Device, --channels-last and --compile for a freshly built or loaded model (teachers, peers)."""
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = compile_model(model, args)
    return model


def sgd(params, lr, momentum, wd):
    """torch.optim.SGD as every method uses it (coupled weight decay, no dampening, no Nesterov). On CUDA
    the fused kernel: the same update in a few launches instead of several per parameter. `params`
    may be parameter groups."""
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    fused = {"fused": True} if first.device.type == "cuda" else {}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, **fused)


def freeze(model):
    """A teacher: eval() once, no parameter gradients (docs/conventions.md "Teachers")."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def input_grad_only(model):
    """Inside: the parameters of `model` do not require grad; on exit they are as before. For every attack
    on a trained model: torch.autograd.grad(loss, x_adv) prunes the weight gradients in eager mode, but a
    compiled model's backward (AOTAutograd) returns a gradient for every input that requires one, which
    is about half the arithmetic of each attack step."""
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


def unwrap(model, keep_compiled=False):
    """The module under a DDP wrapper and (unless `keep_compiled`) under torch.compile's wrapper: the plain
    module holds the state_dict; the compiled one, without DDP, runs the attacks (input gradients only,
    no gradient all-reduce)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model if keep_compiled else getattr(model, "_orig_mod", model)



class EpochTimer:
    """Wall time of an epoch, synchronising CUDA so that queued kernels are counted."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ======================================================================================
# Distributed training (torchrun): ranks, BatchNorm statistics, sums over ranks
# ======================================================================================

def world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """True on the process that prints and writes (rank 0, or the only process)."""
    return world()[0] == 0


def say(*a):
    """print, on the main process only."""
    if is_main():
        print(*a, flush=True)


def join_process_group(name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL for CUDA and gloo for CPU, and take
    the GPU of LOCAL_RANK. Returns the device name to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if name.startswith("cuda"):
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(name)
        dist.init_process_group("nccl" if name.startswith("cuda") else "gloo")
        atexit.register(_leave_process_group)
    return name


def _leave_process_group():
    """At exit: wait (a bounded time) for every rank to get here, then leave. A rank that leaves while
    rank 0 still writes its last checkpoint can take gloo's threads down with it (SIGABRT)."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=300))
        else:
            dist.barrier()
    dist.destroy_process_group()


def prepare_student(model, args, device):
    """prepare_model for the trained model, and under torchrun: --sync-bn, then DistributedDataParallel.
    The loss forwards go through the returned wrapper (gradients all-reduced); the attack runs on
    `unwrap(student, keep_compiled=True)`, the module itself, so that no DDP reducer or buffer broadcast enters it."""
    model = model.to(device)
    if world()[1] > 1 and args.sync_bn:
        model = sync_batchnorm(model, device)
    model = prepare_model(model, args, device)
    if world()[1] > 1:  # buffers: broadcast_buffers, once before each step and before the monitor, not at every forward
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum shared by every rank is the sum of the
    ranks' gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of a CPU (gloo) torchrun job, where torch's SyncBatchNorm refuses
    CPU tensors: batch sums and sums of squares are all-reduced (differentiably), then normalised as
    nn.BatchNorm2d does, running statistics updated with the unbiased global variance."""

    def forward(self, x):
        if not self.training or world()[1] == 1:
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * (var.detach() * n / (n - 1)))
        out = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return out * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else out


def sync_batchnorm(model, device):
    """--sync-bn: torch's SyncBatchNorm on CUDA (NCCL); the gloo version above on CPU. Same state_dict."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = _SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def _synced_bn(model):
    """True when the model's BatchNorm layers compute their statistics over the global batch (--sync-bn)."""
    return any(isinstance(m, (nn.SyncBatchNorm, _SyncBatchNorm2d)) for m in unwrap(model).modules())


def broadcast_buffers(*models):
    """Under torchrun, every rank takes rank 0's buffers (BatchNorm statistics), as nn.DataParallel's
    replicas took device 0's: the attack and the monitor then see the same statistics on every rank, and
    last.pt (rank 0's) holds the whole state a resumed run needs. One collective for all buffers of all
    models, bit for bit (their bytes, packed). Under --sync-bn every rank already holds the same statistics:
    nothing to do. A no-op outside torchrun."""
    if world()[1] == 1:
        return
    buffers = [b for m in models if not _synced_bn(m) for b in unwrap(m).buffers()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).view(torch.uint8) for b in buffers])
    dist.broadcast(flat, 0)
    offset = 0
    for b in buffers:
        n = b.numel() * b.element_size()
        b.copy_(flat[offset:offset + n].clone().view(b.dtype).view(b.shape))  # clone: aligned for the dtype
        offset += n


def global_sum_factor(reduction):
    """A loss summed over the batch (reduction "sum") adds up this rank's slice only, and DDP averages the
    ranks' gradients: times the world size it is the one-process sum over the global batch. 1 otherwise."""
    return world()[1] if reduction == "sum" else 1


def all_mean(t):
    """Mean of a tensor over the ranks (the tensor itself outside torchrun); a collective on every rank."""
    return all_sum(t) / world()[1] if world()[1] > 1 else t


def all_sum(t):
    """Sum of a tensor over the ranks (the tensor itself outside torchrun); a collective on every rank."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _rng_states_of_all_ranks():
    """This process's generator states, or under torchrun every rank's, gathered (a collective)."""
    state = _rng_state()
    if world()[1] == 1:
        return [state]
    states = [None] * world()[1]
    dist.all_gather_object(states, state)
    return states


# ======================================================================================
# The run folder: args.json, metrics.jsonl, best.pt and last.pt, exact resume
# ======================================================================================

def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def json_dumps(obj, **kw):
    """Strict JSON: a non-finite float becomes null (json.dumps would write a bare NaN)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(_jsonable(obj)), allow_nan=False, **kw)


def environment():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "host": platform.node(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "world_size": world()[1]}


def _rng_state():
    """Generator states as tensors and primitives, so that last.pt stays readable with weights_only."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    _, py_state, py_gauss = random.getstate()
    state = {"cpu": torch.get_rng_state(), "python": list(py_state), "python_gauss": py_gauss,
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter for --tensorboard, or one line naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter


def tensorboard_scalars(writer, record):
    """Every number of one metrics.jsonl line as a TensorBoard scalar at step = epoch, flushed at once."""
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()
    return writer


def all_finite(model):
    """True when every parameter and floating buffer of `model` is finite (one host sync)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class Run:
    """Run folder `runs/<script>__<dataset>__<arch>__s<seed>__<time>/` with args.json, metrics.jsonl,
    last.pt and best.pt; progress lines; divergence guard; exact resume from last.pt. Under torchrun
    every rank keeps the same bookkeeping and rank 0 alone writes.

    Usage: `args = common.parse(p, argv, ...)` (with --resume it restores the saved flags), then
    `run = Run(script, args, arch)`, `start = run.begin(model, optimizer)` once setup has succeeded
    (nothing is written before), and per epoch `for x_nat, y in run.batches(train_data, epoch)`,
    `metrics = run.train_metrics(...)`, then `run.end_epoch(...)`.
    """

    def __init__(self, script, args, arch, variant=None):
        self.script, self.args, self.resumed = script, args, None
        if args.resume:
            self.resumed = load_checkpoint(args.resume, unsafe=False)
            self.dir = Path(args.resume).resolve().parent
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = script if variant is None else f"{script}-{variant}"  # iad-iad2, adt_aodt-aodt: told apart
            base = Path(args.runs_dir) / f"{name}__{args.dataset}__{arch}__s{args.seed}__{stamp}"
            self.dir, i = base, 1
            while self.dir.exists():
                i += 1
                self.dir = base.with_name(f"{base.name}-{i}")
        self.epoch_walls, self.images, self._constant_at = [], None, None
        self._epoch_start, self._said_selection = None, False
        # --tensorboard: fails here, before anything is written, when the package is missing
        self.tb_class, self.tb = (summary_writer_class() if getattr(args, "tensorboard", False) else None), None

    def begin(self, model, optimizer, *, monitor, extra=None, peer=None, teachers=None):
        """Call just before the epoch loop, once every flag is final: writes args.json (the flags, the
        monitor's attack `monitor` and what `teachers` {prefix: load_teacher's info} found), or loads the
        resumed state into model (and `peer`), optimizer and `extra`. Returns the first epoch to run and
        the best monitored epoch so far, {"epoch": None, "value": None} in a new run."""
        found = {f"{prefix}_{k}": info[k] for prefix, info in (teachers or {}).items() for k in ("arch", "norm", "sha256")}
        self.args_json = {"script": self.script, **_jsonable({k: v for k, v in vars(self.args).items()
                                                              if not k.startswith("_")}),
                          **_jsonable(found), "monitor_attack": _jsonable(monitor)}  # a resume checks the teachers' files
        say(f"run folder: {self.dir}")
        if not self.resumed:  # the folder appears only once setup has succeeded
            if is_main():
                check_writable(self.dir.parent)
                try:
                    self.dir.mkdir()
                except OSError as e:
                    _write_error(self.dir, e)
                write_text(self.dir / "args.json", json_dumps({**self.args_json, "env": environment()}, indent=2) + "\n")
            return 1, {"epoch": None, "value": None}
        ck = self.resumed
        unwrap(model).load_state_dict(ck["model"])
        if peer is not None:
            unwrap(peer).load_state_dict(ck["peer"])
        optimizer.load_state_dict(ck["optimizer"])
        if extra is not None:
            extra.update(ck.get("extra", {}))
        sel = ck.get("select") or {}
        best = {"epoch": sel.get("best_epoch"), "value": sel.get("best_value"),
                **({"name": sel["value_name"]} if sel.get("value_name") else {})}
        epoch, self._constant_at = ck["epoch"], ck.get("constant_at")
        if is_main():
            for stale in self.dir.glob(".*.tmp"):  # a write cut short by the kill
                _remove(stale)
            if epoch < self.args.epochs:  # a finished run that is only asked again is not a resume
                self._record_resume(epoch)
                self._truncate_metrics(epoch)
        rank, world_size = world()
        states = ck.get("rng_ranks") or [ck["rng"]]
        if len(states) != world_size:
            say(f"warning: {self.dir.name} was saved by {len(states)} process(es), resumed by {world_size}; "
                "the data order is the same, the attack noise is not")
        _set_rng_state(states[rank % len(states)])
        say(f"resumed {self.dir.name} after epoch {epoch}")
        if epoch >= self.args.epochs:
            say(f"nothing to do: the run has finished its {self.args.epochs} epochs; pass --epochs N to train longer")
        return epoch + 1, best

    def _truncate_metrics(self, epoch):
        """metrics.jsonl keeps the lines of the epochs the checkpoint holds."""
        metrics = self.dir / "metrics.jsonl"
        if metrics.exists():
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    if json.loads(line).get("epoch", 0) <= epoch:
                        kept.append(line)
                except ValueError:  # a line cut short by the kill
                    pass
            write_text(metrics, "".join(ln + "\n" for ln in kept))

    def _record_resume(self, epoch):
        """args.json keeps the flags as they are now and a list of the resumes with what changed."""
        path = self.dir / "args.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        resumes = saved.get("resumes", []) + [{"after_epoch": epoch, "changed": self.args._resumed_changes or {},
                                               "env": environment()}]
        write_text(path, json_dumps({**self.args_json, "env": saved.get("env"), "resumes": resumes}, indent=2) + "\n")

    def log(self, record):
        if is_main():
            write_text(self.dir / "metrics.jsonl", json_dumps(record) + "\n", append=True)
            if self.tb_class is not None:  # purge_step: a resumed run drops the killed run's events of the epochs it redoes
                self.tb = tensorboard_scalars(self.tb or self.tb_class(str(self.dir), purge_step=record["epoch"]), record)

    def batches(self, loader, epoch):
        """The training batches of `epoch` (this rank's slices under torchrun), with a progress line every
        --progress-every seconds: images/s and the ETA of the epoch and of the run, monitor included.
        Host clock only: no device sync per step (on a GPU the rate shows once the launch queue is full)."""
        every, total = getattr(self.args, "progress_every", 0), len(loader)
        start = last = self._epoch_start = time.perf_counter()  # the teacher's measurement is not the epoch's
        global_batch = min(loader.batch_size, len(loader.y))
        for b, batch in enumerate(loader.epoch(epoch), 1):
            yield batch
            now = time.perf_counter()
            if every and now - last >= every and b < total:
                last = now
                rate = b / (now - start)  # batches per second
                eta_epoch = (total - b) / rate
                walls = self.epoch_walls or [total / rate]
                eta_run = eta_epoch + (self.args.epochs - epoch) * sum(walls) / len(walls)
                say(f"  epoch {epoch} batch {b}/{total}  {rate * global_batch:.0f} img/s  epoch ETA "
                    f"{datetime.timedelta(seconds=round(eta_epoch))}  run ETA {datetime.timedelta(seconds=round(eta_run))}")

    def train_metrics(self, epoch, totals, n_seen, optimizer, *models):
        """Epoch means of the loss terms and the lr: one host sync, once per epoch (under torchrun the sums
        and counts of all ranks, all-reduced). A term that is not finite, or a model holding a non-finite
        weight, stops the run (exit status 1) before anything of this epoch is saved: last.pt and
        best.pt keep the last finite epoch."""
        keys = list(totals)
        device = next(iter(totals.values())).device if totals else torch.device("cpu")
        sums = all_sum(torch.stack([torch.as_tensor(totals[k], dtype=torch.float64, device=device) for k in keys]
                                   + [torch.tensor(float(n_seen), dtype=torch.float64, device=device)])).tolist()
        self.images = int(sums[-1])
        metrics = {"lr": optimizer.param_groups[0]["lr"], **{k: v / self.images for k, v in zip(keys, sums)}}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if not bad:
            bad = [f"the weights of {unwrap(m).arch}" for m in models if not all_finite(m)]
        if bad:
            self.log({"epoch": epoch, **metrics, "diverged": bad})
            kept = (f"last.pt and best.pt keep epoch {epoch - 1}" if epoch > 1 or self.resumed
                    else "no checkpoint was written")
            fail(f"epoch {epoch} diverged: {', '.join(bad)} not finite; {kept}; try a smaller --lr", status=1)
        return metrics

    def log_epoch(self, epoch, metrics, best, seconds=None):
        """One line of metrics.jsonl (the epoch's metrics, its time and images/s, the best epoch so far)
        and the progress line; returns the line's record."""
        record = {"epoch": epoch, **metrics}
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
            if self.images:
                record["images_per_s"] = round(self.images / seconds, 1)
        record["best_epoch"], record["best_value"] = best["epoch"], best["value"]
        warning = self._constant_classifier(record)
        if warning:
            record["warning"] = warning
        self.log(record)
        if self._epoch_start is not None:
            self.epoch_walls.append(time.perf_counter() - self._epoch_start)  # training and monitor
        say(self._progress(record, self.args.epochs))
        if warning:
            say(f"  warning: {warning}")
        return record

    def _constant_classifier(self, record):
        """A warning (not an error) when the monitor found a constant classifier at this monitored epoch and at
        the one before: one class predicted for every test image, or clean accuracy equal to robust accuracy
        near chance (below twice chance)."""
        if "test_clean" not in record:
            return None
        clean, robust = record["test_clean"], record.get("test_robust")
        chance = 1 / DATASETS[self.args.dataset]
        constant = record.get("test_classes") == 1 or (robust == clean and clean < 2 * chance)
        previous, self._constant_at = self._constant_at, record["epoch"] if constant else None
        if not (constant and previous):
            return None
        return (f"a constant classifier at epochs {previous} and {record['epoch']}: "
                + ("one class predicted for every test image, " if record.get("test_classes") == 1 else "")
                + f"clean {100 * clean:.2f}%" + ("" if robust is None else f", robust {100 * robust:.2f}%")
                + f" (chance {100 * chance:.2f}%); the run goes on")

    def _select(self, best):
        """What selected the checkpoint: the monitor, and `best["name"]` when the value is not its robust
        accuracy (e.g. W-Robust)."""
        return {"monitor": self.args.monitor, **({"value_name": best["name"]} if best.get("name") else {})}

    def save_best(self, model, record, best, peer=None):
        """best.pt: the model (and `peer`) of the epoch `best` names."""
        if is_main():
            save_checkpoint(self.dir / "best.pt", checkpoint_dict(
                model, kind="best", epoch=best["epoch"], dataset=self.args.dataset, args=self.args_json,
                metrics=record, select={**self._select(best), "value": best["value"], "epoch": best["epoch"]}, peer=peer))
        caveat = "" if self._said_selection else "; selected on the test set, as the papers do, not good practice"
        self._said_selection = True
        say(f"  best.pt <- epoch {best['epoch']} ({best.get('name') or self.args.monitor} {100 * best['value']:.2f}%){caveat}")

    def save_last(self, model, optimizer, record, best, extra=None, peer=None):
        """last.pt: everything exact resume needs (model, `peer`, optimizer, `extra`, the best epoch so far,
        every rank's generator states). A collective: every rank calls it, rank 0 writes."""
        states = _rng_states_of_all_ranks()
        if is_main():
            select = {**self._select(best), "epoch": record["epoch"], "best_value": best["value"],
                      "best_epoch": best["epoch"]}
            ck = checkpoint_dict(model, kind="last", epoch=record["epoch"], dataset=self.args.dataset,
                                 args=self.args_json, metrics=record, select=select, optimizer=optimizer,
                                 extra=extra, peer=peer)
            ck["rng"], ck["constant_at"] = states[0], self._constant_at  # constant_at: for the warning on resume
            if len(states) > 1:
                ck["rng_ranks"] = states
            save_checkpoint(self.dir / "last.pt", ck)

    def _progress(self, r, total):
        parts = [f"epoch {r['epoch']}/{total}"]
        for k, v in r.items():
            if k in ("epoch", "seconds", "images_per_s", "best_epoch", "best_value") or v is None:
                continue
            if k == "monitor_seconds":
                continue
            if isinstance(v, float):
                parts.append(f"{k} {100 * v:.2f}" if k.endswith(("clean", "robust", "acc")) else f"{k} {v:.4g}")
        if "images_per_s" in r:
            parts.append(f"{r['images_per_s']:.0f} img/s")
        if self.epoch_walls:
            eta = sum(self.epoch_walls) / len(self.epoch_walls) * (total - r["epoch"])
            monitor_s = f" + monitor {r['monitor_seconds']:.1f}s" if r.get("monitor_seconds") is not None else ""
            parts.append(f"train {r.get('seconds', 0):.1f}s{monitor_s}  run ETA {datetime.timedelta(seconds=round(eta))}")
        return "  ".join(parts)


def measure_teacher(run, teacher, test_data, attack, prefix="teacher"):
    """Clean and monitor accuracy of a frozen teacher, once, before training (docs/conventions.md "Teachers");
    logged as epoch 0 under `<prefix>/...` so that a wrong checkpoint or normalisation shows at once."""
    m = monitor(teacher, test_data, attack, tf32=getattr(run.args, "monitor_tf32", False))
    record = {f"{prefix}/clean": m["clean"], f"{prefix}/robust": m["robust"]}
    run.log({"epoch": 0, **record})
    robust = "" if m["robust"] is None else f", {run.args.monitor} {100 * m['robust']:.2f}%"
    say(f"{prefix}: clean {100 * m['clean']:.2f}%{robust} on {len(test_data.y)} test images")
    return record


def measure_norms(run, model, test_data, prefix="teacher"):
    """Clean accuracy of a normalising model under each data set's constants, logged once (a teacher
    whose constants are a per-checkpoint fact, e.g. WRN-70-16 on CIFAR-100: docs/rslad.md §4)."""
    base = unwrap(model)
    if base.mean is None:
        return {}
    saved = base.mean.clone(), base.std.clone()
    record = {}
    for name, (mean, std) in NORMS.items():
        base.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        base.std.copy_(torch.tensor(std).view(1, 3, 1, 1))
        record[f"{prefix}/clean_{name}_norm"] = monitor(model, test_data, None)["clean"]
    base.mean.copy_(saved[0])
    base.std.copy_(saved[1])
    run.log({"epoch": 0, **record})
    say(f"{prefix}: clean " + ", ".join(f"{100 * v:.2f}% with {k.split('_')[1]} constants" for k, v in record.items())
        + f" (in use: {run.args_json.get(prefix + '_norm')})")
    return record


# ======================================================================================
# The per-epoch robustness monitor (docs/common.md §7)
# ======================================================================================

@contextlib.contextmanager
def fp32_eval(model, tf32=False):
    """eval() mode, frozen parameters, TF32 off (unless `tf32`), autocast off; everything restored on exit."""
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.eval()
    model.requires_grad_(False)
    if any(saved_tf32) and not tf32:  # switched only when on: a compiled model then keeps one cache entry per setting
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type="cuda", enabled=False), torch.autocast(device_type="cpu", enabled=False):
            yield model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)


def _monitor_pgd(model, x, y, eps, steps, step, start, loss, noise, bn="eval"):
    """PGD of docs/conventions.md: sign step, project to the eps-ball, clamp to [0,1]; last iterate.
    `noise` is the random start's U(-eps, eps) draw."""
    x_adv = x + noise
    if start == "uniform-clamp":
        x_adv = x_adv.clamp(0, 1)
    reduction = "sum" if loss == "ce_sum" else "mean"
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction=reduction), x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def monitor(model, loader, attack, seed=0, tf32=False):
    """Clean and robust test accuracy (fractions of all points), fp32 (TF32 only with `tf32`: --monitor-tf32),
    eval() mode. `attack` is a method file's MONITORS entry: dict(eps, steps, step, start ("uniform" or
    "uniform-clamp"), loss ("ce_sum" or "ce_mean"), bn="eval"); None = clean only. Also returns how many
    classes the clean predictions take ("classes": 1 for a constant classifier) and the seconds it took
    (device work included).

    The random starts come from a generator seeded with `seed` (the same noise at every call, and no
    draw from the training run's generator). Under torchrun every rank first takes rank 0's BatchNorm
    statistics, the ranks share the test batches round robin, every rank draws every batch's noise, and
    the counts are all-reduced: the numbers equal the single-process ones exactly. A compiled model
    sees one batch shape only: the last, partial batch is padded with copies of its last image, which
    are not counted (eval mode: each image's result is its own)."""
    if attack is not None and attack.get("bn", "eval") != "eval":
        raise ValueError(f"the monitor runs in eval() mode, not BatchNorm mode {attack['bn']!r}")
    model = unwrap(model, keep_compiled=True)  # the attack takes input gradients only: no DDP wrapper
    broadcast_buffers(model)  # under torchrun: rank 0's BatchNorm statistics, on every rank
    rank, world_size = world()
    g = torch.Generator(device=loader.device).manual_seed(epoch_seed(seed, 0))
    counts = torch.zeros(3, dtype=torch.float64, device=loader.device)  # clean, robust, n
    heads = [m.out_features for m in unwrap(model).modules() if isinstance(m, nn.Linear)]
    predicted = torch.zeros(heads[-1] if heads else 0, dtype=torch.float64, device=loader.device)  # per class
    classes = torch.arange(len(predicted), device=loader.device)
    pad_to = loader.batch_size if hasattr(model, "_orig_mod") else 0
    with EpochTimer(loader.device) as timer, fp32_eval(model, tf32):
        for b, (x, y) in enumerate(loader):
            noise = None if attack is None else torch.empty_like(x).uniform_(-attack["eps"], attack["eps"], generator=g)
            if b % world_size != rank:
                continue
            n = len(y)
            if n < pad_to:
                x, y, noise = (None if t is None else _pad_batch(t, pad_to, loader.memory_format) for t in (x, y, noise))
            with torch.no_grad():
                pred = model(x).argmax(1)[:n]
            counts[0] += (pred == y[:n]).sum()
            predicted += (pred[:, None] == classes).sum(0)  # no host sync (torch.bincount reads its max back)
            if attack is not None:
                x_adv = _monitor_pgd(model, x, y, **attack, noise=noise)
                with torch.no_grad():
                    counts[1] += (model(x_adv).argmax(1) == y)[:n].sum()
            counts[2] += n
        totals = all_sum(torch.cat([counts, predicted])).tolist()
    clean, robust, n = totals[:3]
    return {"clean": clean / n, "robust": robust / n if attack is not None else None,
            "classes": sum(c > 0 for c in totals[3:]) if heads else None, "seconds": timer.seconds}


def _pad_batch(t, size, memory_format):
    """t with copies of its last row appended up to `size` rows (images keep the loader's memory format)."""
    t = torch.cat([t, t[-1:].expand(size - len(t), *t.shape[1:])])
    return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t
