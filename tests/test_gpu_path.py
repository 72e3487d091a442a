"""The GPU path, proven as far as the CPU can prove it (docs/common.md §8): torchrun at every script's default
architectures, what CUDA graphs do to the outputs of compiled models, compiled stage outputs (ARDIR), the
attack's arithmetic under torch.compile, the graphs a compiled run compiles, BatchNorm buffer broadcasts,
the monitor's cost and precision, and the smaller flags of the GPU path. tools/gpu_check.py proves the rest
on a GPU."""

import json
import os
import sys
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, read_metrics

import common

sys.path.insert(0, str(ROOT / "tools"))
import bench_train  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# --------------------------------------------------------------------------------------------------
# 1. torchrun at every training script's default architectures
# --------------------------------------------------------------------------------------------------

DEFAULT_RUNS = [  # (run name, script, flags): the student (and peer) architectures are each script's defaults
    ("rslad", "rslad", ["--teacher", "{wrn34_10}", "--attack-steps", "1"]),
    ("ard", "ard", ["--teacher", "{wrn34_10}", "--attack-steps", "1"]),
    ("iad1", "iad", ["--teacher", "{resnet18}", "--attack-steps", "1", "--begin", "0"]),
    ("iad2", "iad", ["--variant", "iad2", "--teacher", "{resnet18}", "--nat-teacher", "{resnet18}", "--attack-steps", "1",
                     "--begin", "0"]),
    ("mtard", "mtard", ["--teacher", "{wrn34_10}", "--nat-teacher", "{resnet56}", "--attack-steps", "1"]),
    ("ardir", "ardir", ["--teacher", "{preact_resnet18}", "--attack-steps", "1"]),
    ("adt", "adt_aodt", ["--method", "adt", "--teacher", "wrn34_10:{wrn34_10}", "--attack-steps", "1"]),
    ("aodt", "adt_aodt", ["--method", "aodt", "--attack-steps", "1"]),
    ("trades", "train_teacher", ["--recipe", "trades", "--attack-steps", "1"]),
    ("natural-rslad-wrn", "train_teacher", ["--recipe", "natural-rslad", "--arch", "wrn34_10"]),
]


def test_torchrun_every_script_at_its_default_architectures(cifar_dir, tmp_path):
    """`torchrun --nproc_per_node 2 adt_aodt.py` (WRN-34-10 by default), `train_teacher.py --recipe trades` and
    `--recipe natural-rslad --arch wrn34_10` train a model that owns `sub_block1`, which no forward uses; DDP
    raised "Expected to have finished reduction in the prior iteration" at the second step. Every training
    script, two steps under 2 gloo processes."""
    import subprocess
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "ddp_defaults_worker.py"), str(cifar_dir), str(tmp_path),
                           json.dumps(DEFAULT_RUNS)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, _, _ in DEFAULT_RUNS:
        (run,) = (tmp_path / name).iterdir()
        last = torch.load(run / "last.pt", weights_only=True)
        assert last["epoch"] == 1 and last["args"]["batch_size"] == 8, name
        epoch = [m for m in read_metrics(run) if m["epoch"] == 1][0]
        assert all(v == v for v in epoch.values() if isinstance(v, float)), (name, epoch)  # no NaN
        assert len(last["optimizer"]["state"]) > 0, name  # two SGD steps with momentum happened
    aodt = torch.load(next((tmp_path / "aodt").iterdir()) / "last.pt", weights_only=True)
    assert aodt["arch"] == "wrn34_10" and aodt["peer_arch"] == "resnet18"


def test_sub_block1_takes_no_gradient_and_keeps_its_init_as_in_trades():
    """TRADES' WideResNet owns sub_block1 but never calls it: its parameters get no gradient (so SGD, weight
    decay included, never moves them), here because they do not require one."""
    model = common.build_model("wrn34_10", depth=10, widen_factor=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("sub_block1.")}
    assert before and not any(p.requires_grad for p in model.sub_block1.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("sub_block1."))
    opt = common.sgd(model.parameters(), lr=0.1, momentum=0.9, wd=5e-4)
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------------------
# 2. --compile-mode reduce-overhead (CUDA graphs): outputs kept across a later call of a compiled model
# --------------------------------------------------------------------------------------------------

