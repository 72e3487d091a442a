"""Unit and smoke tests of eval_attacks.py (docs/eval_attacks.md §10.4).

Parity with the official AutoAttack lives in tests/test_autoattack_parity.py.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_cnn

import eval_attacks as ea

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_cnn(0)


@pytest.fixture(scope="module")
def data(model):
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).max(1)[1]
    return x, y


def linf(a, b):
    return (a - b).abs().max().item()


def assert_valid(x_adv, x, eps):
    assert not torch.isnan(x_adv).any()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert linf(x_adv, x) <= eps + 1e-6


# ---- import, guards ---------------------------------------------------------------------------------

def test_import_has_no_side_effects():
    state = (torch.get_rng_state(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_num_threads(), torch.is_grad_enabled())
    importlib.reload(ea)
    after = (torch.get_rng_state(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_num_threads(), torch.is_grad_enabled())
    assert torch.equal(state[0], after[0]) and state[1:] == after[1:]


def test_amp_is_not_a_flag(capsys):
    """The attacks always run in fp32: --amp is an unknown flag to argparse (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        ea.main(["missing.pt", "--amp"])
    assert e.value.code == 2
    assert "unrecognized arguments: --amp" in capsys.readouterr().err


def test_guards_fail_loudly(model, data):
    x, y = data
    eps = 8 / 255
    for bad in (x + 2 * eps, x.clone().fill_(float("nan")), x - 1.5):
        with pytest.raises(SystemExit) as e:
            ea.checked_predict(model, bad, x, eps, "test")
        assert e.value.code == 2
    stochastic = nn.Sequential(nn.Dropout(0.5), tiny_cnn(1)).train()  # its own copy: train() recurses
    with pytest.raises(SystemExit):
        ea.checked_predict(stochastic, x, x, eps, "test")
    with pytest.raises(SystemExit):
        ea.check_frozen(nn.Linear(2, 2), "test")
    ea.check_frozen(model, "test")


# ---- the PGD routine (§3) ---------------------------------------------------------------------------

def test_one_pgd_step_by_hand():
    """A linear model on 6 pixels, CE_mean over two points, injected start noise: sign(0) = 0 on the pixel
    every class ignores, projection to the eps-ball and the [0,1] clamp are all active."""
    eps, step = 0.1, 0.15
    w = torch.tensor([[1.0, -2.0, 0.0, 0.5, 1.5, -1.0],
                      [-1.0, 1.0, 0.0, -0.5, 0.5, 2.0],
                      [0.5, 0.5, 0.0, 1.0, -2.0, 0.5]])
    bias = torch.tensor([0.1, -0.2, 0.3])
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(bias)
    model.requires_grad_(False)
    x = torch.tensor([[0.0, 0.5, 0.5, 1.0, 0.2, 0.95], [0.3, 0.05, 0.7, 0.4, 0.98, 0.6]]).view(2, 1, 2, 3)
    y = torch.tensor([0, 2])
    noise = torch.tensor([[-0.1, 0.1, 0.05, 0.1, -0.05, 0.08], [0.02, -0.09, 0.1, -0.1, 0.07, 0.0]]).view(2, 1, 2, 3)

    x0 = (x + noise).clamp(0, 1)  # uniform-clamp start
    logits = x0.flatten(1) @ w.T + bias
    g = (F.softmax(logits, 1) - F.one_hot(y, 3)) @ w / 2  # d CE_mean / d x0, by hand
    s = torch.sign(g).view_as(x)
    assert (s.flatten(1)[:, 2] == 0).all() and (s.flatten(1)[:, [0, 1, 3, 4, 5]] != 0).all()
    expected = torch.min(torch.max(x0 + step * s, x - eps), x + eps).clamp(0, 1)
    assert (expected != (x0 + step * s)).any()  # projection or clamp bound somewhere

    got = ea.pgd(model, x, y, eps, steps=1, step=step, x_start=ea.random_start(x, eps, "uniform-clamp", noise))
    assert torch.equal(got, expected)
    unclamped = ea.random_start(x, eps, "uniform", noise)
    assert torch.equal(unclamped, x + noise)  # 'uniform' keeps the start outside the box


@pytest.mark.parametrize("name", list(ea.WHITEBOX))
def test_whitebox_attack_stays_in_ball_and_raises_loss(model, data, name):
    x, y = data
    eps = 8 / 255
    p = dict(ea.WHITEBOX[name])
    p["step"] = eps if p["step"] is None else p["step"]
    torch.manual_seed(0)
    x_adv = ea.pgd(model, x, y, eps, min(p["steps"], 50), p["step"], p["start"], p["loss"], p.get("kappa", 50.0))
    assert_valid(x_adv, x, eps)
    with torch.no_grad():
        if p["loss"] == "ce":
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
        else:
            assert ea.cw_loss(model(x_adv), y, p["kappa"]) > ea.cw_loss(model(x), y, p["kappa"])


def test_cw_loss_on_crafted_logits():
    # all logits negative: the 1e4 mask keeps the true class out of the max (a (1-onehot)*z mask would give 0)
    z, y = torch.tensor([[-5.0, -1.0, -3.0]]), torch.tensor([1])
    assert ea.cw_loss(z, y, kappa=0.0).item() == -2.0
    # a tie between the true class and another: margin 0, loss -kappa
    assert ea.cw_loss(torch.tensor([[2.0, 2.0, 0.0]]), torch.tensor([0]), kappa=50.0).item() == -50.0
    # kappa binding (margin + kappa < 0): loss 0 and no gradient; not binding: margin + kappa
    z = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    loss = ea.cw_loss(z, torch.tensor([1]), kappa=50.0)
    assert loss.item() == 0.0
    assert torch.equal(torch.autograd.grad(loss, z)[0], torch.zeros_like(z))
    assert ea.cw_loss(torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([1]), kappa=50.0).item() == -40.0
    # 100 classes, several points: the one-hot follows the output width
    g = torch.Generator().manual_seed(0)
    z, y = 5 * torch.randn(6, 100, generator=g), torch.randint(0, 100, (6,), generator=g)
    ref = sum(max((z[i, y[i]] - torch.cat([z[i, :y[i]], z[i, y[i] + 1:]]).max() + 50.0).item(), 0.0) for i in range(6))
    assert ea.cw_loss(z, y, 50.0).item() == pytest.approx(-ref, rel=1e-6)


# ---- AutoAttack pieces (§4) ---------------------------------------------------------------------------

def test_targets_are_the_2nd_to_10th_largest_clean_logits(model, data, monkeypatch):
    x, y = data
    assert torch.equal(ea.aa_target(torch.tensor([[0.1, 3.0, 2.0, -1.0]]), 2), torch.tensor([2]))
    real, calls = ea.aa_target, []

    def spy(logits, k):
        calls.append((logits.clone(), k))
        return real(logits, k)

    monkeypatch.setattr(ea, "aa_target", spy)
    with torch.no_grad():
        clean = model(x)
    for run in (lambda: ea.apgd(model, x, y, 1e-6, loss="dlr-targeted", n_iter=2),
                lambda: ea.fab_targeted(model, x, y, 1e-6, n_iter=2)):
        calls.clear()
        run()  # eps 1e-6 breaks nothing, so every target runs on every point
        assert [k for _, k in calls] == list(range(2, 11))
        order = clean.argsort(1, descending=True)
        for logits, k in calls:
            assert torch.allclose(logits, clean)
            assert torch.equal(real(logits, k), order[:, k - 1])
        targets = torch.stack([real(lg, k) for lg, k in calls], 1)  # 9 distinct non-true classes
        assert all(set(t.tolist()) == set(range(10)) - {c} for t, c in zip(targets, y.tolist()))


def test_aa_attacks_stay_in_ball(model, data):
    x, y = data
    eps = 2 / 255
    outs = [ea.apgd(model, x, y, eps, loss="ce", n_iter=10), ea.apgd(model, x, y, eps, loss="dlr", n_iter=10),
            ea.apgd(model, x, y, eps, loss="dlr-targeted", n_iter=5, n_target_classes=2),
            ea.fab_targeted(model, x, y, eps, n_iter=10, n_target_classes=2), ea.square(model, x, y, eps, n_queries=200)]
    for adv in outs:
        assert_valid(adv, x, eps)
        unchanged = (adv == x).flatten(1).all(1)
        with torch.no_grad():
            fooled = model(adv).max(1)[1] != y
        assert (unchanged | fooled).all()  # a point is replaced only by an adversarial example


def test_ensemble_accounting(model, data):
    x, y = data
    y = y.clone()
    y[0] = (y[0] + 1) % 10  # one point misclassified clean
    eps = 8 / 255  # APGD-CE breaks every point, so APGD-T is skipped (nothing robust left)
    r = ea.autoattack(model, x, y, eps, version="fast", bs=3, seed=0)
    assert r["cumulative"] == {"clean": 7 / 8, "apgd-ce": 0.0, "apgd-t": 0.0} and not r["robust"].any()
    assert torch.equal(r["x_adv"][0], x[0]) and r["y_adv"][0] != y[0]  # clean-wrong: clean image, clean prediction
    with torch.no_grad():
        assert torch.equal(r["y_adv"], model(r["x_adv"]).max(1)[1])
    stats = ea.reevaluate(model, x, y, r, eps, 3, "cpu", "test")
    assert stats["reevaluated_acc"] == 0.0 and stats["max_linf"] <= eps + 1e-6 and stats["n_nan"] == 0
    assert stats["n_disagree"] == 0 and stats["disagreements"] == [] and stats["acc_from"] == "robust_flags"
    r["robust"][1] = True  # a flag the re-evaluation cannot reproduce: recorded, not fatal
    stats = ea.reevaluate(model, x, y, r, eps, 3, "cpu", "test")
    with torch.no_grad():
        top2 = model(r["x_adv"][1:2]).topk(2)[0][0]
    (d,) = stats["disagreements"]
    assert (d["index"], d["robust"], d["tol"]) == (1, True, pytest.approx(1e-4))
    assert d["margin"] == pytest.approx((top2[0] - top2[1]).item()) and d["near_tie"] == (d["margin"] <= 1e-4)
    assert stats["n_disagree"] == 1 and stats["n_near_tie"] == int(d["near_tie"])


def test_near_tie_tolerance_by_hand_fp32_and_tf32():
    """The rule checked_predict and reevaluate share: top-2 margin <= max(1e-4, rtol * max_j |z_j|), rtol 0
    in fp32 and 2e-2 under TF32."""
    z = torch.tensor([[2.0, 2.0 - 2 ** -14, 0.0],  # margin 6.1e-5
                      [2.0, 2.0 - 2 ** -12, 0.0],  # 2.4e-4
                      [-3.0, 9.875, 10.0],  # 0.125; TF32 tolerance 0.2
                      [10.0, 9.75, -3.0],  # 0.25; TF32 tolerance 0.2
                      [0.25, 0.0, -20.0],  # 0.25; the largest |logit| is negative: TF32 tolerance 0.4
                      [2 ** -10, 2 ** -10 - 2 ** -14, 0.0],  # 6.1e-5 on tiny logits: the 1e-4 floor
                      [2 ** -10, 0.0, 0.0],  # 9.8e-4 on tiny logits
                      [1.0, 1.0, 0.0]])  # an exact tie
    margins = [2 ** -14, 2 ** -12, 0.125, 0.25, 0.25, 2 ** -14, 2 ** -10, 0.0]
    for tf32, tols, ties in ((False, [1e-4] * 8, [1, 0, 0, 0, 0, 1, 0, 1]),
                             (True, [0.04, 0.04, 0.2, 0.2, 0.4, 1e-4, 1e-4, 0.02], [1, 1, 1, 0, 1, 1, 0, 1])):
        margin, tol, tie = ea.near_tie(z, tf32)
        assert margin.tolist() == margins
        assert tol.tolist() == pytest.approx(tols)
        assert tie.tolist() == [bool(t) for t in ties]


class PushedAtBatchSize(nn.Module):
    """`base` whose logit `cls` rises by `delta` in batches of exactly `size` points: a deterministic model
    on which a kernel picked per batch shape moves a point."""

    def __init__(self, base, size, cls, delta):
        super().__init__()
        self.base, self.size, self.cls, self.delta = base, size, cls, delta

    def forward(self, x):
        z = self.base(x)
        return z + self.delta * F.one_hot(torch.tensor(self.cls), z.shape[1]) if len(x) == self.size else z


def near_tie_points(margin):
    """Six uint8 images for picker(10, 3*I) with bias -margin on class 7: points 0-4 have margin 3, except
    point 3 (label 3) whose logits 3 and 7 are 1.8 and 1.8 - margin; point 5 is misclassified clean
    (class 0, label 1), so AutoAttack attacks five points where the clean pass and the re-evaluation see six."""
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    x = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    flat = x.view(6, -1)
    flat[torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 0])] = 255
    flat[3, 3] = flat[3, 7] = 153  # 0.6
    base = picker(10, 3 * torch.eye(10))
    with torch.no_grad():
        base[1].bias[7] = -margin
    return x, y, base


