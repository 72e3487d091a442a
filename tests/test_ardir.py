"""ardir.py against docs/ardir.md: defaults per combination and data set, the internal-representation
distance and the label-corrected KL against float64 computations of the formulas, β = 0 as ard.py's loss,
which model sees which input per combination, the attacks, one optimisation step computed independently,
subprocess smoke runs per combination, resume after a kill, and the one-line refusals."""

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
    check_resume_in_process,
    np_kl_terms,
    np_log_softmax,
    random_logits,
    read_metrics,
    run_script,
    setup_models,
)

import ard
import ardir
import common

CNN = ["--arch", "cnn_small", "--ir-layers", "layer1,layer2,layer3"]
TINY = [*CNN, "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--attack-steps", "2",
        "--lr", "0.02", "--device", "cpu"]
PREACT_SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]  # PreActResNet-18 layer1..layer4


def feature_maps(shapes, b, seed, relu=False):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, *s, generator=g, dtype=torch.float64) for s in shapes]
    return [m.clamp(min=0) for m in maps] if relu else maps


def np_ir(feats_s, feats_t, norm="channel", sqrt=True):
    """IR_i of docs/ardir.md §1 in float64 numpy: per layer û, the 1/(H·W) mean of Σ_c (û^S − û^T)², summed
    over the layers, then sqrt(· + 1e-12). norm 'spatial-sum' is the literal Eq. 10 on relu(φ)."""
    d = 0.0
    for s, t in zip(feats_s, feats_t):
        u = []
        for phi in (s.detach().double().numpy(), t.detach().double().numpy()):
            if norm == "channel":
                u.append(phi / (np.sqrt((phi ** 2).sum(1, keepdims=True)) + 1e-10))
            else:
                phi = np.maximum(phi, 0)
                u.append(phi / (phi.sum((2, 3), keepdims=True) + 1e-10))
        h, w = s.shape[2:]
        d = d + ((u[0] - u[1]) ** 2).sum((1, 2, 3)) / (h * w)
    return np.sqrt(d + 1e-12) if sqrt else d


# ---------------------------------------------------------------------------------------------
# Defaults (docs/ardir.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults_per_combination_and_data_set():
    a = args_for(ardir)
    assert (a.arch, a.combo, a.beta, a.temp, a.t2, a.kl_reduction, a.label_correction) == \
        ("preact_resnet18", "RC", 0.6, 1.0, True, "batchmean", True)
    assert (a.ir_layers, a.ir_norm, a.ir_sqrt, a.clean_forward) == \
        (["layer1", "layer2", "layer3", "layer4"], "channel", True, True)
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_schedule, a.lr_milestones) == \
        (200, 128, 0.1, 0.9, 5e-4, "paper", None)
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "train", "uniform")
    assert (a.monitor, a.eval_every, a.seed) == ("pgd20-sat", 1, 0)
    betas = {(d, c): args_for(ardir, "--dataset", d, "--combo", c).beta for d in ("cifar10", "svhn", "cifar100")
             for c in ("RC", "CC", "RA")}
    assert betas == {("cifar10", "RC"): 0.6, ("cifar10", "CC"): 0.4, ("cifar10", "RA"): 0.1,  # Table 2
                     ("svhn", "RC"): 0.8, ("svhn", "CC"): 0.2, ("svhn", "RA"): 0.2,  # Table 3
                     ("cifar100", "RC"): 0.6, ("cifar100", "CC"): 0.4, ("cifar100", "RA"): 0.1}
    svhn = args_for(ardir, "--dataset", "svhn")
    assert svhn.attack_step == 1 / 255  # the monitor's step on SVHN: test_svhn_and_cifar100_runs
    assert args_for(ardir, "--combo", "RA", "--beta", "0").beta == 0.0  # the ARD baseline
    assert args_for(ardir, "--dataset", "svhn", "--attack-step", "2/255").attack_step == 2 / 255


def test_lr_schedules():
    paper, code = args_for(ardir), args_for(ardir, "--lr-schedule", "iad-code")
    short = args_for(ardir, "--lr-milestones", "20", "25", "--epochs", "30")
    epochs = (1, 99, 100, 101, 149, 150, 200)
    assert [ardir.lr_at(e, paper) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-3])
    assert [ardir.lr_at(e, code) for e in epochs] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])
    assert [ardir.lr_at(e, short) for e in (20, 21, 25, 26, 30)] == pytest.approx([0.1, 0.01, 0.01, 1e-3, 1e-3])


