"""peeraid.py against docs/peeraid.md: defaults, the schedule against main.py's adjust_learning_rate, every loss
term in float64, the gradient the peer's KL sends the student through its target, the KL attack, the forward
ledger, one optimisation step of both models against the official formulas written out, the SWA average and its
BatchNorm pass, an exact resume, a smoke run whose best.pt is the SWA student, and refused values."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    ROOT,
    args_for,
    assert_same_end,
    np_kl_terms,
    np_log_softmax,
    random_logits,
    read_metrics,
    run_stopped_after,
    same,
    setup_models,
)

import common
import peeraid

# one intra-op thread (conftest's one_thread), here and in the subprocess: on 2 shared cores two spinning OpenMP
# threads make the runs many times slower; the results do not depend on it (the resume compares runs of one process)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--arch", "cnn_small", "--peer-arch", "cnn_small", "--train-subset", "64", "--test-subset", "32",
        "--batch-size", "32", "--attack-steps", "2", "--lr", "0.02", "--peer-lr", "0.02", "--device", "cpu"]


def models(seed=0):
    """A train-mode cnn_small student and peer (with BatchNorm) and a seeded batch of 16: (student, peer, x, y)."""
    student, _, x, y = setup_models(seed)
    torch.manual_seed(seed + 5)
    return student, common.build_model("cnn_small").train(), x, y


# ---------------------------------------------------------------------------------------------
# Defaults and schedule (docs/peeraid.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults():
    a = args_for(peeraid)
    assert (a.arch, a.peer_arch, a.temp, a.peer_temp) == ("resnet18", "resnet18", 5.0, 1.0)
    assert (a.gamma1, a.gamma2) == (1.0, 0.1)
    assert (a.lambda1, a.lambda2, a.lambda3, a.kl_reduction) == (0.0, 1.0, 1.0, "elemmean")
    assert (a.eps, a.attack_step, a.attack_steps, a.rand_start) == (8 / 255, 2 / 255, 10, "normal001")
    assert (a.epochs, a.batch_size, a.lr, a.peer_lr, a.momentum, a.wd) == (300, 128, 0.1, 0.1, 0.9, 2e-4)
    assert (a.lr_milestones, a.swa, a.swa_start) == ([214, 259, 284], True, 214)  # D-PEER-4, D-PEER-5
    assert (a.monitor, a.eval_every, a.seed, a.test_batch_size) == ("pgd10-peeraid", 1, 0, None)
    assert peeraid.MONITORS["pgd10-peeraid"] == dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform",
                                                     loss="ce_mean", bn="eval")
    a.device = "cpu"
    common.setup_device(a)
    assert a.test_batch_size == 128  # main.py's test loader uses the training batch
    assert args_for(peeraid, "--dataset", "cifar100").gamma2 == 1.0 and args_for(peeraid, "--dataset", "svhn").gamma2 == 0.1  # D-PEER-6
    assert args_for(peeraid, "--dataset", "cifar100", "--gamma2", "0.3").gamma2 == 0.3
    assert args_for(peeraid, "--lr-milestones", "30", "10").swa_start == 10 and args_for(peeraid, "--swa-start", "0").swa_start == 0
    assert args_for(peeraid, "--no-swa").swa_start is None and args_for(peeraid, "--no-swa", "--lr-milestones").lr_milestones == []


def official_lr(epoch0, decay_epochs, lr):
    """main.py adjust_learning_rate(optimizer, epoch, lr_decay_epochs, learning_rate), 0-indexed epoch."""
    for d in decay_epochs:
        if epoch0 < d:
            break
        lr /= 10
    return lr


def test_lr_at_equals_adjust_learning_rate_for_all_300_epochs():
    a = args_for(peeraid, "--peer-lr", "0.05")
    for epoch in range(1, 301):  # suite epoch E is the code's epoch E - 1
        assert peeraid.lr_at(epoch, a) == pytest.approx(official_lr(epoch - 1, [214, 259, 284], 0.1), rel=1e-12)
        assert peeraid.lr_at(epoch, a, a.peer_lr) == pytest.approx(official_lr(epoch - 1, [214, 259, 284], 0.05),
                                                                   rel=1e-12)
    assert [peeraid.lr_at(e, a) for e in (214, 215, 259, 260, 284, 285)] == pytest.approx(
        [0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4])


# ---------------------------------------------------------------------------------------------
# Loss (docs/peeraid.md §1), float64 against numpy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["elemmean", "batchmean", "sum"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_loss_matches_formula(reduction, num_classes):
    a = args_for(peeraid, "--kl-reduction", reduction, "--temp", "4", "--peer-temp", "2", "--gamma1", "0.7", "--gamma2", "0.3",
                "--lambda1", "0.2", "--lambda2", "1.5", "--lambda3", "0.6")
    p_adv, s_tgt, s_adv, s_nat = (random_logits(8, num_classes, seed) for seed in (1, 2, 3, 4))
    y = torch.arange(8) * 7 % num_classes
    loss, terms = peeraid.loss_fn(p_adv, s_tgt, s_adv, s_nat, y, a)
    red = {"elemmean": np.mean, "batchmean": lambda e: e.sum() / len(e), "sum": np.sum}[reduction]
    n = lambda t: t.numpy()
    ce = lambda z: -np_log_softmax(n(z))[np.arange(8), n(y)].mean()
    kl_peer = red(np_kl_terms(n(s_tgt) / 2, n(p_adv) / 2))  # target: the student's first pass on x'
    kl_p2s = red(np_kl_terms(n(p_adv) / 4, n(s_adv) / 4))
    kl_nat = red(np_kl_terms(n(s_nat) / 4, n(s_adv) / 4))
    loss_peer = 0.7 * ce(p_adv) + 0.3 * 4 * kl_peer
    loss_student = 0.2 * ce(s_adv) + 1.5 * 16 * kl_p2s + 0.6 * 16 * kl_nat
    expected = {"loss": loss_peer + loss_student, "loss_peer": loss_peer, "loss_student": loss_student,
                "ce_peer": ce(p_adv), "kl_peer": kl_peer, "ce": ce(s_adv), "kl_peer_to_student": kl_p2s,
                "kl_nat": kl_nat}
    assert loss.dtype == torch.float64 and terms["loss"] is loss and set(terms) == set(expected)
    for k, v in expected.items():
        assert abs(terms[k].item() - v) < 1e-9 * max(1.0, abs(v)), k


def test_the_peer_kl_trains_the_student_through_its_target():
    """train_kd keeps S(x')'s graph in the peer's KL target, so L_peer sends the student a gradient; the peer's logits
    in the student's KL are detached; S(x) (the lambda3 target) is not."""
    a = args_for(peeraid, "--gamma2", "0.5", "--lambda1", "0.2")
    p_adv, s_tgt, s_adv, s_nat = (random_logits(8, 10, s).requires_grad_(True) for s in (1, 2, 3, 4))
    y = torch.arange(8)
    loss, _ = peeraid.loss_fn(p_adv, s_tgt, s_adv, s_nat, y, a)
    g_peer, g_tgt, g_nat = torch.autograd.grad(loss, (p_adv, s_tgt, s_nat))
    q = F.softmax(s_tgt, 1)  # τp = 1
    ref = 0.5 * (q * (F.log_softmax(s_tgt, 1) - F.log_softmax(p_adv, 1))).mean()
    want, = torch.autograd.grad(ref, s_tgt)
    assert g_tgt.abs().max() > 1e-4 and torch.allclose(g_tgt, want, atol=1e-12)
    # the peer's gradient: its CE and its KL only (detached in the student's KL)
    q = q.detach()
    ref_peer = F.cross_entropy(p_adv, y) + 0.5 * (q * (torch.log(q) - F.log_softmax(p_adv, 1))).mean()
    want_peer, = torch.autograd.grad(ref_peer, p_adv)
    assert torch.allclose(g_peer, want_peer, atol=1e-12) and g_nat.abs().max() > 1e-6
    detached, _ = peeraid.loss_fn(p_adv, s_tgt.detach(), s_adv, s_nat, y, a)
    assert detached.item() == loss.item()  # same value, other gradient
    assert torch.autograd.grad(detached, s_tgt, allow_unused=True)[0] is None


# ---------------------------------------------------------------------------------------------
# Inner maximisation (attack_function.py LinfPeerAttack)
# ---------------------------------------------------------------------------------------------

def ref_attack(student, p_logits, x, steps, eps=8 / 255, step=2 / 255, objective="kl"):
    """LinfPeerAttack.perturb written out (objective "ce": the same loop on CE_sum, for contrast)."""
    x_adv = x + 0.001 * torch.randn(x.shape)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        z = student(x_adv)
        if objective == "kl":
            obj = nn.KLDivLoss(reduction="none")(F.log_softmax(z, 1), F.softmax(p_logits, 1)).sum()
        else:
            obj = F.cross_entropy(z, p_logits.argmax(1), reduction="sum")
        g, = torch.autograd.grad(obj, x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps), 0, 1)
    return x_adv


