"""rslad.py against docs/rslad.md: defaults, the loss (RSLAD Eq. 3 with the code's reductions),
the inner maximisation, one optimisation step computed independently, and a subprocess smoke run."""

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
    random_logits,
    read_metrics,
    run_script,
    setup_models,
)

import common
import rslad


# ---------------------------------------------------------------------------------------------
# Defaults (rslad.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults_cifar10_and_cifar100():
    a = args_for(rslad)
    assert (a.arch, a.alpha, a.kl_scale, a.kl_reduction, a.log_of_softmax) == ("resnet18", 5 / 6, 1.0, "elemmean", False)
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_milestones) == (300, 128, 0.1, 0.9, 2e-4, [215, 260, 285])
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "eval", "normal001")
    assert (a.monitor, a.eval_every, a.eval_all_from, a.seed, a.teacher_dtype) == ("pgd20-monitor", 20, 215, 0, "fp32")
    assert (a.inner, a.outer) == ("rslad", "rslad")
    b = args_for(rslad, "--dataset", "cifar100")
    assert b.kl_scale == 10.0  # RSLAD README: x10 on CIFAR-100
    c = args_for(rslad, "--inner", "ard")
    assert (c.attack_bn, c.rand_start) == ("train", "uniform")  # D-RSLAD-5: ARD's attack verbatim


def test_lr_schedule_decays_after_the_listed_epochs():
    a = args_for(rslad)
    got = {e: rslad.lr_at(e, a) for e in (1, 215, 216, 260, 261, 285, 286, 300)}
    assert got == pytest.approx({1: 0.1, 215: 0.1, 216: 0.01, 260: 0.01, 261: 1e-3, 285: 1e-3, 286: 1e-4, 300: 1e-4})


# ---------------------------------------------------------------------------------------------
# The loss against the formula (values to 1e-6)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,num_classes,k", [("cifar10", 10, 1.0), ("cifar100", 100, 10.0)])
@pytest.mark.parametrize("reduction", ["elemmean", "batchmean", "sum"])
def test_loss_matches_eq3(dataset, num_classes, k, reduction):
    a = args_for(rslad, "--dataset", dataset, "--kl-reduction", reduction)
    s_adv, s_nat, t = (random_logits(8, num_classes, seed) for seed in (1, 2, 3))
    loss, terms = rslad.loss_fn(s_adv, s_nat, t, a)
    reduce = {"elemmean": np.mean, "batchmean": lambda e: e.sum() / len(e), "sum": np.sum}[reduction]
    kl_adv = k * reduce(np_kl_terms(t.double().numpy(), s_adv.double().numpy(), eps=1e-5))
    kl_nat = k * reduce(np_kl_terms(t.double().numpy(), s_nat.double().numpy(), eps=1e-5))
    expected = 5 / 6 * kl_adv + 1 / 6 * kl_nat
    tol = 1e-6 * max(1.0, abs(expected))
    assert abs(loss.item() - expected) < tol
    assert abs(terms["kl_adv"].item() - kl_adv) < tol and abs(terms["kl_nat"].item() - kl_nat) < tol


def test_epsilon_changes_the_value_not_the_gradient():
    a = args_for(rslad)
    s_adv = random_logits(4, 10, 1).requires_grad_(True)
    s_nat, t = random_logits(4, 10, 2), random_logits(4, 10, 3)
    loss, _ = rslad.loss_fn(s_adv, s_nat, t, a)
    p = F.softmax(t, 1)
    plain = 5 / 6 * (p * (torch.log(p) - F.log_softmax(s_adv, 1))).mean() \
        + 1 / 6 * (p * (torch.log(p) - F.log_softmax(s_nat, 1))).mean()
    g, = torch.autograd.grad(loss, s_adv)
    g_plain, = torch.autograd.grad(plain, s_adv)
    assert torch.allclose(g, g_plain, atol=1e-8)
    assert 1e-8 < abs(loss.item() - plain.item()) < 1e-4


def test_log_of_softmax_flag_d_rslad_2():
    a, b = args_for(rslad), args_for(rslad, "--log-of-softmax")
    s, t = random_logits(4, 10, 1, dtype=torch.float32), random_logits(4, 10, 2, dtype=torch.float32)
    assert rslad.loss_fn(s, s, t, a)[0].item() == pytest.approx(rslad.loss_fn(s, s, t, b)[0].item(), abs=1e-6)
    s[0, 0] = -200.0  # the student's probability underflows to 0
    assert torch.isfinite(rslad.loss_fn(s, s, t, a)[0]) and not torch.isfinite(rslad.loss_fn(s, s, t, b)[0])


def test_outer_ard_is_ards_loss():
    a = args_for(rslad, "--outer", "ard")
    s_adv, s_nat, t = (random_logits(8, 10, seed) for seed in (1, 2, 3))
    loss, _ = rslad.loss_fn_ard(s_adv, s_nat, t, a)
    expected = 900 * np.mean(np_kl_terms(t.double().numpy() / 30, s_adv.double().numpy() / 30))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Inner maximisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["rslad", "ard"])
def test_inner_max_ball_box_objective_and_bn(inner):
    a = args_for(rslad, "--attack-steps", "5", "--inner", inner)
    student, teacher, x, y = setup_models()
    with torch.no_grad():
        t = teacher(x)
    before = [b.clone() for b in student.buffers()]
    x_adv = rslad.inner_max(student, x, y, t, a)
    assert student.training
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    moved = any(not torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert moved is (inner == "ard")  # RSLAD attacks in eval(); ARD's attack in train()
    probe = copy.deepcopy(student).train(inner == "ard")
    with torch.no_grad():
        if inner == "rslad":
            p = F.softmax(t, 1)
            objective = lambda z: F.kl_div(F.log_softmax(probe(z), 1), p, reduction="sum").item()
        else:
            objective = lambda z: F.cross_entropy(probe(z), y, reduction="sum").item()
        assert objective(x_adv) > objective(x) + 1e-3


def test_forward_passes_attack_in_eval_then_two_train_passes():
    """Forwards of one train_step: 10 eval-mode attack passes, then S(x') and S(x) in train mode."""
    a = args_for(rslad)
    student, teacher, x, y = setup_models()
    seen = []
    student.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.equal(inp[0], x))))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    rslad.train_step(student, teacher, opt, x, y, a)
    assert seen == [(False, False)] * 10 + [(True, False), (True, True)]