@pytest.fixture
def tf32_flags():
    """main() sets the TF32 flags; they are put back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_main(monkeypatch, tmp_path, model, x_u8, y, *flags):
    """main() on `model` and the points (x_u8, y): AutoAttack fast only, eps 1/255 (the picker's margins of
    3 stay out of reach), batches of all six points."""
    import common
    info = {"arch": "picker", "arch_kwargs": {}, "num_classes": 10, "norm": None, "suite": False}
    monkeypatch.setattr(ea, "load_target", lambda args, device: (model.eval().requires_grad_(False), info, "cifar10"))
    monkeypatch.setattr(common, "load_split", lambda *a, **k: (x_u8, y))
    ckpt, out = tmp_path / "model.pt", tmp_path / "eval.json"
    ckpt.write_bytes(b"a stand-in: load_target is replaced")
    ea.main([str(ckpt), "--device", "cpu", "--eps", "1/255", "--attacks", "none", "--aa", "fast", "--bs", "6",
             "--aa-bs", "6", "--json", str(out), "--quiet", *flags])
    return out


@pytest.mark.usefixtures("tf32_flags")
@pytest.mark.parametrize("margin, delta, flags", [(2e-5, 1e-3, []), (0.03, 0.05, ["--tf32"])])
def test_autoattack_near_tie_flip_in_reevaluation_keeps_the_evaluation(monkeypatch, tmp_path, capsys, margin, delta,
                                                                         flags):
    """Point 3 is broken in AutoAttack's batch of five and correct again in the re-evaluation's batch of six,
    at a top-2 margin within the tolerance (fp32: 2e-5 <= 1e-4; --tf32: 0.03 <= 2e-2 * 1.8): the run ends
    normally and the JSON keeps the attack's accuracy and records the moved point."""
    x_u8, y, base = near_tie_points(margin)
    out = run_main(monkeypatch, tmp_path, PushedAtBatchSize(base, 5, 7, delta), x_u8, y, *flags)
    j = json.loads(out.read_text())
    aa = j["attacks"]["aa_fast"]
    assert aa["robust_flags"] == [1, 1, 1, 0, 1, 0] and aa["acc_from"] == "robust_flags"
    assert aa["acc"] == pytest.approx(4 / 6)  # the attack's flags, not the re-evaluation's
    assert aa["reevaluated_acc"] == pytest.approx(5 / 6) and aa["n_disagree"] == 1 and aa["n_near_tie"] == 1
    (d,) = aa["disagreements"]
    assert (d["index"], d["robust"], d["near_tie"]) == (3, False, True)
    assert d["margin"] == pytest.approx(margin, rel=1e-2) and aa["near_tie_tol"]["tf32"] == bool(flags)
    assert not any("near-tie tolerance" in w for w in j["warnings"])
    stdout = capsys.readouterr().out
    assert "aa_fast: the re-evaluation moved 1 of 6 points (1 near-ties)" in stdout and "wrote" in stdout


