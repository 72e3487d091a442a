"""mtard.py against docs/mtard.md: defaults, the two KL terms and the Adaptive Normalization Loss
against float64 computations, which model sees which input, the attack, one optimisation step
computed independently, the per-epoch ANL alternative, a subprocess smoke run and exact resume."""

import copy
import inspect
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
)

import common
import mtard
import rslad

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "2", "--lr", "0.02", "--device", "cpu"]


def np_kl_elemmean(teacher, student, eps):
    """mean over B x C of p (log(p + eps) - log q), float64."""
    p = np.exp(np_log_softmax(teacher))
    return float(np.mean(p * (np.log(p + eps) - np_log_softmax(student))))


def official_anl(losses, rw, beta=1.0, w_nat=0.5):
    """The scripts' weight update in plain Python floats, from a list of (L_adv, L_nat) per iteration;
    returns [(w_adv, w_nat)] after each update (each is the pair that iteration's loss uses)."""
    out, l0 = [], None
    for l_adv, l_nat in losses:
        l0 = l0 or (l_adv, l_nat)
        r_adv, r_nat = (l_adv / l0[0]) ** beta, (l_nat / l0[1]) ** beta
        w_nat = w_nat - rw * (w_nat - r_nat / (r_adv + r_nat))
        out.append((1 - w_nat, w_nat))
    return out


# ---------------------------------------------------------------------------------------------
# Defaults and schedule (mtard.md §3)
# ---------------------------------------------------------------------------------------------

def test_defaults_and_schedules():
    a = args_for(mtard)
    assert (a.arch, a.kl_scale, a.rw, a.anl_beta, a.w_init, a.rw_decay, a.anl_every, a.select) == \
        ("resnet18", 1.0, 0.025, 1.0, 0.5, "lr", "iter", "robust")
    assert (a.epochs, a.batch_size, a.lr, a.momentum, a.wd, a.lr_milestones) == (300, 128, 0.1, 0.9, 2e-4, [215, 260, 285])
    assert (a.eps, a.attack_step, a.attack_steps, a.attack_bn, a.rand_start) == (8 / 255, 2 / 255, 10, "eval", "normal001")
    assert (a.monitor, a.eval_every, a.eval_all_from, a.eval_first, a.seed) == ("pgd20-monitor", 20, 215, True, 0)
    assert args_for(mtard, "--dataset", "cifar100").kl_scale == 10.0  # mtard_resnet18_cifar100.py: 10 * torch.mean
    assert mtard.TEACHER_ARCHS == {"teacher": {"cifar10": "wrn34_10", "cifar100": "dm_wrn70_16"},
                                   "nat_teacher": {"cifar10": "resnet56", "cifar100": "dm_wrn22_6"}}
    epochs = (1, 215, 216, 260, 261, 285, 286, 300)
    assert [mtard.lr_at(e, a) for e in epochs] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    assert [mtard.rw_at(e, a) for e in epochs] == pytest.approx([0.025, 0.025, 2.5e-3, 2.5e-3, 2.5e-4, 2.5e-4, 2.5e-5, 2.5e-5])
    assert mtard.rw_at(300, args_for(mtard, "--rw-decay", "none")) == 0.025
    monitored = [e for e in range(1, 301) if common.is_monitor_epoch(a, e)]
    assert monitored == [1, *range(20, 201, 20), *range(215, 301)]  # the scripts' test condition


def test_shared_helpers_are_rslads_verbatim():
    for name in ("random_start", "kl_div", "lr_at"):
        assert inspect.getsource(getattr(mtard, name)) == inspect.getsource(getattr(rslad, name)), name


# ---------------------------------------------------------------------------------------------
# The loss and the ANL against float64 computations
# ---------------------------------------------------------------------------------------------