# ---------------------------------------------------------------------------------------------
# The internal-representation distance (ARDIR Eq. 7-11, D-ARDIR-1, -2)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["channel", "spatial-sum"])
@pytest.mark.parametrize("sqrt", [True, False])
def test_ir_distance_matches_float64_formula(norm, sqrt):
    a = args_for(ardir, "--ir-norm", norm, *([] if sqrt else ["--no-ir-sqrt"]))
    fs, ft = feature_maps(PREACT_SHAPES, 3, 1), feature_maps(PREACT_SHAPES, 3, 2)
    got = ardir.ir_distance(fs, ft, a)
    want = np_ir(fs, ft, norm, sqrt)
    assert got.shape == (3,) and np.allclose(got.numpy(), want, rtol=1e-9, atol=0)
    # the 1/(H·W) mean, not a sum: each PreActResNet-18 layer of random maps adds about E‖û^S − û^T‖² = 2
    if norm == "channel" and not sqrt:
        assert np.all(np.abs(want - 2 * len(PREACT_SHAPES)) < 0.5)


def test_ir_epsilons_are_where_the_spec_puts_them():
    a, b = args_for(ardir), args_for(ardir, "--no-ir-sqrt")
    zero = [torch.zeros(2, 4, 3, 3, dtype=torch.float64)]
    assert torch.allclose(ardir.ir_distance(zero, zero, a), torch.full((2,), 1e-6, dtype=torch.float64), rtol=1e-12)
    tiny = [torch.full((1, 4, 2, 2), 1e-10, dtype=torch.float64)]  # ‖φ‖ = 2e-10: û = φ / (2e-10 + 1e-10) = 1/3
    want = (1 / 3) ** 2 * 4  # Σ_c (û − 0)² at every position, spatial mean
    assert ardir.ir_distance(tiny, [torch.zeros_like(tiny[0])], b).item() == pytest.approx(want, rel=1e-12)


def test_ir_invariant_to_positive_per_position_scaling():
    a = args_for(ardir)
    fs = feature_maps(PREACT_SHAPES, 2, 3)
    ft = [f + 0.3 * n for f, n in zip(fs, feature_maps(PREACT_SHAPES, 2, 4))]  # near the student: a small IR
    g = torch.Generator().manual_seed(5)
    per_position = [f * torch.exp(torch.randn(f.shape[0], 1, *f.shape[2:], generator=g, dtype=f.dtype)) for f in fs]
    per_channel = [f * torch.exp(torch.randn(1, f.shape[1], 1, 1, generator=g, dtype=f.dtype)) for f in fs]
    base = ardir.ir_distance(fs, ft, a)
    assert torch.allclose(ardir.ir_distance(per_position, ft, a), base, rtol=1e-8, atol=0)
    assert not torch.allclose(ardir.ir_distance(per_channel, ft, a), base, rtol=1e-3)  # not trivially invariant
    # the literal Eq. 10 normalises per channel instead: invariant to the other scaling
    b = args_for(ardir, "--ir-norm", "spatial-sum")
    rs, rt = [f.clamp(min=0) for f in fs], [f.clamp(min=0) for f in ft]
    scaled = [f * torch.exp(torch.randn(1, f.shape[1], 1, 1, generator=g, dtype=f.dtype)) for f in rs]
    assert torch.allclose(ardir.ir_distance(scaled, rt, b), ardir.ir_distance(rs, rt, b), rtol=1e-8, atol=0)
    moved = [f.clamp(min=0) for f in per_position]
    assert not torch.allclose(ardir.ir_distance(moved, rt, b), ardir.ir_distance(rs, rt, b), rtol=1e-3)


@pytest.mark.parametrize("norm", ["channel", "spatial-sum"])
def test_ir_gradient_finite_at_student_equal_teacher_and_at_zero_positions(norm):
    a = args_for(ardir, "--ir-norm", norm)
    ft = feature_maps(PREACT_SHAPES, 2, 6)
    fs = [f.clone().requires_grad_(True) for f in ft]
    grads = torch.autograd.grad(ardir.ir_distance(fs, ft, a).mean(), fs)
    assert all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads)  # sqrt(0 + 1e-12): gradient 0
    relu_maps = feature_maps(PREACT_SHAPES, 2, 7, relu=True)
    for f in relu_maps:
        f[:, :, :2] = 0  # positions where every channel is 0, as after a ReLU
    fs = [f.clone().requires_grad_(True) for f in relu_maps]
    grads = torch.autograd.grad(ardir.ir_distance(fs, ft, a).mean(), fs)
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# The KL term with label correction, and the whole loss (ARDIR Eq. 12, Algorithm 1)
# ---------------------------------------------------------------------------------------------

