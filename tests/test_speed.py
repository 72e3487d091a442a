"""tools/bench_train.py and the progress lines, at tiny sizes on CPU."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script

import common

sys_path = str(ROOT / "tools")


def flops_of(fn):
    import sys
    sys.path.insert(0, sys_path)
    from bench_train import count_flops
    return count_flops(fn)


def test_bench_flops_equal_the_ledgers_passes(tmp_path):
    """The FLOPs bench_train prints for one RSLAD step equal the flop counter's for the passes of the
    ledger counted one by one: T(x) once, K attack passes (forward, backward to the input only), then
    S(x') and S(x) forward and one backward to the weights."""
    b, k = 4, 2
    proc = run_script(ROOT / "tools" / "bench_train.py", "rslad", "--arch", "cnn_small", "--teacher-arch", "cnn_small",
                      "--batch-size", b, "--attack-steps", k, "--steps", 1, "--warmup", 0, "--device", "cpu",
                      "--channels-last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = int(re.search(r"FLOPs of one training step.*: (\d+) ", proc.stdout).group(1))
    rates = re.findall(r"([0-9.]+) img/s", proc.stdout)
    assert len(rates) == 2 and all(float(r) > 0 for r in rates) and "speed-up" in proc.stdout

    torch.manual_seed(0)
    student, teacher = common.build_model("cnn_small"), common.freeze(common.build_model("cnn_small"))
    x = torch.rand(b, 3, 32, 32)

    def teacher_pass():
        with torch.no_grad():
            teacher(x)

    def attack_pass():
        student.eval()
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(student(xa).sum(), xa)

    def outer_passes():
        student.train()
        (student(x).sum() + student(x).sum()).backward()

    expected = flops_of(teacher_pass) + k * flops_of(attack_pass) + flops_of(outer_passes)
    assert expected > 0 and printed == expected


def test_progress_lines_inside_an_epoch(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "rslad.py", "--teacher", teacher_ckpt, "--arch", "cnn_small", "--train-subset", "96",
                      "--test-subset", "32", "--batch-size", "32", "--attack-steps", "1", "--epochs", "2",
                      "--progress-every", "1e-9", "--data-dir", cifar_dir, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if " batch " in ln]
    assert [ln.split()[:4] for ln in lines] == [["epoch", "1", "batch", "1/3"], ["epoch", "1", "batch", "2/3"],
                                               ["epoch", "2", "batch", "1/3"], ["epoch", "2", "batch", "2/3"]]
    assert all(re.search(r"\d+ img/s +epoch ETA \d+:\d\d:\d\d +run ETA \d+:\d\d:\d\d", ln) for ln in lines)


def test_sgd_step_is_the_plain_update():
    """The optimiser the scripts build (foreach or fused where the device has it) applies SGD as written."""
    torch.manual_seed(0)
    model = common.build_model("cnn_small")
    ref = [p.detach().clone() for p in model.parameters()]
    opt = common.sgd(model.parameters(), lr=0.1, momentum=0.9, wd=2e-4)
    loss = F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), ref, grads):
        assert torch.allclose(p, p0 - 0.1 * (g + 2e-4 * p0), atol=1e-7)


BENCH_FLAGS = {
    "ard": ["--teacher-arch", "cnn_small"],
    "iad": ["--variant", "iad2", "--teacher-arch", "cnn_small", "--nat-teacher-arch", "cnn_small"],
    "mtard": ["--teacher-arch", "cnn_small", "--nat-teacher-arch", "cnn_small"],
    "ardir": ["--teacher-arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3"],
    "adt_aodt": ["--method", "aodt", "--peer-arch", "cnn_small"],
    "train_teacher": ["--recipe", "trades"],
}


@pytest.mark.parametrize("method", sorted(BENCH_FLAGS))
def test_bench_runs_every_method(method, tmp_path):
    proc = run_script(ROOT / "tools" / "bench_train.py", method, *BENCH_FLAGS[method], "--arch", "cnn_small",
                      "--batch-size", 4, "--attack-steps", 1, "--steps", 1, "--warmup", 0, "--device", "cpu",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flops = int(re.search(r"FLOPs of one training step.*: (\d+) ", proc.stdout).group(1))
    assert flops > 0 and len(re.findall(r"[0-9.]+ img/s", proc.stdout)) == 2