@pytest.mark.usefixtures("tf32_flags")
def test_autoattack_large_flip_in_reevaluation_is_written_then_exits_1(monkeypatch, tmp_path, capsys):
    """The same flip at a top-2 margin of 0.3: the table and the JSON are written, the moved point is a loud
    warning (JSON, stderr), and only then does the run exit with status 1."""
    x_u8, y, base = near_tie_points(0.3)
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, tmp_path, PushedAtBatchSize(base, 5, 7, 0.5), x_u8, y)
    assert e.value.code == 1
    j = json.loads((tmp_path / "eval.json").read_text())
    aa = j["attacks"]["aa_fast"]
    assert aa["acc"] == pytest.approx(4 / 6) and aa["reevaluated_acc"] == pytest.approx(5 / 6)
    assert (aa["n_disagree"], aa["n_near_tie"]) == (1, 0)
    assert aa["disagreements"][0]["index"] == 3 and aa["disagreements"][0]["margin"] == pytest.approx(0.3, rel=1e-5)
    assert [w for w in j["warnings"] if "beyond the near-tie tolerance" in w and "points 3" in w]
    captured = capsys.readouterr()
    assert "WARNING: aa_fast: 1 of 6 points moved" in captured.err and "written to" in captured.err
    assert "aa_fast" in captured.out and "wrote" in captured.out