def corrected_case(num_classes=10):
    """Teacher logits that classify samples 0..3 right and 4..7 wrong."""
    t = random_logits(8, num_classes, 3)
    y = t.argmax(1).clone()
    y[4:] = (y[4:] + 1) % num_classes
    return random_logits(8, num_classes, 1), t, y


@pytest.mark.parametrize("temp", [1.0, 30.0])
def test_label_correction_per_sample(temp):
    s, t, y = corrected_case()
    feats = feature_maps([(4, 2, 2)], 8, 9)
    on = args_for(ardir, "--beta", "0", "--temp", str(temp))
    off = args_for(ardir, "--beta", "0", "--temp", str(temp), "--no-label-correction")
    ls = np_log_softmax(s.numpy() / temp)
    kl_soft = np_kl_terms(t.numpy() / temp, s.numpy() / temp).sum(1)
    for i in range(8):
        one = slice(i, i + 1)
        got, terms = ardir.loss_fn(s[one], [f[one] for f in feats], t[one], [f[one] for f in feats], y[one], on)
        want = temp ** 2 * (-ls[i, y[i]] if i >= 4 else kl_soft[i])  # corrected: t²·CE(σ_t(S(x')), y), one-hot kept
        assert got.item() == pytest.approx(want, rel=1e-9)
        assert terms["teacher_wrong"].item() == (i >= 4)
        got_off, _ = ardir.loss_fn(s[one], [f[one] for f in feats], t[one], [f[one] for f in feats], y[one], off)
        assert got_off.item() == pytest.approx(temp ** 2 * kl_soft[i], rel=1e-9)
    whole, terms = ardir.loss_fn(s, feats, t, feats, y, on)
    assert terms["teacher_wrong"].item() == 0.5
    assert whole.item() == pytest.approx(temp ** 2 * np.mean(np.where(np.arange(8) >= 4, -ls[np.arange(8), y], kl_soft)),
                                         rel=1e-9)


@pytest.mark.parametrize("beta,temp,reduction,t2", [(0.6, 1.0, "batchmean", True), (0.1, 4.0, "batchmean", True),
                                                    (0.4, 4.0, "elemmean", False), (1.0, 2.0, "sum", True)])
def test_loss_matches_eq12(beta, temp, reduction, t2):
    a = args_for(ardir, "--beta", str(beta), "--temp", str(temp), "--kl-reduction", reduction, *([] if t2 else ["--no-t2"]))
    s, t, y = corrected_case()
    shapes = [(8, 8, 8), (16, 4, 4), (32, 2, 2)]
    fs, ft = feature_maps(shapes, 8, 11), feature_maps(shapes, 8, 12)
    loss, terms = ardir.loss_fn(s, fs, t, ft, y, a)
    p = np.exp(np_log_softmax(t.numpy() / temp))
    q = np.where((np.arange(8) >= 4)[:, None], np.eye(10)[y.numpy()], p)
    e = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - np_log_softmax(s.numpy() / temp)), 0.0)
    kl = {"batchmean": e.sum() / 8, "elemmean": e.mean(), "sum": e.sum()}[reduction]
    ir = np_ir(fs, ft).mean()
    want = (1 - beta) * (temp ** 2 if t2 else 1.0) * kl + beta * ir
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-9) and terms["ir"].item() == pytest.approx(ir, rel=1e-9)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_beta_0_t30_uncorrected_elemmean_is_ards_loss(num_classes):
    a = args_for(ardir, "--beta", "0", "--temp", "30", "--no-label-correction", "--kl-reduction", "elemmean")
    ard_args, _ = ard.parse_args(["--teacher", "t.pt"])  # alpha 1, tau 30, elemmean: its CE weighs 0
    s_adv, s_nat, t = (random_logits(8, num_classes, seed) for seed in (1, 2, 3))
    y = torch.arange(8) % num_classes
    feats = feature_maps([(4, 2, 2)], 8, 13)
    s1, s2 = s_adv.clone().requires_grad_(True), s_adv.clone().requires_grad_(True)
    mine, _ = ardir.loss_fn(s1, feats, t, feature_maps([(4, 2, 2)], 8, 14), y, a)
    theirs, _ = ard.loss_fn(s2, s_nat, t, y, ard_args)
    assert abs(mine.item() - theirs.item()) <= 1e-9 * max(1.0, abs(theirs.item()))
    g1, = torch.autograd.grad(mine, s1)
    g2, = torch.autograd.grad(theirs, s2)
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Attacks, inputs per combination, the forward passes
# ---------------------------------------------------------------------------------------------

