"""iad.py against docs/iad.md: defaults and warm-up per variant and data set, the flags a variant does not
read, each variant's loss against a float64 computation of its formula before and after the warm-up, the
forward passes of each variant and their order, the warm-up boundary, the train-mode attack, one optimisation step of iad1 and iad2 written out as the official
loops compute it, bad values, subprocess smoke runs with a best.pt reload, and resume after a kill."""

import copy
import os
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
    check_resume_in_process,
    np_log_softmax,
    random_logits,
    read_metrics,
    run_script,
    setup_models,
)

import common
import iad

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "2", "--lr", "0.02", "--device", "cpu"]


@pytest.fixture(scope="module")
def nat_teacher_ckpt(tmp_path_factory):
    """A second cnn_small in the suite's format, standing in for the naturally trained T_st."""
    torch.manual_seed(5)
    model = common.build_model("cnn_small")
    path = tmp_path_factory.mktemp("nat_teacher") / "nat_teacher.pt"
    common.save_checkpoint(path, common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar10", args={}))
    return path


# ---------------------------------------------------------------------------------------------
# Defaults (iad.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults_and_warm_up_per_variant_and_dataset():
    a = args_for(iad)
    assert (a.variant, a.arch, a.temp, a.alpha, a.beta, a.begin, a.introspection_temp) == (
        "iad1", "resnet18", 1.0, 1.0, 0.1, 60, "code")
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_schedule, a.lr_milestones) == (
        200, 128, 0.1, 0.9, 2e-4, "code", None)
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "train", "uniform")
    assert (a.monitor, a.eval_every, a.seed, a.test_batch_size, a.nat_teacher) == ("pgd10-ard", 1, 1, None, None)
    a.device = "cpu"
    common.setup_device(a)  # the monitor's batch is sized for the device: 128 on the CPU, as IAD's scripts
    assert a.test_batch_size == 128
    b = args_for(iad, "--variant", "iad2")
    assert (b.lambda2, b.lambda3, b.begin, b.nat_teacher) == (0.5, 0.25, 40, os.path.abspath("st.pt"))  # stored absolute
    assert args_for(iad, "--dataset", "cifar100").begin == 80 == args_for(iad, "--variant", "iad2", "--dataset", "cifar100").begin
    assert args_for(iad, "--begin", "0").begin == 0  # IAD Table 6 "0 epochs"
    assert args_for(iad, "--variant", "ard").begin is None and args_for(iad, "--variant", "akd2").begin is None


