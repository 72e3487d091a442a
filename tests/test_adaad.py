"""adaad.py against docs/adaad.md and boyellow/AdaAD main.py / AT_helper.py: defaults, both losses against
float64 formulas, the search (its ball, box, objective, BN mode, the teacher's share of the gradient), the
forward ledger, one step of each variant against a step written out from the official formulas, the lr
schedule, refused values, and exact resume with --resume alone."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    args_for,
    check_best_reloads,
    check_first_step,
    check_resume_in_process,
    np_kl_terms,
    np_log_softmax,
    random_logits,
    setup_models,
)

import adaad
import common


def test_defaults():
    a = args_for(adaad)
    assert (a.variant, a.arch, a.alpha, a.kl_reduction) == ("adaad", "resnet18", 1.0, "elemmean")
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "eval", "normal001")
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_milestones) == (200, 128, 0.1, 0.9, 5e-4, [100, 150])
    assert (a.monitor, a.eval_every) == ("pgd10-madry", 1)
    assert args_for(adaad, "--dataset", "cifar100").kl_reduction == "batchmean"  # main.py's CIFAR-100 branch
    b = args_for(adaad, "--variant", "adaiad")
    assert (b.temp, b.beta, b.begin, b.alpha, b.kl_reduction) == (30.0, 0.1, 60, 1.0, None)
    assert adaad.TEACHER_ARCHS == {"cifar10": "wrn34_20", "svhn": "wrn34_20", "cifar100": "wrn34_10"}
    a.device = "cpu"
    common.setup_device(a)
    assert a.test_batch_size == 400  # main.py's test loader


def test_lr_schedule_is_main_py_lr_decay():
    a = args_for(adaad)
    for e in range(200):  # main.py lr_decay(epoch, 200), piecewise, 0-indexed epoch e = our epoch e + 1
        official = 0.1 if e < 100 else (0.01 if e < 150 else 0.001)
        assert adaad.lr_at(e + 1, a) == pytest.approx(official, rel=1e-12), e


@pytest.mark.parametrize("reduction", ["elemmean", "batchmean", "sum"])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_adaad_loss_matches_formula(reduction, alpha, num_classes):
    a = args_for(adaad, "--alpha", str(alpha), "--kl-reduction", reduction)
    s_adv, s_nat, t_adv, t_nat = (random_logits(8, num_classes, seed) for seed in (1, 2, 3, 4))
    loss, terms = adaad.loss_fn(s_adv, s_nat, t_adv, t_nat, a)
    reduce = {"elemmean": np.mean, "batchmean": lambda e: e.sum() / len(e), "sum": np.sum}[reduction]
    kl_adv = reduce(np_kl_terms(t_adv.numpy(), s_adv.numpy()))
    kl_nat = reduce(np_kl_terms(t_nat.numpy(), s_nat.numpy()))
    expected = alpha * kl_adv + (1 - alpha) * kl_nat
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (terms["kl_adv"].item(), terms["kl_nat"].item()) == pytest.approx((kl_adv, kl_nat), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("intro", [False, True])
@pytest.mark.parametrize("alpha,temp,beta", [(1.0, 30.0, 0.1), (0.8, 4.0, 0.5)])
def test_adaiad_loss_matches_formula(intro, alpha, temp, beta):
    a = args_for(adaad, "--variant", "adaiad", "--alpha", str(alpha), "--temp", str(temp), "--beta", str(beta))
    s_adv, s_self, s_ce, t_adv = (random_logits(8, 10, seed) for seed in (1, 2, 3, 4))
    y = torch.arange(8) % 10
    loss, terms = adaad.loss_fn_adaiad(s_adv, s_self if intro else None, s_ce, t_adv, y, a)
    kl = np_kl_terms(t_adv.numpy() / temp, s_adv.numpy() / temp).sum() / 8
    ce = -np_log_softmax(s_ce.numpy())[np.arange(8), y.numpy()].mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    if intro:
        trust = np.exp(np_log_softmax(t_adv.numpy()))[np.arange(8), y.numpy()] ** beta  # σ(T(x'))_y^β
        rows = np_kl_terms(s_self.numpy(), s_adv.numpy()).sum(1)  # KL(σ(S(x)) ‖ σ(S(x'))), untempered
        expected += alpha * (rows * (1 - trust)).sum() / 8
        assert terms["trust"].item() == pytest.approx(trust.mean(), rel=1e-9)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ("intro" in terms) == intro


def test_search_maximises_the_disagreement_in_eval_mode_through_both_models():
    a = args_for(adaad, "--attack-steps", "5")
    student, teacher, x, y = setup_models()
    x[:, :, :4] = 0.0  # dark rows: the unclamped N(0, 0.001) start leaves [0, 1] there
    first = []
    hook = student.register_forward_pre_hook(lambda m, inp: first.append(inp[0].detach().clone()) if not first else None)
    modes = []
    student.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    before = [b.clone() for b in student.buffers()]
    torch.manual_seed(3)
    x_adv = adaad.inner_max(student, teacher, x, a)
    hook.remove()
    assert first[0].min() < 0 and (first[0] - x).abs().max() < 0.01  # x + 0.001 N(0, I), not clamped
    assert modes == [False] * 5 and student.training  # BN_eval=True, back to train() on return
    assert all(torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1

    def disagreement(z):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student.eval()(z), 1), F.softmax(teacher(z), 1), reduction="sum").item()
    assert disagreement(x_adv) > disagreement(x) + 1e-3
    student.train()

    # the first step's direction: sign of the gradient of KL through S(x') and T(x'), not through S alone
    one = args_for(adaad, "--attack-steps", "1", "--rand-start", "none", "--eps", "1", "--attack-step", "0.01")
    x0 = x.clone().requires_grad_(True)
    student.eval()
    both, = torch.autograd.grad(F.kl_div(F.log_softmax(student(x0), 1), F.softmax(teacher(x0), 1), reduction="sum"), x0)
    only_s, = torch.autograd.grad(F.kl_div(F.log_softmax(student(x0), 1), F.softmax(teacher(x0), 1).detach(),
                                           reduction="sum"), x0)
    student.train()
    step = adaad.inner_max(student, teacher, x, one) - x
    inside = (x > 0.01) & (x < 0.99)  # no clamp at the box
    assert torch.equal(step[inside].sign(), both.sign()[inside])
    assert not torch.equal(both.sign(), only_s.sign())


def ledger(student, teacher):
    seen = []
    for name, model in (("S", student), ("T", teacher)):
        model.register_forward_pre_hook(lambda m, inp, name=name: seen.append((name, m.training, inp[0])))
    return seen


@pytest.mark.parametrize("variant,epoch,expected", [
    ("adaad", 1, ["S(x')", "S(x)", "S(x')", "T(x)", "T(x')"]),
    ("adaiad", 1, ["S(x)", "S(x')", "T(x')", "S(x)"]),  # before the warm-up ends: S(x) for CE only
    ("adaiad", 2, ["S(x)", "S(x')", "T(x')", "S(x)", "S(x)"]),  # introspection target, then CE
])
def test_ledger_order_and_modes(variant, epoch, expected):
    a = args_for(adaad, "--variant", variant, "--attack-steps", "2",
                 *(["--begin", "1"] if variant == "adaiad" else []))
    student, teacher, x, y = setup_models()
    seen = ledger(student, teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    adaad.train_step(student, teacher, opt, x, y, epoch, a)
    search, rest = seen[:4], seen[4:]
    assert [(n, t) for n, t, _ in search] == [("S", False), ("T", False)] * 2  # S(x'), T(x') per step, both eval()
    names = [f"{n}(x)" if torch.equal(inp, x) else f"{n}(x')" for n, _, inp in rest]
    if variant == "adaad":
        expected = expected[1:]  # the first entry above documents the search
    assert names == expected
    assert all(t == (n == "S") for n, t, _ in rest)  # student train(), teacher eval()


def official_search(student, teacher, x, steps, eps=8 / 255, step=2 / 255):
    """AT_helper.py adaad_inner_loss as written: BN_eval, x + 0.001 randn, KL summed, sign steps."""
    student.eval()
    teacher.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = nn.KLDivLoss(reduction="none")(F.log_softmax(student(x_adv), dim=1), F.softmax(teacher(x_adv), dim=1))
        grad = torch.autograd.grad(torch.sum(loss), [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    student.train()
    return torch.clamp(x_adv, 0.0, 1.0)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_one_adaad_step_equals_main_py(dataset):
    a = args_for(adaad, "--attack-steps", "3", "--alpha", "0.7", "--dataset", dataset)
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = adaad.train_step(student, teacher, opt, x, y, 1, a)

    torch.manual_seed(7)  # main.py --method AdaAD
    x_adv = official_search(ref, teacher, x, 3)
    ori, adv = ref(x), ref(x_adv)
    with torch.no_grad():
        t_ori, t_adv = teacher(x), teacher(x_adv)
    if dataset == "cifar10":
        kl1 = nn.KLDivLoss()(F.log_softmax(adv, dim=1), F.softmax(t_adv, dim=1))
        kl2 = nn.KLDivLoss()(F.log_softmax(ori, dim=1), F.softmax(t_ori, dim=1))
    else:
        kl1 = (1 / len(adv)) * torch.sum(nn.KLDivLoss(reduction="none")(F.log_softmax(adv, dim=1), F.softmax(t_adv, dim=1)))
        kl2 = (1 / len(adv)) * torch.sum(nn.KLDivLoss(reduction="none")(F.log_softmax(ori, dim=1), F.softmax(t_ori, dim=1)))
    check_first_step(student, terms, ref, 0.7 * kl1 + 0.3 * kl2, a.lr, a.wd)


@pytest.mark.parametrize("epoch", [1, 2])  # --begin 1: epoch 1 warm-up, epoch 2 introspective
def test_one_adaiad_step_equals_main_py(epoch):
    a = args_for(adaad, "--variant", "adaiad", "--attack-steps", "3", "--alpha", "0.8", "--temp", "4", "--begin", "1")
    student, teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    torch.manual_seed(7)
    terms = adaad.train_step(student, teacher, opt, x, y, epoch, a)

    torch.manual_seed(7)  # main.py --method AdaAD_with_IAD1, with IAD_alpha 0.8, temp 4, IAD_beta 0.1, IAD_begin 1
    x_adv = official_search(ref, teacher, x, 3)
    ref.train()
    ref(x)
    adv = ref(x_adv)
    guide = teacher(x_adv)
    t_out = teacher(x_adv)
    kl = nn.KLDivLoss(reduction="none")
    first = 0.8 * 16 * (1 / len(adv)) * torch.sum(kl(F.log_softmax(adv / 4, dim=1), F.softmax(t_out / 4, dim=1)).sum(dim=1))
    if epoch - 1 >= 1:
        alpha = torch.tensor([F.softmax(guide, dim=1)[i][y[i].item()].pow(0.1).item() for i in range(len(adv))])
        loss = first + 0.8 * (1 / len(adv)) * torch.sum(
            kl(F.log_softmax(adv, dim=1), F.softmax(ref(x), dim=1)).sum(dim=1).mul(1 - alpha)) \
            + 0.2 * nn.CrossEntropyLoss()(ref(x), y)
    else:
        loss = first + 0.2 * nn.CrossEntropyLoss()(ref(x), y)
    check_first_step(student, terms, ref, loss, a.lr, a.wd)


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temp", "4"], "--temp is read by --variant adaiad only, not by adaad"),
    (["--variant", "adaiad", "--kl-reduction", "sum"], "--kl-reduction is read by --variant adaad only"),
    (["--variant", "adaiad", "--begin", "-1"], "--begin must be an integer >= 0"),
])
def test_bad_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        adaad.parse_args(["--teacher", "t.pt", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_resume_alone_equals_the_uninterrupted_run(cifar_dir, teacher_ckpt, tmp_path):
    """Stopped after epoch 1 (last.pt written), then `main(["--resume", last.pt])` alone: the same last.pt, best.pt
    and metrics.jsonl as an uninterrupted 2-epoch run (in-process: the subprocess kill is tested for rslad and
    train_teacher in test_command_line)."""
    argv = ["--teacher", str(teacher_ckpt), "--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32",
            "--batch-size", "32", "--attack-steps", "2", "--lr", "0.02", "--device", "cpu", "--data-dir", str(cifar_dir)]
    full, part = check_resume_in_process(adaad, argv, tmp_path)
    saved = json.loads((full / "args.json").read_text())
    assert (saved["variant"], saved["teacher_arch"], saved["monitor_attack"]["start"]) == ("adaad", "cnn_small",
                                                                                          "uniform-clamp")
    assert full.name.startswith("adaad-adaad__cifar10__cnn_small__")  # script-variant, as iad
    best = check_best_reloads(full, cifar_dir, 32)
    assert best["select"]["monitor"] == "pgd10-madry"
