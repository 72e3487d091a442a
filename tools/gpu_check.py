"""Prove the GPU path of the suite on one CUDA machine with one command (CI has no GPU): five checks, a
JSON file holding every number and a one-screen summary. Models have random weights; no checkpoint and
no internet are needed (CIFAR-10 from --data-dir is used by check 4 when it is there).

    python tools/gpu_check.py --out DIR [--data-dir DIR]          # any CUDA machine, under 8 min on one H100/H200
    python tools/gpu_check.py --out DIR --only compiled,bench     # a subset, in the order below
    python tools/gpu_check.py --device cpu --tiny --out DIR       # the dry path: every check's code on the CPU

Writes DIR/gpu_check.json (environment, command line, every number, each check's status pass / fail /
skip with its reason; rewritten after each check, so it exists even when something failed) and prints
one line per check. Exit status 1 if a check failed, 0 otherwise, 2 for bad arguments. Every check runs
inside try/except: a failure is recorded with the exception's last line and the next check runs.
--budget-seconds (default 450) bounds the whole run: a check, or the rest of one, that would start
after it is skipped with the reason "budget" (in full mode each check also leaves an estimate of the
time the later checks need, RESERVE below).

Checks, in this order:
  eager       every method's train_step, every variant (VARIANTS, 21), eager fp32 on the device against the
              same step on the CPU from the same weights and batch, TF32 off, --rand-start none; the method's
              student (ResNet-18 where the default is a WRN; MobileNetV2 for ARD, PreActResNet-18 for ARDIR
              and its teacher), cnn_small teachers, batch 32, 3 attack steps. Proves the device computes
              what the CPU computes. PGD's sign() turns float differences where the input gradient is ~0
              into flipped steps, so comparisons are relative (TOL): every logged term
              |a - b| <= 1e-3 max(|a|, |b|) + 1e-6; the parameter update (after - before, one vector over the
              trained models) within 1e-2 of the CPU's in L2 norm; floating buffers (BatchNorm statistics,
              frozen teachers) within 1e-3 of the largest value of each tensor; integer buffers equal.
  compiled    one variant per method (COMPILED_VARIANTS), cnn_small models, batch 32, 20 steps in each of
              two configurations: --amp bf16 --channels-last --compile, and --compile --compile-mode
              reduce-overhead (CUDA graphs, fp32), torch._dynamo.reset() before each. Every logged term
              finite on every step; the first compiled step against the eager fp32 step from the same
              weights and batch: the loss within rel 5e-2 for bf16, every term within rel 5e-3 for fp32;
              from torch._dynamo's counters: graphs compiled (unique_graphs before / after, at least one),
              recompiles (compilations of a code object beyond its first) and none after the first step.
  bench       tools/bench_train.py's measurement of RSLAD (ResNet-18 student, WRN-34-10 teacher, batch
              128): eager fp32 (TF32 off) and --amp bf16 --channels-last --compile, images/s, TFLOP/s and
              MFU (FLOPs counted on the eager step), one 50,000-image epoch projected from the step time,
              and one PGD-20 monitor pass over 10,000 test images (common.monitor, fp32) projected from a
              few synthetic batches. Passes when every number is finite and positive; speed is reported.
  autoattack  eval_attacks.autoattack against the official pyautoattack (skipped when not importable) on
              500 points with the same seed and batch size, cuDNN deterministic: a random cnn_small, CIFAR-10
              test images (synthetic ones without --data-dir), labels = the model's predictions, eps 1/255 so
              that every attack of the ensemble gets points (at 8/255 APGD-CE breaks them all). The per-point
              robust flags may differ on at most 1% of the points on CUDA, on none on the CPU (bitwise there).
  ddp         with two or more GPUs: torchrun, 2 processes, NCCL, rslad.py for one tiny epoch on synthetic
              CIFAR-format data and a random teacher checkpoint; exit status 0 and a last.pt of epoch 1
              written by a world of 2. With one GPU: skipped.

--tiny (with --device cpu: the dry path CI runs, tests/test_gpu_check.py) runs the same code with cnn_small
models, batch 8, one attack step, 2 steps instead of 20, bench on cnn_small, AutoAttack on 16 points with
Square's budget at 500 queries (5000 in "standard", as the full check runs it). On the CPU check 1 compares
the CPU with itself (every difference 0), torch.compile uses common.COMPILE_BACKEND = "aot_eager" (so
reduce-overhead records no CUDA graph; the JSON says so), one CPU thread, and ddp is skipped.
"""

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import pickle
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import bench_train  # noqa: E402
import common  # noqa: E402
import rslad  # noqa: E402

CHECKS = ("eager", "compiled", "bench", "autoattack", "ddp")