def test_anl_update_matches_the_scripts_over_iterations():
    losses = [(2.0, 1.0), (1.8, 0.6), (1.5, 0.4), (1.2, 0.35), (1.3, 0.2)]
    for beta, rw in ((1.0, 0.025), (2.0, 0.3)):
        a = args_for(mtard, "--anl-beta", str(beta), "--rw", str(rw))
        anl = mtard.anl_state(a, "cpu")
        got = []
        for l_adv, l_nat in losses:
            mtard.anl_update(anl, torch.tensor(l_adv, dtype=torch.float32), torch.tensor(l_nat, dtype=torch.float32), a)
            assert anl["w_adv"].dtype == torch.float64 and anl["w_nat"].dtype == torch.float64
            got.append((anl["w_adv"].item(), anl["w_nat"].item()))
        want = official_anl([(float(np.float32(u)), float(np.float32(v))) for u, v in losses], rw, beta)
        assert np.allclose(got, want, rtol=0, atol=1e-12), (got, want)
        assert got[0] == (0.5, 0.5)  # the first batch: both ratios are 1
        assert all(w_adv > 0.5 for w_adv, _ in got[1:])  # L_nat fell more, so T_adv gains weight
        assert anl["L_adv0"].item() == 2.0 and anl["L_nat0"].item() == 1.0  # first batch, never reset
    a = args_for(mtard)
    anl = mtard.anl_state(a, "cpu")
    for l_adv, l_nat in [(1.0, 2.0), (0.4, 1.9)]:  # now the adversarial loss falls faster
        mtard.anl_update(anl, torch.tensor(l_adv), torch.tensor(l_nat), a)
    assert anl["w_nat"].item() > 0.5


@pytest.mark.parametrize("dataset,num_classes,k", [("cifar10", 10, 1.0), ("cifar100", 100, 10.0)])
def test_loss_and_anl_against_the_formula(dataset, num_classes, k):
    """Three iterations of loss_fn with one ANL state: each loss uses the weights updated from its own terms."""
    a = args_for(mtard, "--dataset", dataset)
    anl = mtard.anl_state(a, "cpu")
    values, got = [], []
    for it in range(3):
        s_adv, s_nat, t_adv, t_nat = (random_logits(8, num_classes, 10 * it + j, scale=3.0 / (it + 1))
                                      for j in range(4))
        loss, terms = mtard.loss_fn(s_adv, s_nat, t_adv, t_nat, anl, a)
        kl_adv = k * np_kl_elemmean(t_adv.numpy(), s_adv.numpy(), 1e-5)
        kl_nat = k * np_kl_elemmean(t_nat.numpy(), s_nat.numpy(), 1e-5)
        tol = 1e-6 * max(1.0, kl_adv, kl_nat)
        assert abs(terms["kl_adv"].item() - kl_adv) < tol and abs(terms["kl_nat"].item() - kl_nat) < tol
        values.append((kl_adv, kl_nat))
        got.append((loss.item(), terms["w_adv"].item(), terms["w_nat"].item()))
    for (loss, w_adv, w_nat), (kl_adv, kl_nat), (want_adv, want_nat) in zip(got, values, official_anl(values, 0.025)):
        assert abs(w_adv - want_adv) < 1e-9 and abs(w_nat - want_nat) < 1e-9
        assert abs(loss - (want_adv * kl_adv + want_nat * kl_nat)) < 1e-6 * max(1.0, kl_adv)
    assert got[0][1:] == (0.5, 0.5) and got[2][1] != 0.5


def test_epsilon_changes_the_value_not_the_gradient():
    a = args_for(mtard, "--anl-every", "epoch")  # fixed weights 0.5: the comparison is about the KL only
    anl = mtard.anl_state(a, "cpu")
    s_adv = random_logits(4, 10, 1).requires_grad_(True)
    s_nat, t_adv, t_nat = random_logits(4, 10, 2), random_logits(4, 10, 3), random_logits(4, 10, 4)
    loss, _ = mtard.loss_fn(s_adv, s_nat, t_adv, t_nat, anl, a)
    kl = lambda t, s: (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).mean()
    plain = 0.5 * kl(t_adv, s_adv) + 0.5 * kl(t_nat, s_nat)
    g, = torch.autograd.grad(loss, s_adv)
    g_plain, = torch.autograd.grad(plain, s_adv)
    assert torch.allclose(g, g_plain, atol=1e-10)
    assert 1e-8 < abs(loss.item() - plain.item()) < 1e-4
    assert anl["L_adv0"] is None and anl["w_adv"].item() == 0.5  # --anl-every epoch: loss_fn leaves the state