class CudaGraphTrees:
    """What torch.compile(mode="reduce-overhead") does to the outputs of compiled models on CUDA
    (torch/_inductor/cudagraph_trees.py, torch 2.14): the compiled models share one memory pool; a call
    starts a new generation unless a forward that ran with gradients still waits for its backward (any
    compiled backward ends the wait), and a new generation reuses the memory of every earlier output, which
    torch then refuses to read ("accessing tensor output of CUDAGraphs that has been overwritten"). Here
    the earlier outputs are filled with NaN instead, so a loss that read one is NaN."""

    def __init__(self):
        self.outputs, self.pending = [], False

    def wrap(self, model, args=None):
        return _GraphedModel(model, self)


class _EndsPending(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, tree):
        ctx.tree = tree
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.tree.pending = False
        return grad, None


class _GraphedModel(nn.Module):
    """A model as the CUDA-graph pool sees it; `_orig_mod` like torch.compile's wrapper."""

    def __init__(self, model, tree):
        super().__init__()
        self._orig_mod, self.tree = model, tree

    def forward(self, *args, **kwargs):
        tree = self.tree
        if not tree.pending:  # a new generation: every earlier output is overwritten
            for ref in tree.outputs:
                t = ref()
                if t is not None:
                    t.data.fill_(float("nan"))
            tree.outputs = []
        out = self._orig_mod(*args, **kwargs)
        tensors = [out] if isinstance(out, torch.Tensor) else [out[1], *out[0]]  # logits, or (stages, logits)
        graphed = []
        for t in tensors:
            if t.requires_grad:
                t = _EndsPending.apply(t, tree)
                tree.pending = True
            tree.outputs.append(weakref.ref(t))
            graphed.append(t)
        return graphed[0] if isinstance(out, torch.Tensor) else (graphed[1:], graphed[0])


def test_emulated_cuda_graphs_catch_an_output_read_after_a_new_generation():
    """The emulation can fail: the teacher's logits read after the attack's first call of the student (what
    rslad.py and mtard.py did) are NaN; read before, or copied, they are intact."""
    tree = CudaGraphTrees()
    torch.manual_seed(0)
    teacher = tree.wrap(common.freeze(common.build_model("cnn_small")))
    student = tree.wrap(common.build_model("cnn_small").eval())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        kept = teacher(x).float()  # fp32: .float() is the same tensor
    copied = kept.clone()
    x_adv = x.clone().requires_grad_(True)
    torch.autograd.grad(student(x_adv).sum(), x_adv)
    assert torch.isnan(kept).all() and not torch.isnan(copied).any()
    out_adv = student(x)  # same generation while its backward is pending: both stay intact
    out_nat = student(x)
    (out_adv.sum() + out_nat.sum()).backward()
    assert not torch.isnan(out_adv).any() and not torch.isnan(out_nat).any()


STEP_VARIANTS = [  # (method, flags) for bench_train.build: every method's step, every variant
    ("rslad", ["--teacher-arch", "cnn_small"]),
    ("rslad", ["--teacher-arch", "cnn_small", "--inner", "ard", "--outer", "ard"]),
    ("ard", ["--teacher-arch", "cnn_small"]),
    ("iad", ["--variant", "iad1", "--teacher-arch", "cnn_small"]),
    ("iad", ["--variant", "ard", "--teacher-arch", "cnn_small"]),
    ("iad", ["--variant", "iad2", "--teacher-arch", "cnn_small", "--nat-teacher-arch", "cnn_small"]),
    ("iad", ["--variant", "akd2", "--teacher-arch", "cnn_small", "--nat-teacher-arch", "cnn_small"]),
    ("mtard", ["--teacher-arch", "cnn_small", "--nat-teacher-arch", "cnn_small"]),
    ("ardir", ["--teacher-arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3"]),
    ("ardir", ["--teacher-arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3", "--combo", "RA"]),
    ("adt_aodt", ["--method", "adt", "--teacher", "cnn_small:-"]),
    ("adt_aodt", ["--method", "adt", "--teacher", "cnn_small:-", "--reg", "trades"]),
    ("adt_aodt", ["--method", "aodt", "--peer-arch", "cnn_small", "--reg", "alp"]),
    ("train_teacher", ["--recipe", "sat-iad"]),
    ("train_teacher", ["--recipe", "trades"]),
]