def test_whitebox_check_accepts_a_tf32_sized_flip_only_under_tf32():
    """checked_predict scores a batch whole and in halves; point 3 flips in the halves at a margin of 0.03:
    beyond the fp32 tolerance (an error), within the TF32 one (2e-2 of 1.8)."""
    x_u8, y, base = near_tie_points(0.03)
    model = PushedAtBatchSize(base, 3, 7, 0.05).eval()
    x = x_u8.float() / 255
    with pytest.raises(SystemExit):
        ea.checked_predict(model, x, x, 1 / 255, "test")
    assert torch.equal(ea.checked_predict(model, x, x, 1 / 255, "test", tf32=True), torch.tensor([0, 1, 2, 3, 4, 0]))


# ---- quantisation, W-Robust, presets (§7, §8, §2) ----------------------------------------------------------

def test_quantize_known_values():
    x = torch.tensor([0.0, 0.2, 0.5, 0.51, 1.0])
    assert torch.equal(ea.quantize(x, 1), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))  # round half to even
    assert torch.equal(ea.quantize(x, 2), torch.tensor([0.0, 1 / 3, 2 / 3, 2 / 3, 1.0]))
    assert torch.equal(ea.quantize(torch.tensor([0.3]), 3), torch.tensor([2 / 7]))
    levels = torch.arange(256) / 255
    assert torch.equal(ea.quantize(levels, 8), levels)  # 8 bits leave CIFAR pixels unchanged


