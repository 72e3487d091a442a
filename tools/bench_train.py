"""Time K training steps of a method's `train_step` at real sizes and report images/s, the FLOPs of one
step (torch.utils.flop_counter, every forward and backward pass of the step), the achieved TFLOP/s
and the MFU against the device's peak, for the eager fp32 configuration and for the configuration the
flags ask for, in one run, with their ratio. Models are randomly initialised: speed does not depend on
the weights, and no checkpoint is needed.

    python tools/bench_train.py rslad --arch resnet18 --teacher-arch wrn34_10 --batch-size 128 \\
        --amp bf16 --channels-last --compile --device cuda
    python tools/bench_train.py ard --arch cnn_small --teacher-arch cnn_small --batch-size 8 --steps 2   # CPU, tiny

The first positional argument names the method file; every other flag is that script's own (its
defaults, e.g. the attack's steps, are the method's). --steps and --warmup set the timing, --peak-tflops
the peak when the device is not in the table below.
"""

import importlib
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

# Dense peak TFLOP/s from the vendors' data sheets (SXM parts): bf16 tensor cores, TF32 tensor cores,
# and plain fp32 (TF32 off).
PEAKS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
}

METHODS = ("rslad", "ard", "iad", "mtard", "ardir", "adt_aodt", "adaad", "peeraid", "train_teacher")
# the checkpoint flags each script requires; the bench builds randomly initialised models instead
PLACEHOLDERS = {"rslad": ["--teacher", "-"], "ard": ["--teacher", "-"], "iad": ["--teacher", "-"],
                "mtard": ["--teacher", "-", "--nat-teacher", "-"], "ardir": ["--teacher", "-"],
                "adt_aodt": [], "adaad": ["--teacher", "-"], "peeraid": [], "train_teacher": []}


def method_args(method, argv):
    """The method script's own parser and defaults, with placeholders for its checkpoint flags."""
    module = importlib.import_module(method)
    fill = list(PLACEHOLDERS[method])
    if method == "iad" and any(v in argv for v in ("iad2", "akd2")):
        fill += ["--nat-teacher", "-"]
    if method == "adt_aodt" and "aodt" not in argv and "--teacher" not in argv:
        fill += ["--teacher", "wrn34_10:-"]
    args, _ = module.parse_args(fill + argv)
    return module, args


def frozen(arch, n, args, device):
    return common.prepare_model(common.freeze(common.build_model(arch, n)), args, device)


def build(method, module, args, device):
    """Models, optimiser and a step closure `step(x, y)` for `method`, as its main() builds them (random
    weights; the teachers' architectures from the flags or the method's defaults). `step.student` is the
    trained model."""
    n = common.DATASETS[args.dataset]
    c100 = args.dataset == "cifar100"
    build_model = module.build if method == "peeraid" else common.build_model  # PeerAiD's WRN has no sub_block1
    student = common.prepare_student(build_model(args.arch, n), args, device)
    if method == "peeraid":  # the peer trains with the student: one SGD, a group per model
        peer = common.prepare_student(module.build(args.peer_arch, n), args, device)
        optimizer = common.sgd([{"params": list(student.parameters()), "lr": args.lr},
                                {"params": list(peer.parameters()), "lr": args.peer_lr}], args.lr, args.momentum, args.wd)
        return _with_student(lambda x, y: module.train_step(student, peer, optimizer, x, y, args), student)
    if method == "train_teacher":
        optimizer = module.make_optimizer(student, args)

        def step(x, y):
            x_adv = x if args.kind == "natural" else module.inner_max(common.unwrap(student, keep_compiled=True), x, y, args)
            loss, terms, _ = module.loss_fn(student, x, x_adv, y, args)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return terms
        return _with_student(step, student)
    if method == "adt_aodt":
        params = list(student.parameters())
        if args.method == "aodt":
            teacher = common.prepare_student(common.build_model(args.peer_arch, n, None), args, device)
            params += list(teacher.parameters())
        else:
            arch = args.teacher[0].split(":")[0] if args.teacher and ":" in args.teacher[0] else "wrn34_10"
            teacher = module.MeanLogits([frozen(arch, n, args, device)])
        optimizer = common.sgd(params, args.lr, args.momentum, args.wd)
        return _with_student(lambda x, y: module.train_step(student, teacher, optimizer, x, y, args), student)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    if method == "mtard":
        adv = frozen(args.teacher_arch or module.TEACHER_ARCHS["teacher"][args.dataset], n, args, device)
        nat = frozen(args.nat_teacher_arch or module.TEACHER_ARCHS["nat_teacher"][args.dataset], n, args, device)
        anl = module.anl_state(args, device)
        return _with_student(lambda x, y: module.train_step(student, adv, nat, optimizer, x, y, anl, args), student)
    if method == "adaad":  # adaiad: the step after the warm-up, the most forward passes
        teacher = frozen(args.teacher_arch or module.TEACHER_ARCHS[args.dataset], n, args, device)
        epoch = args.begin + 1 if args.variant == "adaiad" else 1
        return _with_student(lambda x, y: module.train_step(student, teacher, optimizer, x, y, epoch, args), student)
    default = {"rslad": "dm_wrn70_16" if c100 else "wrn34_10", "ard": "dm_wrn70_16" if c100 else "wrn34_10",
               "iad": "resnet18", "ardir": "preact_resnet18"}[method]
    teacher = frozen(args.teacher_arch or default, n, args, device)
    if method == "iad":  # the step after the warm-up: the most forward passes
        st = frozen(args.nat_teacher_arch or "resnet18", n, args, device) if args.variant in ("iad2", "akd2") else None
        epoch = (args.begin or 0) + 1
        return _with_student(lambda x, y: module.train_step(student, teacher, st, optimizer, x, y, epoch, args), student)
    return _with_student(lambda x, y: module.train_step(student, teacher, optimizer, x, y, args), student)