def test_attack_ball_box_kl_objective_eval_bn_and_unclamped_start():
    a = args_for(peeraid, "--attack-steps", "5")
    student, peer, x, y = models()
    x[:, :, :4] = 0.0  # dark rows: x + 0.001 N(0, I) leaves [0,1] there
    with torch.no_grad():
        p_logits = peer.eval()(x)
    seen, before = [], [b.clone() for b in student.buffers()]
    hook = student.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].detach().clone())))
    torch.manual_seed(3)
    x_adv = peeraid.inner_max(student, p_logits, x, a)
    hook.remove()
    assert [t for t, _ in seen] == [False] * 5 and student.training  # eval() during, train() on return
    assert all(torch.equal(u, v) for u, v in zip(before, student.buffers()))  # no BN statistic moved
    assert seen[0][1].min() < 0 and 0 < (seen[0][1] - x).abs().max() < 0.01  # normal001, not clamped
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    probe = copy.deepcopy(student).eval()
    torch.manual_seed(3)
    assert torch.equal(x_adv, ref_attack(probe, p_logits, x, 5))  # the KL to the peer's fixed clean prediction
    torch.manual_seed(3)
    assert not torch.equal(x_adv, ref_attack(probe, p_logits, x, 5, objective="ce"))
    with torch.no_grad():
        p = F.softmax(p_logits, 1)
        kl = lambda z: (p * (torch.log(p) - F.log_softmax(probe(z), 1))).sum().item()
        assert kl(x_adv) > kl(x) + 1e-3