def test_bpda_passes_the_gradient_through():
    w = torch.randn(1, 12, generator=torch.Generator().manual_seed(0))
    f = nn.Sequential(nn.Flatten(), nn.Linear(12, 1, bias=False))
    with torch.no_grad():
        f[1].weight.copy_(w)
    f.requires_grad_(False)
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    for bpda, expected in ((True, w.view(1, 3, 2, 2)), (False, torch.zeros(1, 3, 2, 2))):
        g = ea.Quantized(f, 3, bpda=bpda)
        out = g(x)
        assert torch.allclose(out, f(ea.quantize(x, 3)), atol=1e-6)
        assert torch.allclose(torch.autograd.grad(out.sum(), x)[0], expected)


def test_w_robust():
    assert ea.w_robust(0.8736, 0.6120) == pytest.approx(0.7428)  # MTARD Table 2: (87.36 + 61.20) / 2


def test_presets(monkeypatch):
    args = ea.parse_args(["c.pt"])
    p = ea.resolve_protocol(args, "cifar10")
    assert p["eps"] == 8 / 255 and p["aa"] == "standard" and list(p["whitebox"]) == ["fgsm", "pgd_sat", "pgd_trades", "cw"]
    assert p["whitebox"]["cw"] == dict(steps=20, step=2 / 255, start="uniform-clamp", loss="cw", kappa=50.0)
    assert p["whitebox"]["fgsm"]["step"] == 8 / 255 and p["whitebox"]["fgsm"]["start"] == "none"
    assert ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "mtard"]), "cifar10")["preset"] == "rslad"
    assert ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "iad"]), "cifar10")["whitebox"]["cw"]["steps"] == 30
    assert ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "ardir"]), "svhn")["whitebox"]["pgd20"]["step"] == 1 / 255
    adt = ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "adt", "--long"]), "cifar10")
    assert adt["eps"] == 0.031 and adt["aa"] == "off" and "fgsm1000" in adt["whitebox"]
    assert adt["whitebox"]["fgsm20"]["start"] == "uniform" and adt["whitebox"]["cw20"]["step"] == 0.003
    # AdaAD eval_utils.py: advertorch PGD-10, step eps/4 = 2/255, clamped random init; PeerAiD main.py: LinfPGDAttack
    # PGD-20, step 2/255, x + U(-eps, eps) unclamped; both FGSM without a start and standard AutoAttack
    ada = ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "adaad"]), "cifar10")
    assert list(ada["whitebox"]) == ["fgsm", "pgd10"] and ada["aa"] == "standard" and ada["eps"] == 8 / 255
    assert ada["whitebox"]["pgd10"] == dict(steps=10, step=2 / 255, start="uniform-clamp", loss="ce")
    peer = ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", "peeraid"]), "cifar10")
    assert list(peer["whitebox"]) == ["fgsm", "pgd20"] and peer["aa"] == "standard" and peer["eps"] == 8 / 255
    assert peer["whitebox"]["pgd20"] == dict(steps=20, step=2 / 255, start="uniform", loss="ce")
    assert peer["whitebox"]["fgsm"]["start"] == "none" and ada["whitebox"]["fgsm"]["start"] == "none"
    o = ea.resolve_protocol(ea.parse_args(["c.pt", "--eps", "4/255", "--cw-kappa", "0", "--pgd-start", "uniform",
                                           "--attacks", "pgd_trades,cw"]), "cifar10")
    assert o["eps"] == 4 / 255 and o["whitebox"]["cw"]["kappa"] == 0 and o["whitebox"]["pgd_trades"]["start"] == "uniform"
    assert set(o["overrides"]) == {"eps", "cw_kappa", "pgd_start", "attacks"}


