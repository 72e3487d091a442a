"""Bit parity of eval_attacks.py's AutoAttack with the official code (docs/eval_attacks.md §10.1).

The oracle is `pyautoattack` 0.2.0 (fra31/auto-attack@a392200 repackaged), a test-only dependency:
these tests skip when it is absent. Everything runs on the CPU with one thread, the same seed and
the same batch size for both implementations, and every comparison is `torch.equal` (bitwise): no
component needed a tolerance. Sizes are chosen for cost (FAB's projection and Square's 5000 queries
dominate on a CPU); what each configuration exercises is asserted next to the parity check.
"""

import logging
import re

import pytest
import torch
import torch.nn as nn

pyautoattack = pytest.importorskip("pyautoattack")
from conftest import tiny_cnn as shared_tiny_cnn  # noqa: E402
from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
from pyautoattack.fab_projections import projection_linf as official_projection_linf  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

import eval_attacks as ea  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Quantize(nn.Module):
    """Q_5 in front of the network: round() has a zero gradient, so white-box attacks see nothing."""

    def forward(self, x):
        return torch.round(x * 31) / 31


def tiny_cnn(seed=0, masked=False):
    """conftest.tiny_cnn, optionally behind a rounding layer that masks gradients."""
    net = shared_tiny_cnn(seed)
    return nn.Sequential(Quantize(), net).eval() if masked else net


def points(model, n, seed, n_wrong=1):
    """Seeded uniform images; labels = the model's predictions, the first `n_wrong` shifted to a wrong class."""
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).max(1)[1]
    y[:n_wrong] = (y[:n_wrong] + 1) % 10
    return x, y


def n_robust(model, x_adv, y):
    with torch.no_grad():
        return (model(x_adv).max(1)[1] == y).sum().item()


@pytest.fixture(scope="module")
def model():
    return tiny_cnn(0)


# ---- projection_linf -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,dim", [(1, 2), (7, 2), (5, 3), (9, 17), (16, 100), (6, 3072)])
def test_projection_linf_bitwise(n, dim):
    g = torch.Generator().manual_seed(1000 + dim)
    t = torch.rand(n, dim, generator=g)
    w = torch.randn(n, dim, generator=g)
    w[:, ::5] = 0  # zero coordinates (the (w != 0) masks)
    t[:, 1::7] = torch.round(t[:, 1::7])  # points on the box faces
    b = torch.randn(n, generator=g) * dim ** 0.5
    b[::3] = (w[::3] * t[::3]).sum(1) + 0.01 * torch.randn(len(b[::3]), generator=g)  # hyperplanes close to the point
    mine, official = ea.projection_linf(t, w, b), official_projection_linf(t, w, b)
    assert torch.equal(mine, official)


# ---- each sub-attack: one run (the whole trajectory) and perturb() ---------------------------------------
# A run's outputs for points it does not break (APGD's highest-loss iterate, Square's x_best after all its
# queries) depend on every iteration, so comparing runs checks the full schedules, not only the successes.

def test_apgd_ce_bitwise(model):
    eps = 0.75 / 255
    x, y = points(model, 10, seed=3, n_wrong=2)
    official = APGDAttack(model, n_restarts=1, n_iter=100, eps=eps, seed=0, loss="ce", rho=.75, device="cpu")
    official.init_hyperparam(x)
    torch.manual_seed(0)
    ref = official.attack_single_run(x, y)  # (x_best, acc, loss_best, x_best_adv)
    torch.manual_seed(0)
    run = ea._apgd_run(model, x, y, eps, ea.ce_loss)
    assert all(torch.equal(a, b) for a, b in zip(run, ref))
    mine = ea.apgd(model, x, y, eps, loss="ce", seed=0)
    assert torch.equal(mine, official.perturb(x, y))
    assert 0 < n_robust(model, mine, y) < 8  # some points broken, some not


def test_apgd_dlr_eot_perturb_bitwise(model):
    """APGD-DLR with EOT (version 'rand' uses eot_iter 20; 2 here, the code path is the same)."""
    eps = 0.75 / 255
    x, y = points(model, 4, seed=4)
    official = APGDAttack(model, n_restarts=1, n_iter=100, eps=eps, seed=0, loss="dlr", eot_iter=2, device="cpu")
    assert torch.equal(ea.apgd(model, x, y, eps, loss="dlr", seed=0, eot_iter=2), official.perturb(x, y))