# ---------------------------------------------------------------------------------------------
# Inputs of each model, the attack
# ---------------------------------------------------------------------------------------------

def setup_models(seed=0):
    torch.manual_seed(seed)
    student = common.build_model("cnn_small").train()
    teacher = common.freeze(common.build_model("cnn_small"))
    nat_teacher = common.freeze(common.build_model("cnn_small"))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return student, teacher, nat_teacher, x, y


def test_which_model_sees_which_input_and_in_which_order():
    """T_nat(x) first; 10 eval-mode attack passes; S(x') in train mode; T_adv on that same x'; then S(x)."""
    a = args_for(mtard)
    student, teacher, nat_teacher, x, y = setup_models()
    seen = []
    for name, m in (("S", student), ("T_adv", teacher), ("T_nat", nat_teacher)):
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.append((name, mod.training, inp[0].detach())))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    mtard.train_step(student, teacher, nat_teacher, opt, x, y, mtard.anl_state(a, "cpu"), a)
    assert [(n, t) for n, t, _ in seen] == [("T_nat", False)] + [("S", False)] * 10 + \
        [("S", True), ("T_adv", False), ("S", True)]
    inputs = [z for _, _, z in seen]
    assert torch.equal(inputs[0], x) and torch.equal(inputs[-1], x)
    x_adv = inputs[11]
    assert torch.equal(inputs[12], x_adv) and not torch.equal(x_adv, x)
    assert (x_adv - x).abs().max() <= a.eps + 1e-7


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_inner_max_ball_box_objective_and_bn(bn):
    a = args_for(mtard, "--attack-steps", "5", "--attack-bn", bn)
    student, _, _, x, y = setup_models()
    before = [b.clone() for b in student.buffers()]
    x_adv = mtard.inner_max(student, x, y, a)
    assert student.training
    assert (x_adv - x).abs().max() <= a.eps + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    moved = any(not torch.equal(u, v) for u, v in zip(before, student.buffers()))
    assert moved is (bn == "train")  # mtard_loss.py attacks in eval(): running statistics untouched
    probe = copy.deepcopy(student).eval()
    with torch.no_grad():
        assert F.cross_entropy(probe(x_adv), y).item() > F.cross_entropy(probe(x), y).item() + 1e-3


# ---------------------------------------------------------------------------------------------
# One optimisation step, independently (loss 1e-6, parameters 1e-5)
# ---------------------------------------------------------------------------------------------