# (method, flags) of every train_step variant; iad's step is the one after the warm-up (bench_train.build)
VARIANTS = (
    ("rslad", []), ("rslad", ["--inner", "ard", "--outer", "ard"]), ("ard", []),
    ("iad", ["--variant", "iad1"]), ("iad", ["--variant", "iad2"]), ("iad", ["--variant", "ard"]),
    ("iad", ["--variant", "akd2"]), ("mtard", []),
    ("ardir", ["--combo", "RC"]), ("ardir", ["--combo", "CC"]), ("ardir", ["--combo", "RA"]),
    ("adt_aodt", ["--method", "adt"]), ("adt_aodt", ["--method", "aodt"]),
    ("adt_aodt", ["--method", "adt", "--reg", "alp"]), ("adt_aodt", ["--method", "aodt", "--reg", "trades"]),
    ("adaad", []), ("adaad", ["--variant", "adaiad"]), ("peeraid", []),
    ("train_teacher", ["--recipe", "natural-rslad"]), ("train_teacher", ["--recipe", "sat-iad"]),
    ("train_teacher", ["--recipe", "trades"]),
)
# one per method for check 2: the step with the most forward passes of each (iad1 after the warm-up, RA attacks the teacher too,
# AODT trains a peer)
COMPILED_VARIANTS = (
    ("rslad", []), ("ard", []), ("iad", ["--variant", "iad1"]), ("mtard", []), ("ardir", ["--combo", "RA"]),
    ("adt_aodt", ["--method", "aodt", "--reg", "trades"]), ("adaad", ["--variant", "adaiad"]), ("peeraid", []),
    ("train_teacher", ["--recipe", "trades"]),
)
# name -> (flags, rtol of the first compiled step against eager fp32, terms compared)
COMPILED_CONFIGS = {
    "bf16-channels-last": (["--amp", "bf16", "--channels-last", "--compile"], 5e-2, "loss"),
    "reduce-overhead": (["--compile", "--compile-mode", "reduce-overhead"], 5e-3, "every term"),
}
TOL = {"terms_rtol": 1e-3, "terms_atol": 1e-6, "update_rtol": 1e-2, "buffers_rtol": 1e-3}
AA_EPS = 1 / 255
SIZES = {  # full: small-but-real; tiny: the CPU dry path
    False: dict(batch=32, attack_steps=3, steps=20, bench_batch=128, bench_steps=10, bench_warmup=3,
                monitor_batch=128, monitor_batches=4, aa_points=500, aa_bs=250, aa_square_queries=5000),
    True: dict(batch=8, attack_steps=1, steps=2, bench_batch=8, bench_steps=2, bench_warmup=1,
               monitor_batch=8, monitor_batches=2, aa_points=16, aa_bs=8, aa_square_queries=500),
}
# full mode: seconds each check is expected to need on one H100/H200, left free for it by the checks before
# (scaled down with a --budget-seconds under 450); NEED: the least time left for one more item of a check to start
RESERVE = {"eager": 45, "compiled": 120, "bench": 120, "autoattack": 40, "ddp": 60}
NEED = {"compiled": 15, "bench_compiled": 60}
EPOCH_IMAGES, MONITOR_IMAGES = 50_000, 10_000
BOILERPLATE = ("Set TORCH", "You can suppress", "For even more developer context", "To execute this test",
               "from user code", "HINT:", "Explanation:", "Developer debug context")


# --------------------------------------------------------------------------------------
# Arguments, environment, reporting
# --------------------------------------------------------------------------------------

def check_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown check {', '.join(unknown) or repr(text)}; "
                                         f"choose from {','.join(CHECKS)}")
    return names