def test_forward_ledger():
    a = args_for(peeraid, "--attack-steps", "3")
    student, peer, x, y = models()
    seen = []
    for name, model in (("S", student), ("P", peer)):
        model.register_forward_pre_hook(
            lambda m, inp, name=name: seen.append((name, m.training, "x" if torch.equal(inp[0], x) else "x'")))
    grad_mode = []
    peer.register_forward_pre_hook(lambda m, inp: grad_mode.append(torch.is_grad_enabled()))
    opt = torch.optim.SGD([*student.parameters(), *peer.parameters()], lr=0.01, momentum=0.9)
    peeraid.train_step(student, peer, opt, x, y, a)
    assert seen == ([("P", False, "x")] + [("S", False, "x'")] * 3  # P(x) eval, the attack on S in eval
                    + [("P", True, "x'"), ("S", True, "x'"), ("S", True, "x'"), ("S", True, "x")])
    assert grad_mode == [False, True] and student.training and peer.training


# ---------------------------------------------------------------------------------------------
# One optimisation step of both models, against main.py train_kd written out
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_one_step_equals_the_official_formulas():
    a = args_for(peeraid, "--attack-steps", "3", "--temp", "4", "--peer-temp", "2", "--gamma2", "0.5", "--lambda1", "0.3",
                "--lambda3", "0.8", "--peer-lr", "0.05")
    student, peer, x, y = models()
    s, p = copy.deepcopy(student), copy.deepcopy(peer)
    opt = common.sgd([{"params": list(student.parameters()), "lr": a.lr},
                      {"params": list(peer.parameters()), "lr": a.peer_lr}], a.lr, a.momentum, a.wd)
    torch.manual_seed(7)
    terms = peeraid.train_step(student, peer, opt, x, y, a)

    opt_s = torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    opt_p = torch.optim.SGD(p.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    torch.manual_seed(7)
    p.eval()
    with torch.no_grad():
        peer_logits = p(x)
    p.train()
    s.eval()
    adv = ref_attack(s, peer_logits, x, 3)
    s.train()
    adv_outputs = p(adv)
    target = s(adv)
    kl = nn.KLDivLoss()
    loss_peer = nn.CrossEntropyLoss()(adv_outputs, y) * 1.0 + kl(F.log_softmax(adv_outputs / 2, 1),
                                                                  F.softmax(target / 2, 1)) * 0.5 * 2 * 2
    peer_outputs = adv_outputs.clone().detach()
    student_outputs = s(adv)
    logit_nat = s(x)
    loss_student = (F.cross_entropy(student_outputs, y) * 0.3
                    + kl(F.log_softmax(student_outputs / 4, 1), F.softmax(peer_outputs / 4, 1)) * (1.0 * 16)
                    + kl(F.log_softmax(student_outputs / 4, 1), F.softmax(logit_nat / 4, 1)) * (0.8 * 16))
    opt_s.zero_grad()
    opt_p.zero_grad()
    (loss_peer + loss_student).backward()
    opt_p.step()
    opt_s.step()

    assert abs(terms["loss"].item() - (loss_peer + loss_student).item()) < 1e-6
    assert abs(terms["loss_peer"].item() - loss_peer.item()) < 1e-6
    for got, want in ((student, s), (peer, p)):
        for u, v in zip(got.parameters(), want.parameters()):
            assert torch.allclose(u, v, atol=1e-6)
        for u, v in zip(got.buffers(), want.buffers()):
            assert torch.allclose(u.float(), v.float(), atol=1e-6)
    assert not torch.equal(next(peer.parameters()), next(models()[1].parameters()))  # the peer did move


# ---------------------------------------------------------------------------------------------
# SWA (utils/SWA.py)
# ---------------------------------------------------------------------------------------------

def test_swa_average_is_the_running_mean_of_the_averaged_students():
    torch.manual_seed(0)
    swa, snapshots = common.build_model("cnn_small"), []
    for n in range(4):
        torch.manual_seed(10 + n)
        student = common.build_model("cnn_small")
        snapshots.append([q.detach().clone() for q in student.parameters()])
        peeraid.swa_average(swa, student, n)
        if n == 0:
            assert all(torch.equal(u, v) for u, v in zip(swa.parameters(), student.parameters()))  # a copy
        for u, *vs in zip(swa.parameters(), *snapshots):
            assert torch.allclose(u, torch.stack(vs).mean(0), atol=1e-6)


def test_bn_update_is_the_cumulative_average_over_one_pass():
    a = args_for(peeraid)
    torch.manual_seed(0)
    model = common.build_model("cnn_small").eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, inp: stats[m].append(
        (len(inp[0]), inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=True)))) for m in bns]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(b, 3, 32, 32, generator=g), None) for b in (16, 16, 5)]  # a last partial batch
    for m in bns:
        m.running_mean.fill_(3.0)  # whatever was there is forgotten
    peeraid.bn_update(model, batches, a)
    for h in hooks:
        h.remove()
    for m in bns:
        w = torch.tensor([b for b, _, _ in stats[m]], dtype=torch.float32)[:, None]
        mean = (w * torch.stack([mu for _, mu, _ in stats[m]])).sum(0) / w.sum()
        var = (w * torch.stack([v for _, _, v in stats[m]])).sum(0) / w.sum()
        assert torch.allclose(m.running_mean, mean, atol=1e-6) and torch.allclose(m.running_var, var, atol=1e-5)
        assert m.momentum == 0.1  # restored