def test_one_step_equals_independent_computation():
    """From an ANL state mid-training (weights 0.3/0.7, first-batch losses set, r_w large enough for the
    update to show): the step's loss uses the weights updated from this batch's own loss values."""
    a = args_for(mtard, "--attack-steps", "3", "--rw", "0.5")
    student, teacher, nat_teacher, x, y = setup_models()
    ref = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
    anl = mtard.anl_state(a, "cpu")
    anl.update(w_adv=torch.tensor(0.3, dtype=torch.float64), w_nat=torch.tensor(0.7, dtype=torch.float64),
               L_adv0=torch.tensor(0.5, dtype=torch.float64), L_nat0=torch.tensor(0.01, dtype=torch.float64))
    torch.manual_seed(7)
    terms = mtard.train_step(student, teacher, nat_teacher, opt, x, y, anl, a)

    torch.manual_seed(7)
    with torch.no_grad():
        p_nat = F.softmax(nat_teacher(x), 1)
    ref.eval()  # mtard_loss.py: model.eval(), start x + 0.001 N(0, I), 3 steps of 2/255 on CE_mean
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(3):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + 2 / 255 * g.sign(), x - 8 / 255), x + 8 / 255), 0, 1)
    ref.train()
    out_adv = ref(x_adv)
    with torch.no_grad():
        p_adv = F.softmax(teacher(x_adv), 1)
    out_nat = ref(x)
    kl = lambda p, z: (p * (torch.log(p + 1e-5) - F.log_softmax(z, 1))).mean()
    kl_adv, kl_nat = kl(p_adv, out_adv), kl(p_nat, out_nat)
    r_adv, r_nat = kl_adv.item() / 0.5, kl_nat.item() / 0.01
    w_nat = 0.7 - 0.5 * (0.7 - r_nat / (r_adv + r_nat))
    loss = (1 - w_nat) * kl_adv + w_nat * kl_nat
    check_first_step(student, terms, ref, loss, a.lr, a.wd)
    assert abs(anl["w_nat"].item() - w_nat) < 1e-7 and abs(anl["w_adv"].item() - (1 - w_nat)) < 1e-7  # fp32 losses


# ---------------------------------------------------------------------------------------------
# Runs: per-epoch ANL with W-Robust selection, smoke run and reload, exact resume, errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nat_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("nat") / "nat.pt"
    common.save_checkpoint(path, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=1,
                                                        dataset="cifar10", args={}))
    return path


