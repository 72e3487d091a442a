"""The training protocol as main() runs it, for every training script and configuration.

Unit tests check lr_at, the monitors and the optimiser helper one by one; nothing else checks that
main() wires them together: a main() that sets a constant lr instead of calling lr_at, passes weight
decay 0 to SGD, or monitors with 10 PGD steps instead of 20, passes all of them. Here each script
runs once as a user types it (in-process main(argv), tiny synthetic data, 3 epochs, the lr
milestones moved into the run), and what the run wrote is checked against the papers' numbers,
written out below as the docs/<script>.md pages state them (never imported from the code):

- metrics.jsonl: the lr of each epoch (initial lr x 0.1 after each milestone), and which epochs the
  monitor ran (the lines with test_clean / test_robust); a global optimiser step hook: the lr each
  SGD step actually used;
- last.pt's optimizer state: momentum, weight decay, nesterov, dampening and lr of every parameter
  group, and that the groups hold every trained parameter;
- args.json: the monitor's name, its epoch flags (eval_every, eval_all_from, eval_first, eval_last)
  and `monitor_attack`, the attack the monitor ran (eps, steps, step, start, loss, bn);
- and, through a spy on common.monitor, that the attack main() hands the monitor is that same one.

A second test runs main() with a scripted monitor and checks how best.pt is chosen: the highest value,
strictly greater (a tie keeps the earlier epoch), written at the epoch that found it.
"""

import json
from importlib import import_module

import pytest
import torch
from conftest import read_metrics

import common

EPOCHS = 3
MILESTONES = ["--lr-milestones", "1", "2"]  # lr x0.1 after epochs 1 and 2: every rate of the schedule in 3 epochs
LR_SCHEDULE = [0.1, 0.01, 0.001]  # every script's paper lr 0.1, then x0.1 per passed milestone
TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--device", "cpu", "--epochs", str(EPOCHS), *MILESTONES]
ATTACK = ["--attack-steps", "1"]  # the training attack only; the monitor keeps the paper's steps