# ---- smoke run on the fixture data, JSON schema (§9) ---------------------------------------------------------

def test_cli_smoke_writes_json(cifar_dir, tmp_path):
    common = pytest.importorskip("common")
    if not hasattr(common, "build_model"):
        pytest.skip("common.build_model not available yet")
    torch.manual_seed(0)
    net = common.build_model("cnn_small", 10, None)
    ckpt = tmp_path / "last.pt"
    common.save_checkpoint(ckpt, common.checkpoint_dict(net.eval(), kind="last", epoch=1, dataset="cifar10", args={}))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(REPO / "eval_attacks.py"), str(ckpt), "--data-dir", str(cifar_dir), "--device", "cpu",
           "--n-ex", "6", "--bs", "4", "--attacks", "fgsm,pgd_sat,cw", "--aa", "fast", "--aa-bs", "6",
           "--transfer-from", f"cnn_small:{ckpt}", "--transfer-attacks", "pgd20", "--square-bb",
           "--square-queries", "20", "--quant-grid", "4,8", "--quant-mode", "bpda", "--json", str(out), "--quiet"]
    # one OpenMP thread: on a shared 2-core machine, spinning worker threads can slow a tiny run 100-fold
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "clean" in run.stdout and "aa_fast" in run.stdout
    j = json.loads(out.read_text())
    assert j["schema"] == "suite-eval/1" and j["dataset"] == "cifar10" and j["n_ex"] == 6 and j["eps"] == 8 / 255
    for key in ("checkpoint", "sha256", "arch", "arch_kwargs", "num_classes", "norm", "loader", "preset", "eps_str",
                "bs", "env", "clean", "attacks", "warnings"):
        assert key in j
    for key in ("torch", "cuda", "cudnn", "device", "tf32", "cudnn_deterministic", "seed", "aa_seed", "aa_bs",
                "host", "date"):
        assert key in j["env"]
    assert set(j["clean"]) == {"acc", "n_correct", "n"}
    for name in ("fgsm", "pgd_sat", "cw"):
        rec = j["attacks"][name]
        assert set(rec) >= {"params", "acc", "acc_and_clean", "n_correct", "w_robust", "seconds"}
        assert 0 <= rec["acc_and_clean"] <= min(rec["acc"], j["clean"]["acc"])
        assert rec["w_robust"] == pytest.approx((j["clean"]["acc"] + rec["acc"]) / 2)
    aa = j["attacks"]["aa_fast"]
    assert list(aa["cumulative"]) == ["clean", "apgd-ce", "apgd-t"] and aa["acc"] <= j["clean"]["acc"]
    assert aa["reevaluated_acc"] == aa["acc"] and len(aa["robust_flags"]) == 6 and aa["max_linf"] <= j["eps"] + 1e-6
    assert sum(aa["robust_flags"]) == aa["n_correct"] and aa["acc_from"] == "robust_flags"
    assert (aa["n_disagree"], aa["n_near_tie"], aa["disagreements"]) == (0, 0, [])
    assert "aa_fast: the re-evaluation reproduces the attack's flags on all 6 points" in run.stdout
    assert set(j["attacks"]["transfer"]["pgd20"]) >= {"source", "params", "acc", "source_acc", "w_robust"}
    assert set(j["attacks"]["square_bb"]) >= {"n_queries", "p_init", "acc", "w_robust", "median_queries"}
    q = j["attacks"]["quant"]
    assert q["selected_b"] in (4, 8) and set(q["4"]) == {"nonadaptive", "bpda"}
    assert set(q["8"]["bpda"]["fgsm20"]) == {"acc", "clean_acc", "w_robust"}


# ---- per-class accuracy, eps sweep, training record (§9) ----------------------------------------------------