def _steps(method, flags, wrap, steps=2, monkeypatch=None):
    """Two steps of `method` built as its main() builds them (bench_train.build), every model passed through
    `wrap` where --compile would compile it; returns the logged terms and the trained model's parameters."""
    argv = [*flags, "--arch", "cnn_small", "--batch-size", "6", "--attack-steps", "2", "--device", "cpu"]
    if wrap is not None:
        monkeypatch.setattr(common, "compile_model", wrap)
        argv.append("--compile")
    module, args = bench_train.method_args(method, argv)
    torch.manual_seed(0)
    step = bench_train.build(method, module, args, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    terms = []
    for _ in range(steps):
        x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
        terms.append({k: float(v.detach()) for k, v in step(x, y).items()})
    return terms, [p.detach().clone() for p in step.student.parameters()]


@pytest.mark.parametrize("method, flags", STEP_VARIANTS, ids=[f"{m}-{'-'.join(f[1:2])}" for m, f in STEP_VARIANTS])
def test_compile_mode_reduce_overhead_keeps_every_output_a_step_reads(method, flags, monkeypatch):
    """`--compile --compile-mode reduce-overhead`: a step reads no output of a compiled model after a new
    CUDA-graph generation overwrote it; its losses and updated weights equal the step without CUDA graphs."""
    want, want_params = _steps(method, flags, None)
    tree = CudaGraphTrees()
    got, got_params = _steps(method, flags, tree.wrap, monkeypatch=monkeypatch)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))