def test_student_attack_train_mode_unclamped_start_raises_ce():
    a = args_for(ardir, "--attack-steps", "5")
    student, _, x, y = setup_models()
    x[:, :, :4] = 0.0
    first = []
    hook = student.register_forward_pre_hook(lambda m, inp: first.append(inp[0].detach().clone()) if not first else None)
    before = [b.clone() for b in student.buffers()]
    x_adv = ardir.inner_max(student, x, y, a)
    hook.remove()
    assert first[0].min() < 0  # D-ARDIR-5: x + U(-eps, eps), not clamped before the first forward
    assert student.training and any(not torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    probe = copy.deepcopy(student).eval()
    with torch.no_grad():
        assert F.cross_entropy(probe(x_adv), y, reduction="sum") > F.cross_entropy(probe(x), y, reduction="sum") + 1e-3
    b = args_for(ardir, "--attack-steps", "3", "--attack-bn", "eval")
    before = [t.clone() for t in student.buffers()]
    ardir.inner_max(student, x, y, b)
    assert student.training and all(torch.equal(u, v) for u, v in zip(before, student.buffers()))


def test_teacher_attack_eval_mode_raises_teachers_ce():
    a = args_for(ardir, "--combo", "RA", "--attack-steps", "5")
    _, teacher, x, y = setup_models()
    before = [b.clone() for b in teacher.buffers()]
    x_dot = ardir.teacher_inner_max(teacher, x, y, a)
    assert not teacher.training and all(torch.equal(u, v) for u, v in zip(before, teacher.buffers()))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert (x_dot - x).abs().max() <= a.eps + 1e-7 and 0 <= x_dot.min() and x_dot.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(teacher(x_dot), y, reduction="sum") > F.cross_entropy(teacher(x), y, reduction="sum") + 1e-3


def cnn_stages(model, x):
    """layer1..layer3 outputs and logits of cnn_small, written out module by module (no hooks)."""
    f1 = model.layer1(x)
    f2 = model.layer2(f1)
    f3 = model.layer3(f2)
    return [f1, f2, f3], model.linear(f3.flatten(1))


@pytest.mark.parametrize("combo,extra", [("RC", []), ("CC", []), ("RA", []), ("RC", ["--no-clean-forward"]),
                                         ("RC", ["--attack-bn", "eval"])])
def test_inputs_per_combination_and_forward_passes(combo, extra, monkeypatch):
    a = args_for(ardir, "--combo", combo, *CNN, "--attack-steps", "3", *extra)
    student, teacher, x, y = setup_models()
    s_seen, t_seen, captured = [], [], {}
    student.register_forward_pre_hook(lambda m, inp: s_seen.append((m.training, torch.is_grad_enabled(), inp[0].detach())))
    teacher.register_forward_pre_hook(lambda m, inp: t_seen.append((m.training, torch.is_grad_enabled(), inp[0].detach())))
    real = ardir.loss_fn

    def spy(logits_adv, feats_adv, logits_teacher, feats_teacher, y_, args):
        captured.update(logits_adv=logits_adv.detach(), feats_adv=[f.detach() for f in feats_adv],
                        logits_teacher=logits_teacher, feats_teacher=feats_teacher,
                        state=copy.deepcopy(student.state_dict()))  # the weights of this step, before the update
        return real(logits_adv, feats_adv, logits_teacher, feats_teacher, y_, args)

    monkeypatch.setattr(ardir, "loss_fn", spy)
    t_buffers = [b.clone() for b in teacher.buffers()]
    ardir.train_step(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), x, y, a)

    attack_mode = "--attack-bn" not in extra
    clean = [] if "--no-clean-forward" in extra else [(True, False, True)]
    assert [(tr, gr, torch.equal(inp, x)) for tr, gr, inp in s_seen] == \
        [(attack_mode, True, False)] * 3 + [(True, True, False)] + clean  # 3 attack passes, S(x'), S(x)
    x_adv = s_seen[3][2]
    assert (x_adv - x).abs().max() <= a.eps + 1e-7
    # the student's features and logits in the loss are those of its one train-mode pass on x'
    ref = common.build_model("cnn_small")
    ref.load_state_dict(captured["state"])
    with torch.no_grad():
        feats, logits = cnn_stages(ref.train(), x_adv)
    assert torch.allclose(captured["logits_adv"], logits, atol=1e-6)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(captured["feats_adv"], feats))
    # the teacher: eval mode, no graph for its loss pass; it sees x for RC/CC, a PGD example against itself for RA
    assert all(not tr for tr, _, _ in t_seen) and all(torch.equal(u, v) for u, v in zip(t_buffers, teacher.buffers()))
    *attack, (_, grad_on, x_dot) = t_seen
    assert not grad_on
    if combo == "RA":
        assert len(attack) == 3 and all(gr for _, gr, _ in attack)
        assert not torch.equal(x_dot, x) and (x_dot - x).abs().max() <= a.eps + 1e-7
        assert 0 <= x_dot.min() and x_dot.max() <= 1 and not torch.equal(x_dot, x_adv)
        with torch.no_grad():
            assert F.cross_entropy(teacher(x_dot), y) > F.cross_entropy(teacher(x), y)
    else:
        assert attack == [] and torch.equal(x_dot, x)
    with torch.no_grad():
        feats_t, logits_t = cnn_stages(teacher, x_dot)
    assert torch.allclose(captured["logits_teacher"], logits_t, atol=1e-6)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(captured["feats_teacher"], feats_t))