def test_amp_bf16_keeps_iterates_fp32():
    a = args_for(rslad, "--amp", "bf16", "--attack-steps", "2")
    student, teacher, x, y = setup_models()
    x_adv = rslad.inner_max(student, x, y, teacher(x), a)
    assert x_adv.dtype == torch.float32 and (x_adv - x).abs().max() <= a.eps + 1e-7


# ---------------------------------------------------------------------------------------------
# One optimisation step, independently (loss 1e-6, parameters 1e-5)
# ---------------------------------------------------------------------------------------------

def test_one_step_equals_independent_computation():
    a = args_for(rslad, "--attack-steps", "3")
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = rslad.train_step(student, teacher, opt, x, y, a)

    torch.manual_seed(7)
    with torch.no_grad():
        t = teacher(x)
    p = F.softmax(t, 1)
    ref.eval()  # rslad_loss.py: model.eval(), start x + 0.001 N(0, I), 3 steps of 2/255 on KL_sum
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(3):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad((p * (torch.log(p) - F.log_softmax(ref(x_adv), 1))).sum(), x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + 2 / 255 * g.sign(), x - 8 / 255), x + 8 / 255), 0, 1)
    ref.train()
    kl = lambda z: (p * (torch.log(p + 1e-5) - F.log_softmax(z, 1))).mean()
    loss = 5 / 6 * kl(ref(x_adv)) + 1 / 6 * kl(ref(x))
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


# ---------------------------------------------------------------------------------------------
# Smoke run and errors
# ---------------------------------------------------------------------------------------------

def test_smoke_subprocess_and_best_reload(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "rslad.py", "--teacher", teacher_ckpt, "--arch", "cnn_small", "--epochs", "2",
                      "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--attack-steps", "2",
                      "--eval-every", "1", "--data-dir", cifar_dir, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("rslad__cifar10__cnn_small__s0__")
    saved = json.loads((run / "args.json").read_text())
    assert (saved["teacher_arch"], saved["teacher_norm"], saved["kl_scale"]) == ("cnn_small", "none", 1.0)
    lines = read_metrics(run)
    assert lines[0]["epoch"] == 0 and "teacher/clean" in lines[0] and "teacher/robust" in lines[0]
    epochs = lines[1:]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert all({"kl_adv", "kl_nat", "loss", "test_clean", "test_robust", "images_per_s"} <= set(m) for m in epochs)
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"]["value"] == max(m["test_robust"] for m in epochs)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_cifar100_logs_teacher_under_both_normalisations(cifar100_dir, tmp_path):
    torch.manual_seed(0)
    model = common.build_model("cnn_small", 100, norm="cifar10")
    path = tmp_path / "t100.pt"
    common.save_checkpoint(path, common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar100", args={}))
    rslad.main(["--teacher", str(path), "--dataset", "cifar100", "--data-dir", str(cifar100_dir), "--arch", "cnn_small",
                "--epochs", "1", "--train-subset", "32", "--test-subset", "40", "--attack-steps", "1", "--device", "cpu",
                "--runs-dir", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    first = read_metrics(run)[:2]
    x, y = common.load_split("cifar100", cifar100_dir, train=False, subset=40, download=False)
    model.eval()
    for name in ("cifar10", "cifar100"):
        model.mean.copy_(torch.tensor(common.NORMS[name][0]).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(common.NORMS[name][1]).view(1, 3, 1, 1))
        with torch.no_grad():
            acc = (model(x.float() / 255).argmax(1) == y).float().mean().item()
        assert first[1][f"teacher/clean_{name}_norm"] == acc
    assert first[0]["teacher/clean"] == first[1]["teacher/clean_cifar10_norm"]  # the recorded constants are in use
    assert json.loads((run / "args.json").read_text())["kl_scale"] == 10.0


def test_bad_teacher_is_one_line(cifar_dir, cifar100_dir, teacher_ckpt, tmp_path, capsys):
    base = ["--arch", "cnn_small", "--runs-dir", str(tmp_path), "--device", "cpu",
            "--epochs", "1", "--train-subset", "32", "--test-subset", "16"]
    for teacher, extra, match in [(tmp_path / "missing.pt", ["--data-dir", str(cifar_dir)], "not found"),
                                  (teacher_ckpt, ["--dataset", "cifar100", "--data-dir", str(cifar100_dir),
                                                  "--override-record"], "10-class head")]:
        with pytest.raises(SystemExit) as e:
            rslad.main(["--teacher", str(teacher), *base, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and match in err[-1], err
    assert not any(tmp_path.iterdir())  # no run folder left behind by a run that never started


@pytest.mark.parametrize("flags", [["--alpha", "0.5"], ["--kl-scale", "2"], ["--kl-reduction", "elemmean"],
                                   ["--log-of-softmax"]])
def test_flags_outer_ard_does_not_read_are_refused(flags, capsys):
    args_for(rslad, *flags)  # read by RSLAD's loss
    with pytest.raises(SystemExit) as e:
        args_for(rslad, "--outer", "ard", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {flags[0]} "), err
    assert "--outer ard" in err[0]