# ---------------------------------------------------------------------------------------------
# Runs: exact resume, SWA from the first milestone, best.pt, the smoke run
# ---------------------------------------------------------------------------------------------

def swa_argv(cifar_dir):
    return [*TINY, "--epochs", "3", "--lr-milestones", "1", "2", "--data-dir", str(cifar_dir)]


@pytest.fixture(scope="module")
def full_run(one_thread, cifar_dir, tmp_path_factory):
    """The folder of an uninterrupted 3-epoch run whose SWA averages epochs 2 and 3."""
    runs = tmp_path_factory.mktemp("full")
    peeraid.main([*swa_argv(cifar_dir), "--runs-dir", str(runs)])
    (run,) = runs.iterdir()
    return run


def test_resume_alone_equals_the_uninterrupted_run_and_swa_averages_epochs_2_and_3(full_run, cifar_dir, tmp_path):
    argv = swa_argv(cifar_dir)
    run_stopped_after(peeraid, [*argv, "--runs-dir", str(tmp_path / "part")], 2)
    full, (part,) = full_run, list((tmp_path / "part").iterdir())
    at2 = torch.load(part / "last.pt", weights_only=True)
    assert at2["epoch"] == 2 and at2["extra"]["swa_n"] == 1
    peeraid.main(["--resume", str(part / "last.pt")])
    assert_same_end(full, part, 3, keys=("model", "peer", "extra", "rng"))
    a = torch.load(full / "last.pt", weights_only=True)
    best_full, best_part = (torch.load(d / "best.pt", weights_only=True) for d in (full, part))
    assert same(best_full["model"], best_part["model"]) and best_full["select"] == best_part["select"]

    # D-PEER-4: with --lr-milestones 1 2 the SWA average takes the students of epochs 2 and 3 (the lr-decayed ones)
    swa = a["extra"]["swa"]
    assert a["extra"]["swa_n"] == 2
    names = [k for k, _ in common.build_model("cnn_small").named_parameters()]
    for k in names:
        assert torch.allclose(swa[k], (at2["model"][k] + a["model"][k]) / 2, atol=1e-6), k
    # D-PEER-3: its BatchNorm statistics are one train() pass over the set as augmented for "epoch -3"
    args = args_for(peeraid, *argv)
    model = common.build_model("cnn_small")
    model.load_state_dict({**model.state_dict(), **{k: swa[k] for k in names}})
    peeraid.bn_update(model, common.train_loader(args, 32, device="cpu").epoch(-3), args)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, swa[k]), k
    lines = read_metrics(full)
    assert ["swa_robust" in m for m in lines] == [False, True, True]
    assert [m.get("swa_n") for m in lines] == [None, 1, 2]
    assert [m["lr"] for m in lines] == pytest.approx([0.02, 2e-3, 2e-4])