def test_amp_bf16_keeps_iterates_and_terms_fp32():
    a = args_for(ardir, *CNN, "--attack-steps", "2", "--amp", "bf16", "--combo", "RA")
    student, teacher, x, y = setup_models()
    assert ardir.inner_max(student, x, y, a).dtype == torch.float32
    assert ardir.teacher_inner_max(teacher, x, y, a).dtype == torch.float32
    terms = ardir.train_step(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), x, y, a)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


# ---------------------------------------------------------------------------------------------
# One optimisation step against the formulas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combo", ["RC", "RA"])
def test_one_step_equals_independent_computation(combo):
    a = args_for(ardir, "--combo", combo, *CNN, "--attack-steps", "2", "--beta", "0.6", "--temp", "2")
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = ardir.train_step(student, teacher, opt, x, y, a)

    eps, step = 8 / 255, 2 / 255
    torch.manual_seed(7)

    def pgd(model, x_adv):  # CE summed, sign step, project, clamp; 2 steps
        for _ in range(2):
            x_adv.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
            x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps), 0, 1)
        return x_adv.detach()

    ref.train()
    x_adv = pgd(ref, x + torch.zeros_like(x).uniform_(-eps, eps))  # train-mode BN, unclamped uniform start
    x_dot = pgd(teacher, x + torch.zeros_like(x).uniform_(-eps, eps)) if combo == "RA" else x
    feats_s, z_adv = cnn_stages(ref, x_adv)
    with torch.no_grad():
        feats_t, z_t = cnn_stages(teacher, x_dot)
        ref(x)  # the unused clean pass (its BN update)
    q = torch.where((z_t.argmax(1) != y)[:, None], F.one_hot(y, 10).float(), F.softmax(z_t / 2, 1))
    log_q = torch.log(torch.where(q > 0, q, torch.ones_like(q)))
    kl = (q * (log_q - F.log_softmax(z_adv / 2, 1))).sum() / len(y)
    d = 0
    for fs, ft in zip(feats_s, feats_t):
        us = fs / (torch.sqrt((fs ** 2).sum(1, keepdim=True)) + 1e-10)
        ut = ft / (torch.sqrt((ft ** 2).sum(1, keepdim=True)) + 1e-10)
        d = d + ((us - ut) ** 2).sum((1, 2, 3)) / (fs.shape[2] * fs.shape[3])
    loss = 0.4 * 4 * kl + 0.6 * torch.sqrt(d + 1e-12).mean()
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


# ---------------------------------------------------------------------------------------------
# Subprocess runs, resume, refusals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combo,beta", [("RC", 0.6), ("CC", 0.4), ("RA", 0.1)])
def test_smoke_subprocess_and_best_reload(combo, beta, cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "ardir.py", "--teacher", teacher_ckpt, "--combo", combo, *TINY, "--epochs", "2",
                      "--data-dir", cifar_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"ardir-{combo}__cifar10__cnn_small__s0__")
    saved = json.loads((run / "args.json").read_text())
    assert (saved["combo"], saved["beta"], saved["ir_layers"], saved["teacher_arch"], saved["wd"]) == \
        (combo, beta, ["layer1", "layer2", "layer3"], "cnn_small", 5e-4)
    lines = read_metrics(run)
    assert lines[0]["epoch"] == 0 and "teacher/robust" in lines[0]
    epochs = lines[1:]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert all({"loss", "kl", "ir", "teacher_wrong", "test_clean", "test_robust"} <= set(m) for m in epochs)
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"] == {"monitor": "pgd20-sat", "value": max(m["test_robust"] for m in epochs),
                              "epoch": best["epoch"]}