def _with_student(step, student):
    step.student = student
    return step


class FlopCount(TorchDispatchMode):
    """torch.utils.flop_counter's per-operator formulas (convolutions, matmuls, their backward) summed
    over everything that runs inside the context. FlopCounterMode itself tracks modules with backward
    hooks that torch.autograd.grad on an input (every attack step) does not support."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn, *a):
    with FlopCount() as counter:
        fn(*a)
    return counter.total


def peak_tflops(device, precision, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for key, p in PEAKS.items() if key in name), None)


def measure(method, argv, steps, warmup, peak_override):
    module, args = method_args(method, argv)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    g = torch.Generator().manual_seed(0)
    n = common.DATASETS[args.dataset]
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, n, (args.batch_size,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step = build(method, module, args, device)
    flops = None
    if not args.compile:  # the flop counter runs eager; a compiled step does the same arithmetic
        flops = count_flops(step, x, y)
    for _ in range(warmup):
        step(x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync()
    seconds = (time.perf_counter() - start) / steps
    precision = "bf16" if args.amp == "bf16" else ("fp32" if args.no_tf32 or device.type != "cuda" else "tf32")
    return {"args": args, "device": device, "flops": flops, "seconds": seconds,
            "images_per_s": args.batch_size / seconds, "precision": precision,
            "peak": peak_tflops(device, precision, peak_override)}


def report(name, r, flops):
    tflops = flops / r["seconds"] / 1e12 if flops else math.nan
    mfu = f"{100 * tflops / r['peak']:.1f}%" if r["peak"] else "n/a (pass --peak-tflops)"
    print(f"{name:<10} {r['images_per_s']:>10.1f} img/s  {1000 * r['seconds']:>9.2f} ms/step  "
          f"{tflops:>8.3f} TFLOP/s  MFU {mfu} (peak: {r['precision']})")
    return tflops


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = common.parser("tools/bench_train", __doc__.split("\n\n")[0], add_help=False)
    p.add_argument("method", choices=METHODS)
    p.add_argument("--steps", type=common.positive_int, default=20, help="timed steps")
    p.add_argument("--warmup", type=common.non_negative_int, default=3,
                   help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--peak-tflops", type=common.positive_float, default=None, help="peak TFLOP/s of the device for the MFU")
    p.add_argument("-h", "--help", action="store_true")
    if "-h" in argv or "--help" in argv:  # before the parse, which would ask for the method first
        print(__doc__)
        return
    ours, rest = p.parse_known_args(argv)
    eager_argv = [a for a in rest if a not in ("--compile", "--channels-last")]
    drop = {"--amp": 1, "--compile-mode": 1}
    cleaned, skip = [], 0
    for a in eager_argv:
        if skip:
            skip -= 1
            continue
        if a in drop:
            skip = drop[a]
            continue
        cleaned.append(a)
    base = measure(ours.method, cleaned + ["--amp", "off", "--no-tf32"], ours.steps, ours.warmup, ours.peak_tflops)
    fast = measure(ours.method, rest, ours.steps, ours.warmup, ours.peak_tflops)
    a = base["args"]
    flops = base["flops"]
    print(f"{ours.method}: student {a.arch}, batch {a.batch_size}, device {base['device']}"
          f"{' (' + torch.cuda.get_device_name(base['device']) + ')' if base['device'].type == 'cuda' else ''}")
    print(f"FLOPs of one training step (every forward and backward pass): {flops} ({flops:.3e})")
    report("eager fp32", base, flops)
    report("requested", fast, flops)
    print(f"speed-up of the requested configuration over eager fp32: {fast['images_per_s'] / base['images_per_s']:.2f}x"
          f"  ({' '.join(rest) or 'no flags'})")


if __name__ == "__main__":
    main()