def test_smoke_subprocess_best_is_the_swa_student(cifar_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "peeraid.py"), *TINY, "--epochs", "2", "--lr-milestones", "1",
                           "--data-dir", str(cifar_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("peeraid__cifar10__cnn_small__s0__")
    saved = json.loads((run / "args.json").read_text())
    assert (saved["swa_start"], saved["gamma2"], saved["monitor_attack"]["loss"]) == (1, 0.1, "ce_mean")
    lines = read_metrics(run)
    assert [m["epoch"] for m in lines] == [1, 2]  # no teacher line: nothing is pretrained
    keys = {"loss_peer", "loss_student", "kl_peer", "kl_peer_to_student", "kl_nat", "test_robust", "peer_clean"}
    assert all(keys <= set(m) for m in lines)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["select"] == {"monitor": "pgd10-peeraid", "value_name": "SWA PGD-10",
                                                      "value": lines[1]["swa_robust"], "epoch": 2}
    assert best["peer_arch"] == "cnn_small"
    model, _ = common.load_model(run / "best.pt")
    x, y = common.load_split("cifar10", cifar_dir, train=False, subset=32, download=False)
    with torch.no_grad():
        assert (model(x.float() / 255).argmax(1) == y).float().mean().item() == lines[1]["swa_clean"]
    assert "reported checkpoint (D-PEER-1)" in proc.stdout


def test_no_swa_trains_the_same_models_and_reports_the_student(full_run, cifar_dir, tmp_path):
    peeraid.main([*swa_argv(cifar_dir), "--no-swa", "--runs-dir", str(tmp_path)])
    (run,) = tmp_path.iterdir()
    last, swa_last = torch.load(run / "last.pt", weights_only=True), torch.load(full_run / "last.pt", weights_only=True)
    assert same(last["model"], swa_last["model"]) and same(last["peer"], swa_last["peer"])  # SWA takes nothing from them
    assert "extra" not in last and all("swa_robust" not in m for m in read_metrics(run))
    lines = read_metrics(run)
    best = torch.load(run / "best.pt", weights_only=True)
    assert "value_name" not in best["select"] and best["select"]["value"] == max(m["test_robust"] for m in lines)
    assert [m["test_robust"] for m in lines] == [m["test_robust"] for m in read_metrics(full_run)]


# ---------------------------------------------------------------------------------------------
# Refused values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--gamma1", "-1"], "--gamma1 must be a number >= 0"),
    (["--gamma2", "-0.5"], "--gamma2 must be a number >= 0"),
    (["--lambda3", "-1"], "--lambda3 must be a number >= 0"),
    (["--peer-temp", "0"], "--peer-temp must be a positive number"),
    (["--temp", "0"], "--temp must be a positive number"),
    (["--peer-lr", "0"], "--peer-lr must be a positive number"),
    (["--eps", "2"], "--eps must be in [0, 1]"),
    (["--no-swa", "--swa-start", "5"], "--swa-start is read by --swa only"),
    (["--unsafe-load"], "--unsafe-load is not read"),
    (["--lr-milestones"], "--swa starts after the first of --lr-milestones"),
    (["--swa-start", "-1"], "must be >= 0"),
    (["--teacher", "t.pt"], "unrecognized arguments"),
])
def test_bad_values_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        peeraid.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        peeraid.parse_args(["--help"])
    entries = [" ".join(chunk.split()) for chunk in capsys.readouterr().out.split("\n  -")[1:]]
    options = {"-" + entry.split()[0].rstrip(","): entry for entry in entries}
    for entry in options.values():
        assert entry.count("(default") <= 1 and "(default: None)" not in entry, entry
    for flag in ("--gamma2", "--swa-start", "--swa"):  # resolved or boolean: said in words
        assert "default" in options[flag], options[flag]
    assert "(default: 5.0)" in options["--temp"] and "(default: 0.0)" in options["--lambda1"]
    assert "(default: [214, 259, 284])" in options["--lr-milestones"]