def parse_args(argv):
    p = common.parser("gpu_check", __doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json (created)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ (check 4; synthetic images without)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N; cpu only with --tiny")
    p.add_argument("--tiny", action="store_true", help="cnn_small, batch 8, one attack step, 2 steps: the dry path")
    p.add_argument("--budget-seconds", type=common.positive_float, default=450.0, help="time bound of the whole run")
    p.add_argument("--only", type=check_list, default=list(CHECKS), help=f"comma list of checks ({','.join(CHECKS)})")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        common.fail("this check needs CUDA; --device cpu is only for --tiny")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        common.fail(f"--device {args.device}: use cuda, cuda:N, or cpu with --tiny")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.fail(f"--device {args.device} asked for, but CUDA is not available (torch {torch.__version__}, "
                    f"built for CUDA {torch.version.cuda}); --device cpu --tiny runs the dry path")
    return args


def environment(device, argv):
    cuda = device.type == "cuda"
    return {"command": shlex.join([sys.executable, str(Path(__file__)), *argv]), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "python": platform.python_version(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads(),
            "compile_backend": getattr(common, "COMPILE_BACKEND", None)}


def log(ctx, msg):
    print(f"[{time.monotonic() - ctx.start:7.1f} s] {msg}", file=sys.stderr, flush=True)


class _Tee(io.TextIOBase):
    """stderr that is also kept, to recover the one-line message of a common.fail (SystemExit) inside a check."""

    def __init__(self, stream):
        self.stream, self.kept = stream, []

    def write(self, s):
        self.kept.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def error_line(e, kept=""):
    """The exception's last informative line (torch's hints about environment variables left out)."""
    if isinstance(e, SystemExit):
        lines = [ln for ln in kept.splitlines() if ln.startswith("error:")]
        return lines[-1] if lines else f"SystemExit({e.code})"
    lines = [ln.strip() for ln in "".join(traceback.format_exception_only(type(e), e)).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(BOILERPLATE)]
    line = (useful or lines or [type(e).__name__])[-1]
    return line if line.startswith(type(e).__name__) or len(lines) == 1 else f"{type(e).__name__}: ... {line}"


def attempt(fn, *a, **kw):
    """(result, None) or (None, error line, traceback): a failure inside one item does not end the check."""
    tee = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            return fn(*a, **kw), None, None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        return None, error_line(e, "".join(tee.kept)), traceback.format_exc()[-4000:]


def rel(a, b):
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def close(a, b, rtol, atol):
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def fmt(v, spec=".1e"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def overall(items, what):
    """Status of a check from its items: fail if one failed, skip if the budget cut it short, else pass."""
    failed = [i["name"] for i in items if i["status"] == "fail"]
    skipped = [i["name"] for i in items if i["status"] == "skip"]
    if failed:
        return "fail", f"{len(failed)} of {len(items)} {what} failed: {', '.join(failed)}"
    if skipped:
        return "skip", (f"budget: {len(skipped)} of {len(items)} {what} not run "
                        f"(the {len(items) - len(skipped)} run passed)")
    return "pass", None


# --------------------------------------------------------------------------------------
# Building a method's step from argv with known weights (bench_train's method_args and build)
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def built_models():
    """Every model common.build_model returns while the block runs, in build order (students, teachers,
    peers: the module objects that end up on the device, under any torch.compile wrapper)."""
    models, original = [], common.build_model

    def build_model(*a, **kw):
        models.append(original(*a, **kw))
        return models[-1]
    common.build_model = build_model
    try:
        yield models
    finally:
        common.build_model = original


def model_flags(method, flags, small):
    """Architectures: the method's student (resnet18 where the default is a WRN) and cnn_small teachers;
    cnn_small everywhere when `small`. ARDIR's IR term compares stages of one shape: teacher = student."""
    student = "cnn_small" if small else {"ard": "mobilenet_v2", "ardir": "preact_resnet18"}.get(method, "resnet18")
    teacher = "cnn_small"
    out = ["--arch", student]
    if method in ("rslad", "ard", "iad", "adaad"):
        out += ["--teacher-arch", teacher]
    if method == "iad" and any(v in flags for v in ("iad2", "akd2")):
        out += ["--nat-teacher-arch", teacher]
    if method == "mtard":
        out += ["--teacher-arch", teacher, "--nat-teacher-arch", teacher]
    if method == "ardir":
        out += ["--teacher-arch", student] + (["--ir-layers", "layer1,layer2,layer3"] if student == "cnn_small" else [])
    if method == "adt_aodt":
        out += ["--peer-arch", teacher] if "aodt" in flags else ["--teacher", f"{teacher}:-"]
    if method == "peeraid":
        out += ["--peer-arch", teacher]
    return out


def step_argv(method, flags, ctx, small):
    natural = any(f.startswith("natural-") for f in flags)  # no attack: train_teacher.py refuses its flags
    attack = [] if natural else ["--attack-steps", str(ctx.sizes["attack_steps"]), "--rand-start", "none"]
    return [*flags, *model_flags(method, flags, small), "--batch-size", str(ctx.sizes["batch"]), *attack]


def build_step(method, argv, device, seed=0):
    """(step(x, y), models, args) of `method` from argv, weights from torch.manual_seed(seed)."""
    module, args = bench_train.method_args(method, argv)
    torch.manual_seed(seed)
    with built_models() as models:
        step = bench_train.build(method, module, args, device)
    return step, models, args


def load_states(models, states):
    if len(models) != len(states):
        raise RuntimeError(f"built {len(models)} models, expected {len(states)}")
    for m, sd in zip(models, states):
        m.load_state_dict(sd)


def fixed_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def floats(terms):
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


# --------------------------------------------------------------------------------------
# Check 1: eager fp32 on the device against the CPU
# --------------------------------------------------------------------------------------

def compare_models(ref_models, models, before):
    """Parameter update (L2 over all trained parameters, relative to the reference's), the largest absolute
    parameter difference, floating buffers (relative to each tensor's largest value), integer buffers."""
    num = den = 0.0
    max_abs = buf_rel = 0.0
    int_mismatch = []
    for ref, dev, init in zip(ref_models, models, before):
        trained = {n for n, p in ref.named_parameters() if p.requires_grad}
        dev_sd = dev.state_dict()
        for k, a in ref.state_dict().items():
            a, b = a.detach().cpu(), dev_sd[k].detach().cpu()
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    int_mismatch.append(k)
            elif k in trained:
                d = b.double() - a.double()
                num += d.pow(2).sum().item()
                den += (a.double() - init[k].double()).pow(2).sum().item()
                max_abs = max(max_abs, d.abs().max().item() if d.numel() else 0.0)
            elif a.numel():
                buf_rel = max(buf_rel, ((b - a).abs().max() / a.abs().max().clamp_min(1e-12)).item())
    update_rel = math.sqrt(num) / math.sqrt(den) if den else (0.0 if num == 0 else math.inf)
    return {"update_rel_diff": update_rel, "param_max_abs_diff": max_abs, "buffers_max_rel_diff": buf_rel,
            "int_buffers_differ": int_mismatch}


def eager_variant(method, flags, ctx):
    argv = step_argv(method, flags, ctx, ctx.tiny)
    cpu = torch.device("cpu")
    ref_step, ref_models, args = build_step(method, argv, cpu)
    step, models, _ = build_step(method, argv, ctx.device)
    load_states(models, [m.state_dict() for m in ref_models])
    before = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in ref_models]
    x, y = fixed_batch(args.batch_size)
    ref = floats(ref_step(x, y))
    got = floats(step(x.to(ctx.device), y.to(ctx.device)))
    terms = {k: {"cpu": ref[k], "device": got.get(k, math.nan), "abs_diff": abs(ref[k] - got.get(k, math.nan)),
                 "rel_diff": rel(ref[k], got.get(k, math.nan))} for k in ref}
    r = {"argv": argv, "terms": terms, "terms_max_rel_diff": max((t["rel_diff"] for t in terms.values()), default=0.0),
         **compare_models(ref_models, models, before)}
    problems = [f"{k}: cpu {t['cpu']:.6g} vs device {fmt(t['device'], '.6g')}" for k, t in terms.items()
                if not close(t["cpu"], t["device"], TOL["terms_rtol"], TOL["terms_atol"])]
    problems += [f"logged only on the device: {k}" for k in got if k not in ref]
    if not r["update_rel_diff"] <= TOL["update_rtol"]:
        problems.append(f"parameter update differs by {fmt(r['update_rel_diff'])} (L2, relative)")
    if not r["buffers_max_rel_diff"] <= TOL["buffers_rtol"]:
        problems.append(f"buffers differ by {fmt(r['buffers_max_rel_diff'])} (relative)")
    if r["int_buffers_differ"]:
        problems.append(f"integer buffers differ: {', '.join(r['int_buffers_differ'][:3])}")
    return r, problems


def check_eager(ctx, details):
    set_tf32(False)
    details.update(reference_device="cpu", device=str(ctx.device), tf32=False, tolerances=dict(TOL),
                   batch=ctx.sizes["batch"], attack_steps=ctx.sizes["attack_steps"], variants=[])
    items = details["variants"]
    for method, flags in VARIANTS:
        name = " ".join([method, *flags])
        item = {"name": name, "method": method, "flags": flags}
        items.append(item)
        if ctx.time_left() <= 0:
            item.update(status="skip", reason="budget")
            continue
        start = time.monotonic()
        res, err, tb = attempt(eager_variant, method, flags, ctx)
        item["seconds"] = round(time.monotonic() - start, 3)
        if err:
            item.update(status="fail", reason=err, traceback=tb)
        else:
            r, problems = res
            item.update(r, status="fail" if problems else "pass", reason="; ".join(problems) or None)
        log(ctx, f"eager  {name:<40} {item['status']}  {item.get('reason') or ''}")
    ran = [i for i in items if "terms" in i]
    details["max"] = {k: max((i[k] for i in ran), default=None)
                      for k in ("terms_max_rel_diff", "update_rel_diff", "param_max_abs_diff", "buffers_max_rel_diff")}
    status, reason = overall(items, "variants")
    m = details["max"]
    line = (f"{sum(i['status'] == 'pass' for i in items)}/{len(items)} variants match the CPU; max rel diff: terms "
            f"{fmt(m['terms_max_rel_diff'])} (tol {TOL['terms_rtol']:.0e}), update {fmt(m['update_rel_diff'])} "
            f"(tol {TOL['update_rtol']:.0e}), buffers {fmt(m['buffers_max_rel_diff'])} (tol {TOL['buffers_rtol']:.0e})")
    return status, reason, line


# --------------------------------------------------------------------------------------
# Check 2: compiled configurations against the eager step
# --------------------------------------------------------------------------------------

def dynamo_counts():
    """torch._dynamo's counters. recompiles: compilations of a code object beyond its first since the last
    torch._dynamo.reset() (another module instance, BatchNorm mode, grad mode, dtype or memory format each
    add one); None where this torch lacks the per-frame counter."""
    import torch._dynamo.convert_frame
    from torch._dynamo.utils import counters
    per_frame = getattr(torch._dynamo.convert_frame, "FRAME_COMPILE_COUNTER", None)
    return {"unique_graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "recompiles": None if per_frame is None else sum(max(c - 1, 0) for c in per_frame.values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def recompile_reasons(limit=3):
    failures = getattr(torch._dynamo.utils, "guard_failures", {})
    return [str(r)[:300] for v in failures.values() for r in v][:limit]


def compiled_config(method, flags, config, ref, states, x, y, ctx):
    cflags, rtol, compared = COMPILED_CONFIGS[config]
    argv = step_argv(method, flags, ctx, True) + cflags
    torch._dynamo.reset()
    counts0 = dynamo_counts()
    step, models, args = build_step(method, argv, ctx.device)
    load_states(models, states)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps, per_step, seconds = ctx.sizes["steps"], [], []
    for i in range(steps):
        start = time.perf_counter()
        per_step.append(floats(step(x, y)))  # float(): a host sync, so the time is the step's
        seconds.append(time.perf_counter() - start)
        if i == 0:
            counts1 = dynamo_counts()
    counts2 = dynamo_counts()
    first = per_step[0]
    keys = ["loss"] if compared == "loss" else list(ref)
    diffs = {k: rel(ref[k], first.get(k, math.nan)) for k in ref}
    r = {"argv": argv, "steps": steps, "rtol": rtol, "compared": compared, "eager_first_step": ref,
         "compiled_first_step": first, "rel_diff": diffs, "max_rel_diff_compared": max(diffs[k] for k in keys),
         "losses": [s["loss"] for s in per_step], "unique_graphs_before": counts0["unique_graphs"],
         "unique_graphs_after_first_step": counts1["unique_graphs"], "unique_graphs_after": counts2["unique_graphs"],
         "graphs_compiled": counts2["unique_graphs"] - counts0["unique_graphs"],
         "frames_compiled": counts2["frames"] - counts0["frames"], "recompiles": counts2["recompiles"],
         "recompile_reasons": recompile_reasons(),
         "cudagraph_skips": counts2["cudagraph_skips"] - counts0["cudagraph_skips"],
         "backend": common.COMPILE_BACKEND, "first_step_seconds": seconds[0],
         "steady_step_seconds": sum(seconds[1:]) / (steps - 1) if steps > 1 else None}
    if config == "reduce-overhead":
        r["cuda_graphs"] = ctx.device.type == "cuda" and common.COMPILE_BACKEND == "inductor"
        if not r["cuda_graphs"]:
            r["note"] = f"backend {common.COMPILE_BACKEND} on {ctx.device.type}: CUDA graphs not exercised"
    problems = []
    bad = [i + 1 for i, s in enumerate(per_step) if not all(math.isfinite(v) for v in s.values())]
    if bad:
        problems.append(f"non-finite terms at steps {bad[:5]}")
    off = [f"{k} eager {ref[k]:.6g} vs compiled {fmt(first.get(k), '.6g')}" for k in keys
           if not close(ref[k], first.get(k, math.nan), rtol, TOL["terms_atol"])]
    if off:
        problems.append(f"first step off by more than rel {rtol:g}: " + ", ".join(off))
    if r["graphs_compiled"] < 1:
        problems.append("no graph compiled")
    if counts2["unique_graphs"] != counts1["unique_graphs"]:
        problems.append(f"{counts2['unique_graphs'] - counts1['unique_graphs']} graphs compiled after the first step")
    return r, problems


def compiled_method(method, flags, ctx, record):
    """The eager fp32 reference step, then each configuration from the same weights and batch."""
    step, models, args = build_step(method, step_argv(method, flags, ctx, True), ctx.device)
    states = [copy.deepcopy(m.state_dict()) for m in models]
    x, y = (t.to(ctx.device) for t in fixed_batch(args.batch_size))
    ref = floats(step(x, y))
    del step, models
    problems = []
    for config in COMPILED_CONFIGS:
        res, err, tb = attempt(compiled_config, method, flags, config, ref, states, x, y, ctx)
        if err:
            record[config] = {"status": "fail", "reason": err, "traceback": tb}
            problems.append(f"{config}: {err}")
        else:
            r, p = res
            record[config] = {**r, "status": "fail" if p else "pass", "reason": "; ".join(p) or None}
            problems += [f"{config}: {q}" for q in p]
        torch._dynamo.reset()
    return problems


def check_compiled(ctx, details):
    set_tf32(False)
    details.update(device=str(ctx.device), backend=common.COMPILE_BACKEND, tf32=False, steps=ctx.sizes["steps"],
                   batch=ctx.sizes["batch"], attack_steps=ctx.sizes["attack_steps"],
                   configs={k: {"flags": v[0], "rtol": v[1], "compared": v[2]} for k, v in COMPILED_CONFIGS.items()},
                   methods=[])
    items = details["methods"]
    for method, flags in COMPILED_VARIANTS:
        item = {"name": " ".join([method, *flags]), "method": method, "flags": flags}
        items.append(item)
        if ctx.time_left() <= (0 if ctx.tiny else NEED["compiled"]):
            item.update(status="skip", reason="budget")
            continue
        start = time.monotonic()
        problems, err, tb = attempt(compiled_method, method, flags, ctx, item)
        item["seconds"] = round(time.monotonic() - start, 3)
        if err:
            item.update(status="fail", reason=err, traceback=tb)
        else:
            item.update(status="fail" if problems else "pass", reason="; ".join(problems) or None)
        log(ctx, f"compiled  {item['name']:<40} {item['status']}  {item.get('reason') or ''}")
    status, reason = overall(items, "methods")
    parts = []
    for config, (_, rtol, _) in COMPILED_CONFIGS.items():
        runs = [i[config] for i in items if "losses" in i.get(config, {})]
        graphs = ""
        if config == "reduce-overhead" and runs:
            graphs = (f", CUDA graphs ({sum(r['cudagraph_skips'] for r in runs)} skipped)"
                      if all(r["cuda_graphs"] for r in runs) else ", CUDA graphs not exercised")
        parts.append(f"{config}: max rel {fmt(max((r['max_rel_diff_compared'] for r in runs), default=None))} "
                     f"(tol {rtol:g}), {sum(r['graphs_compiled'] for r in runs)} graphs, "
                     f"{sum(r['recompiles'] or 0 for r in runs)} recompiles{graphs}")
    line = (f"{sum(i['status'] == 'pass' for i in items)}/{len(items)} methods x {len(COMPILED_CONFIGS)} configs; "
            + "; ".join(parts))
    return status, reason, line


# --------------------------------------------------------------------------------------
# Check 3: bench_train's measurement, epoch and monitor projections
# --------------------------------------------------------------------------------------

def monitor_seconds(ctx, arch):
    """Seconds of one monitor pass over MONITOR_IMAGES test images, projected from a few synthetic batches
    (after one untimed batch: cuDNN autotuning)."""
    bs, n = ctx.sizes["monitor_batch"], ctx.sizes["monitor_batches"]
    torch.manual_seed(0)
    model = common.build_model(arch).to(ctx.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (bs * n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (bs * n,), generator=g)
    cfg = rslad.MONITORS["pgd20-monitor"]
    common.monitor(model, common.DeviceLoader(x[:bs], y[:bs], bs, train=False, device=ctx.device), cfg)
    loader = common.DeviceLoader(x, y, bs, train=False, device=ctx.device)
    start = time.perf_counter()
    m = common.monitor(model, loader, cfg)  # returns host floats: synchronised
    seconds = time.perf_counter() - start
    return {"arch": arch, "attack": "pgd20-monitor", "images_timed": bs * n, "batch": bs, "seconds_timed": seconds,
            "projected_seconds": seconds * MONITOR_IMAGES / (bs * n), "projected_images": MONITOR_IMAGES,
            "clean": m["clean"], "robust": m["robust"]}


def bench_row(r, flops):
    tflops = flops / r["seconds"] / 1e12 if flops else None
    return {"seconds_per_step": r["seconds"], "images_per_s": r["images_per_s"], "precision": r["precision"],
            "peak_tflops": r["peak"], "tflops": tflops, "mfu": tflops / r["peak"] if tflops and r["peak"] else None,
            "epoch_seconds_projected": EPOCH_IMAGES / r["images_per_s"]}


def check_bench(ctx, details):
    s = ctx.sizes
    if ctx.tiny:
        models = ["--arch", "cnn_small", "--teacher-arch", "cnn_small", "--attack-steps", str(s["attack_steps"])]
    else:  # the method's own attack (10 steps)
        models = ["--arch", "resnet18", "--teacher-arch", "wrn34_10"]
    base = [*models, "--batch-size", str(s["bench_batch"]), "--device", str(ctx.device)]
    configs = {"eager-fp32": ["--amp", "off", "--no-tf32"],
               "bf16-channels-last-compile": ["--amp", "bf16", "--channels-last", "--compile"]}
    details.update(method="rslad", argv=base, steps=s["bench_steps"], warmup=s["bench_warmup"],
                   epoch_images=EPOCH_IMAGES, configs={})
    problems, flops = [], None
    for name, extra in configs.items():
        if name != "eager-fp32" and ctx.time_left() <= (0 if ctx.tiny else NEED["bench_compiled"]):
            details["configs"][name] = {"status": "skip", "reason": "budget"}
            continue
        torch._dynamo.reset()
        r, err, tb = attempt(bench_train.measure, "rslad", base + extra, s["bench_steps"], s["bench_warmup"], None)
        if err:
            details["configs"][name] = {"status": "fail", "reason": err, "traceback": tb}
            problems.append(f"{name}: {err}")
            continue
        if name == "eager-fp32":
            flops = r["flops"]
            details["flops_per_step"] = flops
        details["configs"][name] = {"flags": extra, **bench_row(r, flops)}
        log(ctx, f"bench  {name:<28} {r['images_per_s']:.1f} img/s")
    torch._dynamo.reset()
    if ctx.time_left() > 0:
        mon, err, tb = attempt(monitor_seconds, ctx, "cnn_small" if ctx.tiny else "resnet18")
        details["monitor"] = mon if mon else {"status": "fail", "reason": err, "traceback": tb}
        if err:
            problems.append(f"monitor: {err}")
    else:
        details["monitor"] = {"status": "skip", "reason": "budget"}
    numbers = {f"{n}.{k}": c[k] for n, c in details["configs"].items() if "images_per_s" in c
               for k in ("images_per_s", "tflops", "epoch_seconds_projected")}
    if "images_per_s" in details["configs"].get("eager-fp32", {}):
        numbers["flops_per_step"] = flops
    if "projected_seconds" in details["monitor"]:
        numbers["monitor.projected_seconds"] = details["monitor"]["projected_seconds"]
    bad = [k for k, v in numbers.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad:
        problems.append(f"missing, zero or not finite: {', '.join(bad)}")
    e, c = details["configs"].get("eager-fp32", {}), details["configs"].get("bf16-channels-last-compile", {})
    if "images_per_s" in e and "images_per_s" in c:
        details["speedup"] = c["images_per_s"] / e["images_per_s"]

    def row(r):
        if "images_per_s" not in r:
            return r.get("status", "not run").upper()
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        return (f"{r['images_per_s']:.0f} img/s {fmt(r['tflops'], '.2f')} TFLOP/s MFU {mfu} "
                f"epoch {r['epoch_seconds_projected']:.0f} s")
    line = (f"eager fp32 {row(e)} | bf16+cl+compile {row(c)} | x{fmt(details.get('speedup'), '.2f')} | monitor pass "
            f"{fmt(details['monitor'].get('projected_seconds'), '.0f')} s")
    skipped = [n for n, r in details["configs"].items() if r.get("status") == "skip"] + \
        (["monitor"] if details["monitor"].get("status") == "skip" else [])
    if problems:
        return "fail", "; ".join(problems), line
    return ("skip", f"budget: {', '.join(skipped)} not run", line) if skipped else ("pass", None, line)


# --------------------------------------------------------------------------------------
# Check 4: AutoAttack against the official code
# --------------------------------------------------------------------------------------

def aa_points(ctx, model, n):
    """The first n CIFAR-10 test images of --data-dir, else seeded uniform images; labels: the model's
    predictions, so that every point starts robust and each attack of the ensemble has work."""
    source = "synthetic"
    x = None
    if ctx.data_dir:
        got, err, _ = attempt(common.load_split, "cifar10", ctx.data_dir, False, n, False)
        if got is not None:
            x, source = got[0].float() / 255, f"cifar10 test split in {ctx.data_dir}"
        else:
            source = f"synthetic ({err})"
    if x is None:
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 250].to(ctx.device)).argmax(1).cpu() for i in range(0, len(x), 250)])
    return x, y, source


def check_autoattack(ctx, details):
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        details["reason"] = str(e)
        return "skip", f"pyautoattack is not importable ({e}); pip install pyautoattack", ""
    import eval_attacks
    n, bs, queries = ctx.sizes["aa_points"], ctx.sizes["aa_bs"], ctx.sizes["aa_square_queries"]
    set_tf32(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    model = common.freeze(common.build_model("cnn_small")).to(ctx.device)
    x, y, source = aa_points(ctx, model, n)
    tol = 0 if ctx.device.type == "cpu" else n // 100
    details.update(model="cnn_small (random, seed 0)", points=len(y), source=source, labels="model predictions",
                   eps=AA_EPS, bs=bs, seed=0, version="standard", square_queries=queries, tolerance_points=tol,
                   cudnn_deterministic=True)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    ours = eval_attacks.autoattack(model, x, y, AA_EPS, version="standard", bs=bs, seed=0, device=ctx.device,
                                   square_queries=queries)
    sync()
    details["ours_seconds"] = time.perf_counter() - start
    details["ours_cumulative"] = ours["cumulative"]
    log(ctx, f"autoattack  eval_attacks: robust {ours['robust'].float().mean().item():.2%}")
    adversary = AutoAttack(model, norm="Linf", eps=AA_EPS, version="standard", seed=0, device=ctx.device)
    adversary.square.n_queries = queries  # 5000 as "standard" sets it; the CPU dry path (--tiny) takes 500
    start = time.perf_counter()
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=bs)
    sync()
    details["official_seconds"] = time.perf_counter() - start
    official = y_adv.cpu() == y
    differ = int((official != ours["robust"]).sum())
    details.update(ours_robust=ours["robust"].float().mean().item(), official_robust=official.float().mean().item(),
                   flags_differ=differ, differing_points=(official != ours["robust"]).nonzero().flatten().tolist()[:50],
                   warnings=ours["warnings"])
    line = (f"{len(y)} points eps {AA_EPS * 255:g}/255: robust ours {details['ours_robust']:.2%} official "
            f"{details['official_robust']:.2%}, {differ} flags differ (tol {tol}); {details['ours_seconds']:.1f} s vs "
            f"{details['official_seconds']:.1f} s")
    return ("pass", None, line) if differ <= tol else ("fail", f"{differ} robust flags differ (tolerance {tol})", line)


# --------------------------------------------------------------------------------------
# Check 5: torchrun with NCCL
# --------------------------------------------------------------------------------------

def write_cifar10(root, n_train=80, n_test=32, seed=0):
    """Random images in cifar-10-batches-py's pickle layout (common._read_cifar reads it)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}, fh)
    return Path(root)


def ddp_run(device_type, tmp, timeout):
    """rslad.py under torchrun (2 processes) for one tiny epoch; returns the details."""
    tmp = Path(tmp)
    data = write_cifar10(tmp / "data")
    torch.manual_seed(0)
    teacher = tmp / "teacher.pt"
    common.save_checkpoint(teacher, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=1,
                                                           dataset="cifar10", args={}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "rslad.py"),
           "--teacher", str(teacher), "--arch", "cnn_small", "--data-dir", str(data), "--train-subset", "64",
           "--test-subset", "32", "--batch-size", "16", "--test-batch-size", "16", "--attack-steps", "2",
           "--epochs", "1", "--runs-dir", str(tmp / "runs"), "--device", device_type, "--progress-every", "0"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    out = {"command": shlex.join(cmd), "returncode": proc.returncode, "seconds": time.perf_counter() - start,
           "stdout_tail": proc.stdout[-2000:], "stderr_tail": proc.stderr[-2000:]}
    last = sorted((tmp / "runs").glob("*/last.pt"))
    out["last_pt"] = bool(last)
    if last:
        out["last_epoch"] = torch.load(last[0], map_location="cpu", weights_only=True)["epoch"]
        run = last[0].parent
        out["world_size"] = json.loads((run / "args.json").read_text()).get("env", {}).get("world_size")
        out["metrics"] = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return out


def check_ddp(ctx, details):
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    details["gpus"] = gpus
    if gpus < 2:
        why = f"found {gpus}" if ctx.device.type == "cuda" else "the device is the CPU"
        return "skip", f"needs 2 GPUs ({why})", f"needs 2 GPUs ({why})"
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        details.update(ddp_run("cuda", tmp, max(30, min(300, ctx.time_left()))))
    line = (f"torchrun 2 x NCCL rslad.py 1 epoch: exit {details['returncode']}, last.pt {details['last_pt']}, "
            f"world size {details.get('world_size')}, {details['seconds']:.0f} s")
    if details["returncode"] != 0:  # the workers' one-line error, else the last line that is not a ==== rule
        lines = [ln.strip() for ln in details["stderr_tail"].splitlines() if ln.strip().strip("=")]
        cause = ([ln for ln in lines if "error:" in ln] or lines or [""])[-1]
        return "fail", f"torchrun exited with {details['returncode']}: {cause}", line
    if not details["last_pt"] or details.get("last_epoch") != 1 or details.get("world_size") != 2:
        return "fail", (f"expected last.pt of epoch 1 from 2 processes; found last.pt {details['last_pt']}, epoch "
                        f"{details.get('last_epoch')}, world size {details.get('world_size')}"), line
    return "pass", None, line


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def run_check(name, ctx):
    """One check inside try/except, with its time, status and reason; global state restored afterwards."""
    rec = {"status": None, "reason": None, "line": "", "seconds": None, "details": {}}
    later = [c for c in CHECKS[CHECKS.index(name) + 1:] if c in ctx.only and (c != "ddp" or ctx.gpus >= 2)]
    ctx.check_deadline = ctx.deadline - (0 if ctx.tiny else ctx.reserve_scale * sum(RESERVE[c] for c in later))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    start = time.monotonic()
    log(ctx, f"{name}: start")
    res, err, tb = attempt(globals()[f"check_{name}"], ctx, rec["details"])
    if err:
        rec.update(status="fail", reason=err, traceback=tb)
    else:
        rec["status"], rec["reason"], rec["line"] = res
    rec["seconds"] = round(time.monotonic() - start, 3)
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = flags
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if ctx.device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    log(ctx, f"{name}: {rec['status']} {rec['reason'] or ''}")
    return rec


def summary(report):
    env = report["environment"]
    lines = [f"gpu_check: torch {env['torch']}, CUDA {env['cuda']}, device {env['device']} ({env['device_name']}), "
             f"{env['gpus']} GPU(s){', tiny' if report['tiny'] else ''}",
             f"command: {env['command']}"]
    for name, rec in report["checks"].items():
        text = rec["line"] or ""
        if rec["status"] != "pass" and rec["reason"] and rec["reason"] not in text:
            text = f"{rec['reason']}" + (f" | {text}" if text else "")
        took = f"  ({rec['seconds']:.1f} s)" if rec["seconds"] is not None else ""
        lines.append(f"{rec['status'].upper():<5} {name:<11} {text}{took}")
    counts = {s: sum(r["status"] == s for r in report["checks"].values()) for s in ("fail", "pass", "skip")}
    lines.append(f"result: {counts['fail']} failed, {counts['pass']} passed, {counts['skip']} skipped in "
                 f"{report['seconds']:.0f} s; every number in {report['json']}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    common.check_writable(out)
    json_path = out / "gpu_check.json"
    saved_backend, saved_threads = getattr(common, "COMPILE_BACKEND", "inductor"), torch.get_num_threads()
    if device.type == "cpu":
        common.COMPILE_BACKEND = "aot_eager"  # no code generation on the dry path: Dynamo capture and AOTAutograd
        torch.set_num_threads(1)  # tiny ops: threads only add barriers, and a busy machine makes them stall
    start = time.monotonic()
    ctx = argparse.Namespace(device=device, tiny=args.tiny, sizes=SIZES[args.tiny], data_dir=args.data_dir,
                             start=start, deadline=start + args.budget_seconds, only=args.only,
                             gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
                             reserve_scale=min(1.0, args.budget_seconds / 450))
    ctx.check_deadline = ctx.deadline
    ctx.time_left = lambda: min(ctx.deadline, ctx.check_deadline) - time.monotonic()
    report = {"tool": "gpu_check", "environment": environment(device, argv), "tiny": args.tiny,
              "budget_seconds": args.budget_seconds, "only": args.only, "json": str(json_path),
              "sizes": ctx.sizes, "checks": {}, "seconds": None}
    try:
        for name in CHECKS:
            if name not in args.only:
                rec = {"status": "skip", "reason": "not selected (--only)"}
            elif time.monotonic() >= ctx.deadline:
                rec = {"status": "skip", "reason": f"budget: the {args.budget_seconds:g} s of --budget-seconds spent"}
            else:  # a crash inside the check (a dead CUDA context, a killed process) leaves this in the JSON
                report["checks"][name] = {"status": "running", "reason": "the run ended inside this check"}
                common.write_text(json_path, common.json_dumps(report, indent=1) + "\n")
                rec = run_check(name, ctx)
            report["checks"][name] = {"line": "", "seconds": None, **rec}
            report["seconds"] = round(time.monotonic() - start, 3)
            common.write_text(json_path, common.json_dumps(report, indent=1) + "\n")
    finally:
        common.COMPILE_BACKEND = saved_backend
        torch.set_num_threads(saved_threads)
    print(summary(report), flush=True)
    return 1 if any(r["status"] == "fail" for r in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