# The monitors' attacks as docs/common.md §7 defines them (its table of named configurations;
# the student is always in eval() mode there: "One routine: model in eval() mode").
PGD10_ARD = dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_sum", bn="eval")
PGD20_MONITOR = dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval")
PGD10_MADRY = dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval")
PGD20_SAT = dict(eps=8 / 255, steps=20, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval")  # C-10 step
PGD10_PEERAID = dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_mean", bn="eval")
FGSM20_TRADES = dict(eps=0.031, steps=20, step=0.003, start="uniform", loss="ce_mean", bn="eval")

EVERY_EPOCH = dict(eval_every=1, eval_all_from=None, eval_first=False)


def case(id, script, argv, *, wd, monitor, attack, schedule, monitored, source, models=1, groups=None):
    """One configuration: `argv(teacher)` gives its own flags (after TINY: they win); the rest is what the
    page `source` says."""
    return pytest.param(dict(script=script, argv=argv, wd=wd, monitor=monitor, attack=attack, schedule=schedule,
                             monitored=monitored, models=models, groups=groups, source=source), id=id)


CASES = [
    # docs/rslad.md §3: lr 0.1, momentum 0.9, wd 2e-4; pgd20-monitor at epochs 20, 40, ..., 200 and every epoch
    # from 215 (--eval-every 20 --eval-all-from 215), plus the last: epoch 3 only in a 3-epoch run
    case("rslad", "rslad", lambda t: ["--teacher", t, *ATTACK],
         wd=2e-4, monitor="pgd20-monitor", attack=PGD20_MONITOR,
         schedule=dict(eval_every=20, eval_all_from=215, eval_first=False), monitored=[3], source="docs/rslad.md §3"),
    # docs/ard.md §3: 0.1, 0.9, 2e-4; monitor pgd10-ard every epoch (test() in main.py)
    case("ard", "ard", lambda t: ["--teacher", t, *ATTACK],
         wd=2e-4, monitor="pgd10-ard", attack=PGD10_ARD, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/ard.md §3"),
    # docs/iad.md §3: 0.1, 0.9, 2e-4; monitor pgd10-ard every epoch, for every variant
    case("iad-iad1", "iad", lambda t: ["--variant", "iad1", "--teacher", t, *ATTACK],
         wd=2e-4, monitor="pgd10-ard", attack=PGD10_ARD, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/iad.md §3"),
    case("iad-iad2", "iad",
         lambda t: ["--variant", "iad2", "--teacher", t, "--nat-teacher", t, *ATTACK],
         wd=2e-4, monitor="pgd10-ard", attack=PGD10_ARD, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/iad.md §3"),
    # docs/mtard.md §3: 0.1, 0.9, 2e-4; pgd20-monitor at epoch 1, every 20 epochs, every epoch from 215
    # (--eval-first --eval-every 20 --eval-all-from 215), plus the last: epochs 1 and 3
    case("mtard", "mtard", lambda t: ["--teacher", t, "--nat-teacher", t, *ATTACK],
         wd=2e-4, monitor="pgd20-monitor", attack=PGD20_MONITOR,
         schedule=dict(eval_every=20, eval_all_from=215, eval_first=True), monitored=[1, 3], source="docs/mtard.md §3"),
    # docs/ardir.md §3: 0.1, 0.9, **5e-4** (§4.1); monitor pgd20-sat every epoch, 20 steps x 2/255 on CIFAR-10
    # (D-ARDIR-6). cnn_small has no layer4 (tests/test_ardir.py)
    case("ardir", "ardir", lambda t: ["--teacher", t, "--ir-layers", "layer1,layer2,layer3", *ATTACK],
         wd=5e-4, monitor="pgd20-sat", attack=PGD20_SAT, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/ardir.md §3"),
    # docs/adt_aodt.md §3: 0.1, 0.9, 2e-4; monitor fgsm20-trades (eps 0.031, 20 x 0.003) every epoch (D-ADT-8);
    # AODT: one SGD over M^r and the peer M^n with the same hyper-parameters (D-ADT-3)
    case("adt", "adt_aodt", lambda t: ["--method", "adt", "--teacher", t, *ATTACK],
         wd=2e-4, monitor="fgsm20-trades", attack=FGSM20_TRADES, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/adt_aodt.md §3"),
    case("aodt", "adt_aodt", lambda t: ["--method", "aodt", "--peer-arch", "cnn_small", *ATTACK],
         wd=2e-4, monitor="fgsm20-trades", attack=FGSM20_TRADES, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         models=2, source="docs/adt_aodt.md §3, D-ADT-3"),
    # docs/adaad.md §3: 0.1, 0.9, **5e-4** (main.py); monitor pgd10-madry (advertorch's PGD-10) every epoch
    case("adaad", "adaad", lambda t: ["--teacher", t, *ATTACK],
         wd=5e-4, monitor="pgd10-madry", attack=PGD10_MADRY, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/adaad.md §3"),
    case("adaad-adaiad", "adaad", lambda t: ["--variant", "adaiad", "--teacher", t, "--begin", "1", *ATTACK],
         wd=5e-4, monitor="pgd10-madry", attack=PGD10_MADRY, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/adaad.md §3"),
    # docs/peeraid.md §3: both models SGD 0.1, 0.9, 2e-4 (configs/PeerAiD_*.json), a group each (D-PEER-2);
    # monitor pgd10-peeraid (test_kd's PGD-10: unclamped uniform start, CE mean) every epoch
    case("peeraid", "peeraid", lambda t: ["--peer-arch", "cnn_small", *ATTACK],
         wd=2e-4, monitor="pgd10-peeraid", attack=PGD10_PEERAID, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         models=2, source="docs/peeraid.md §3, D-PEER-2"),
    # docs/train_teacher.md §1: every recipe SGD lr 0.1, momentum 0.9; monitor every epoch (pass)
    case("teacher-natural-rslad", "train_teacher", lambda t: ["--recipe", "natural-rslad"],
         wd=2e-4, monitor="clean", attack=None, schedule=EVERY_EPOCH, monitored=[1, 2, 3], source="docs/train_teacher.md §1.1"),
    case("teacher-natural-iad", "train_teacher", lambda t: ["--recipe", "natural-iad"],
         wd=2e-4, monitor="clean", attack=None, schedule=EVERY_EPOCH, monitored=[1, 2, 3], source="docs/train_teacher.md §1.2"),
    case("teacher-natural-ardir", "train_teacher", lambda t: ["--recipe", "natural-ardir"],
         wd=5e-4, monitor="clean", attack=None, schedule=EVERY_EPOCH, monitored=[1, 2, 3], source="docs/train_teacher.md §1.3"),
    # sat-madry: iteration-based; 64 images / 32 = 2 iterations a pass (remainder dropped), so milestones 2 and 4
    # iterations give the passes' final lrs 0.1, 0.01, 0.001. wd 2e-4 on conv and linear weights only, 0 on
    # the rest (Madry's DW variables): two groups
    case("teacher-sat-madry", "train_teacher",
         lambda t: ["--recipe", "sat-madry", *ATTACK, "--lr-milestones", "2", "4"],
         wd=2e-4, monitor="pgd20-monitor", attack=PGD20_MONITOR, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         groups="madry", source="docs/train_teacher.md §1.4"),
    case("teacher-sat-iad", "train_teacher", lambda t: ["--recipe", "sat-iad", *ATTACK],
         wd=2e-4, monitor="pgd10-madry", attack=PGD10_MADRY, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/train_teacher.md §1.5"),
    case("teacher-sat-ardir", "train_teacher", lambda t: ["--recipe", "sat-ardir", *ATTACK],
         wd=5e-4, monitor="pgd20-sat", attack=PGD20_SAT, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/train_teacher.md §1.6"),
    case("teacher-trades", "train_teacher", lambda t: ["--recipe", "trades", *ATTACK],
         wd=2e-4, monitor="pgd20-monitor", attack=PGD20_MONITOR, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/train_teacher.md §1.7, D-TEACH-9"),
    case("teacher-trades-iad", "train_teacher", lambda t: ["--recipe", "trades-iad", *ATTACK],
         wd=2e-4, monitor="pgd10-madry", attack=PGD10_MADRY, schedule=EVERY_EPOCH, monitored=[1, 2, 3],
         source="docs/train_teacher.md §1.8"),
]


def check_attack(got, want):
    """`got` (a monitor configuration) is the documented attack `want`: same keys, floats to 1e-9 relative."""
    assert isinstance(got, dict) and set(got) == set(want), got
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), (k, got[k], v)


@pytest.fixture
def monitor_calls(monkeypatch):
    """The attack of every common.monitor(model, loader, attack, ...) call during the test (None: clean
    accuracy only)."""
    real, calls = common.monitor, []

    def spy(model, loader, attack, *args, **kwargs):
        calls.append(attack)
        return real(model, loader, attack, *args, **kwargs)
    monkeypatch.setattr(common, "monitor", spy)
    return calls


@pytest.fixture
def step_lrs():
    """The lr of every parameter group at each optimiser step during the test (a global step pre-hook)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append([g["lr"] for g in optimizer.param_groups])
    handle = register_optimizer_step_pre_hook(hook)
    yield steps
    handle.remove()


def cnn_small_parameters():
    return list(common.build_model("cnn_small").parameters())


@pytest.mark.parametrize("c", CASES)
def test_main_runs_the_papers_protocol(c, cifar_dir, teacher_ckpt, tmp_path, monitor_calls, step_lrs):
    module = import_module(c["script"])
    runs = tmp_path / "runs"
    module.main([*TINY, *c["argv"](str(teacher_ckpt)), "--data-dir", str(cifar_dir), "--runs-dir", str(runs)])
    (run,) = runs.iterdir()

    # the lr of each epoch: 0.1, then x0.1 after each milestone
    lines = [m for m in read_metrics(run) if m["epoch"] >= 1]  # epoch 0: the teachers' measurement
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert [m["lr"] for m in lines] == pytest.approx(LR_SCHEDULE, rel=1e-9), c["source"]
    # ... and the lr the steps used: 64 images / batch 32 = 2 steps an epoch (an lr logged but set after the
    # epoch's steps, or a second optimiser, would show here)
    want = [lr for lr in LR_SCHEDULE for _ in range(2)]
    assert len(step_lrs) == len(want), step_lrs
    for lrs, lr in zip(step_lrs, want):
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-9), step_lrs

    # the optimiser as it ended: SGD with the paper's momentum and weight decay in every group
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    for g in groups:
        assert g["lr"] == pytest.approx(LR_SCHEDULE[-1], rel=1e-9)
        assert g["momentum"] == 0.9
        assert (g["nesterov"], g["dampening"]) == (False, 0)
    params = cnn_small_parameters()
    if c["groups"] == "madry":  # weight decay on conv and linear weights only, 0 on BN parameters and biases
        weights = sum(p.ndim > 1 for p in params)
        assert sorted((g["weight_decay"], len(g["params"])) for g in groups) == \
            [(0, len(params) - weights), (pytest.approx(c["wd"], rel=1e-9), weights)], c["source"]
    else:
        assert [g["weight_decay"] for g in groups] == pytest.approx([c["wd"]] * len(groups), rel=1e-9), c["source"]
    assert sum(len(g["params"]) for g in groups) == c["models"] * len(params)  # every trained parameter

    # the monitor: its epochs, its flags and its attack
    saved = json.loads((run / "args.json").read_text())
    assert saved["monitor"] == c["monitor"]
    assert {k: saved[k] for k in (*c["schedule"], "eval_last")} == {**c["schedule"], "eval_last": True}
    assert [m["epoch"] for m in lines if "test_clean" in m] == c["monitored"]
    if c["attack"] is not None:
        assert [m["epoch"] for m in lines if "test_robust" in m] == c["monitored"]
    assert "monitor_attack" in saved, "args.json does not record the monitor's attack"
    if c["attack"] is None:
        assert saved["monitor_attack"] is None
    else:
        check_attack(saved["monitor_attack"], c["attack"])
    # what main() really handed the monitor (the teachers' measurement included; None: clean accuracy)
    attacks = [a for a in monitor_calls if a is not None]
    if c["attack"] is None:
        assert attacks == []
    else:
        assert len(attacks) >= len(c["monitored"])
        for a in attacks:  # common.monitor always runs the model in eval(): the configuration may omit bn
            check_attack({"bn": "eval", **a}, c["attack"])


# ---------------------------------------------------------------------------------------------
# How best.pt is chosen
# ---------------------------------------------------------------------------------------------

SCRIPTED = [0.3, 0.5, 0.5]  # the monitor's value at epochs 1, 2, 3: best.pt = epoch 2 (a tie keeps the earlier)
SELECTION_CASES = [c for c in CASES if c.id in ("rslad", "ard", "iad-iad2", "mtard", "ardir", "adt", "aodt", "adaad",
                                                  "teacher-natural-rslad", "teacher-trades")]


@pytest.mark.parametrize("c", SELECTION_CASES)
def test_best_pt_is_the_first_epoch_with_the_highest_monitored_value(c, cifar_dir, teacher_ckpt, tmp_path,
                                                                     monkeypatch, step_lrs):
    """common.monitor answers SCRIPTED[e - 1] in epoch e (the epoch read from the optimiser steps taken: 2 an
    epoch), clean and robust alike; before training (the teachers' measurement) it answers 0.9."""
    def scripted(model, loader, attack, *args, **kwargs):
        value = SCRIPTED[len(step_lrs) // 2 - 1] if step_lrs else 0.9
        return {"clean": value, "robust": None if attack is None else value, "classes": 10, "seconds": 0.0}
    monkeypatch.setattr(common, "monitor", scripted)
    models, save_last = {}, common.Run.save_last

    def save_last_and_keep_the_model(self, model, optimizer, record, *args, **kwargs):  # the epoch's model
        save_last(self, model, optimizer, record, *args, **kwargs)
        models[record["epoch"]] = torch.load(self.dir / "last.pt", weights_only=True)["model"]
    monkeypatch.setattr(common.Run, "save_last", save_last_and_keep_the_model)
    module = import_module(c["script"])
    runs = tmp_path / "runs"
    module.main([*TINY, *c["argv"](str(teacher_ckpt)), "--eval-every", "1", "--data-dir", str(cifar_dir),
                 "--runs-dir", str(runs)])
    (run,) = runs.iterdir()
    lines = [m for m in read_metrics(run) if m["epoch"] >= 1]
    assert [(m["best_epoch"], m["best_value"]) for m in lines] == [(1, 0.3), (2, 0.5), (2, 0.5)]
    best = torch.load(run / "best.pt", weights_only=True)
    assert (best["epoch"], best["select"]["value"], best["select"]["epoch"], best["metrics"]["epoch"]) == (2, 0.5, 2, 2)
    assert best["model"].keys() == models[2].keys() and all(torch.equal(best["model"][k], models[2][k])
                                                            for k in models[2])  # epoch 2's weights, not epoch 3's
    assert not all(torch.equal(models[2][k], models[3][k]) for k in models[2])
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and (last["select"]["best_epoch"], last["select"]["best_value"]) == (2, 0.5)


def test_a_constant_classifier_at_two_monitored_epochs_is_reported(cifar_dir, teacher_ckpt, tmp_path, monkeypatch,
                                                                    step_lrs, capsys):
    """Epoch 1 predicts every class, epochs 2 and 3 one class: a warning line and a `warning` in metrics.jsonl at
    epoch 3 only (two monitored epochs in a row), and the run goes on to its end."""
    answers = [(0.3, 0.1, 10), (0.1, 0.1, 1), (0.1, 0.1, 1)]  # clean, robust, classes predicted

    def scripted(model, loader, attack, *args, **kwargs):
        clean, robust, classes = answers[len(step_lrs) // 2 - 1] if step_lrs else (0.9, 0.5, 10)
        return {"clean": clean, "robust": robust, "classes": classes, "seconds": 0.0}
    monkeypatch.setattr(common, "monitor", scripted)
    import ard
    runs = tmp_path / "runs"
    ard.main([*TINY, "--teacher", str(teacher_ckpt), *ATTACK, "--data-dir", str(cifar_dir), "--runs-dir", str(runs)])
    (run,) = runs.iterdir()
    lines = [m for m in read_metrics(run) if m["epoch"] >= 1]
    assert [m.get("warning") for m in lines[:2]] == [None, None]
    want = ("a constant classifier at epochs 2 and 3: one class predicted for every test image, clean 10.00%, "
            "robust 10.00% (chance 10.00%); the run goes on")
    assert lines[2]["warning"] == want and lines[2]["test_classes"] == 1
    assert capsys.readouterr().out.count(f"warning: {want}") == 1
    assert (run / "last.pt").exists()