def trained_cnn(args, steps=30):
    """cnn_small after a few natural SGD steps on the test data set's training split: some points resist an attack."""
    torch.manual_seed(0)
    model = common.build_model("cnn_small")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = common.train_loader(args, 64, device="cpu")
    for epoch in range(1, steps // len(data) + 2):
        for x, y in data.epoch(epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def test_compile_mode_reduce_overhead_monitor_equals_the_plain_monitor(cifar_dir):
    """The monitor through the emulated CUDA graphs (its last, padded batch included) gives the plain numbers."""
    import rslad
    args = bench_train.method_args("rslad", ["--data-dir", str(cifar_dir), "--test-subset", "40",
                                             "--test-batch-size", "16", "--device", "cpu"])[1]
    loader = common.test_loader(args, device="cpu")
    model = trained_cnn(args)
    cfg = rslad.MONITORS["pgd20-monitor"]
    want = common.monitor(model, loader, cfg)
    got = common.monitor(CudaGraphTrees().wrap(model), loader, cfg)
    assert (got["clean"], got["robust"]) == (want["clean"], want["robust"]) and 0 < want["robust"] < want["clean"]


# --------------------------------------------------------------------------------------------------
# 3. ardir.py --compile: stage outputs from a compiled model
# --------------------------------------------------------------------------------------------------

def _ardir_step(cifar_dir, compiled, combo):
    import ardir
    flags = ["--teacher", "-", "--arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3", "--attack-steps", "2",
             "--combo", combo, "--data-dir", str(cifar_dir), "--test-subset", "12", "--test-batch-size", "6", "--device", "cpu"]  # the batch of the step
    args, _ = ardir.parse_args(flags + (["--compile"] if compiled else []))
    torch.manual_seed(0)
    teacher = common.prepare_model(common.freeze(common.build_model("cnn_small")), args, "cpu")
    student = common.prepare_student(common.build_model("cnn_small"), args, torch.device("cpu"))
    ardir.check_ir_layers(student, teacher, args, "cpu")
    common.monitor(teacher, common.test_loader(args, device="cpu"), ardir.MONITORS["pgd20-sat"])  # measure_teacher
    optimizer = common.sgd(student.parameters(), 0.05, 0.9, 5e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    terms = ardir.train_step(student, teacher, optimizer, x, y, args)
    return {k: v.item() for k, v in terms.items()}, [p.detach().clone() for p in student.parameters()]


@pytest.mark.parametrize("combo", ["RC", "RA"])
def test_ardir_compile_after_the_monitor_equals_eager(cifar_dir, combo, monkeypatch):
    """`ardir.py --compile`: the teacher is compiled (and measured by the monitor) before the first step; a
    hook-based collection of the stage outputs then found no hook in the cached graph (KeyError). The
    compiled step equals the eager one (aot_eager: the same Dynamo capture and AOTAutograd graphs)."""
    want, want_params = _ardir_step(cifar_dir, False, combo)
    monkeypatch.setattr(common, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    got, got_params = _ardir_step(cifar_dir, True, combo)
    assert want["ir"] > 0 and got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(got_params, want_params))


# --------------------------------------------------------------------------------------------------
# 6. --compile: the attack's backward computes the input's gradient only
# --------------------------------------------------------------------------------------------------

def gradient_counting_backend():
    """An AOTAutograd backend (the graphs inductor would get, run eagerly) that records, for each backward
    graph it compiles, how many gradients the graph returns: one per forward input that requires grad."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    returned = []

    def backward(gm, example_inputs):
        (outputs,) = next(n for n in gm.graph.nodes if n.op == "output").args
        returned.append(sum(o is not None for o in outputs))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward), returned


ATTACKS = {  # method -> its training attack on a compiled student, as train_step calls it
    "rslad": lambda m, s, x, y, a: m.inner_max(s, x, y, torch.randn(len(y), 10), a),
    "ard": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
    "iad": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
    "mtard": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
    "ardir": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
    "adt_aodt": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
    "train_teacher": lambda m, s, x, y, a: m.inner_max(s, x, y, a),
}
ATTACK_FLAGS = {"ardir": ["--teacher-arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3"],
                "adt_aodt": ["--method", "adt", "--teacher", "cnn_small:-", "--reg", "trades"],
                "train_teacher": ["--recipe", "sat-iad"]}


@pytest.mark.parametrize("method", sorted(ATTACKS))
def test_compiled_attack_computes_no_weight_gradient(method, monkeypatch):
    """`--compile`: AOTAutograd's backward returns a gradient for every input that requires one, and
    torch.autograd.grad(loss, x_adv) cannot prune them, so each attack step also computed every weight
    gradient (about +50% per step). The trained model's attack now takes the input's gradient only; the
    same model's loss pass (after the attack) still takes every weight's."""
    backend, returned = gradient_counting_backend()
    monkeypatch.setattr(common, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    module, args = bench_train.method_args(method, [*ATTACK_FLAGS.get(method, []), "--arch", "cnn_small",
                                                    "--attack-steps", "2", "--compile", "--device", "cpu"])
    torch.manual_seed(0)
    student = common.prepare_student(common.build_model("cnn_small"), args, torch.device("cpu"))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ATTACKS[method](module, student, x, y, args)
    assert returned and set(returned) == {1}, returned  # x' only
    F.cross_entropy(student(x), y).backward()  # the loss pass: x needs no gradient, every parameter does
    assert returned[-1] == len(list(student.parameters()))


# --------------------------------------------------------------------------------------------------
# 9. --compile: a bounded set of static graphs, each compiled once
# --------------------------------------------------------------------------------------------------

def test_compile_run_compiles_static_graphs_once(cifar_dir, teacher_ckpt, tmp_path, monkeypatch):
    """`rslad.py --compile` with a partial last training batch (20 = 8 + 8 + 4) and a partial last test batch
    (14 = 8 + 6): every graph has static shapes (a partial batch used to recompile every graph as dynamic),
    the monitor pads its last batch (no graph for 6 images), and the second epoch compiles nothing."""
    import rslad
    from torch._dynamo.utils import counters
    graphs = []  # (batch size, any symbolic dimension) of every graph Dynamo hands the backend

    def recording_backend(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        images = [t for t in example_inputs if isinstance(t, torch.Tensor) and tuple(t.shape[1:]) == (3, 32, 32)]
        graphs.append((images[0].shape[0], any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in v.shape) for v in values)))
        return gm.forward

    monkeypatch.setattr(common, "COMPILE_BACKEND", recording_backend)
    after_epoch = []
    log_epoch = common.Run.log_epoch
    monkeypatch.setattr(common.Run, "log_epoch", lambda self, *a, **k: (after_epoch.append(len(graphs)),
                                                                       log_epoch(self, *a, **k))[1])
    torch._dynamo.reset()
    counters.clear()
    rslad.main(["--teacher", str(teacher_ckpt), "--arch", "cnn_small", "--train-subset", "20", "--batch-size", "8",
                "--test-subset", "14", "--test-batch-size", "8", "--attack-steps", "2", "--epochs", "2",
                "--eval-every", "1", "--compile", "--device", "cpu", "--data-dir", str(cifar_dir),
                "--runs-dir", str(tmp_path)])
    assert not any(dynamic for _, dynamic in graphs), graphs
    assert {size for size, _ in graphs} == {8, 4}, graphs  # full and partial training batches; test batches padded
    assert after_epoch[0] == after_epoch[1] == len(graphs) == counters["stats"]["unique_graphs"]
    # at 8 and at 4: the clean pass (eval BN, no grad: the teacher, the monitor's), the attack (eval BN, weights
    # frozen: the student's, the monitor's) and the loss pass (train BN); torch >= 2.5 shares a graph between
    # models of one class, as parameters are graph inputs, where older releases compile one per model
    assert len(graphs) <= 10, graphs


# --------------------------------------------------------------------------------------------------
# 7. torchrun: rank 0's BatchNorm buffers in one collective
# --------------------------------------------------------------------------------------------------

def test_bn_buffers_reach_every_rank_in_one_collective_bit_for_bit(monkeypatch):
    """Before each step and before the monitor every rank takes rank 0's buffers: one broadcast for all the
    buffers of all models (it was one per buffer: ~60 for a ResNet-18, ~590 for AODT's two models), bytes
    unchanged (float running statistics and int64 counters alike)."""
    torch.manual_seed(0)
    rank0 = [common.build_model("resnet18").train(), common.build_model("cnn_small").train()]
    for m in rank0:  # statistics that differ from the other rank's
        m(torch.rand(8, 3, 32, 32) * 3)
    torch.manual_seed(1)
    rank1 = [common.build_model("resnet18"), common.build_model("cnn_small")]
    sent, calls = [], []

    def broadcast(t, src):
        calls.append(src)
        if sent:
            t.copy_(sent[0])  # rank 1 receives rank 0's bytes
        else:
            sent.append(t.clone())

    monkeypatch.setattr(common, "world", lambda: (0, 2))
    monkeypatch.setattr(common.dist, "broadcast", broadcast)
    common.broadcast_buffers(*rank0)
    common.broadcast_buffers(*rank1)
    assert calls == [0, 0]
    for a, b in zip(rank0, rank1):
        for x, y in zip(a.buffers(), b.buffers()):
            assert x.dtype == y.dtype and torch.equal(x, y)
    calls.clear()
    common.broadcast_buffers(common.sync_batchnorm(common.build_model("cnn_small"), torch.device("cpu")))
    assert calls == []  # --sync-bn: every rank already holds the global statistics


# --------------------------------------------------------------------------------------------------
# 8. the monitor: its cost shown, its batch sized for the device, TF32 only when asked for
# --------------------------------------------------------------------------------------------------

def test_monitor_seconds_in_the_progress_line_and_metrics(cifar_dir, teacher_ckpt, tmp_path, capsys):
    import rslad
    rslad.main(["--teacher", str(teacher_ckpt), "--arch", "cnn_small", "--train-subset", "32", "--batch-size", "16",
                "--test-subset", "16", "--attack-steps", "1", "--epochs", "2", "--eval-every", "2", "--device", "cpu",
                "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert "+ monitor" not in lines[0] and "+ monitor" in lines[1], lines
    (run,) = tmp_path.iterdir()
    records = {m["epoch"]: m for m in read_metrics(run)}
    assert "monitor_seconds" not in records[1] and records[2]["monitor_seconds"] > 0
    args = json.loads((run / "args.json").read_text())
    assert args["test_batch_size"] == 128 and args["monitor_tf32"] is False  # the official batch on the CPU


def test_test_batch_size_default_is_the_official_one_on_the_cpu_and_larger_on_a_gpu():
    import argparse
    import ard
    args, _ = ard.parse_args(["--teacher", "-"])
    assert args.test_batch_size is None
    cpu = argparse.Namespace(**{**vars(args), "device": "cpu"})
    common.setup_device(cpu)
    assert cpu.test_batch_size == 100  # ARD's test loader
    assert common.GPU_TEST_BATCH > 128


def test_monitor_tf32_keeps_tf32_on_and_the_default_turns_it_off():
    model = common.build_model("cnn_small")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training sets it on CUDA
        with common.fp32_eval(model):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with common.fp32_eval(model, tf32=True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# 5. smaller flags of the GPU path
# --------------------------------------------------------------------------------------------------

def test_rslad_teacher_dtype_fp16_with_amp_bf16_trains():
    """`rslad.py --teacher-dtype fp16 --amp bf16`: the half teacher ran under bf16 autocast and its BatchNorm
    failed on bf16 inputs with fp16 weights. It runs outside autocast, as the official half teacher did."""
    rslad, args = bench_train.method_args("rslad", ["--teacher-arch", "cnn_small", "--arch", "cnn_small",
                                                     "--teacher-dtype", "fp16", "--amp", "bf16", "--attack-steps", "2",
                                                     "--device", "cpu"])
    torch.manual_seed(0)
    student, teacher = common.build_model("cnn_small"), common.freeze(common.build_model("cnn_small")).half()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = rslad.train_step(student, teacher, common.sgd(student.parameters(), 0.1, 0.9, 2e-4), x, y, args)
    assert torch.isfinite(terms["loss"]) and terms["kl_adv"].item() > 0 and terms["kl_nat"].item() > 0


def test_deterministic_sets_the_cublas_workspace(monkeypatch):
    """`--deterministic`: cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set (torch only warns)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        common.set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