def test_anl_every_epoch_and_select_wrobust(cifar_dir, teacher_ckpt, nat_ckpt, tmp_path):
    """D-MTARD-4 alternative: each epoch uses the weights from the previous epochs' mean losses relative
    to epoch 1's; D-MTARD-5 alternative: best.pt by (clean + robust)/2."""
    mtard.main(["--teacher", str(teacher_ckpt), "--nat-teacher", str(nat_ckpt), *TINY, "--epochs", "4",
                "--eval-every", "1", "--anl-every", "epoch", "--select", "wrobust", "--rw", "0.5",
                "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path)])
    (run,) = tmp_path.iterdir()
    epochs = [m for m in read_metrics(run) if m["epoch"] > 0]
    w_nat, l0 = 0.5, (epochs[0]["kl_adv"], epochs[0]["kl_nat"])
    for m in epochs:
        assert abs(m["w_nat"] - w_nat) < 1e-6 and abs(m["w_adv"] - (1 - w_nat)) < 1e-6
        r_adv, r_nat = m["kl_adv"] / l0[0], m["kl_nat"] / l0[1]
        w_nat = w_nat - 0.5 * (w_nat - r_nat / (r_adv + r_nat))
        assert m["test_wrobust"] == (m["test_clean"] + m["test_robust"]) / 2
    assert epochs[2]["w_nat"] != 0.5
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["select"]["value"] == max(m["test_wrobust"] for m in epochs)
    assert best["select"]["value_name"] == "W-Robust"


def test_smoke_subprocess_and_best_reload(cifar_dir, teacher_ckpt, nat_ckpt, tmp_path):
    proc = run_script(ROOT / "mtard.py", "--teacher", teacher_ckpt, "--nat-teacher", nat_ckpt, *TINY,
                      "--epochs", "2", "--eval-every", "1", "--data-dir", cifar_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("mtard__cifar10__cnn_small__s0__")
    saved = json.loads((run / "args.json").read_text())
    assert (saved["teacher_arch"], saved["nat_teacher_arch"], saved["kl_scale"]) == ("cnn_small", "cnn_small", 1.0)
    assert saved["teacher_sha256"] != saved["nat_teacher_sha256"]
    lines = read_metrics(run)
    assert [m["epoch"] for m in lines[:2]] == [0, 0]
    assert {"teacher/clean", "teacher/robust"} <= set(lines[0])
    assert {"nat_teacher/clean", "nat_teacher/robust"} <= set(lines[1])
    epochs = lines[2:]
    assert [m["epoch"] for m in epochs] == [1, 2]
    keys = {"loss", "kl_adv", "kl_nat", "w_adv", "w_nat", "r_w", "test_clean", "test_robust", "test_wrobust"}
    assert all(keys <= set(m) for m in epochs)
    assert epochs[0]["w_adv"] != 0.5 or epochs[1]["w_adv"] != 0.5
    best = check_best_reloads(run, cifar_dir, 32)
    assert best["select"]["value"] == max(m["test_robust"] for m in epochs)


def test_resume_alone_continues_the_anl_exactly(cifar_dir, teacher_ckpt, nat_ckpt, tmp_path):
    """Stopped after epoch 1 of 3 and resumed with --resume alone: the ANL weights and their reference losses
    (last.pt's extra) come back exactly, so epochs 2 and 3 equal the uninterrupted run's."""
    argv = ["--teacher", teacher_ckpt, "--nat-teacher", nat_ckpt, *TINY, "--eval-every", "2",
            "--data-dir", cifar_dir]
    full, _ = check_resume_in_process(mtard, argv, tmp_path, epochs=3)
    extra = torch.load(full / "last.pt", weights_only=True)["extra"]
    assert set(extra) == {"w_adv", "w_nat", "L_adv0", "L_nat0", "r_w"}
    assert all(extra[k].dtype == torch.float64 for k in ("w_adv", "w_nat", "L_adv0", "L_nat0"))
    assert extra["w_adv"].item() != 0.5 and extra["r_w"] == 0.025


@pytest.mark.parametrize("flags,match", [
    (["--rw", "2"], "--rw must be in [0, 1]"),
    (["--w-init", "-0.1"], "--w-init must be in [0, 1]"),
    (["--anl-beta", "nan"], "--anl-beta"),
    (["--select", "wrobust", "--monitor", "clean"], "--monitor"),  # no clean-only monitor: W-Robust needs a robust one
    (["--anl-every", "step"], "--anl-every"),
])
def test_bad_values_are_one_line(flags, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mtard.main(["--teacher", "a.pt", "--nat-teacher", "n.pt", "--runs-dir", str(tmp_path), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag,value", [("--anl-beta", "2"), ("--rw-decay", "none"), ("--anl-every", "epoch")])
def test_an_anl_flag_is_refused_with_rw_zero(flag, value, capsys):
    """--rw 0 keeps the weights at --w-init: the flags of the ANL update are not read."""
    assert mtard.unused_flags(args_for(mtard)) == {}
    with pytest.raises(SystemExit) as e:
        mtard.parse_args(["--teacher", "a.pt", "--nat-teacher", "n.pt", "--rw", "0", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {flag} is not read with --rw 0 (the weights stay at --w-init)"], err


def test_missing_or_mismatched_teacher_is_one_line(cifar_dir, cifar100_dir, teacher_ckpt, tmp_path, capsys):
    base = ["--arch", "cnn_small", "--runs-dir", str(tmp_path), "--device", "cpu", "--epochs", "1",
            "--train-subset", "32", "--test-subset", "16"]
    cases = [(["--teacher", str(teacher_ckpt)], ["--data-dir", str(cifar_dir)], "--nat-teacher"),
             (["--teacher", str(teacher_ckpt), "--nat-teacher", str(tmp_path / "missing.pt")],
              ["--data-dir", str(cifar_dir)], "not found"),
             (["--teacher", str(teacher_ckpt), "--nat-teacher", str(teacher_ckpt)],
              ["--dataset", "cifar100", "--data-dir", str(cifar100_dir), "--override-record"], "10-class head")]
    for teachers, extra, match in cases:
        with pytest.raises(SystemExit) as e:
            mtard.main([*teachers, *base, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and match in err[-1], err
    assert not any(tmp_path.iterdir())
