"""ard.py against docs/ard.md: defaults, the tempered KD loss with its elemmean reduction,
the train-mode attack, the forward ledger, one optimisation step computed independently, a smoke run."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    args_for,
    check_best_reloads,
    check_first_step,
    np_kl_terms,
    np_log_softmax,
    random_logits,
    read_metrics,
    run_script,
    setup_models,
)

import ard
import common


def test_defaults():
    a = args_for(ard)
    assert (a.arch, a.alpha, a.temp, a.kl_reduction, a.ce_input) == ("mobilenet_v2", 1.0, 30.0, "elemmean", "clean")
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_schedule) == (200, 128, 0.1, 0.9, 2e-4, "code")
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "train", "uniform")
    assert (a.monitor, a.eval_every, a.seed, a.test_batch_size) == ("pgd10-ard", 1, 0, None)
    a.device = "cpu"
    common.setup_device(a)  # the monitor's batch is sized for the device: ARD's test loader's 100 on the CPU
    assert a.test_batch_size == 100
    assert args_for(ard, "--dataset", "cifar100").batch_size == 256  # main.py's CIFAR-100 loader
    assert args_for(ard, "--dataset", "cifar100", "--batch-size", "64").batch_size == 64


def test_lr_schedules():
    code, paper = args_for(ard), args_for(ard, "--lr-schedule", "paper")
    ard300 = args_for(ard, "--lr-milestones", "215", "260", "285", "--epochs", "300")
    epochs = (1, 100, 101, 150, 151, 200)
    assert [ard.lr_at(e, code) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.01])  # one decay
    assert [ard.lr_at(e, paper) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert [ard.lr_at(e, ard300) for e in (215, 216, 261, 286)] == pytest.approx([0.1, 0.01, 1e-3, 1e-4])


@pytest.mark.parametrize("alpha,temp,reduction", [(1.0, 30.0, "elemmean"), (0.6, 4.0, "elemmean"),
                                                   (0.9, 2.0, "batchmean"), (0.5, 1.0, "sum")])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_loss_matches_formula(alpha, temp, reduction, num_classes):
    a = args_for(ard, "--alpha", str(alpha), "--temp", str(temp), "--kl-reduction", reduction)
    s_adv, s_nat, t = (random_logits(8, num_classes, seed) for seed in (1, 2, 3))
    y = torch.arange(8) % num_classes
    loss, terms = ard.loss_fn(s_adv, s_nat, t, y, a)
    e = np_kl_terms(t.double().numpy() / temp, s_adv.double().numpy() / temp)
    kl = {"elemmean": e.mean(), "batchmean": e.sum() / len(e), "sum": e.sum()}[reduction]
    ce = -np_log_softmax(s_nat.double().numpy())[np.arange(8), y.numpy()].mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    assert abs(loss.item() - expected) < 1e-6 * max(1.0, abs(expected))
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-6, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6, abs=1e-7)


def test_inner_max_train_mode_unclamped_start_raises_ce():
    a = args_for(ard, "--attack-steps", "5")
    student, _, x, y = setup_models()
    x[:, :, :4] = 0.0  # dark rows: a uniform start must leave [0,1] there
    first = []
    hook = student.register_forward_pre_hook(lambda m, inp: first.append(inp[0].detach().clone()) if not first else None)
    before = [b.clone() for b in student.buffers()]
    x_adv = ard.inner_max(student, x, y, a)
    hook.remove()
    assert first[0].min() < 0  # official: x + U(-eps, eps), no clamp before the first forward
    assert student.training and any(not torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    probe = copy.deepcopy(student)
    with torch.no_grad():
        assert F.cross_entropy(probe(x_adv), y, reduction="sum") > F.cross_entropy(probe(x), y, reduction="sum") + 1e-3
    b = args_for(ard, "--attack-steps", "3", "--attack-bn", "eval")
    before = [t.clone() for t in student.buffers()]
    ard.inner_max(student, x, y, b)
    assert all(torch.equal(u, v) for u, v in zip(before, student.buffers()))


def test_ledger_keeps_the_clean_pass_at_alpha_1():
    a = args_for(ard)
    student, teacher, x, y = setup_models()
    seen = []
    student.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.equal(inp[0], x))))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    ard.train_step(student, teacher, opt, x, y, a)
    assert seen == [(True, False)] * 10 + [(True, False), (True, True)]  # 10 attack passes, S(x'), S(x)


def test_one_step_equals_independent_computation():
    a = args_for(ard, "--attack-steps", "3", "--alpha", "0.8", "--temp", "5")
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = ard.train_step(student, teacher, opt, x, y, a)

    torch.manual_seed(7)  # main.py AttackPGD: train mode, x + U(-eps, eps), CE summed, 3 steps of 2/255
    ref.train()
    x_adv = x + torch.zeros_like(x).uniform_(-8 / 255, 8 / 255)
    for _ in range(3):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(ref(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + 2 / 255 * g.sign(), x - 8 / 255), x + 8 / 255), 0, 1)
    z_adv = ref(x_adv)
    with torch.no_grad():
        p = F.softmax(teacher(x) / 5, 1)
    z_nat = ref(x)
    loss = 0.8 * 25 * (p * (torch.log(p) - F.log_softmax(z_adv / 5, 1))).mean() + 0.2 * F.cross_entropy(z_nat, y)
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


def test_smoke_subprocess_and_best_reload(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "ard.py", "--teacher", teacher_ckpt, "--arch", "cnn_small", "--epochs", "2",
                      "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--attack-steps", "2",
                      "--data-dir", cifar_dir, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("ard__cifar10__cnn_small__s0__")
    saved = json.loads((run / "args.json").read_text())
    assert (saved["teacher_arch"], saved["lr_schedule"], saved["temp"]) == ("cnn_small", "code", 30.0)
    lines = read_metrics(run)
    assert lines[0]["epoch"] == 0 and "teacher/robust" in lines[0]
    epochs = lines[1:]
    assert [m["epoch"] for m in epochs] == [1, 2] and all({"kl", "ce", "test_robust"} <= set(m) for m in epochs)
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"] == {"monitor": "pgd10-ard", "value": max(m["test_robust"] for m in epochs),
                              "epoch": best["epoch"]}


def test_teacher_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        ard.parse_args([])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--teacher" in err[0]


def test_lr_schedule_with_lr_milestones_is_refused(capsys):
    assert args_for(ard, "--lr-schedule", "paper").lr_schedule == "paper"  # read without milestones
    with pytest.raises(SystemExit) as e:
        args_for(ard, "--lr-milestones", "215", "260", "285", "--lr-schedule", "paper")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --lr-schedule is replaced by --lr-milestones"]