def picker(num_classes, weights=None):
    """A linear model whose prediction for x is the argmax of its first `num_classes` pixels."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[:, :num_classes] = torch.eye(num_classes) if weights is None else weights
        model[1].bias.zero_()
    return model.requires_grad_(False)


def test_per_class_counts_by_hand():
    """12 points over 4 classes (class 3 has none): predictions set through the first four pixels."""
    pred = torch.tensor([0, 0, 1, 2, 0, 1, 1, 2, 2, 0, 1, 1])
    y = torch.tensor([0, 0, 0, 2, 1, 1, 1, 2, 2, 2, 0, 1])
    x = torch.zeros(12, 3, 32, 32)
    x.view(12, -1)[torch.arange(12), pred] = 1.0
    correct = ea.predict(picker(4), x) == y
    # by hand: class 0 holds points 0, 1, 2, 10 (correct 0, 1); class 1 points 4, 5, 6, 11 (correct 5, 6, 11);
    # class 2 points 3, 7, 8, 9 (correct 3, 7, 8); class 3 none
    s = ea.class_stats(correct, y, 4)
    assert s["n"] == [4, 4, 4, 0] and s["n_correct"] == [2, 3, 3, 0]
    assert s["acc"] == [0.5, 0.75, 0.75, None]
    assert (s["worst_class"], s["worst_acc"], s["best_class"], s["best_acc"], s["spread"]) == (0, 0.5, 1, 0.75, 0.25)
    row = ea.table_row("clean", correct.float().mean().item(), per_class=s, names=ea.CLASS_NAMES["cifar10"])
    assert row.endswith("25.00 50.00 (0 airplane)") and ea.TABLE_HEADER.endswith("spread worst class")


def test_eps_sweep_resolves_each_radius():
    args = ea.parse_args(["c.pt", "--eps-sweep", "2/255, 4/255,8/255,16/255"])
    sweep = ea.resolve_protocol(args, "cifar10")["sweep"]
    assert sweep["attack"] == "pgd_sat"  # the preset's first PGD attack
    assert [(t, e) for t, e, _ in sweep["points"]] == [(t, int(t.split("/")[0]) / 255)
                                                       for t in ("2/255", "4/255", "8/255", "16/255")]
    assert all(p == ea.WHITEBOX["pgd_sat"] for _, _, p in sweep["points"])  # step 2/255 and 20 steps at every eps
    fgsm = ea.resolve_protocol(ea.parse_args(["c.pt", "--eps-sweep", "2/255,16/255", "--sweep-attack", "fgsm"]),
                               "cifar10")["sweep"]
    assert [p["step"] for _, _, p in fgsm["points"]] == [2 / 255, 16 / 255]  # FGSM's step is the radius
    for preset, name in (("iad", "pgd20"), ("ardir", "pgd20"), ("adt", "fgsm20")):
        p = ea.resolve_protocol(ea.parse_args(["c.pt", "--preset", preset, "--eps-sweep", "0.01"]), "cifar10")
        assert p["sweep"]["attack"] == name and "eps_sweep" not in p["overrides"]
    assert ea.resolve_protocol(ea.parse_args(["c.pt"]), "cifar10")["sweep"] is None
    for bad in (["--eps-sweep", "0,8/255"], ["--eps-sweep", "2"], ["--eps-sweep", "x"], ["--sweep-attack", "pgd20"],
                ["--eps-sweep", "8/255", "--sweep-attack", "nope"]):
        with pytest.raises(SystemExit) as e:
            ea.resolve_protocol(ea.parse_args(["c.pt", *bad]), "cifar10")
        assert e.value.code == 2


def test_eps_sweep_reaches_the_attack(monkeypatch):
    """A two-class linear model: the CE gradient's sign is the same everywhere, so PGD drives every pixel
    to the boundary of its ball; the perturbation each point of the sweep produces must be exactly its eps."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3 * 32 * 32, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w * 1e-3)
        model[1].bias.zero_()
    model.requires_grad_(False)
    x = 0.3 + 0.4 * torch.rand(6, 3, 32, 32, generator=g)  # far from 0 and 1: no clamp binds
    y = ea.predict(model, x)
    args = ea.parse_args(["c.pt", "--eps-sweep", "2/255,4/255,8/255,16/255", "--bs", "4", "--quiet"])
    sweep = ea.resolve_protocol(args, "cifar10")["sweep"]
    seen, real = [], ea.pgd
    monkeypatch.setattr(ea, "pgd", lambda m, xb, yb, eps, *a, **k: seen.append((eps, xb, real(m, xb, yb, eps, *a, **k)))
                        or seen[-1][2])
    ctx = ea.Evaluation(args=args, model=model, x=x, y=y, eps=8 / 255, device="cpu", num_classes=2, exact=True,
                        clean=1.0, clean_correct=y == y)
    res = ea.eval_sweep(ctx, sweep)
    assert [e for e, _, _ in seen] == [e for _, e, _ in sweep["points"] for _ in range(2)]  # two batches per eps
    for eps, xb, x_adv in seen:
        delta = (x_adv - xb).abs()
        assert delta.min() >= eps - 1e-6 and delta.max() <= eps + 1e-6  # saturated: every pixel at eps
    assert [p["max_linf"] for p in res["points"]] == pytest.approx(res["eps"], abs=1e-6)
    assert res["eps"] == [2 / 255, 4 / 255, 8 / 255, 16 / 255] and res["acc"] == sorted(res["acc"], reverse=True)
    assert all(sum(p["per_class"]["n_correct"]) == p["n_correct"] for p in res["points"])
    assert len(ctx.rows) == 4 and ctx.rows[0].startswith("pgd_sat @ eps 2/255")