def test_apgd_t_bitwise(model):
    eps = 0.75 / 255
    x, y = points(model, 5, seed=0)
    official = APGDAttack_targeted(model, n_restarts=1, n_iter=100, eps=eps, seed=0, n_target_classes=9, device="cpu")
    official.init_hyperparam(x)
    with torch.no_grad():
        official.y_target = model(x).sort(dim=1)[1][:, -2]
    torch.manual_seed(0)
    ref = official.attack_single_run(x, y)
    torch.manual_seed(0)
    run = ea._apgd_run(model, x, y, eps, lambda z, yy: ea.dlr_targeted_loss(z, yy, official.y_target))
    assert all(torch.equal(a, b) for a, b in zip(run, ref))
    mine = ea.apgd(model, x, y, eps, loss="dlr-targeted", seed=0)
    assert torch.equal(mine, official.perturb(x, y))
    assert 0 < n_robust(model, mine, y) < 4


@pytest.mark.parametrize("target_class", [2, 6, 10])
def test_fab_t_run_bitwise(model, target_class):
    """One targeted run returns the closest adversarial iterate found, whatever eps: a value that depends on
    the whole trajectory towards that target."""
    x, y = points(model, 3, seed=0, n_wrong=0)
    official = FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=100, eps=1 / 255, seed=0, targeted=True,
                            device="cpu")
    official.target_class = target_class
    ref = official.attack_single_run(x, y, use_rand_start=False, is_targeted=True)
    assert torch.equal(ea._fab_targeted_run(model, x, y, target_class), ref)


def test_fab_t_perturb_bitwise(model):
    eps = 1 / 255
    x, y = points(model, 6, seed=0)
    oracle = AutoAttack(model, device="cpu", eps=eps, seed=0, version="standard")
    oracle.fab.targeted, oracle.fab.n_restarts, oracle.fab.seed = True, 1, 0
    mine = ea.fab_targeted(model, x, y, eps, seed=0)
    assert torch.equal(mine, oracle.fab.perturb(x, y))
    assert n_robust(model, mine, y) == 0


def test_square_run_full_budget_bitwise(model):
    """The full 5000 queries: one point survives them all (its x_best carries the whole p schedule), the
    other is broken after ~700 queries."""
    eps = 1.5 / 255
    x, y = points(model, 6, seed=0)
    x, y = x[4:], y[4:]
    official = SquareAttack(model, p_init=.8, n_queries=5000, eps=eps, norm="Linf", n_restarts=1, seed=0,
                            device="cpu", resc_schedule=False)
    official.init_hyperparam(x)
    torch.manual_seed(0)
    queries_ref, x_best_ref = official.attack_single_run(x, y)
    torch.manual_seed(0)
    queries, x_best = ea._square_run(model, x, y, eps)
    assert torch.equal(queries, queries_ref) and torch.equal(x_best, x_best_ref)
    assert queries.max() == 5001 and queries.min() < 5001


def test_square_perturb_bitwise(model):
    eps = 3 / 255
    x, y = points(model, 4, seed=0)
    oracle = AutoAttack(model, device="cpu", eps=eps, seed=0, version="standard")
    oracle.square.seed = 0
    assert oracle.square.n_queries == 5000 and oracle.square.p_init == 0.8 and not oracle.square.rescale_schedule
    mine = ea.square(model, x, y, eps, seed=0)
    assert torch.equal(mine, oracle.square.perturb(x, y))
    assert n_robust(model, mine, y) == 0


# ---- the ensemble (run_standard_evaluation) ----------------------------------------------------------

class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_oracle(model, x, y, eps, bs, attacks=None):
    """The official ensemble; per-attack accuracies come only from the 'auto-attack' logger at DEBUG."""
    adversary = AutoAttack(model, device="cpu", eps=eps, seed=0, version="standard")
    if attacks is not None:  # 'fast' = standard with the list trimmed (§4.5)
        adversary.attacks_to_run = attacks
    logger, handler = logging.getLogger("auto-attack"), Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=bs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return x_adv, y_adv, handler.messages