@pytest.mark.parametrize("dataset", ["svhn", "cifar100"])
def test_svhn_and_cifar100_runs(dataset, svhn_dir, cifar100_dir, tmp_path):
    data = svhn_dir if dataset == "svhn" else cifar100_dir
    num_classes = common.DATASETS[dataset]
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    common.save_checkpoint(teacher, common.checkpoint_dict(common.build_model("cnn_small", num_classes), kind="best",
                                                           epoch=1, dataset=dataset, args={}))
    ardir.main(["--teacher", str(teacher), "--dataset", dataset, *TINY, "--train-subset", "32", "--test-subset", "16",
                "--epochs", "1", "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run / "args.json").read_text())
    assert (saved["beta"], saved["attack_step"]) == ((0.8, 1 / 255) if dataset == "svhn" else (0.6, 2 / 255))
    assert saved["monitor_attack"]["step"] == saved["attack_step"]  # pgd20-sat: the training step a, 1/255 on SVHN
    assert torch.load(run / "best.pt", weights_only=True)["num_classes"] == num_classes
    assert read_metrics(run)[-1]["epoch"] == 1


def test_resume_alone_equals_the_uninterrupted_run(cifar_dir, teacher_ckpt, tmp_path):
    full, part = check_resume_in_process(ardir, ["--teacher", teacher_ckpt, "--combo", "RA", *TINY,
                                                 "--data-dir", cifar_dir], tmp_path)
    saved = json.loads((part / "args.json").read_text())
    assert saved["combo"] == "RA" and saved["resumes"][0]["changed"] == {}


def one_line(capsys, excinfo):
    err = capsys.readouterr().err.strip().splitlines()
    assert excinfo.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags,needle", [(["--beta", "1.5"], "--beta must be in [0, 1]"),
                                          (["--beta", "-0.1"], "--beta must be in [0, 1]"),
                                          (["--ir-layers", "layer1,,layer2"], "--ir-layers"),
                                          (["--ir-layers", "layer1,layer1"], "--ir-layers"),
                                          (["--combo", "CA"], "--combo"),
                                          (["--temp", "0"], "--temp")])
def test_bad_values_refused(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        ardir.parse_args(["--teacher", "t.pt", *flags])
    assert needle in one_line(capsys, e)


@pytest.mark.parametrize("config,flags", [(["--beta", "0"], ["--ir-norm", "spatial-sum"]),
                                         (["--beta", "0"], ["--no-ir-sqrt"]),
                                         (["--beta", "0"], ["--ir-sqrt"]),
                                         (["--lr-milestones", "20", "25"], ["--lr-schedule", "iad-code"])])
def test_flags_the_configuration_does_not_read_are_refused(config, flags, capsys):
    args_for(ardir, *flags)  # read by the default configuration
    with pytest.raises(SystemExit) as e:
        args_for(ardir, *flags, *config)
    line = one_line(capsys, e)
    assert line.startswith("error: " + flags[0].replace("--no-", "--") + " ") and config[0] in line


@pytest.mark.parametrize("flags,needles", [
    (["--arch", "cnn_small"], ["--ir-layers layer4", "student cnn_small", "layer1,layer2,layer3"]),
    ([*CNN[:2], "--ir-layers", "layer1,linear"], ["--ir-layers linear", "not a feature map"]),
    (["--arch", "resnet56", "--ir-layers", "layer1"], ["--ir-layers layer1", "16x32x32", "16x16x16"]),
    ([*CNN[:2], "--ir-layers", "layer1,block9"], ["--ir-layers block9", "student cnn_small"]),
])
def test_unreachable_stages_end_in_one_line(flags, needles, cifar_dir, teacher_ckpt, tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        ardir.main(["--teacher", str(teacher_ckpt), *flags, "--data-dir", str(cifar_dir), "--device", "cpu",
                    "--train-subset", "32", "--test-subset", "16", "--runs-dir", str(runs)])
    line = one_line(capsys, e)
    assert all(n in line for n in needles), line
    assert not runs.exists()  # nothing written before setup succeeded