def test_eps_sweep_with_autoattack(model, data):
    x, y = data
    args = ea.parse_args(["c.pt", "--aa", "fast", "--aa-bs", "4", "--eps-sweep", "1/255,3/255", "--sweep-attack",
                          "autoattack", "--quiet"])
    sweep = ea.resolve_protocol(args, "cifar10")["sweep"]
    assert sweep["aa_version"] == "fast" and all(p is None for _, _, p in sweep["points"])
    ctx = ea.Evaluation(args=args, model=model, x=x, y=y, eps=8 / 255, device="cpu", num_classes=10, exact=True,
                        clean=1.0, clean_correct=y == y)
    res = ea.eval_sweep(ctx, sweep)
    for p, eps in zip(res["points"], (1 / 255, 3 / 255)):
        assert p["eps"] == eps and 0 < p["max_linf"] <= eps + 1e-6 and p["params"]["version"] == "fast"
        assert p["n_disagree"] == 0 and p["disagreements"] == []
    assert len(ctx.notes) == 2 and not ctx.failed
    assert res["acc"][0] >= res["acc"][1]


def test_cli_records_per_class_sweep_and_training(cifar_dir, tmp_path):
    """A suite checkpoint trained (on paper) in tmp/train with a relative teacher path: the JSON says which
    script and flags made it and what its teacher file is; per-class counts agree with the per-point flags."""
    import common
    train = tmp_path / "train"
    (train / "runs" / "iad__x").mkdir(parents=True)
    torch.manual_seed(0)
    teacher = train / "teacher.pt"
    common.save_checkpoint(teacher, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=3,
                           dataset="cifar10", args={"script": "train_teacher", "recipe": "sat-iad"}))
    args = {"script": "iad", "variant": "iad1", "teacher": "teacher.pt", "teacher_sha256": common.file_sha256(teacher),
            "runs_dir": "runs", "dataset": "cifar10", "env": {"host": "x"}}
    ckpt = train / "runs" / "iad__x" / "best.pt"
    common.save_checkpoint(ckpt, common.checkpoint_dict(common.build_model("cnn_small").eval(), kind="best", epoch=7,
                           dataset="cifar10", args=args))
    out = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, str(REPO / "eval_attacks.py"), str(ckpt), "--data-dir", str(cifar_dir),
                          "--device", "cpu", "--n-ex", "24", "--bs", "12", "--attacks", "fgsm", "--aa", "fast",
                          "--aa-bs", "24", "--eps-sweep", "2/255,8/255", "--json", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "worst class" in run.stdout and "pgd_sat @ eps 8/255" in run.stdout
    j = json.loads(out.read_text())
    t = j["training"]
    assert (t["script"], t["kind"], t["epoch"], t["args"]["variant"]) == ("iad", "best", 7, "iad1")
    assert "env" not in t["args"]
    assert t["teachers"]["teacher"] == {"path": "teacher.pt", "found": True, "suite": True, "same_file": True,
                                        "script": "train_teacher", "recipe": "sat-iad", "arch": "cnn_small",
                                        "dataset": "cifar10", "kind": "best", "epoch": 3}
    _, y = common.load_split("cifar10", cifar_dir, train=False, subset=24, download=False)
    flags = torch.tensor(j["attacks"]["aa_fast"]["robust_flags"], dtype=torch.bool)
    assert j["per_class"]["aa_fast"] == ea.class_stats(flags, y, 10)
    assert list(j["per_class"]) == ["clean", "fgsm", "aa_fast"] and j["class_names"][3] == "cat"
    for key, rec in (("clean", j["clean"]), ("fgsm", j["attacks"]["fgsm"])):
        assert j["per_class"][key]["n"] == torch.bincount(y, minlength=10).tolist()
        assert sum(j["per_class"][key]["n_correct"]) == rec["n_correct"]
    sweep = j["eps_sweep"]
    assert sweep["attack"] == "pgd_sat" and sweep["eps"] == [2 / 255, 8 / 255]
    for p in sweep["points"]:
        assert p["params"]["step"] == 2 / 255 and p["max_linf"] == pytest.approx(p["eps"], abs=1e-6)