def compare_ensembles(model, x, y, eps, bs, attacks):
    x_off, y_off, log = run_oracle(model, x, y, eps, bs, None if attacks == ea.AA_VERSIONS["standard"] else attacks)
    mine = ea.autoattack(model, x, y, eps, attacks=attacks, bs=bs, seed=0)
    assert torch.equal(mine["x_adv"], x_off)
    assert torch.equal(mine["y_adv"], y_off)
    assert torch.equal(mine["robust"], y_off == y)  # robust flags: the official y_adv equals y exactly there

    # cumulative accuracies: exact counts from the per-batch lines, and the logged percentages
    n = len(y)
    count = round(mine["cumulative"]["clean"] * n)
    assert f"initial accuracy: {mine['cumulative']['clean']:.2%}" in log
    per_attack = {}
    for msg in log:
        m = re.fullmatch(r"(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed", msg)
        if m:
            per_attack.setdefault(m[1], []).append((int(m[2]), int(m[5]), int(m[4])))
    batches = {}
    for name in attacks:
        if name not in per_attack:  # skipped by both: nothing robust left
            assert mine["cumulative"][name] == 0.0 and count == 0
            continue
        count -= sum(k for _, _, k in per_attack[name])
        assert round(mine["cumulative"][name] * n) == count
        assert f"robust accuracy after {name.upper()}: {mine['cumulative'][name]:.2%}" in " ".join(log)
        batches[name] = [size for _, size, _ in per_attack[name]]
    official_warnings = [msg for msg in log if "it seems" in msg or "points with zero gradient" in msg
                         or "Square Attack has decreased" in msg]
    assert len(mine["warnings"]) == len(official_warnings)
    return mine, batches


def test_ensemble_standard_multibatch_bitwise(model):
    """bs 3 < n 8: the clean pass runs 3+3+2, APGD-CE runs 3+3+1 (a last batch of one point), and the one
    point that survives goes through APGD-T, FAB-T and Square alone (a batch of one)."""
    x, y = points(model, 8, seed=0)
    mine, batches = compare_ensembles(model, x, y, 0.75 / 255, 3, ea.AA_VERSIONS["standard"])
    assert batches == {"apgd-ce": [3, 3, 1], "apgd-t": [1], "fab-t": [1], "square": [1]}


def test_ensemble_gradient_masking_warnings_bitwise():
    """A model behind a rounding layer has zero input gradients (the DLR zero-gradient warning at every
    APGD-T run): APGD-CE and APGD-T break one point each only through their random starts, Square breaks
    the rest (the official Square-success warning). A custom list, as the official version='custom'."""
    model = tiny_cnn(0, masked=True)
    x, y = points(model, 6, seed=2)
    mine, batches = compare_ensembles(model, x, y, 6 / 255, 6, ["apgd-ce", "apgd-t", "square"])
    assert [round(6 * v) for v in mine["cumulative"].values()] == [5, 4, 3, 0]
    assert sum("zero input gradient" in w for w in mine["warnings"]) == 9
    assert any("Square lowered" in w for w in mine["warnings"])


# ---- the bundled ResNet-18 (pyautoattack/examples/model_test.pt) ----------------------------------------

def test_resnet18_model_test_pt_bitwise():
    """The official example checkpoint in the suite's resnet18, two points. On one CPU thread a ResNet-18
    step costs ~0.1 s, so the schedules are shortened (10 iterations for APGD-CE; 5 iterations and 3 targets
    for APGD-T); the 100-iteration, 9-target schedule is covered on the tiny model above."""
    common = pytest.importorskip("common")
    if "resnet18" not in getattr(common, "ARCHS", ()):
        pytest.skip("common.build_model('resnet18') not available yet")
    from importlib.resources import files
    path = files("pyautoattack") / "examples" / "model_test.pt"
    model = common.build_model("resnet18", 10, None)
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True), strict=True)
    model.eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).max(1)[1]
    eps = 8 / 255
    official = APGDAttack(model, n_restarts=1, n_iter=10, eps=eps, seed=0, loss="ce", device="cpu")
    assert torch.equal(ea.apgd(model, x, y, eps, loss="ce", seed=0, n_iter=10), official.perturb(x, y))
    official_t = APGDAttack_targeted(model, n_restarts=1, n_iter=5, eps=eps, seed=0, n_target_classes=3, device="cpu")
    assert torch.equal(ea.apgd(model, x, y, eps, loss="dlr-targeted", seed=0, n_iter=5, n_target_classes=3),
                      official_t.perturb(x, y))