def test_lr_schedules():
    code, paper = args_for(iad), args_for(iad, "--lr-schedule", "paper")
    short = args_for(iad, "--lr-milestones", "20", "25", "--epochs", "30")
    epochs = (1, 100, 101, 150, 151, 200)
    assert [iad.lr_at(e, code) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.01])  # D-IAD-1
    assert [iad.lr_at(e, paper) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert [iad.lr_at(e, short) for e in (20, 21, 25, 26)] == pytest.approx([0.1, 0.01, 0.01, 1e-3])


@pytest.mark.parametrize("argv,needle", [
    (["--variant", "iad2"], "--nat-teacher"),
    (["--variant", "akd2"], "--nat-teacher"),
    (["--nat-teacher", "st.pt"], "--nat-teacher"),
    (["--variant", "ard", "--begin", "5"], "--begin"),
    (["--variant", "akd2", "--nat-teacher", "s.pt", "--begin", "5"], "--begin"),
    (["--begin", "-1"], "--begin"),
    (["--alpha", "1.5"], "--alpha"),
    (["--beta", "-0.1"], "--beta"),
    (["--variant", "iad2", "--nat-teacher", "s.pt", "--lambda2", "0.8", "--lambda3", "0.5"], "--lambda2 + --lambda3"),
    (["--eps", "2"], "--eps"),
    (["--variant", "iad3"], "--variant"),
])
def test_bad_values_are_refused_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        iad.parse_args(["--teacher", "t.pt", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


# Each flag typed with a variant that does not read it: one line naming the flag, exit 2 (docs/iad.md §3)
READERS = [(("--alpha", "0.5"), ("iad1", "ard")), (("--lambda2", "0.4"), ("iad2", "akd2")),
           (("--lambda3", "0.2"), ("iad2", "akd2")), (("--beta", "0.5"), ("iad1", "iad2")),
           (("--begin", "3"), ("iad1", "iad2")), (("--introspection-temp", "paper"), ("iad1", "iad2")),
           (("--nat-teacher", "s.pt"), ("iad2", "akd2")), (("--nat-teacher-arch", "resnet18"), ("iad2", "akd2")),
           (("--nat-teacher-norm", "none"), ("iad2", "akd2")), (("--nat-teacher-shortcut-from", "act"), ("iad2", "akd2"))]


@pytest.mark.parametrize("flag,value,readers,variant", [
    (flag, value, readers, variant) for (flag, value), readers in READERS for variant in iad.VARIANTS if variant not in readers])
def test_a_flag_the_variant_does_not_read_is_refused(flag, value, readers, variant, capsys):
    nat = ["--nat-teacher", "s.pt"] if variant in iad.TWO_TEACHERS else []
    with pytest.raises(SystemExit) as e:
        iad.parse_args(["--teacher", "t.pt", "--variant", variant, *nat, flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {flag} is read by --variant {' and '.join(readers)} only, not by {variant}"], err


def test_lr_schedule_is_refused_when_milestones_replace_it(capsys):
    with pytest.raises(SystemExit) as e:
        iad.parse_args(["--teacher", "t.pt", "--lr-milestones", "20", "25", "--lr-schedule", "paper"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --lr-schedule is not read when --lr-milestones replaces the schedule"], err


def test_warm_up_is_zero_indexed():
    """IAD-I.py `if epoch >= args.begin` counts epochs from 0: with --begin 60 the 1-indexed epochs 1-60
    use the base loss and 61-200 the full one."""
    for variant, begin in (("iad1", 60), ("iad2", 40)):
        a = args_for(iad, "--variant", variant)
        assert [iad.introspection_on(e, a) for e in (1, begin, begin + 1, 200)] == [False, False, True, True]
    assert iad.introspection_on(1, args_for(iad, "--begin", "0"))
    assert not any(iad.introspection_on(e, args_for(iad, "--variant", v)) for v in ("ard", "akd2") for e in (1, 100, 200))


# ---------------------------------------------------------------------------------------------
# Losses against float64 formulas (iad.md §1)
# ---------------------------------------------------------------------------------------------

def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kl_rows(target, pred):
    """Per-sample KL(σ(target) ‖ σ(pred)) in float64."""
    p = np_softmax(target)
    return (p * (np.log(p) - np_log_softmax(pred))).sum(1)


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def logits_set(num_classes, b=8):
    z = {k: random_logits(b, num_classes, seed) for k, seed in
         (("adv", 1), ("nat", 2), ("teacher", 3), ("self", 4), ("guide", 5), ("st", 6))}
    y = torch.arange(b) % num_classes
    return z, y


@pytest.mark.parametrize("alpha,temp,beta,itemp", [(1.0, 1.0, 0.1, "code"), (0.7, 3.0, 0.5, "code"),
                                                   (0.7, 3.0, 1.0, "paper")])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_iad1_and_ard_loss_match_formula(alpha, temp, beta, itemp, num_classes):
    a = args_for(iad, "--alpha", str(alpha), "--temp", str(temp), "--beta", str(beta), "--introspection-temp", itemp)
    z, y = logits_set(num_classes)
    n = {k: v.numpy() for k, v in z.items()}
    kl = np_kl_rows(n["teacher"] / temp, n["adv"] / temp).mean()  # batchmean, teacher on clean x
    ce = np_ce(n["nat"], y.numpy())
    base = alpha * temp ** 2 * kl + (1 - alpha) * ce
    # before the warm-up (and the ard variant): the base loss only
    for args in (a, args_for(iad, "--variant", "ard", "--alpha", str(alpha), "--temp", str(temp))):
        loss, terms = iad.loss_fn(z["adv"], z["nat"], z["teacher"], y, args)
        assert abs(loss.item() - base) < 1e-6 * max(1.0, abs(base)) and "intro" not in terms
    # after: a_i from T(x'), (1 - a_i) on the untempered introspection KL, weight alpha, no tau^2 (code)
    trust = np_softmax(n["guide"])[np.arange(8), y.numpy()] ** beta
    t_i, scale = (temp, temp ** 2) if itemp == "paper" else (1.0, 1.0)
    intro = ((1 - trust) * np_kl_rows(n["self"] / t_i, n["adv"] / t_i)).sum() / 8
    expected = base + alpha * scale * intro
    loss, terms = iad.loss_fn(z["adv"], z["nat"], z["teacher"], y, a, z["self"], z["guide"])
    assert abs(loss.item() - expected) < 1e-6 * max(1.0, abs(expected))
    assert terms["intro"].item() == pytest.approx(intro, rel=1e-6, abs=1e-9)
    assert terms["trust"].item() == pytest.approx(trust.mean(), rel=1e-9)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-9) and terms["ce"].item() == pytest.approx(ce, rel=1e-9)


@pytest.mark.parametrize("a1,a2,temp,beta,itemp", [(0.5, 0.25, 1.0, 0.1, "code"), (0.3, 0.6, 2.0, 0.5, "code"),
                                                   (0.5, 0.25, 2.0, 0.1, "paper")])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_iad2_and_akd2_loss_match_formula(a1, a2, temp, beta, itemp, num_classes):
    flags = ["--lambda2", str(a1), "--lambda3", str(a2), "--temp", str(temp)]
    a = args_for(iad, "--variant", "iad2", *flags, "--beta", str(beta), "--introspection-temp", itemp)
    z, y = logits_set(num_classes)
    n = {k: v.numpy() for k, v in z.items()}
    ce = np_ce(n["adv"], y.numpy())  # CE on S(x')
    kl_at_rows = np_kl_rows(n["teacher"] / temp, n["adv"] / temp)  # T_at(x')
    kl_st = np_kl_rows(n["st"] / temp, n["adv"] / temp).mean()  # T_st(x')
    before = (1 - a1 - a2) * ce + a1 * temp ** 2 * kl_at_rows.mean() + a2 * temp ** 2 * kl_st
    for args in (a, args_for(iad, "--variant", "akd2", *flags)):
        loss, terms = iad.loss_fn_akd2(z["adv"], z["teacher"], z["st"], y, args)
        assert abs(loss.item() - before) < 1e-6 * max(1.0, abs(before)) and "intro" not in terms
    trust = np_softmax(n["teacher"])[np.arange(8), y.numpy()] ** beta  # a_i from the same T_at(x')
    t_i = temp if itemp == "paper" else 1.0
    intro = ((1 - trust) * np_kl_rows(n["self"] / t_i, n["adv"] / t_i)).sum() / 8
    kl_at = (trust * kl_at_rows).sum() / 8
    after = (1 - a1 - a2) * ce + a1 * temp ** 2 * (kl_at + intro) + a2 * temp ** 2 * kl_st  # intro inside tau^2
    loss, terms = iad.loss_fn_akd2(z["adv"], z["teacher"], z["st"], y, a, z["self"])
    assert abs(loss.item() - after) < 1e-6 * max(1.0, abs(after))
    assert terms["kl_at"].item() == pytest.approx(kl_at, rel=1e-9) and terms["intro"].item() == pytest.approx(intro, rel=1e-6)
    assert terms["kl_st"].item() == pytest.approx(kl_st, rel=1e-9)


def test_trust_is_a_constant_and_the_introspection_target_is_not_detached():
    z, y = logits_set(10)
    z = {k: v.clone().requires_grad_(True) for k, v in z.items()}
    loss, _ = iad.loss_fn(z["adv"], z["nat"], z["teacher"], y, args_for(iad, "--beta", "1"), z["self"], z["guide"])
    g_self, g_guide = torch.autograd.grad(loss, [z["self"], z["guide"]], allow_unused=True)
    assert g_guide is None and g_self.abs().max() > 1e-3  # a_i carries no gradient; sigma(S(x)) does
    loss, _ = iad.loss_fn_akd2(z["adv"], z["teacher"], z["st"], y, args_for(iad, "--variant", "iad2", "--beta", "1"), z["self"])
    g_self, = torch.autograd.grad(loss, [z["self"]])
    assert g_self.abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Attack, forward passes, warm-up boundary (iad.md §1-2)
# ---------------------------------------------------------------------------------------------

def test_inner_max_train_mode_unclamped_start_raises_ce():
    a = args_for(iad, "--attack-steps", "5")
    student, _, x, y = setup_models()
    x[:, :, :4] = 0.0  # dark rows: the unclamped uniform start leaves [0,1] there
    first = []
    hook = student.register_forward_pre_hook(lambda m, inp: first.append(inp[0].detach().clone()) if not first else None)
    before = [b.clone() for b in student.buffers()]
    x_adv = iad.inner_max(student, x, y, a)
    hook.remove()
    assert first[0].min() < 0
    assert student.training and any(not torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    probe = copy.deepcopy(student)
    with torch.no_grad():
        assert F.cross_entropy(probe(x_adv), y, reduction="sum") > F.cross_entropy(probe(x), y, reduction="sum") + 1e-3


def forward_passes(variant, epoch):
    """Train-mode student passes and teacher calls of one train_step, as (model, training, input) triples."""
    a = args_for(iad, "--variant", variant, "--begin", "3") if variant in ("iad1", "iad2") else args_for(iad, "--variant", variant)
    student, teacher, x, y = setup_models()
    nat_teacher = common.freeze(common.build_model("cnn_small"))
    seen = []
    for name, m in (("S", student), ("T", teacher), ("T_st", nat_teacher)):
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.append(
            (name, mod.training, "x" if torch.equal(inp[0], x) else "x'")))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    terms = iad.train_step(student, teacher, nat_teacher, opt, x, y, epoch, a)
    return [s for s in seen if s[0] == "S"], [s for s in seen if s[0] != "S"], terms


ATTACK = [("S", True, "x'")] * 10


@pytest.mark.parametrize("variant,epoch,student_after_attack,teachers", [
    # iad1: S(x'), basicop S(x') (unused), [S(x) introspection target], S(x) CE; T(x), [T(x') for a_i]
    ("iad1", 3, ["x'", "x'", "x"], [("T", "x")]),
    ("iad1", 4, ["x'", "x'", "x", "x"], [("T", "x"), ("T", "x'")]),
    ("ard", 100, ["x'", "x"], [("T", "x")]),
    # iad2: S(x'), [S(x) introspection target]; both teachers on x'
    ("iad2", 3, ["x'"], [("T", "x'"), ("T_st", "x'")]),
    ("iad2", 4, ["x'", "x"], [("T", "x'"), ("T_st", "x'")]),
    ("akd2", 100, ["x'"], [("T", "x'"), ("T_st", "x'")]),
])
def test_forward_passes_and_warm_up_boundary(variant, epoch, student_after_attack, teachers):
    """With --begin 3, 1-indexed epoch 3 is 0-indexed epoch 2 = begin - 1 (no introspection) and epoch 4
    is 0-indexed 3 = begin (introspection): the term and its passes appear exactly there."""
    students, teacher_calls, terms = forward_passes(variant, epoch)
    assert students == ATTACK + [("S", True, s) for s in student_after_attack]
    assert teacher_calls == [(t, False, s) for t, s in teachers]  # teachers only ever run in eval mode
    assert ("intro" in terms) is (epoch == 4)


# ---------------------------------------------------------------------------------------------
# One optimisation step against the official loops written out (iad.md §1, IAD-I.py / IAD-II.py train())
# ---------------------------------------------------------------------------------------------

def official_attack(ref, x, y):
    """AttackPGD: train mode, x + U(-eps, eps) unclamped, CE summed, 3 steps of 2/255; returns S(x'), x'."""
    x_adv = x + torch.zeros_like(x).uniform_(-8 / 255, 8 / 255)
    for _ in range(3):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(ref(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + 2 / 255 * g.sign(), x - 8 / 255), x + 8 / 255), 0, 1)
    return ref(x_adv), x_adv


def kl_none(log_q, p):
    return F.kl_div(log_q, p, reduction="none")  # nn.KLDivLoss(reduce=False)


def official_alpha(guide, y, beta):
    alpha = torch.ones(len(y))
    for i in range(len(y)):  # the scripts' per-sample loop with .item()
        alpha[i] = F.softmax(guide, dim=1)[i][y[i].item()].pow(beta).item()
    return alpha


def test_one_iad1_step_after_warm_up_equals_the_written_out_loop():
    a = args_for(iad, "--attack-steps", "3", "--alpha", "0.8", "--temp", "2", "--beta", "0.5", "--begin", "0")
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = iad.train_step(student, teacher, None, opt, x, y, 1, a)

    torch.manual_seed(7)
    ref.train()
    with torch.no_grad():
        t_out = teacher(x)
    outputs, x_adv = official_attack(ref, x, y)
    ref(x_adv).detach()  # basicop
    with torch.no_grad():
        alpha = official_alpha(teacher(x_adv), y, 0.5)
    b, t = len(y), 2.0
    loss = (0.8 * t * t * (1 / b) * kl_none(F.log_softmax(outputs / t, 1), F.softmax(t_out / t, 1)).sum(1).sum()
            + 0.8 * (1 / b) * kl_none(F.log_softmax(outputs, 1), F.softmax(ref(x), 1)).sum(1).mul(1 - alpha).sum()
            + 0.2 * F.cross_entropy(ref(x), y))
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


def test_one_iad2_step_after_warm_up_equals_the_written_out_loop():
    a = args_for(iad, "--variant", "iad2", "--attack-steps", "3", "--temp", "2", "--beta", "0.5", "--begin", "0")
    student, teacher, x, y = setup_models()
    torch.manual_seed(3)
    nat_teacher = common.freeze(common.build_model("cnn_small"))
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = iad.train_step(student, teacher, nat_teacher, opt, x, y, 1, a)

    torch.manual_seed(7)
    ref.train()
    outputs, x_adv = official_attack(ref, x, y)
    with torch.no_grad():
        t_out, st_out = teacher(x_adv), nat_teacher(x_adv)
        alpha = official_alpha(teacher(x_adv), y, 0.5)
    b, t = len(y), 2.0
    log_q = F.log_softmax(outputs / t, 1)
    loss = (0.25 * F.cross_entropy(outputs, y)
            + 0.5 * t * t * ((1 / b) * kl_none(log_q, F.softmax(t_out / t, 1)).sum(1).mul(alpha).sum()
                             + (1 / b) * kl_none(F.log_softmax(outputs, 1), F.softmax(ref(x), 1)).sum(1).mul(1 - alpha).sum())
            + 0.25 * t * t * (1 / b) * kl_none(log_q, F.softmax(st_out / t, 1)).sum(1).sum())
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


# ---------------------------------------------------------------------------------------------
# Subprocess runs: smoke + best.pt reload per variant; resume with --resume alone after a kill
# ---------------------------------------------------------------------------------------------

def variant_argv(variant, teacher, nat_teacher, data_dir):
    argv = ["--variant", variant, "--teacher", teacher, *TINY, "--data-dir", data_dir]
    if variant in ("iad2", "akd2"):
        argv += ["--nat-teacher", nat_teacher]
    return argv + (["--begin", "1"] if variant in ("iad1", "iad2") else [])


@pytest.mark.parametrize("variant", iad.VARIANTS)
def test_smoke_subprocess_and_best_reload(variant, cifar_dir, teacher_ckpt, nat_teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "iad.py", *variant_argv(variant, teacher_ckpt, nat_teacher_ckpt, cifar_dir),
                      "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"iad-{variant}__cifar10__cnn_small__s1__")  # the variant in the name
    saved = json.loads((run / "args.json").read_text())
    assert (saved["variant"], saved["teacher_arch"], saved["lr_schedule"]) == (variant, "cnn_small", "code")
    lines = read_metrics(run)
    teachers = [m for m in lines if m["epoch"] == 0]
    assert "teacher/robust" in teachers[0] and (len(teachers) == 2) is (variant in ("iad2", "akd2"))
    epochs = [m for m in lines if m["epoch"] > 0]
    assert [m["epoch"] for m in epochs] == [1, 2] and all("test_robust" in m for m in epochs)
    # --begin 1: epoch 1 (0-indexed 0) is the warm-up, epoch 2 has the introspection term
    assert ["intro" in m for m in epochs] == ([False, True] if variant in ("iad1", "iad2") else [False, False])
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"] == {"monitor": "pgd10-ard", "value": max(m["test_robust"] for m in epochs),
                              "epoch": best["epoch"]}


def test_resume_alone_equals_the_uninterrupted_run(cifar_dir, teacher_ckpt, nat_teacher_ckpt, tmp_path):
    """iad2 with --begin 1: the resumed epochs cross the warm-up boundary, and both teacher paths come back."""
    full, part = check_resume_in_process(iad, variant_argv("iad2", teacher_ckpt, nat_teacher_ckpt, cifar_dir), tmp_path)
    saved = json.loads((part / "args.json").read_text())
    assert saved["nat_teacher"] == str(nat_teacher_ckpt) and saved["begin"] == 1 and saved["resumes"][0]["changed"] == {}
