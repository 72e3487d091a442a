"""adt_aodt.py against docs/adt_aodt.md: defaults, every configuration's loss (ADT, AODT, +ALP, +TRADES,
the l1..l4 ablation) in float64, gradient flow, both attacks, the forward ledgers, one optimisation step
computed independently for ADT and for AODT (both models), the teacher ensemble, smoke runs, the
checkpoint read by eval_attacks.py, an AODT resume after a kill, and refused values."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    ROOT,
    args_for,
    check_best_reloads,
    check_first_step,
    check_resume_in_process,
    np_log_softmax,
    random_logits,
    read_metrics,
    run_script,
    setup_models,
)

import adt_aodt
import common

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "2", "--lr", "0.02", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------
# Defaults (docs/adt_aodt.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults():
    a = args_for(adt_aodt)
    assert (a.method, a.reg, a.reg_weight, a.aodt_loss, a.mse_reduction, a.arch) == ("adt", "none", 0.0, "l1", "mean", "wrn34_10")
    assert (a.peer_arch, a.peer_beta, a.detach_peer, a.temp, a.l3_beta) == (None, 1.0, True, 4.0, 0.1)  # D-ADT-2
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (0.031, 0.007, 10, "eval", "uniform")
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_milestones) == (100, 128, 0.1, 0.9, 2e-4, [74, 89])
    assert (a.monitor, a.eval_every, a.seed, a.report) == ("fgsm20-trades", 1, 1, "last")
    assert args_for(adt_aodt, "--reg", "alp").reg_weight == 1.0 and args_for(adt_aodt, "--reg", "trades").reg_weight == 0.0
    assert args_for(adt_aodt, "--reg", "trades").rand_start == "normal001"  # trades.py's start
    peers = {(d, r): args_for(adt_aodt, "--method", "aodt", "--dataset", d, "--reg", r).peer_arch
             for d in ("cifar10", "cifar100") for r in ("none", "alp", "trades")}
    assert peers == {("cifar10", "none"): "resnet18", ("cifar10", "alp"): "resnet18", ("cifar10", "trades"): "resnet152",
                     ("cifar100", "none"): "resnet152", ("cifar100", "alp"): "resnet18",
                     ("cifar100", "trades"): "resnet152"}  # D-ADT-6, the table captions
    assert args_for(adt_aodt, "--method", "aodt", "--peer-arch", "cnn_small").peer_arch == "cnn_small"


def test_lr_schedule_transitions_at_75_and_90():
    a = args_for(adt_aodt)
    got = [adt_aodt.lr_at(e, a) for e in (1, 74, 75, 89, 90, 100)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])


# ---------------------------------------------------------------------------------------------
# Every configuration's loss against the formulas in float64 (1e-6)
# ---------------------------------------------------------------------------------------------

def np_expected(method, reg, choice, o_adv, o_nat, o_n, y, alpha, reduction="mean", beta=1.0, temp=4.0, b3=0.1):
    """The loss table of docs/adt_aodt.md §1 written out in numpy float64."""
    n = np.arange(len(y))
    mse = lambda a, b: ((a - b) ** 2).mean() if reduction == "mean" else ((a - b) ** 2).sum(1).mean()
    ce = lambda z: -np_log_softmax(z)[n, y].mean()
    soft = lambda z: np.exp(np_log_softmax(z))
    if choice == "l1":
        total = mse(o_adv, o_n)
    elif choice == "l2":
        total = mse(o_adv, o_n) + ce(o_adv)
    elif choice == "l3":
        kd = -(soft(o_n / temp) * np_log_softmax(o_adv / temp)).sum(1).mean()
        total = (1 - b3) * ce(o_adv) + 2 * b3 * temp ** 2 * kd
    else:
        p = soft(o_n)
        total = (p * (np.log(p) - np_log_softmax(o_adv))).sum(1).mean() + ce(o_adv)
    if method == "aodt":
        total += beta * ce(o_n)
    if reg == "alp":
        total += alpha * mse(o_adv, o_nat)
    elif reg == "trades":
        p = soft(o_nat)
        total += alpha * (p * (np.log(p) - np_log_softmax(o_adv))).sum(1).mean()
    return total


CONFIGS = ([("adt", r, "l1") for r in ("none", "alp", "trades")] + [("aodt", r, "l1") for r in ("none", "alp", "trades")]
           + [("aodt", "none", c) for c in ("l2", "l3", "l4")] + [("aodt", "alp", "l3"), ("aodt", "trades", "l4")])


@pytest.mark.parametrize("method,reg,choice", CONFIGS)
@pytest.mark.parametrize("num_classes,reduction,alpha", [(10, "mean", None), (100, "sum-classes", 6.0)])
def test_loss_matches_formula(method, reg, choice, num_classes, reduction, alpha):
    extra = ["--reg", reg] + (["--aodt-loss", choice] if method == "aodt" else [])
    if choice in ("l1", "l2") or reg == "alp":  # the configurations with an MSE term read --mse-reduction
        extra += ["--mse-reduction", reduction]
    if alpha is not None and reg != "none":
        extra += ["--reg-weight", str(alpha)]
    a = args_for(adt_aodt, "--method", method, *extra)
    o_adv, o_nat, o_n = (random_logits(8, num_classes, seed) for seed in (1, 2, 3))
    y = torch.arange(8) * 7 % num_classes
    loss, terms = adt_aodt.loss_fn(o_adv, o_nat if reg != "none" else None, o_n, y, a)
    expected = np_expected(method, reg, choice, o_adv.numpy(), o_nat.numpy(), o_n.numpy(), y.numpy(), a.reg_weight,
                           reduction)
    assert loss.dtype == torch.float64 and abs(loss.item() - expected) < 1e-6 * max(1.0, abs(expected))
    assert terms["loss"] is loss and ("ce_peer" in terms) == (method == "aodt")


def test_l3_keeps_the_literal_factor_and_its_flags():
    a = args_for(adt_aodt, "--method", "aodt", "--aodt-loss", "l3", "--temp", "2", "--l3-beta", "0.5", "--peer-beta", "0.3")
    o_adv, o_n = random_logits(6, 10, 4), random_logits(6, 10, 5)
    y = torch.arange(6)
    loss, terms = adt_aodt.loss_fn(o_adv, None, o_n, y, a)
    expected = np_expected("aodt", "none", "l3", o_adv.numpy(), None, o_n.numpy(), y.numpy(), 0.0, beta=0.3, temp=2.0,
                           b3=0.5)
    assert abs(loss.item() - expected) < 1e-6
    assert abs(loss.item() - (0.5 * terms["ce"] + 2 * 0.5 * 4 * terms["kd"] + 0.3 * terms["ce_peer"]).item()) < 1e-9


# ---------------------------------------------------------------------------------------------
# Gradient flow
# ---------------------------------------------------------------------------------------------

def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def test_adt_gives_the_teacher_no_gradient():
    a = args_for(adt_aodt)
    o_adv, o_n = random_logits(8, 10, 1).requires_grad_(True), random_logits(8, 10, 2).requires_grad_(True)
    loss, _ = adt_aodt.loss_fn(o_adv, None, o_n, torch.arange(8), a)
    g_adv, g_n = grads(loss, o_adv, o_n)
    assert g_n is None  # sg(O^n) even if the logits carried a graph
    assert torch.allclose(g_adv, 2 * (o_adv - o_n).detach() / o_adv.numel(), atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_aodt_peer_gradient_from_the_mse_unless_detached(detach):
    a = args_for(adt_aodt, "--method", "aodt", *([] if detach else ["--no-detach-peer"]))
    o_adv, o_n = random_logits(8, 10, 1).requires_grad_(True), random_logits(8, 10, 2).requires_grad_(True)
    y = torch.arange(8)
    loss, _ = adt_aodt.loss_fn(o_adv, None, o_n, y, a)
    g_adv, g_n = grads(loss, o_adv, o_n)
    ce_grad = (F.softmax(o_n, 1) - F.one_hot(y, 10)).detach() / 8  # β·CE(O^n, y), β = 1
    mse_grad = 2 * (o_n - o_adv).detach() / o_n.numel()
    assert torch.allclose(g_n, ce_grad + (0 if detach else mse_grad), atol=1e-12)
    assert torch.allclose(g_adv, -mse_grad, atol=1e-12)


@pytest.mark.parametrize("method", ["adt", "aodt"])
def test_alp_gradient_reaches_both_branches(method):
    a = args_for(adt_aodt, "--method", method, "--reg", "alp", "--reg-weight", "0.7")
    o_adv, o_nat, o_n = (random_logits(8, 10, s).requires_grad_(True) for s in (1, 2, 3))
    loss, _ = adt_aodt.loss_fn(o_adv, o_nat, o_n, torch.arange(8), a)
    g_adv, g_nat = grads(loss, o_adv, o_nat)
    pair = 2 * 0.7 * (o_adv - o_nat).detach() / o_adv.numel()
    assert torch.allclose(g_nat, -pair, atol=1e-12) and g_nat.abs().max() > 1e-3
    assert torch.allclose(g_adv, 2 * (o_adv - o_n).detach() / o_adv.numel() + pair, atol=1e-12)


def test_trades_kl_target_is_not_detached():
    a = args_for(adt_aodt, "--reg", "trades", "--reg-weight", "6")
    o_adv, o_nat, o_n = (random_logits(8, 10, s).requires_grad_(True) for s in (1, 2, 3))
    loss, _ = adt_aodt.loss_fn(o_adv, o_nat, o_n, torch.arange(8), a)
    g_nat, = grads(loss, o_nat)
    p = F.softmax(o_nat, 1)
    ref = 6 * (p * (F.log_softmax(o_nat, 1) - F.log_softmax(o_adv, 1))).sum() / 8
    g_ref, = torch.autograd.grad(ref, o_nat)
    assert torch.allclose(g_nat, g_ref, atol=1e-12) and g_nat.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Inner maximisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reg", ["none", "trades"])
def test_attack_ball_box_objective_eval_bn_and_start(reg):
    a = args_for(adt_aodt, "--reg", reg, "--attack-steps", "5")
    student, _, x, y = setup_models()
    x[:, :, :4] = 0.0  # dark rows: the uniform start leaves [0,1] there
    first, before = [], [b.clone() for b in student.buffers()]
    hook = student.register_forward_pre_hook(lambda m, inp: first.append(inp[0].detach().clone()) if not m.training else None)
    x_adv = adt_aodt.inner_max(student, x, y, a)
    hook.remove()
    assert student.training and all(torch.equal(u, v) for u, v in zip(before, student.buffers()))  # eval-mode BN
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    if reg == "none":
        assert len(first) == 5 and first[0].min() < 0 and (first[0] - x).abs().max() <= a.eps  # unclamped uniform
    else:
        assert len(first) == 6 and torch.equal(first[0], x)  # M^r(x) once, then 5 steps from x + 0.001 N(0, I)
        assert 0 < (first[1] - x).abs().max() < 0.01
    probe = copy.deepcopy(student).eval()
    with torch.no_grad():
        if reg == "none":
            objective = lambda z: F.cross_entropy(probe(z), y, reduction="sum").item()
        else:
            p = F.softmax(probe(x), 1)
            objective = lambda z: (p * (torch.log(p) - F.log_softmax(probe(z), 1))).sum().item()
        assert objective(x_adv) > objective(x) + 1e-3


def test_trades_attack_in_train_mode_recomputes_the_clean_pass():
    a = args_for(adt_aodt, "--reg", "trades", "--attack-steps", "3", "--attack-bn", "train")
    student, _, x, y = setup_models()
    seen = []
    student.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.equal(inp[0], x))))
    adt_aodt.inner_max(student, x, y, a)
    assert seen == [(True, False), (True, True)] * 3  # trades.py: M^r(x') then M^r(x) at each step


# ---------------------------------------------------------------------------------------------
# Forward ledgers (hooks), per configuration
# ---------------------------------------------------------------------------------------------

def ledger_models(method, seed=0):
    student, teacher, x, y = setup_models(seed)
    if method == "adt":
        torch.manual_seed(seed + 5)
        other = common.freeze(common.build_model("cnn_small"))
        m_n = common.freeze(adt_aodt.MeanLogits([teacher, other]))
        named = {"S": student, "T0": teacher, "T1": other}
    else:
        torch.manual_seed(seed + 5)
        m_n = common.build_model("cnn_small").train()
        named = {"S": student, "P": m_n}
    return student, m_n, named, x, y


@pytest.mark.parametrize("method", ["adt", "aodt"])
@pytest.mark.parametrize("reg", ["none", "alp", "trades"])
def test_forward_ledger(method, reg):
    a = args_for(adt_aodt, "--method", method, "--reg", reg)
    student, m_n, named, x, y = ledger_models(method)
    seen = []
    for name, model in named.items():
        model.register_forward_pre_hook(lambda m, inp, name=name: seen.append((name, m.training, "x" if torch.equal(inp[0], x) else "x'")))
    before = {k: [b.clone() for b in m.buffers()] for k, m in named.items() if k != "S"}
    params = list(student.parameters()) + (list(m_n.parameters()) if method == "aodt" else [])
    adt_aodt.train_step(student, m_n, torch.optim.SGD(params, lr=0.01, momentum=0.9), x, y, a)
    attack = ([("S", False, "x")] if reg == "trades" else []) + [("S", False, "x'")] * 10
    outer = [("T0", False, "x"), ("T1", False, "x")] if method == "adt" else [("P", True, "x")]
    outer += [("S", True, "x'")] + ([("S", True, "x")] if reg != "none" else [])  # TRADES' order: x' first
    assert seen == attack + outer
    for k, bufs in before.items():  # a teacher's BN statistics never move; the peer's move once, in its pass on x
        moved = any(not torch.equal(u, v) for u, v in zip(bufs, named[k].buffers()))
        assert moved is (k == "P")
    if method == "adt":
        assert all(p.grad is None for p in m_n.parameters())


def test_ensemble_teacher_is_the_mean_of_its_members(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = common.build_model("cnn_small")
        paths.append(tmp_path / f"t{seed}.pt")
        common.save_checkpoint(paths[-1], common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar10", args={}))
    a = args_for(adt_aodt, "--teacher", f"cnn_small:{paths[0]}", "--teacher", str(paths[1]))
    a.teacher = a.teacher[1:]  # args_for's placeholder member
    ensemble, members, info = adt_aodt.load_teachers(a, "cpu")
    assert info["arch"] == ["cnn_small", "cnn_small"] and info["sha256"] == [common.file_sha256(p) for p in paths]
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        z0, z1 = (common.load_model(p)[0](x) for p in paths)
        assert torch.allclose(ensemble(x), (z0 + z1) / 2, atol=1e-6) and not torch.allclose(z0, z1, atol=1e-3)
    assert not ensemble.training and not any(p.requires_grad for p in ensemble.parameters())


# ---------------------------------------------------------------------------------------------
# One optimisation step, independently (loss 1e-6, parameters 1e-5)
# ---------------------------------------------------------------------------------------------

def ref_attack(model, x, y, steps, eps, step, trades):
    model.eval()
    if trades:
        with torch.no_grad():
            p = F.softmax(model(x), 1)
        x_adv = x + 0.001 * torch.randn_like(x)
    else:
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        z = model(x_adv)
        obj = (p * (torch.log(p) - F.log_softmax(z, 1))).sum() if trades else F.cross_entropy(z, y, reduction="sum")
        g, = torch.autograd.grad(obj, x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps), 0, 1)
    model.train()
    return x_adv


def test_one_step_adt_alp_with_an_ensemble():
    a = args_for(adt_aodt, "--reg", "alp", "--attack-steps", "3")
    student, m_n, named, x, y = ledger_models("adt")
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = adt_aodt.train_step(student, m_n, opt, x, y, a)

    torch.manual_seed(7)
    x_adv = ref_attack(ref, x, y, 3, 0.031, 0.007, trades=False)
    with torch.no_grad():
        t = (named["T0"](x) + named["T1"](x)) / 2
    z_adv, z_nat = ref(x_adv), ref(x)
    loss = ((z_adv - t) ** 2).mean() + 1.0 * ((z_adv - z_nat) ** 2).mean()
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("reg,choice", [("trades", "l1"), ("none", "l3")])
def test_one_step_aodt_updates_both_models(reg, choice, detach):
    a = args_for(adt_aodt, "--method", "aodt", "--reg", reg, *(["--reg-weight", "6"] if reg == "trades" else []),
                 "--aodt-loss", choice, "--attack-steps", "3", *([] if detach else ["--no-detach-peer"]))
    student, peer, _, x, y = ledger_models("aodt")
    pair = nn.ModuleList([student, peer])
    ref = copy.deepcopy(pair)
    opt = torch.optim.SGD(pair.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = adt_aodt.train_step(student, peer, opt, x, y, a)

    torch.manual_seed(7)
    s, p = ref
    x_adv = ref_attack(s, x, y, 3, 0.031, 0.007, trades=reg == "trades")
    o_n = p(x)
    o_t = o_n.detach() if detach else o_n  # the peer's logits as L's target (D-ADT-2)
    o_r = s(x_adv)
    ce = lambda z: F.cross_entropy(z, y)
    if choice == "l1":
        o_nat = s(x)
        q = F.softmax(o_nat, 1)
        loss = ((o_r - o_t) ** 2).mean() + ce(o_n) + 6 * (q * (torch.log(q) - F.log_softmax(o_r, 1))).sum() / len(y)
    else:
        kd = -(F.softmax(o_t / 4, 1) * F.log_softmax(o_r / 4, 1)).sum(1).mean()
        loss = 0.9 * ce(o_r) + 2 * 0.1 * 16 * kd + ce(o_n)
    check_first_step(pair, terms, ref, loss, a.lr, a.wd)
    assert not torch.equal(next(peer.parameters()), next(ref[1].parameters()))  # the peer did move


# ---------------------------------------------------------------------------------------------
# Smoke runs, checkpoints, resume
# ---------------------------------------------------------------------------------------------

def test_smoke_adt_alp_two_members_and_best_reload(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "adt_aodt.py", "--method", "adt", "--reg", "alp", "--teacher", f"cnn_small:{teacher_ckpt}",
                      "--teacher", teacher_ckpt, *TINY, "--epochs", "2", "--data-dir", cifar_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("adt_aodt-adt__cifar10__cnn_small__s1__")
    saved = json.loads((run / "args.json").read_text())
    assert saved["teacher_arch"] == ["cnn_small"] * 2 and len(saved["teacher_sha256"]) == 2
    lines = read_metrics(run)
    assert lines[0]["epoch"] == 0 and "teacher/clean" in lines[0] and "teacher/robust" in lines[0]
    assert lines[1]["teacher0/clean"] == lines[1]["teacher1/clean"] == lines[0]["teacher/clean"]  # one file twice
    epochs = [m for m in lines if m["epoch"] > 0]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert all({"loss", "mse", "alp", "test_clean", "test_robust"} <= set(m) for m in epochs)
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"]["monitor"] == "fgsm20-trades" and "peer" not in best
    assert f"reported checkpoint (D-ADT-8): {run}/last.pt" in proc.stdout  # --runs-dir is stored absolute


def test_smoke_aodt_trades_checkpoint_holds_both_and_eval_reads_the_robust_model(cifar_dir, tmp_path):
    proc = run_script(ROOT / "adt_aodt.py", "--method", "aodt", "--reg", "trades", "--reg-weight", "6",
                      "--peer-arch", "cnn_small", *TINY, "--epochs", "2", "--data-dir", cifar_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    epochs = read_metrics(run)
    assert [m["epoch"] for m in epochs] == [1, 2]  # no teacher line for AODT
    assert all({"loss", "mse", "ce_peer", "trades_kl", "peer_clean"} <= set(m) for m in epochs)
    check_best_reloads(run, cifar_dir, 32)
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["peer_arch"] == "cnn_small" and set(last["peer"]) == set(common.build_model("cnn_small").state_dict())
    n_student = sum(v.numel() for k, v in last["model"].items() if "running" not in k and "num_batches" not in k)
    n_state = sum(len(s) for s in last["optimizer"]["state"].values())
    assert len(last["optimizer"]["param_groups"][0]["params"]) == 2 * len(list(common.build_model("cnn_small").parameters()))
    assert n_student > 0 and n_state > 0
    out = tmp_path / "eval.json"
    proc = run_script(ROOT / "eval_attacks.py", run / "last.pt", "--preset", "adt", "--attacks", "fgsm_adt",
                      "--n-ex", "32", "--data-dir", cifar_dir, "--device", "cpu", "--json", out, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loader"]["container"] == "model" and result["n_ex"] == 32
    assert result["clean"]["acc"] == epochs[-1]["test_clean"]  # the robust model M^r, not the peer


def test_aodt_resume_alone_equals_the_uninterrupted_run(cifar_dir, tmp_path):
    argv = ["--method", "aodt", "--reg", "alp", "--peer-arch", "cnn_small", *TINY, "--data-dir", cifar_dir]
    full, part = check_resume_in_process(adt_aodt, argv, tmp_path)
    assert torch.load(part / "last.pt", weights_only=True)["peer_arch"] == "cnn_small"


def test_adt_resume_refuses_another_teacher_file(cifar_dir, teacher_ckpt, tmp_path, capsys):
    adt_aodt.main(["--teacher", str(teacher_ckpt), *TINY, "--epochs", "1", "--data-dir", str(cifar_dir),
                   "--runs-dir", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    before = (run / "last.pt").read_bytes()
    torch.manual_seed(3)
    other = tmp_path / "other.pt"
    common.save_checkpoint(other, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=1,
                                                         dataset="cifar10", args={}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        adt_aodt.main(["--resume", str(run / "last.pt"), "--teacher", str(other), "--epochs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "not the file the run started with" in err[-1]
    assert (run / "last.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Refused values and help
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--method", "adt"], "needs --teacher"),
    (["--method", "aodt", "--teacher", "t.pt"], "--teacher is read by --method adt only"),
    (["--method", "adt", "--teacher", "t.pt", "--aodt-loss", "l3"], "--aodt-loss is read by --method aodt only"),
    (["--method", "adt", "--teacher", "t.pt", "--detach-peer"], "--detach-peer is read by --method aodt only"),
    (["--method", "adt", "--teacher", "t.pt", "--peer-arch", "resnet18"], "--peer-arch is read by --method aodt only"),
    (["--method", "aodt", "--reg-weight", "1"], "--reg-weight is read by --reg alp and trades only"),
    (["--method", "aodt", "--reg", "alp", "--reg-weight", "-1"], "--reg-weight must be a number >= 0"),
    (["--method", "aodt", "--aodt-loss", "l3", "--l3-beta", "1.5"], "--l3-beta must be in [0, 1]"),
    (["--method", "aodt", "--peer-beta", "-0.1"], "--peer-beta must be"),
    (["--method", "aodt", "--aodt-loss", "l3", "--temp", "0"], "--temp must be a positive number"),
    (["--method", "aodt", "--eps", "2"], "--eps must be in [0, 1]"),
    (["--method", "aodt", "--aodt-loss", "l5"], "invalid choice"),
])
def test_bad_values_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        adt_aodt.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


# Each flag that a configuration does not read, typed in that configuration (the flag's value is valid)
UNUSED = [
    *[(["--method", "adt", "--teacher", "t.pt", flag, *value], flag) for flag, value in (
        ("--peer-arch", ["resnet18"]), ("--peer-beta", ["1"]), ("--detach-peer", []), ("--aodt-loss", ["l1"]),
        ("--temp", ["4"]), ("--l3-beta", ["0.1"]))],
    (["--method", "aodt", "--teacher", "t.pt"], "--teacher"),
    (["--method", "aodt", "--unsafe-load"], "--unsafe-load"),
    (["--method", "aodt", "--override-record"], "--override-record"),
    (["--method", "aodt", "--aodt-loss", "l2", "--temp", "4"], "--temp"),
    (["--method", "aodt", "--aodt-loss", "l4", "--l3-beta", "0.1"], "--l3-beta"),
    (["--method", "aodt", "--aodt-loss", "l3", "--mse-reduction", "mean"], "--mse-reduction"),
    (["--method", "aodt", "--aodt-loss", "l4", "--reg", "trades", "--mse-reduction", "mean"], "--mse-reduction"),
    (["--method", "adt", "--teacher", "t.pt", "--reg-weight", "0"], "--reg-weight"),
    (["--method", "aodt", "--reg", "none", "--reg-weight", "0"], "--reg-weight"),
]


@pytest.mark.parametrize("argv,flag", UNUSED, ids=[" ".join(argv) for argv, _ in UNUSED])
def test_unread_flags_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        adt_aodt.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} is read by "), err


def test_read_flags_are_accepted():
    args_for(adt_aodt, "--method", "aodt", "--aodt-loss", "l3", "--temp", "2", "--l3-beta", "0.2", "--reg", "alp",
             "--mse-reduction", "sum-classes", "--reg-weight", "2", "--peer-beta", "0.5", "--detach-peer")
    args_for(adt_aodt, "--method", "adt", "--reg", "trades", "--reg-weight", "6", "--mse-reduction", "sum-classes",
             "--unsafe-load", "--override-record")


def test_missing_teacher_file_is_one_line(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        adt_aodt.main(["--teacher", f"cnn_small:{tmp_path / 'missing.pt'}", *TINY, "--epochs", "1",
                       "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        adt_aodt.parse_args(["--help"])
    entries = [" ".join(chunk.split()) for chunk in capsys.readouterr().out.split("\n  -")[1:]]
    options = {"-" + entry.split()[0].rstrip(","): entry for entry in entries}
    assert len(options) > 30
    for entry in options.values():
        assert entry.count("(default") <= 1 and "(default: None)" not in entry, entry
    for flag in ("--reg-weight", "--peer-arch", "--rand-start"):
        assert "(default: " in options[flag], options[flag]


@pytest.mark.parametrize("detach", [True, False])
def test_aodt_probe_logs_each_terms_gradient_per_model(detach, cifar_dir, tmp_path):
    """tools/aodt_probe.py (docs/adt_aodt.md §6): one line per step with every term and the gradient norm it sends
    to each model; the MSE sends the peer nothing unless --no-detach-peer."""
    proc = run_script(ROOT / "tools" / "aodt_probe.py", "--out", tmp_path / "probe.jsonl", "--steps", "2", "--",
                      "--arch", "cnn_small", "--peer-arch", "cnn_small", "--train-subset", "64", "--test-subset", "16",
                      "--batch-size", "32", "--attack-steps", "1", "--epochs", "1", "--data-dir", cifar_dir,
                      *([] if detach else ["--no-detach-peer"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    steps, (end,) = rows[:-1], rows[-1:]
    assert [r["step"] for r in steps] == [1, 2] and end["epoch_end"] == 1 and 1 <= end["robust_classes"] <= 10
    for r in steps:
        assert r["grad/mse/robust"] > 0 and r["grad/ce_peer/peer"] > 0 and r["grad/ce_peer/robust"] == 0
        assert (r["grad/mse/peer"] == 0) is detach
        assert r["loss"] == pytest.approx(r["mse"] + r["ce_peer"], rel=1e-5)
