"""train_teacher.py: recipe defaults against docs/train_teacher.md, the losses and attacks against
independent computations, exact --resume, and a subprocess smoke run of natural training, SAT and TRADES."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    args_for,
    check_best_reloads,
    read_metrics,
    run_script,
)

import common
import train_teacher as tt

# lr 0.02: at the recipes' 0.1 the small CNN diverges within two epochs (the divergence guard stops it)
TINY = ["--arch", "cnn_small", "--train-subset", "96", "--test-subset", "32", "--batch-size", "32",
        "--lr", "0.02"]


# ---------------------------------------------------------------------------------------------
# Recipe defaults (teachers.md §1)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,expect", [
    ("natural-rslad", dict(epochs=100, batch_size=128, lr=0.1, wd=2e-4, monitor="clean", seed=0, arch="resnet18")),
    ("natural-iad", dict(epochs=200, batch_size=128, wd=2e-4, monitor="clean", seed=1)),
    ("natural-ardir", dict(epochs=200, wd=5e-4, arch="preact_resnet18", monitor="clean")),
    ("sat-madry", dict(iterations=80000, batch_size=128, pad=2, wd=2e-4, wd_scope="weights", eps=8 / 255,
                       attack_step=2 / 255, attack_steps=10, rand_start="uniform-clamp", attack_bn="train",
                       attack_loss="ce_sum", monitor="pgd20-monitor")),
    ("sat-iad", dict(epochs=200, eps=8 / 255, attack_step=2 / 255, attack_steps=10, rand_start="uniform-clamp",
                     attack_bn="eval", attack_loss="ce_mean", monitor="pgd10-madry", seed=1, wd_scope="all", pad=4)),
    ("sat-ardir", dict(epochs=200, wd=5e-4, arch="preact_resnet18", attack_bn="eval", monitor="pgd20-sat")),
    ("trades", dict(epochs=76, eps=0.031, attack_step=0.007, attack_steps=10, beta=6.0, rand_start="normal001",
                    attack_bn="eval", monitor="pgd20-monitor", seed=1, arch="wrn34_10")),
    ("trades-iad", dict(epochs=200, eps=8 / 255, attack_step=2 / 255, beta=6.0, monitor="pgd10-madry")),
])
def test_recipe_defaults(recipe, expect):
    args = args_for(tt, "--recipe", recipe)
    assert {k: getattr(args, k) for k in expect} == expect


def test_sat_ardir_svhn_step_and_overrides():
    assert args_for(tt, "--recipe", "sat-ardir", "--dataset", "svhn").attack_step == 1 / 255
    assert args_for(tt, "--recipe", "sat-ardir", "--dataset", "svhn", "--attack-step", "3/255").attack_step == 3 / 255
    assert args_for(tt, "--recipe", "trades", "--eps", "8/255", "--beta", "1").eps == 8 / 255


@pytest.mark.parametrize("recipe,table", [
    ("natural-rslad", {1: 0.1, 74: 0.1, 75: 0.01, 89: 0.01, 90: 0.001, 100: 0.001}),  # "÷10 at the 75th and 90th"
    ("natural-iad", {99: 0.1, 100: 0.01, 149: 0.01, 150: 0.001, 200: 0.001}),       # IAD piecewise, 1-indexed
    ("trades", {74: 0.1, 75: 0.01, 76: 0.01, 90: 0.001, 100: 1e-4}),                 # adjust_learning_rate
    ("sat-madry", {1: 0.1, 40000: 0.1, 40001: 0.01, 60000: 0.01, 60001: 0.001}),     # per iteration
])
def test_lr_schedules(recipe, table):
    args = args_for(tt, "--recipe", recipe)
    assert {k: tt.lr_at(k, args) for k in table} == pytest.approx(table, rel=1e-12)


def test_iterations_only_for_madry(capsys):
    with pytest.raises(SystemExit) as e:
        args_for(tt, "--recipe", "sat-iad", "--iterations", "10")
    assert e.value.code == 2 and "--iterations" in capsys.readouterr().err


# Each flag that a recipe does not read, typed with that recipe (the flag's value is valid)
UNUSED = [
    *[(["--recipe", recipe, flag, value], flag) for recipe in ("natural-rslad", "natural-iad", "natural-ardir")
      for flag, value in (("--eps", "8/255"), ("--attack-step", "2/255"), ("--attack-steps", "10"),
                          ("--rand-start", "uniform"), ("--attack-bn", "eval"), ("--beta", "6"))],
    *[(["--recipe", recipe, "--beta", "6"], "--beta") for recipe in ("sat-madry", "sat-iad", "sat-ardir")],
    *[(["--recipe", recipe, "--iterations", "10"], "--iterations") for recipe in sorted(tt.RECIPES) if recipe != "sat-madry"],
    (["--recipe", "sat-madry", "--iterations", "10", "--epochs", "2"], "--epochs"),
    *[(["--recipe", recipe, flag], flag) for recipe in ("natural-iad", "trades") for flag in ("--unsafe-load", "--override-record")],
]


@pytest.mark.parametrize("argv,flag", UNUSED, ids=[" ".join(argv) for argv, _ in UNUSED])
def test_unread_flags_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        tt.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} is "), err


def test_read_flags_are_accepted():
    args_for(tt, "--recipe", "trades-iad", "--eps", "8/255", "--attack-step", "2/255", "--attack-steps", "3",
             "--rand-start", "uniform", "--attack-bn", "train", "--beta", "1")
    args_for(tt, "--recipe", "sat-madry", "--iterations", "10", "--attack-bn", "eval")
    assert args_for(tt, "--recipe", "sat-madry", "--epochs", "2").iterations is None  # N full passes


def test_madry_weight_decay_only_on_weights():
    model = common.build_model("cnn_small")
    opt = tt.make_optimizer(model, args_for(tt, "--recipe", "sat-madry"))
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 2e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    opt = tt.make_optimizer(model, args_for(tt, "--recipe", "sat-iad"))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 2e-4


# ---------------------------------------------------------------------------------------------
# Losses and attacks against independent computations
# ---------------------------------------------------------------------------------------------

def fixed_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_trades_loss_matches_formula_and_ledger():
    args = args_for(tt, "--recipe", "trades")
    torch.manual_seed(0)
    model = common.build_model("cnn_small").train()
    ref = copy.deepcopy(model)
    x, y = fixed_batch()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    loss, terms, _ = tt.loss_fn(model, x, x_adv, y, args)
    # TRADES Eq. 5 written out, passes in the order [x, x', x], KL target keeps its gradient
    z_nat = ref(x)
    ce = -F.log_softmax(z_nat, 1)[torch.arange(len(y)), y].mean()
    z_adv = ref(x_adv)
    p = F.softmax(ref(x), 1)
    kl = (p * (torch.log(p) - F.log_softmax(z_adv, 1))).sum() / len(y)
    expected = ce + 6.0 * kl
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert terms["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    for a, b in zip(model.buffers(), ref.buffers()):  # same BN updates from the same three passes
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    g = torch.autograd.grad(loss, list(model.parameters()))
    g_ref = torch.autograd.grad(expected, list(ref.parameters()), retain_graph=True)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    # detaching the KL target would give a different gradient: the test can tell them apart
    g_det = torch.autograd.grad(ce + 6.0 * (p.detach() * (torch.log(p.detach()) - F.log_softmax(ref(x_adv), 1))).sum() / len(y),
                                list(ref.parameters()))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_det))


def test_sat_and_natural_losses():
    torch.manual_seed(0)
    model = common.build_model("cnn_small").train()
    x, y = fixed_batch()
    x_adv = (x + 0.03).clamp(0, 1)
    loss, _, _ = tt.loss_fn(model, x, x_adv, y, args_for(tt, "--recipe", "sat-iad"))
    ref = copy.deepcopy(model)
    assert loss.item() == pytest.approx(F.cross_entropy(ref(x_adv), y).item(), abs=1e-6)
    loss, _, _ = tt.loss_fn(model, x, x_adv, y, args_for(tt, "--recipe", "natural-iad"))
    assert loss.item() == pytest.approx(F.cross_entropy(copy.deepcopy(model)(x), y).item(), abs=1e-6)


@pytest.mark.parametrize("recipe,moves", [("sat-madry", True), ("sat-iad", False), ("trades", False)])
def test_inner_max_ball_box_objective_and_bn_mode(recipe, moves):
    args = args_for(tt, "--recipe", recipe, "--attack-steps", "5")
    torch.manual_seed(0)
    model = common.build_model("cnn_small").train()
    x, y = fixed_batch(32)
    before = [b.clone() for b in model.buffers()]
    x_adv = tt.inner_max(model, x, y, args)
    assert model.training  # back in train mode for the outer loss
    assert (x_adv - x).abs().max() <= args.eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert changed is moves  # Madry attacks in train-mode BN; IAD's AT and TRADES in eval()
    model.eval()
    with torch.no_grad():
        if args.kind == "trades":
            p = F.softmax(model(x), 1)
            objective = lambda z: F.kl_div(F.log_softmax(model(z), 1), p, reduction="sum").item()
        else:
            objective = lambda z: F.cross_entropy(model(z), y).item()
        assert objective(x_adv) > objective(x) + 1e-3


# ---------------------------------------------------------------------------------------------
# Runs: resume, smoke
# ---------------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_run(cifar_dir, tmp_path, monkeypatch):
    base = ["--recipe", "sat-iad", *TINY, "--attack-steps", "2", "--epochs", "3", "--data-dir", str(cifar_dir), "--device", "cpu"]
    tt.main(base + ["--runs-dir", str(tmp_path / "a")])
    (full,) = (tmp_path / "a").iterdir()

    real_save = common.Run.save_last

    def killed_after_epoch_2(self, model, optimizer, record, *a, **k):
        out = real_save(self, model, optimizer, record, *a, **k)
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # the process dies right after last.pt of epoch 2 is written
        return out
    monkeypatch.setattr(common.Run, "save_last", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        tt.main(base + ["--runs-dir", str(tmp_path / "b")])
    monkeypatch.setattr(common.Run, "save_last", real_save)
    (part,) = (tmp_path / "b").iterdir()
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 2
    tt.main(base + ["--runs-dir", str(tmp_path / "b"), "--resume", str(part / "last.pt")])

    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full, part))
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])
    ma, mb = read_metrics(full), read_metrics(part)
    assert [m["epoch"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if "seconds" not in k and k != "images_per_s"} == \
               {k: v for k, v in y.items() if "seconds" not in k and k != "images_per_s"}


def test_resume_refuses_changed_flags(cifar_dir, tmp_path, capsys):
    base = ["--recipe", "natural-iad", *TINY, "--epochs", "1", "--data-dir", str(cifar_dir), "--device", "cpu",
            "--runs-dir", str(tmp_path)]
    tt.main(base)
    (run,) = tmp_path.iterdir()
    with pytest.raises(SystemExit) as e:
        tt.main(base + ["--lr", "0.05", "--resume", str(run / "last.pt")])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tt.main(base + ["--resume", str(run / "best.pt")])
    assert e.value.code == 2 and "last.pt" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["natural-rslad", "sat-madry", "trades"])
def test_smoke_subprocess(recipe, cifar_dir, tmp_path):
    length = ["--iterations", "5"] if recipe == "sat-madry" else ["--epochs", "2"]
    attack = [] if recipe.startswith("natural") else ["--attack-steps", "2"]  # a natural recipe runs no attack
    proc = run_script(ROOT / "train_teacher.py", "--recipe", recipe, *TINY, *attack, *length, "--data-dir", cifar_dir,
                      "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"train_teacher-{recipe}__cifar10__cnn_small__s{args_for(tt, '--recipe', recipe).seed}__")
    saved = json.loads((run / "args.json").read_text())
    assert saved["recipe"] == recipe and saved["script"] == "train_teacher"
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["images_per_s"] > 0 for m in metrics)
    if recipe == "sat-madry":  # 3 batches per pass: 5 iterations = one full pass and a cut-short one
        assert saved["iterations"] == 5 and saved["epochs"] == 2
    if recipe == "trades":
        assert {"ce", "kl", "loss"} <= set(metrics[0])
    best = check_best_reloads(run, cifar_dir, 32)
    key = "test_clean" if recipe == "natural-rslad" else "test_robust"
    assert best["select"]["value"] == max(m[key] for m in metrics)
    assert best["epoch"] == metrics[-1]["best_epoch"]
