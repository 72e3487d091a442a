"""Evaluate one checkpoint against every attack the robust-distillation papers report.

White-box: clean, FGSM and its variants, PGD (PGD_SAT, PGD_TRADES, PGD-20, FGSM^k), CW-inf (PGD on
the Carlini-Wagner margin) and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square), re-implemented
here with torch only and checked bit for bit on CPU against the official code (pyautoattack 0.2.0 =
fra31/auto-attack@a392200; tests/test_autoattack_parity.py). Black-box: transfer from a surrogate
checkpoint and Square as a query attack. Input quantisation Q (non-adaptive and BPDA) and W-Robust.
Test split of CIFAR-10, CIFAR-100 or SVHN; one JSON file holds every number.

Specification: docs/eval_attacks.md (section numbers below refer to it; D-EVAL-n are the decisions of
its §12, D-ADT-n those of docs/adt_aodt.md). This file reads top down: the protocol (attacks, radii,
presets), how accuracies are counted, the attacks, main(), and at the end the AutoAttack engine.

Headline command (one row of RSLAD Table 2 / MTARD Table 2: clean, FGSM, PGD_SAT, PGD_TRADES, CW-inf, AA):

    python eval_attacks.py runs/<run>/best.pt --preset rslad --data-dir ./data

Presets (§2) and the tables they fill:
    rslad (aliases mtard, ard)  eps 8/255: FGSM, PGD_SAT 20x2/255, PGD_TRADES 20x0.003, CW-inf 20x2/255
                                k=50, AA standard; with --transfer-from / --square-bb the black-box
                                rows of RSLAD Table 5 and MTARD Table 4.
    iad                         eps 8/255: FGSM with random start, PGD-20, CW-inf 30 steps, AA.
    ardir                       eps 8/255: FGSM, PGD-20 (SVHN step 1/255), AA.
    adt                         eps 0.031: FGSM_adt, FGSM, FGSM^20 (FGSM^1000 with --long), CW20;
                                --quant-grid for the Q rows of ADT Tables 1 and 4.
W-Robust = (clean + robust) / 2 (MTARD) is given for every attack, with per-class accuracies and the worst
class (§9); --eps-sweep 2/255,4/255,8/255,16/255 adds robust accuracy against eps for one attack. A suite
checkpoint's training script and flags go into the JSON, so that tools/report.py finds the paper's row.
Calibration target (§10.3): the
TRADES WRN-34-10 should give clean 84.92, PGD_TRADES 56.61 (uniform start) and AA 53.08 at eps 0.031.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ======================================================================================
# Protocol (§2, §3): the attacks, their radius, steps and step size, and the presets
# ======================================================================================

# Each white-box attack: steps x step size (None: the radius eps, as FGSM), start (one of STARTS, the named
# starts of docs/conventions.md) and loss (ce: mean cross-entropy; cw: the CW-inf margin). Sources in §3.
WHITEBOX = {
    "fgsm": dict(steps=1, step=None, start="none", loss="ce"),
    "fgsm_rand": dict(steps=1, step=None, start="uniform-clamp", loss="ce"),  # IAD basic_eval.py runs random=True
    "fgsm_adt": dict(steps=1, step=0.003, start="uniform", loss="ce"),  # D-ADT-10
    "pgd_sat": dict(steps=20, step=2 / 255, start="uniform-clamp", loss="ce"),  # Madry config.json, RSLAD 20 steps
    "pgd_trades": dict(steps=20, step=0.003, start="uniform-clamp", loss="ce"),  # D-EVAL-2
    "pgd20": dict(steps=20, step=2 / 255, start="uniform-clamp", loss="ce"),  # IAD basic_eval.py; ARDIR §4.1
    "pgd10": dict(steps=10, step=2 / 255, start="uniform-clamp", loss="ce"),  # AdaAD eval_utils.py (advertorch, eps/4)
    "fgsm20": dict(steps=20, step=0.003, start="uniform", loss="ce"),  # TRADES pgd_attack_cifar10.py
    "fgsm1000": dict(steps=1000, step=0.003, start="uniform", loss="ce"),
    "cw": dict(steps=20, step=2 / 255, start="uniform-clamp", loss="cw", kappa=50.0),  # D-EVAL-3
    "cw20": dict(steps=20, step=0.003, start="uniform", loss="cw", kappa=50.0),
    "cw1000": dict(steps=1000, step=0.003, start="uniform", loss="cw", kappa=50.0),
}

# A preset: eps, the white-box attacks (long: added by --long), AutoAttack's version, the attacks crafted
# on a --transfer-from surrogate, the attacks under input quantisation (--quant-grid; quant_long: added by
# --long), and per-preset changes of WHITEBOX entries (tweaks; svhn_tweaks on SVHN only).
PRESETS = {
    "rslad": dict(eps="8/255", whitebox=["fgsm", "pgd_sat", "pgd_trades", "cw"], aa="standard",
                  transfer=["pgd20", "cw"], quant=["fgsm20", "cw20"]),
    "iad": dict(eps="8/255", whitebox=["fgsm_rand", "pgd20", "cw"], aa="standard", transfer=["pgd20", "cw"],
                quant=["fgsm20", "cw20"], tweaks={"cw": {"steps": 30}}),
    "ardir": dict(eps="8/255", whitebox=["fgsm", "pgd20"], aa="standard", transfer=["pgd20", "cw"],
                  quant=["fgsm20", "cw20"], svhn_tweaks={"pgd20": {"step": 1 / 255}}),
    # AdaAD main_eval.py: FGSM, PGD-10, AutoAttack (its CW is advertorch's CW-L2: not carried, docs/adaad.md §5)
    "adaad": dict(eps="8/255", whitebox=["fgsm", "pgd10"], aa="standard", transfer=["pgd20", "cw"],
                  quant=["fgsm20", "cw20"]),
    # PeerAiD main.py --fgsm_eval --pgd_eval --AA: FGSM, PGD-20 from an unclamped uniform start (LinfPGDAttack), AA
    "peeraid": dict(eps="8/255", whitebox=["fgsm", "pgd20"], aa="standard", transfer=["pgd20", "cw"],
                    quant=["fgsm20", "cw20"], tweaks={"pgd20": {"start": "uniform"}}),
    "adt": dict(eps="0.031", whitebox=["fgsm_adt", "fgsm", "fgsm20", "cw20"], long=["fgsm1000"], aa="off",
                transfer=["fgsm20"], quant=["fgsm20", "cw20"], quant_long=["fgsm1000", "cw1000"]),
}

PRESET_ALIASES = {"mtard": "rslad", "ard": "rslad"}
STARTS = ("none", "uniform", "uniform-clamp", "normal001")
# The attacks of each AutoAttack version (run in this order) and the JSON key of its result.
AA_VERSIONS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"], "fast": ["apgd-ce", "apgd-t"],
               "rand": ["apgd-ce", "apgd-dlr"], "individual": ["apgd-ce", "apgd-t", "fab-t", "square"]}
AA_JSON_KEY = {"standard": "autoattack", "fast": "aa_fast", "rand": "aa_rand", "individual": "autoattack_individual"}


def resolve_protocol(args, dataset):
    """Preset + explicit flags -> eps, the attacks to run with their parameters, and the overrides made."""
    preset = PRESET_ALIASES.get(args.preset, args.preset)
    spec = PRESETS[preset]
    eps_str = args.eps if args.eps is not None else spec["eps"]
    try:
        eps = common.parse_float(eps_str)
    except argparse.ArgumentTypeError as e:
        common.fail(f"--eps: {e}")
    if not 0 <= eps <= 1:
        common.fail(f"--eps must be in [0, 1], got {eps:g}")
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in (
        "eps", "attacks", "fgsm_start", "pgd_start", "cw_steps", "cw_step", "cw_kappa", "cw_start", "aa",
        "transfer_attacks")}

    def params(name, radius=eps):
        if name not in WHITEBOX:
            common.fail(f"unknown attack {name!r}; choose from {', '.join(WHITEBOX)}")
        cfg = dict(WHITEBOX[name])
        cfg.update(spec.get("tweaks", {}).get(name, {}))
        if dataset == "svhn":
            cfg.update(spec.get("svhn_tweaks", {}).get(name, {}))
        if cfg["loss"] == "cw":
            if name != "cw1000" and args.cw_steps is not None:
                cfg["steps"] = args.cw_steps
            for flag, key in (("cw_step", "step"), ("cw_kappa", "kappa"), ("cw_start", "start")):
                if getattr(args, flag) is not None:
                    cfg[key] = getattr(args, flag)
        elif name == "fgsm" and args.fgsm_start is not None:
            cfg["start"] = args.fgsm_start
        elif cfg["steps"] > 1 and args.pgd_start is not None:
            cfg["start"] = args.pgd_start
        cfg["step"] = radius if cfg["step"] is None else cfg["step"]  # FGSM's step is the radius itself
        return cfg

    def names(text, default):
        if text is None:
            return list(default)
        return [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]

    whitebox = names(args.attacks, spec["whitebox"] + (spec.get("long", []) if args.long else []))
    transfer = names(args.transfer_attacks, spec["transfer"]) if args.transfer_from else []
    quant = spec["quant"] + (spec.get("quant_long", []) if args.long else [])
    aa = args.aa or spec["aa"]
    return dict(preset=preset, eps=eps, eps_str=str(eps_str), aa=aa,
                whitebox={n: params(n) for n in whitebox}, transfer={n: params(n) for n in transfer},
                quant={n: params(n) for n in quant}, overrides=overrides, sweep=resolve_sweep(args, spec, aa, params))


def resolve_sweep(args, spec, aa, params):
    """--eps-sweep and --sweep-attack -> {attack, points: [(eps_str, eps, params at that eps)]}, or None.
    Only the ball changes with eps: steps and step size stay the attack's (FGSM's step is eps itself)."""
    if args.eps_sweep is None:
        if args.sweep_attack is not None:
            common.fail("--sweep-attack needs --eps-sweep, e.g. --eps-sweep 2/255,4/255,8/255,16/255")
        return None
    name = args.sweep_attack or next(n for n in spec["whitebox"]
                                     if WHITEBOX[n]["steps"] > 1 and WHITEBOX[n]["loss"] == "ce")
    if name not in WHITEBOX and name != "autoattack":
        common.fail(f"--sweep-attack {name!r}: choose autoattack or one of {', '.join(WHITEBOX)}")
    points = []
    for text in (t.strip() for t in args.eps_sweep.split(",")):
        try:
            radius = common.parse_float(text)
        except argparse.ArgumentTypeError as e:
            common.fail(f"--eps-sweep {text!r}: {e}")
        if not 0 < radius <= 1:
            common.fail(f"--eps-sweep values must be in (0, 1], got {text!r}")
        points.append((text, radius, None if name == "autoattack" else params(name, radius)))
    aa_version = (aa if aa in ("fast", "rand") else "standard") if name == "autoattack" else None
    return {"attack": name, "aa_version": aa_version, "points": points}


# ======================================================================================
# Counting (§1, §3, §8, §9). acc = the fraction of the evaluated points whose final adversarial example
# is classified correctly (as the official scripts count; a point wrong on its clean image may, rarely,
# count); acc_and_clean = correct on the clean image and after the attack (AutoAttack's acc equals it
# by construction); W-Robust = (clean + acc) / 2. Then per-class counts, near-ties and the table.
# ======================================================================================

def w_robust(clean, robust):
    """MTARD's W-Robust with pi_nat = pi_adv = 0.5 (§8)."""
    return (clean + robust) / 2


def accuracy_record(correct, clean_correct, clean_acc, params, seconds):
    acc = correct.double().mean().item()
    return {"params": params, "acc": acc, "acc_and_clean": (correct & clean_correct).double().mean().item(),
            "n_correct": int(correct.sum()), "w_robust": w_robust(clean_acc, acc), "seconds": round(seconds, 3)}


def class_stats(correct, y, num_classes):
    """Per-class accuracy of per-point flags (§9): points and correct points per class, accuracies, the
    worst and best class and the spread (best - worst). A class without evaluated points has accuracy
    None and is left out of worst, best and spread; ties go to the lower class index."""
    n = torch.bincount(y, minlength=num_classes)
    k = torch.bincount(y[correct], minlength=num_classes)
    acc = [k[c].item() / n[c].item() if n[c] else None for c in range(num_classes)]
    present = [c for c in range(num_classes) if n[c]]
    worst = min(present, key=lambda c: (acc[c], c))
    best = min(present, key=lambda c: (-acc[c], c))
    return {"n": n.tolist(), "n_correct": k.tolist(), "acc": acc, "worst_class": worst, "worst_acc": acc[worst],
            "best_class": best, "best_acc": acc[best], "spread": acc[best] - acc[worst]}


# Near-tie rule (§1), shared by checked_predict and reevaluate: two passes over the same input may disagree
# at a point whose top-2 logit margin z_(1) - z_(2) is at most max(atol, rtol * max_j |z_j|), with
# (atol, rtol) = NEAR_TIE[tf32].
# fp32: 1e-4 absolute. Kernels chosen per batch shape only reorder fp32 sums (unit roundoff 2^-24).
# TF32 (--tf32): every matmul/convolution input is rounded to a 10-bit mantissa (relative error up to
# 2^-11 = 4.9e-4, 2^-10 if truncated), and a pass may also run a kernel without TF32, so two passes can
# differ by the whole TF32 error. One 10240 x 10240 TF32 matmul already errs by up to 2.2e-3 of its mean
# |entry| (PyTorch notes, CUDA semantics, TensorFloat-32); a deep network adds the errors of its layers,
# about as a random walk (sqrt(34) ~ 6 for a WRN-34): rtol 2e-2 of the row's largest |logit|.
NEAR_TIE = {False: (1e-4, 0.0), True: (1e-4, 2e-2)}


def near_tie(logits, tf32=False):
    """Per row: (top-2 margin, tolerance, margin <= tolerance) under NEAR_TIE[tf32]."""
    atol, rtol = NEAR_TIE[bool(tf32)]
    top2 = logits.topk(2, dim=1)[0]
    margin = top2[:, 0] - top2[:, 1]
    tol = (rtol * logits.abs().max(1)[0]).clamp(min=atol)
    return margin, tol, margin <= tol


CLASS_NAMES = {"cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
               "svhn": tuple(str(d) for d in range(10))}

TABLE_HEADER = f"{'attack':<24} {'acc':>8} {'acc&clean':>10} {'W-Robust':>9} {'seconds':>9} {'spread':>7} worst class"

TABLE_LEGEND = ("acc: robust accuracy (%); acc&clean: points both clean-correct and robust; W-Robust: (clean + acc)/2; "
                "spread: best minus worst class accuracy; worst class: its accuracy and name (§9)")


def table_row(name, acc, acc_and_clean=None, wr=None, seconds=None, per_class=None, names=None):
    cells = [f"{name:<24}", f"{100 * acc:>8.2f}"]
    cells.append(f"{100 * acc_and_clean:>10.2f}" if acc_and_clean is not None else " " * 10)
    cells.append(f"{100 * wr:>9.2f}" if wr is not None else " " * 9)
    cells.append(f"{seconds:>9.1f}" if seconds is not None else " " * 9)
    if per_class is not None:
        worst = per_class["worst_class"]
        label = f"{worst} {names[worst]}" if names and names[worst] != str(worst) else str(worst)
        cells.append(f"{100 * per_class['spread']:>7.2f} {100 * per_class['worst_acc']:.2f} ({label})")
    return " ".join(cells).rstrip()


# ======================================================================================
# Scoring guards (§1, §4.1): frozen model, bounds, a scoring pass separate from the attack's
# ======================================================================================

def check_frozen(model, what):
    """Fail loudly if something switched the model back to train mode or unfroze it mid-run."""
    if any(m.training for m in model.modules()) or any(p.requires_grad for p in model.parameters()):
        common.fail(f"{what}: the model left eval() mode or has trainable parameters during the evaluation")


def predict(model, x):
    with torch.no_grad():
        return model(x).max(1)[1]


def check_bounds(x_adv, x, eps, what):
    """Fail on NaN, values outside [0,1] or a perturbation above eps + 1e-6; returns the max L-inf."""
    if torch.isnan(x_adv).any():
        common.fail(f"{what}: the adversarial examples hold NaNs")
    if x_adv.min() < 0 or x_adv.max() > 1:
        common.fail(f"{what}: adversarial values outside [0,1] ({x_adv.min().item():.6g}, {x_adv.max().item():.6g})")
    linf = (x_adv - x).abs().flatten(1).max(1)[0].max().item()
    if linf > eps + 1e-6:
        common.fail(f"{what}: perturbation {linf:.6g} exceeds eps {eps:.6g}")
    return linf


def checked_predict(model, x_adv, x, eps, what, deterministic=True, tf32=False):
    """Score an adversarial batch in passes separate from the attack's, after checking its bounds (§1).

    With `deterministic`, the batch is scored again in two halves; a changed prediction is an error (a
    stochastic or batch-dependent model, e.g. BatchNorm in train mode) unless near_tie(logits, tf32) calls
    the point a near-tie (kernels chosen per batch size may move a near-tie on a GPU)."""
    check_bounds(x_adv, x, eps, what)
    with torch.no_grad():
        logits = model(x_adv)
        pred = logits.max(1)[1]
        if deterministic and len(x_adv) > 1:
            half = (len(x_adv) + 1) // 2
            again = torch.cat([model(x_adv[:half]), model(x_adv[half:])]).max(1)[1]
            if ((pred != again) & ~near_tie(logits, tf32)[2]).any():
                common.fail(f"{what}: predictions on the same adversarial batch differ between two passes; "
                            "the model is stochastic or depends on the batch (train-mode BatchNorm?)")
    return pred


MOVED_KEYS = ("acc_from", "reevaluated_acc", "n_disagree", "n_near_tie", "near_tie_tol", "disagreements")


def reevaluate(model, x, y, result, eps, bs, device, what, tf32=False):
    """The suite's re-evaluation (§4.1): a separate pass over x_adv in batches of `bs`, after checking its
    bounds. The attack's robust flags stay the result (`acc_from`); every point whose re-evaluated
    prediction differs from its flag is listed with its top-2 margin and whether near_tie(logits, tf32)
    calls it a near-tie. What a disagreement means is the caller's (note_reevaluation)."""
    x_adv, robust = result["x_adv"], result["robust"]
    stats = dict(max_linf=check_bounds(x_adv, x, eps, what), n_nan=0, x_min=x_adv.min().item(),
                 x_max=x_adv.max().item())
    correct, tie = torch.zeros(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)
    margin, tol = torch.zeros(len(y)), torch.zeros(len(y))
    with torch.no_grad():
        for lo in range(0, len(y), bs):
            logits = model(x_adv[lo:lo + bs].to(device))
            correct[lo:lo + bs] = (logits.max(1)[1] == y[lo:lo + bs].to(device)).cpu()
            m, t, k = near_tie(logits, tf32)
            margin[lo:lo + bs], tol[lo:lo + bs], tie[lo:lo + bs] = m.cpu(), t.cpu(), k.cpu()
    moved = (correct != robust).nonzero().flatten().tolist()
    atol, rtol = NEAR_TIE[bool(tf32)]
    stats.update(acc_from="robust_flags", reevaluated_acc=correct.double().mean().item(), n_disagree=len(moved),
                 n_near_tie=int(tie[moved].sum()), near_tie_tol={"tf32": bool(tf32), "atol": atol, "rtol": rtol},
                 disagreements=[{"index": i, "robust": bool(robust[i]), "margin": margin[i].item(),
                                 "tol": tol[i].item(), "near_tie": bool(tie[i])} for i in moved])
    return stats


# ======================================================================================
# White-box attacks other than AutoAttack (§3): FGSM, PGD, FGSM^k and CW-inf are one PGD routine
# ======================================================================================

def cw_loss(logits, y, kappa=50.0):
    """CW-inf margin (§3): -sum_i max(z_y - max_j(z_j - 1e4*[j=y]) + kappa, 0); to be maximised."""
    # ZFancy/IAD:attack_generator.py cwloss / Madry pgd_attack.py loss_func='cw'; one-hot from the model's
    # output width, not a hard-coded 10 (IAD's breaks on CIFAR-100)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    real = (onehot * logits).sum(1)
    other = (logits - 1e4 * onehot).max(1)[0]
    return -torch.clamp(real - other + kappa, min=0).sum()


def random_start(x, eps, start, noise=None):
    """The start point of a named start of docs/conventions.md: x + noise, clamped to [0,1] only for
    'uniform-clamp' (x itself for 'none'). The noise, N(0, 0.001^2) for 'normal001' and U(-eps, eps)
    otherwise, is drawn on x's device from the default generator unless given (tests)."""
    if start == "none":
        return x.clone()
    if noise is None:
        noise = 0.001 * torch.randn_like(x) if start == "normal001" else torch.empty_like(x).uniform_(-eps, eps)
    x_adv = x + noise
    return x_adv.clamp(0, 1) if start == "uniform-clamp" else x_adv


def pgd(model, x, y, eps, steps, step, start="uniform-clamp", loss="ce", kappa=50.0, x_start=None):
    """PGD of docs/conventions.md (sign step, project to the eps-ball, clamp to [0,1]); last iterate.

    Drives FGSM (one step of eps), PGD_SAT, PGD_TRADES, PGD-20, FGSM^k (loss 'ce': the batch-mean
    cross-entropy) and CW-inf (loss 'cw', summed over the batch). Starts from `x_start`, else from
    random_start(x, eps, start)."""
    x_adv = random_start(x, eps, start) if x_start is None else x_start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_adv)
            objective = F.cross_entropy(logits, y) if loss == "ce" else cw_loss(logits, y, kappa)
        grad, = torch.autograd.grad(objective, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def run_attack(attack_model, score_models, x, y, eps, params, bs, device, name, seed, quiet=False, deterministic=True,
               stats=None, tf32=False):
    """Craft `params` (a WHITEBOX entry) on `attack_model` in batches; score on every model of `score_models`.

    Returns, per scoring model, a bool tensor: final iterate classified correctly. The random stream
    restarts from `seed` for every attack, so an attack's result does not depend on the others run.
    A `stats` dict receives the largest L-inf perturbation over all points (`max_linf`); `tf32` selects the
    near-tie tolerance of checked_predict."""
    torch.manual_seed(seed)
    rank, world_size = common.world()
    correct = [torch.zeros(len(y), dtype=torch.bool) for _ in score_models]
    mine = torch.zeros(len(y), dtype=torch.bool)  # the points this rank attacked
    max_linf = 0.0
    bar = Progress(name, len(y), quiet)
    for b, lo in enumerate(range(0, len(y), bs)):
        xb, yb = x[lo:lo + bs].to(device), y[lo:lo + bs].to(device)
        x_start = random_start(xb, eps, params["start"])  # drawn on every rank: the stream equals one process's
        if b % world_size != rank:  # torchrun: the batches are shared round robin
            continue
        check_frozen(attack_model, name)
        x_adv = pgd(attack_model, xb, yb, eps, params["steps"], params["step"], params["start"], params["loss"],
                    params.get("kappa", 50.0), x_start=x_start)
        max_linf = max(max_linf, (x_adv - xb).abs().max().item())
        for c, m in zip(correct, score_models):
            c[lo:lo + bs] = (checked_predict(m, x_adv, xb, eps, name, deterministic, tf32) == yb).cpu()
        mine[lo:lo + bs] = True
        bar.update(min(lo + bs, len(y)))
    if world_size > 1:
        correct = [from_owners(c, mine, device) for c in correct]
        max_linf = float(from_owners(torch.tensor([max_linf]), torch.tensor([True]), device, op="max"))
    if stats is not None:
        stats["max_linf"] = max(stats.get("max_linf", 0.0), max_linf)
    return correct


# ======================================================================================
# Progress lines and torchrun sharing (batches round robin over the ranks)
# ======================================================================================

class Progress:
    """Progress with ETA on stderr, at most one line per `every` seconds (nothing for short attacks)."""

    def __init__(self, name, total, quiet=False, every=10.0):
        self.name, self.total, self.quiet, self.every = name, total, quiet, every
        self.start = self.last = time.perf_counter()

    def update(self, done, note=""):
        now = time.perf_counter()
        if self.quiet or now - self.last < self.every or not common.is_main():  # short attacks print nothing
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1e-9) * (self.total - done)
        print(f"  [{self.name}] {done}/{self.total} {note} elapsed {_hms(elapsed)} ETA {_hms(eta)}",
              file=sys.stderr, flush=True)


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def from_owners(t, mine, device, op="sum"):
    """Under torchrun: every rank's entries where it computed them (`mine`), on every rank. Each entry has
    exactly one owner, so a sum of the masked tensors puts the owner's value everywhere (a max for 'max')."""
    if common.world()[1] == 1:
        return t
    dtype = t.dtype
    mask = mine.view(-1, *[1] * (t.dim() - 1)).to(device)
    v = torch.where(mask, t.to(device).double() if not t.is_floating_point() else t.to(device), 0)
    torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return v.to(dtype).cpu()


def merge(t, mine, attacked, device):
    """Under torchrun, after one attack of the ensemble: the owner's entry for every attacked point, the
    (already equal) entry elsewhere."""
    return torch.where(attacked.view(-1, *[1] * (t.dim() - 1)), from_owners(t, mine, device), t)


# ======================================================================================
# Input quantisation Q (§7)
# ======================================================================================

def quantize(x, bits):
    """Q_b(x) = round(x (2^b - 1)) / (2^b - 1): bit-depth reduction (Xu et al., NDSS 2018)."""
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


class Quantized(nn.Module):
    """g = f o Q_b. With bpda=True (BPDA, Backward Pass Differentiable Approximation) the backward pass
    is the identity: the forward computes x + (Q_b(x) - x).detach()."""

    def __init__(self, model, bits, bpda=False):
        super().__init__()
        self.model, self.bits, self.bpda = model, bits, bpda

    def forward(self, x):
        q = quantize(x, self.bits)
        if self.bpda:
            q = x + (q - x).detach()
        return self.model(q)


# ======================================================================================
# Main: command line, loading, the evaluation steps, the table and the JSON (§9). Transfer (§5)
# crafts on the surrogate with run_attack; Square as a query attack (§6) is autoattack() with
# attacks=['square']
# ======================================================================================

def parse_args(argv=None):
    p = common.parser("eval_attacks", __doc__.split("\n\n")[0] + "\n(§ numbers below: docs/eval_attacks.md)")
    p.add_argument("checkpoint", help="any checkpoint common.load_model reads (suite last.pt/best.pt or official files), "
                                      "or rb:NAME, a RobustBench L-inf zoo model of --dataset (default cifar10; "
                                      "docs/common.md §4.1)")
    g = p.add_argument_group("model and data (§1)")
    g.add_argument("--arch", default=None, help="architecture (required for non-suite checkpoints)")
    g.add_argument("--shortcut-from", choices=["act", "input"], default=None,
                   help="a preact_resnet18 file not written by the suite: what feeds its projection shortcuts, "
                        "relu(bn1(x)) (act: IAD/ARD layout) or x (input: fast_adversarial, RobustBench) (docs/common.md §4)")
    g.add_argument("--norm", default="auto", choices=["auto", "none", "cifar10", "cifar100"],
                   help="input normalisation inside the model; auto = the suite checkpoint's record, else the arch default")
    g.add_argument("--unsafe-load", action="store_true", help="allow pickle execution when loading (trusted files only)")
    g.add_argument("--dataset", default=None, choices=sorted(common.DATASETS),
                   help="test split (default: the suite checkpoint's data set, else from the head width)")
    g.add_argument("--override-record", action="store_true",
                   help="use --dataset and --norm even where a suite checkpoint records another data set or "
                        "normalisation (refused otherwise)")
    g.add_argument("--data-dir", default="./data", help="folder holding the standard layout")
    g.add_argument("--rb-model-dir", default=common.RB_MODEL_DIR, metavar="DIR",
                   help="RobustBench's model cache for rb:NAME (the model and --transfer-from): DIR/<dataset>/Linf/NAME.pt")
    g.add_argument("--n-ex", type=common.positive_int, default=None, help="evaluate the first N test points (default all)")
    g.add_argument("--bs", type=common.positive_int, default=250, help="batch size of the non-AutoAttack attacks")
    g.add_argument("--seed", type=int, default=0, help="seed of the random starts (every attack starts from it)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--tf32", action="store_true",
                   help="allow TF32 in matmuls and convolutions (off by default: true fp32). There is no bf16/fp16 "
                        "option: the attacks always run in fp32 (fp16 zeroes small input gradients and the 1e-12 "
                        "denominators of AutoAttack's DLR loss)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN kernels and torch.use_deterministic_algorithms (slower)")
    g = p.add_argument_group("white-box attacks (§2, §3)")
    g.add_argument("--preset", default="rslad", choices=sorted(PRESETS) + sorted(PRESET_ALIASES),
                   help="paper protocol: eps and every attack parameter (§2)")
    g.add_argument("--eps", default=None, help="L-inf radius (fraction or float); default from the preset")
    g.add_argument("--attacks", default=None,
                   help=f"comma list of white-box attacks replacing the preset's ({', '.join(WHITEBOX)}), or 'none'")
    g.add_argument("--long", action="store_true", help="adt preset: also FGSM^1000 (and CW1000 under Q)")
    g.add_argument("--fgsm-start", choices=STARTS, default=None, help="start of `fgsm` (D-EVAL-1; preset: none)")
    g.add_argument("--pgd-start", choices=STARTS, default=None,
                   help="start of the multi-step CE attacks (D-EVAL-2; preset: uniform-clamp, adt uniform)")
    g.add_argument("--cw-steps", type=common.positive_int, default=None, help="CW-inf steps (preset: 20; iad 30)")
    g.add_argument("--cw-step", type=common.parse_float, default=None, help="CW-inf step size (preset: 2/255; adt 0.003)")
    g.add_argument("--cw-kappa", type=common.parse_float, default=None, help="CW-inf confidence kappa (preset: 50)")
    g.add_argument("--cw-start", choices=STARTS, default=None, help="CW-inf start (preset: uniform-clamp; adt uniform)")
    g.add_argument("--eps-sweep", default=None, metavar="EPS,EPS,...",
                   help="comma list of L-inf radii, e.g. 2/255,4/255,8/255,16/255: robust accuracy of --sweep-attack "
                        "at each, with the attack's own steps and step size (JSON eps_sweep, §9)")
    g.add_argument("--sweep-attack", default=None,
                   help="attack of --eps-sweep: a white-box name or autoattack (the --aa version, standard when off); "
                        "default: the preset's first PGD attack (pgd_sat; pgd20 for iad, ardir and peeraid; pgd10 for "
                        "adaad; fgsm20 for adt)")
    g = p.add_argument_group("AutoAttack (§4)")
    g.add_argument("--aa", default=None, choices=["standard", "fast", "rand", "individual", "off"],
                   help="AutoAttack version; default from the preset (standard; adt off)")
    g.add_argument("--aa-bs", type=common.positive_int, default=250, help="AutoAttack batch size (part of the result, D-EVAL-7)")
    g.add_argument("--aa-seed", type=int, default=0, help="AutoAttack seed, set per attack and batch (D-EVAL-7)")
    g = p.add_argument_group("black-box (§5, §6)")
    g.add_argument("--transfer-from", default=None, metavar="ARCH:CKPT[:NORM]",
                   help="surrogate for transfer attacks (RSLAD: a ResNet-50 with standard adversarial training, D-EVAL-4); ARCH may be left out "
                        "for a suite checkpoint, NORM is auto (default), none, cifar10 or cifar100; or rb:NAME, a "
                        "RobustBench zoo model of the evaluation's data set")
    g.add_argument("--transfer-shortcut-from", choices=["act", "input"], default=None,
                   help="as --shortcut-from, for a preact_resnet18 surrogate file not written by the suite")
    g.add_argument("--transfer-attacks", default=None,
                   help="comma list of attacks crafted on the surrogate (preset: pgd20,cw; adt fgsm20)")
    g.add_argument("--square-bb", action="store_true", help="Square alone as a query-based black-box attack")
    g.add_argument("--square-queries", type=common.positive_int, default=5000, help="query budget of --square-bb (D-EVAL-5)")
    g = p.add_argument_group("input quantisation Q (§7)")
    g.add_argument("--quant-bits", type=common.positive_int, default=None, help="bit depth b of Q_b")
    g.add_argument("--quant-grid", default=None, help="comma list of bit depths, e.g. 3,4,5,6,7,8 (D-EVAL-6)")
    g.add_argument("--quant-mode", default="nonadaptive", choices=["nonadaptive", "bpda"],
                   help="bpda also runs the straight-through adaptive attack (reported next to non-adaptive)")
    g = p.add_argument_group("output (§9)")
    g.add_argument("--json", default=None,
                   help="output file (default: <checkpoint dir>/<checkpoint name>_eval_<preset>.json, e.g. best_eval_rslad.json)")
    g.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return common.parse(p, argv, rules={"cw_step": ("a positive number", common._positive),
                                          "cw_kappa": ("a number >= 0", lambda v: v >= 0)})


def parse_grid(args):
    text = args.quant_grid or (str(args.quant_bits) if args.quant_bits else "")
    try:
        grid = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        common.fail(f"--quant-grid {text!r}: expected a comma list of bit depths, e.g. 3,4,5,6,7,8")
    if any(not 1 <= b <= 16 for b in grid):
        common.fail("--quant-grid: bit depths must lie in 1..16")
    return grid


def output_path(args, preset):
    """The JSON file, named after the checkpoint so that best.pt and last.pt of one run give two files;
    checked before any attack runs: an existing file needs --force, the folder must be writable."""
    ckpt = Path(args.checkpoint)
    path = Path(args.json) if args.json else ckpt.resolve().parent / f"{ckpt.stem}_eval_{preset}.json"
    if path.is_dir():
        common.fail(f"--json {path} is a directory; name a file")
    if path.exists() and not args.force:
        common.fail(f"{path} exists; pass --force to overwrite it or --json to write elsewhere")
    common.check_writable(path.parent)
    return path


def shortcut(value):
    return None if value is None else {"shortcut_from": value}


def load_target(args, device):
    if common.is_rb_source(args.checkpoint):  # a RobustBench zoo model (docs/common.md §4.1)
        for flag, given in (("--arch", args.arch), ("--shortcut-from", args.shortcut_from), ("--norm", args.norm != "auto")):
            if given:
                common.fail(f"{flag} does not apply to {args.checkpoint}: the RobustBench entry fixes the model")
        dataset = args.dataset or "cifar10"  # RobustBench's default
        model, info = common.load_robustbench(args.checkpoint, dataset, args.rb_model_dir, unsafe=args.unsafe_load,
                                              device=device, flag="")
        args.checkpoint = info["path"]  # the cached file: its sha256 in the JSON, the JSON beside it by default
        return common.freeze(model.float()), info, dataset
    norm = None if args.norm == "none" else args.norm
    num_classes = common.DATASETS[args.dataset] if args.dataset else None
    model, info = common.load_model(args.checkpoint, arch=args.arch, num_classes=num_classes, norm=norm,
                                    device=device, unsafe=args.unsafe_load, arch_kwargs=shortcut(args.shortcut_from),
                                    dataset=args.dataset, override_record=args.override_record)
    # suite checkpoints record their data set; other files: from the head width (SVHN needs --dataset)
    dataset = args.dataset or info.get("dataset") or {100: "cifar100"}.get(info["num_classes"], "cifar10")
    if not info["suite"]:
        common.warn_unrecorded(args.checkpoint, dataset, info)
    if common.DATASETS[dataset] != info["num_classes"]:
        common.fail(f"{args.checkpoint} has {info['num_classes']} outputs but {dataset} has "
                    f"{common.DATASETS[dataset]} classes; check --dataset")
    return common.freeze(model.float()), info, dataset  # frozen: FAB's backward would fill parameter gradients


TEACHER_FLAGS = ("teacher", "nat_teacher", "teacher_st", "adv_teacher")  # the last two: runs saved before the rename


def _read_suite_checkpoint(path):
    """The checkpoint dict without reading its tensors into memory (mmap), or None if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy or foreign format: not a suite checkpoint
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None


def training_record(path, info):
    """For a suite checkpoint (§9 `training`): its kind (best/last), epoch, selection, the script that
    wrote it with every flag it ran with, and what its teacher files say they are when they can still be
    found (script, recipe, arch; `same_file` compares the sha256 the run recorded). None for other files."""
    if not info["suite"]:
        return None
    ck = _read_suite_checkpoint(path) or common.load_checkpoint(path)
    saved = ck.get("args") or {}
    flags = {k: v for k, v in saved.items() if k not in ("env", "resumes")}
    rec = {"script": saved.get("script"), "kind": ck.get("kind"), "epoch": ck.get("epoch"), "select": ck.get("select"),
           "args": flags, "teachers": {}}
    # a relative teacher path is relative to the training's folder: runs_dir's parent, when runs_dir was relative
    run_dir, runs_dir = Path(path).resolve().parent, Path(str(saved.get("runs_dir", ".")))
    relative = not runs_dir.is_absolute() and ".." not in runs_dir.parts and len(runs_dir.parts) < len(run_dir.parents)
    base = run_dir.parents[len(runs_dir.parts)] if relative else None
    for key in TEACHER_FLAGS:
        value = saved.get(key)
        if not isinstance(value, str):
            continue
        found = next((c for c in (Path(value), base / value if base else None) if c is not None and c.is_file()), None)
        entry = {"path": value, "found": found is not None}
        if found is not None:
            teacher = _read_suite_checkpoint(found)
            entry["suite"] = teacher is not None
            if saved.get(f"{key}_sha256"):
                entry["same_file"] = common.file_sha256(found) == saved[f"{key}_sha256"]
            if teacher is not None:
                targs = teacher.get("args") or {}
                entry.update(script=targs.get("script"), recipe=targs.get("recipe"), arch=teacher["arch"],
                             dataset=teacher.get("dataset"), kind=teacher.get("kind"), epoch=teacher.get("epoch"))
        rec["teachers"][key] = entry
    return rec


@dataclasses.dataclass
class Evaluation:
    """What main() hands to every eval_* step: the flags, the frozen model, the test points (on the CPU),
    and what the steps add for the output."""
    args: argparse.Namespace
    model: nn.Module
    x: torch.Tensor  # test images in [0,1]
    y: torch.Tensor
    eps: float
    device: torch.device
    num_classes: int
    exact: bool  # a deterministic model is expected (every --aa but rand): two passes must agree
    class_names: tuple = None  # for the table's worst class (CLASS_NAMES)
    clean: float = None  # clean accuracy and per-point flags, set by eval_clean
    clean_correct: torch.Tensor = None
    rows: list = dataclasses.field(default_factory=list)  # lines of the printed table
    warnings: list = dataclasses.field(default_factory=list)  # JSON `warnings`, printed at the end
    notes: list = dataclasses.field(default_factory=list)  # re-evaluation notes, printed after the table
    failed: list = dataclasses.field(default_factory=list)  # labels whose check failed: exit status 1 at the end
    class_acc: dict = dataclasses.field(default_factory=dict)  # JSON `per_class`: class_stats per attack key

    def per_class(self, correct, key):
        """class_stats of per-point flags, recorded under `key` (JSON per_class.<key>) and returned."""
        self.class_acc[key] = class_stats(correct, self.y, self.num_classes)
        return self.class_acc[key]

    def row(self, *a, **k):
        return table_row(*a, **k, names=self.class_names)

    def say(self, *a):
        """A progress line on stderr, unless --quiet (under torchrun, rank 0 only)."""
        if not self.args.quiet and common.is_main():
            print(*a, file=sys.stderr, flush=True)


def note_reevaluation(ctx, label, stats, shown=5):
    """One line for the text output on what the re-evaluation (§4.1) moved. On a model evaluated as
    deterministic (not --aa rand), points moved beyond the near-tie tolerance are a loud warning."""
    moved, n = stats["disagreements"], len(ctx.y)
    if not moved:
        ctx.notes.append(f"{label}: the re-evaluation reproduces the attack's flags on all {n} points")
        return
    listed = ", ".join(f"{d['index']} ({d['margin']:.2g}{', near-tie' if d['near_tie'] else ''})"
                       for d in moved[:shown])
    more = f" and {len(moved) - shown} more in the JSON" if len(moved) > shown else ""
    ctx.notes.append(f"{label}: the re-evaluation moved {len(moved)} of {n} points ({stats['n_near_tie']} near-ties), "
                     f"point (top-2 margin): {listed}{more}; acc is the attack's, re-evaluated "
                     f"{stats['reevaluated_acc']:.4f}")
    far = [d for d in moved if not d["near_tie"]]
    if far and ctx.exact:
        points = ", ".join(str(d["index"]) for d in far[:shown]) + (" ..." if len(far) > shown else "")
        loud_warning(ctx, label, f"{label}: {len(far)} of {n} points moved between the attack and the re-evaluation "
                                 f"beyond the near-tie tolerance (largest margin {max(d['margin'] for d in far):.3g}, "
                                 f"points {points}): is the model stochastic or batch-dependent (train-mode "
                                 "BatchNorm?)")


def loud_warning(ctx, label, msg, status=True):
    """A warning in the JSON and on stderr at once, even with --quiet; with `status`, the exit status becomes
    1 once the results are written (main)."""
    ctx.warnings.append(msg)
    if status:
        ctx.failed.append(label)
    if common.is_main():
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def eval_clean(ctx):
    """Clean accuracy, first (§1): far from the expected value means a wrong --norm or architecture."""
    start, bs = time.perf_counter(), ctx.args.bs
    correct = torch.zeros(len(ctx.y), dtype=torch.bool)
    for lo in range(0, len(ctx.y), bs):
        xb = ctx.x[lo:lo + bs].to(ctx.device)
        correct[lo:lo + bs] = (checked_predict(ctx.model, xb, xb, ctx.eps, "clean", ctx.exact, ctx.args.tf32)
                               == ctx.y[lo:lo + bs].to(ctx.device)).cpu()
    ctx.clean_correct, ctx.clean = correct, correct.double().mean().item()
    per_class = ctx.per_class(correct, "clean")
    ctx.rows.append(ctx.row("clean", ctx.clean, seconds=time.perf_counter() - start, per_class=per_class))
    ctx.say(f"clean accuracy {100 * ctx.clean:.2f}%")
    return {"acc": ctx.clean, "n_correct": int(correct.sum()), "n": len(ctx.y)}


def eval_whitebox(ctx, attacks):
    """FGSM / PGD / CW-inf rows (§3): acc over all points, and acc_and_clean."""
    res = {}
    for name, params in attacks.items():
        start = time.perf_counter()
        correct, = run_attack(ctx.model, [ctx.model], ctx.x, ctx.y, ctx.eps, params, ctx.args.bs, ctx.device, name,
                              ctx.args.seed, ctx.args.quiet, ctx.exact, tf32=ctx.args.tf32)
        res[name] = accuracy_record(correct, ctx.clean_correct, ctx.clean, params, time.perf_counter() - start)
        ctx.rows.append(ctx.row(name, res[name]["acc"], res[name]["acc_and_clean"], res[name]["w_robust"],
                                res[name]["seconds"], ctx.per_class(correct, name)))
        ctx.say(f"{name}: {100 * res[name]['acc']:.2f}%")
    return res


def eval_transfer(ctx, attacks, dataset):
    """Transfer rows (§5): crafted on the surrogate with the true labels, classified by the target."""
    if common.is_rb_source(ctx.args.transfer_from):  # a RobustBench zoo model of the evaluation's data set
        if ctx.args.transfer_shortcut_from:
            common.fail(f"--transfer-shortcut-from does not apply to --transfer-from {ctx.args.transfer_from}")
        source, info = common.load_robustbench(ctx.args.transfer_from, dataset, ctx.args.rb_model_dir,
                                               unsafe=ctx.args.unsafe_load, device=ctx.device, flag="--transfer-from")
        path = info["path"]
    else:
        arch, path, norm = common.parse_model_spec(ctx.args.transfer_from, "--transfer-from")
        source, info = common.load_model(path, arch=arch, num_classes=ctx.num_classes, norm=norm, device=ctx.device,
                                         unsafe=ctx.args.unsafe_load, arch_kwargs=shortcut(ctx.args.transfer_shortcut_from),
                                         arch_flag="--transfer-from ARCH:CKPT", shortcut_flag="--transfer-shortcut-from",
                                         norm_flag="--transfer-from ...:NORM")
    source = common.freeze(source.float())
    res = {}
    for name, params in attacks.items():
        start = time.perf_counter()
        correct, src_correct = run_attack(source, [ctx.model, source], ctx.x, ctx.y, ctx.eps, params, ctx.args.bs,
                                          ctx.device, f"transfer {name}", ctx.args.seed, ctx.args.quiet, ctx.exact,
                                          tf32=ctx.args.tf32)
        acc = correct.double().mean().item()
        res[name] = {"source": {"ckpt": path, "arch": info["arch"], "norm": info["norm"]}, "params": params, "acc": acc,
                     "n_correct": int(correct.sum()), "source_acc": src_correct.double().mean().item(),
                     "clean_acc": ctx.clean, "w_robust": w_robust(ctx.clean, acc),
                     "seconds": round(time.perf_counter() - start, 3)}
        ctx.rows.append(ctx.row(f"transfer {name}", acc, None, res[name]["w_robust"], res[name]["seconds"],
                                ctx.per_class(correct, f"transfer.{name}")))
    return res


def eval_square_bb(ctx):
    """Square alone as the query-based black-box attack (§6): the ensemble with Square only, i.e. on the
    clean-correct points in batches of --aa-bs, seeded per batch."""
    start, args = time.perf_counter(), ctx.args
    r = autoattack(ctx.model, ctx.x, ctx.y, ctx.eps, attacks=["square"], bs=args.aa_bs, seed=args.aa_seed,
                   device=ctx.device, quiet=args.quiet, checks=False, square_queries=args.square_queries)
    stats = reevaluate(ctx.model, ctx.x, ctx.y, r, ctx.eps, args.aa_bs, ctx.device, "square-bb", args.tf32)
    note_reevaluation(ctx, "square-bb", stats)
    acc = r["robust"].double().mean().item()
    broken = ctx.clean_correct & ~r["robust"]
    res = {"n_queries": args.square_queries, "p_init": 0.8, "acc": acc, "n_correct": int(r["robust"].sum()),
           "w_robust": w_robust(ctx.clean, acc),
           "median_queries": r["square_queries"][broken].median().item() if broken.any() else None,
           "seconds": round(time.perf_counter() - start, 3), **{k: stats[k] for k in MOVED_KEYS}}
    ctx.rows.append(ctx.row(f"square-bb ({args.square_queries} q)", acc, None, res["w_robust"], res["seconds"],
                            ctx.per_class(r["robust"], "square_bb")))
    return res


def eval_quant(ctx, attacks, grid):
    """Q_b for every b of the grid (§7): non-adaptive (crafted on f, classified by g = f o Q_b) and, with
    --quant-mode bpda, the straight-through attack on g. selected_b: highest W-Robust under fgsm20,
    non-adaptive, on the evaluated set (D-EVAL-6)."""
    args, x, y = ctx.args, ctx.x, ctx.y
    gs = [common.freeze(Quantized(ctx.model, b)) for b in grid]
    res, clean = {str(b): {"nonadaptive": {}} for b in grid}, {}
    for b, g in zip(grid, gs):
        clean[b] = torch.cat([predict(g, x[lo:lo + args.bs].to(ctx.device)).cpu()
                              for lo in range(0, len(y), args.bs)]).eq(y).double().mean().item()

    def record(b, mode, name, correct, seconds):
        acc = correct.double().mean().item()
        res[str(b)][mode][name] = {"acc": acc, "clean_acc": clean[b], "w_robust": w_robust(clean[b], acc)}
        ctx.rows.append(ctx.row(f"Q{b} {mode} {name}", acc, None, w_robust(clean[b], acc), seconds,
                                ctx.per_class(correct, f"quant.{b}.{mode}.{name}")))

    for name, params in attacks.items():  # crafted once on f, scored under every b
        start = time.perf_counter()
        correct = run_attack(ctx.model, gs, x, y, ctx.eps, params, args.bs, ctx.device, f"Q {name}", args.seed,
                             args.quiet, ctx.exact, tf32=args.tf32)
        for b, c in zip(grid, correct):
            record(b, "nonadaptive", name, c, (time.perf_counter() - start) / len(grid))
    if args.quant_mode == "bpda":
        for b, g in zip(grid, gs):
            res[str(b)]["bpda"] = {}
            for name, params in attacks.items():
                start = time.perf_counter()
                c, = run_attack(common.freeze(Quantized(ctx.model, b, bpda=True)), [g], x, y, ctx.eps, params,
                                args.bs, ctx.device, f"Q{b} bpda {name}", args.seed, args.quiet, ctx.exact,
                                tf32=args.tf32)
                record(b, "bpda", name, c, time.perf_counter() - start)
    key = "fgsm20" if "fgsm20" in attacks else next(iter(attacks))
    res["selected_b"] = max(grid, key=lambda b: res[str(b)]["nonadaptive"][key]["w_robust"])
    return res


def eval_aa(ctx, version):
    """AutoAttack in the version asked for (§4.5), re-evaluated and checked (§4.1); JSON of §9."""
    args, key = ctx.args, AA_JSON_KEY[version]
    if version == "individual":  # run_standard_evaluation_individual: each attack alone from the clean points
        res = {}
        for i, name in enumerate(AA_VERSIONS["standard"]):
            start = time.perf_counter()
            r = autoattack(ctx.model, ctx.x, ctx.y, ctx.eps, version="standard", attacks=[name], bs=args.aa_bs,
                           seed=args.aa_seed, device=ctx.device, quiet=args.quiet, checks=i == 0)
            stats = reevaluate(ctx.model, ctx.x, ctx.y, r, ctx.eps, args.aa_bs, ctx.device, f"AA {name}", args.tf32)
            note_reevaluation(ctx, f"{key}.{name}", stats)
            ctx.warnings += r["warnings"]
            res[name] = {"acc": r["cumulative"][name], "seconds": round(time.perf_counter() - start, 3),
                         **{k: stats[k] for k in MOVED_KEYS}}
            ctx.rows.append(ctx.row(f"AA {name} (alone)", res[name]["acc"], None, w_robust(ctx.clean, res[name]["acc"]),
                                    res[name]["seconds"], ctx.per_class(r["robust"], f"{key}.{name}")))
        return {key: res}
    start = time.perf_counter()
    r = autoattack(ctx.model, ctx.x, ctx.y, ctx.eps, version=version, bs=args.aa_bs, seed=args.aa_seed,
                   device=ctx.device, quiet=args.quiet)
    seconds = time.perf_counter() - start
    stats = reevaluate(ctx.model, ctx.x, ctx.y, r, ctx.eps, args.aa_bs, ctx.device, "AutoAttack", args.tf32)
    note_reevaluation(ctx, key, stats)
    acc = r["robust"].double().mean().item()
    if acc > ctx.clean:
        loud_warning(ctx, key, f"{key}: accuracy {acc:.4f} above the clean accuracy {ctx.clean:.4f}: the clean pass "
                               "and AutoAttack's classify some clean point differently", status=ctx.exact)
    ctx.warnings += r["warnings"]
    ctx.say(f"AutoAttack: max L-inf {stats['max_linf']:.5f}, x_adv in [{stats['x_min']:.5f}, {stats['x_max']:.5f}], "
            f"no NaN, robust accuracy {100 * acc:.2f}%")
    params = {"attacks": AA_VERSIONS[version], "norm": "Linf", "n_iter": 100, "n_restarts": 1, "rho": 0.75,
              "n_target_classes": 9, "eot_iter": 20 if version == "rand" else 1}
    if "fab-t" in params["attacks"]:
        params["fab"] = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9}
    if "square" in params["attacks"]:
        params["square"] = {"n_queries": 5000, "p_init": 0.8, "loss": "margin", "resc_schedule": False}
    per_class = ctx.per_class(r["robust"], key)
    for name in ["clean"] + AA_VERSIONS[version]:
        ctx.rows.append(table_row(f"  {key}: {name}", r["cumulative"][name], None, None, r["seconds"].get(name)))
    ctx.rows.append(ctx.row(key, acc, acc, w_robust(ctx.clean, acc), seconds, per_class))
    return {key: {"version": version, "params": params, "eps": ctx.eps, "bs": args.aa_bs, "seed": args.aa_seed,
                  "cumulative": r["cumulative"], "acc": acc, "n_correct": int(r["robust"].sum()),
                  "w_robust": w_robust(ctx.clean, acc), **stats,
                  "seconds": {**{k: round(v, 3) for k, v in r["seconds"].items()}, "total": round(seconds, 3)},
                  "warnings": r["warnings"], "robust_flags": r["robust"].int().tolist()}}


def eval_sweep(ctx, sweep):
    """Robust accuracy against eps for one attack (§9 eps_sweep). Each point runs the attack at its own
    radius, seeded as every attack; `max_linf` is the largest perturbation it produced (at most eps)."""
    args, name, points = ctx.args, sweep["attack"], []
    for eps_str, eps, params in sweep["points"]:
        start, stats = time.perf_counter(), {}
        if params is None:  # autoattack
            r = autoattack(ctx.model, ctx.x, ctx.y, eps, version=sweep["aa_version"], bs=args.aa_bs, seed=args.aa_seed,
                           device=ctx.device, quiet=args.quiet, checks=False)
            stats = reevaluate(ctx.model, ctx.x, ctx.y, r, eps, args.aa_bs, ctx.device, f"sweep AA @ {eps_str}",
                               args.tf32)
            note_reevaluation(ctx, f"autoattack @ eps {eps_str}", stats)
            correct, params = r["robust"], {"version": sweep["aa_version"], "bs": args.aa_bs, "seed": args.aa_seed}
        else:
            correct, = run_attack(ctx.model, [ctx.model], ctx.x, ctx.y, eps, params, args.bs, ctx.device,
                                  f"sweep {name} @ {eps_str}", args.seed, args.quiet, ctx.exact, stats, args.tf32)
        rec = accuracy_record(correct, ctx.clean_correct, ctx.clean, params, time.perf_counter() - start)
        rec["per_class"] = class_stats(correct, ctx.y, ctx.num_classes)
        points.append({"eps": eps, "eps_str": eps_str, **rec, "max_linf": stats.get("max_linf", 0.0),
                       **{k: stats[k] for k in MOVED_KEYS if k in stats}})
        ctx.rows.append(ctx.row(f"{name} @ eps {eps_str}", rec["acc"], rec["acc_and_clean"], rec["w_robust"],
                                rec["seconds"], rec["per_class"]))
        ctx.say(f"sweep {name} @ {eps_str}: {100 * rec['acc']:.2f}%")
    return {"attack": name, "eps": [p["eps"] for p in points], "acc": [p["acc"] for p in points], "points": points}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(common.join_process_group(str(common.parse_device(args.device))))  # torchrun: one GPU (or CPU process) per rank
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # fp32 unless --tf32 (§1)
    if args.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    grid = parse_grid(args)
    resolve_protocol(args, args.dataset)  # bad attack names or eps fail before a large checkpoint loads
    if args.transfer_from and not common.is_rb_source(args.transfer_from):
        common.parse_model_spec(args.transfer_from, "--transfer-from")
    model, info, dataset = load_target(args, device)
    proto = resolve_protocol(args, dataset)
    json_path = output_path(args, proto["preset"])
    x_u8, y = common.load_split(dataset, args.data_dir, train=False, subset=args.n_ex)
    names = CLASS_NAMES.get(dataset)
    ctx = Evaluation(args=args, model=model, x=x_u8.float().div(255), y=y, eps=proto["eps"], device=device,
                     num_classes=info["num_classes"], exact=proto["aa"] != "rand", class_names=names)
    ctx.say(f"{info['arch']} on {dataset} test[:{len(y)}], preset {proto['preset']}, eps {proto['eps_str']}, "
            f"device {device}")

    out = {"schema": "suite-eval/1", "checkpoint": str(args.checkpoint), "sha256": common.file_sha256(args.checkpoint),
           "arch": info["arch"], "arch_kwargs": info["arch_kwargs"], "dataset": dataset,
           "num_classes": info["num_classes"], "norm": info["norm"], "loader": info,
           "preset": proto["preset"], "eps": ctx.eps, "eps_str": proto["eps_str"], "n_ex": len(y), "bs": args.bs,
           "overrides": proto["overrides"], "training": training_record(args.checkpoint, info),
           "class_names": list(names) if names else None,
           "env": {**common.environment(), "numpy": np.__version__, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "tf32": args.tf32, "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                   "seed": args.seed, "aa_seed": args.aa_seed, "aa_bs": args.aa_bs}}
    out["clean"] = eval_clean(ctx)
    attacks = eval_whitebox(ctx, proto["whitebox"])
    if proto["transfer"]:
        attacks["transfer"] = eval_transfer(ctx, proto["transfer"], dataset)
    if args.square_bb:
        attacks["square_bb"] = eval_square_bb(ctx)
    if grid:
        attacks["quant"] = eval_quant(ctx, proto["quant"], grid)
    if proto["aa"] != "off":
        attacks.update(eval_aa(ctx, proto["aa"]))
    out["attacks"] = attacks
    out["per_class"] = ctx.class_acc
    if proto["sweep"]:
        out["eps_sweep"] = eval_sweep(ctx, proto["sweep"])
    out["warnings"] = list(dict.fromkeys(ctx.warnings))  # each distinct warning once

    if common.is_main():  # under torchrun rank 0 prints and writes
        print(TABLE_HEADER)
        print("\n".join(ctx.rows))
        print(TABLE_LEGEND)
        for note in ctx.notes:
            print(note)
        for w in out["warnings"]:
            print(f"warning: {w}")
        text = common.json_dumps(out, indent=1) + "\n"
        try:
            common.write_text(json_path, text)
        except SystemExit:  # a full disk after hours of attacks: the results go to stdout instead of nowhere
            print(text, end="")
            common.fail(f"the results above could not be written to {json_path}; they are printed to standard "
                        "output (save them from the console)")
        print(f"wrote {json_path}")
    if ctx.failed:  # only now: the results are written whatever the re-evaluation found (§4.1)
        common.fail(f"{', '.join(dict.fromkeys(ctx.failed))}: two passes over the same points disagree beyond "
                    f"near-ties (see the warnings); the results are written to {json_path}", status=1)


# ======================================================================================
# AutoAttack engine: a re-implementation of the official code (fra31/auto-attack@a392200 =
# pyautoattack 0.2.0), version standard, L-inf (§4), equal to it point for point on CPU
# (tests/test_autoattack_parity.py). Every random number is a CPU float32 torch.rand moved to the
# device, after torch.manual_seed(seed) once per attack and batch (§4.6), as the official code.
# ======================================================================================

def _rand(shape, device):
    return torch.rand(shape).to(device)


def aa_target(logits, target_class):
    """Target of APGD-T and FAB-T: the `target_class`-th largest clean logit (2..10)."""
    return logits.sort(dim=1)[1][:, -target_class]


def ce_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits, y):
    """DLR loss (Croce & Hein, ICML 2020): -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3) + 1e-12)."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).float()
    u = torch.arange(len(y), device=logits.device)
    return -(logits[u, y] - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1. - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits, y, y_target):
    """Targeted DLR: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4))/2 + 1e-12); needs >= 4 classes."""
    z_sorted = logits.sort(dim=1)[0]
    u = torch.arange(len(y), device=logits.device)
    return -(logits[u, y] - logits[u, y_target]) / (z_sorted[:, -1] - .5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def _loss_and_grad(model, x_adv, y, loss_fn, eot_iter):
    """Per-sample losses and the gradient of their sum (averaged over eot_iter passes)."""
    x_adv.requires_grad_()
    grad = torch.zeros_like(x_adv)
    for _ in range(eot_iter):
        with torch.enable_grad():
            logits = model(x_adv)
            loss_indiv = loss_fn(logits, y)
            loss = loss_indiv.sum()
        grad += torch.autograd.grad(loss, [x_adv])[0].detach()
    grad /= float(eot_iter)
    return logits.detach(), loss_indiv.detach(), grad


def _apgd_run(model, x, y, eps, loss_fn, *, n_iter=100, rho=0.75, eot_iter=1, warn=None):
    """One APGD run (§4.2), as the official attack_single_run: returns (x_best, acc, loss_best, x_best_adv),
    x_best the highest-loss iterate, acc = classified correctly at every iterate so far."""
    n = len(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)

    t = 2 * _rand(x.shape, x.device).detach() - 1
    t_inf = t.abs().view(n, -1).max(1)[0]
    x_adv = x + eps * torch.ones_like(x).detach() * (t / (t_inf.view(view) + 1e-12))
    x_adv = x_adv.clamp(0., 1.)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros([n_iter, n], device=x.device)

    logits, loss_indiv, grad = _loss_and_grad(model, x_adv, y, loss_fn, eot_iter)
    grad_best = grad.clone()
    if warn is not None and loss_fn is not ce_loss:  # checks.py check_zero_gradients, DLR losses only
        zero = (grad.view(n, -1).abs().sum(-1) == 0).sum().item()
        if zero:
            warn(f"{zero} points with an all-zero input gradient under the DLR loss: gradient-based attacks "
                 "may be unreliable (fra31/auto-attack flags_doc.md)")
    acc = logits.max(1)[1] == y
    loss_best = loss_indiv.clone()

    step_size = 2. * eps * torch.ones([n, *view[1:]], device=x.device).detach()
    x_adv_old = x_adv.clone()
    counter, k = 0, n_iter_2
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones_like(loss_best)

    for i in range(n_iter):
        with torch.no_grad():
            x_adv = x_adv.detach()
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0  # momentum
            z = x_adv + step_size * torch.sign(grad)
            z = torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
            z = torch.clamp(torch.min(torch.max(x_adv + (z - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0)
            x_adv = z + 0.

        logits, loss_indiv, grad = _loss_and_grad(model, x_adv, y, loss_fn, eot_iter)

        with torch.no_grad():
            pred = logits.max(1)[1] == y
            acc = torch.min(acc, pred)
            x_best_adv[~pred] = x_adv[~pred] + 0.  # the latest misclassified iterate, not the best-loss one
            loss_steps[i] = loss_indiv
            better = loss_indiv > loss_best
            x_best[better] = x_adv[better].clone()
            grad_best[better] = grad[better].clone()
            loss_best[better] = loss_indiv[better]

            counter += 1
            if counter == k:  # checkpoint: halve the step where the loss oscillates or stalls
                # fra31/auto-attack autopgd_base.py check_oscillation: loss_steps[-1] wraps to row n_iter-1,
                # still zero at the first checkpoint
                increases = torch.zeros(n, device=x.device)
                for c in range(k):
                    increases += (loss_steps[i - c] > loss_steps[i - c - 1]).float()
                reduce = (increases <= k * rho * torch.ones_like(increases)).float()
                no_improvement = (1. - reduced_last_check) * (loss_best_last_check >= loss_best).float()
                reduce = torch.max(reduce, no_improvement)
                reduced_last_check = reduce.clone()
                loss_best_last_check = loss_best.clone()
                if reduce.sum() > 0:
                    r = reduce > 0
                    step_size[r] /= 2.0
                    x_adv[r] = x_best[r].clone()  # x_adv_old is left as is (official behaviour)
                    grad[r] = grad_best[r].clone()
                k = max(k - size_decr, n_iter_min)
                counter = 0
    return x_best, acc, loss_best, x_best_adv


def apgd(model, x, y, eps, *, loss="ce", seed=0, n_iter=100, n_restarts=1, rho=0.75, eot_iter=1,
         n_target_classes=9, warn=None):
    """APGD-CE / APGD-DLR (loss 'ce' / 'dlr') and APGD-T (loss 'dlr-targeted'), as the official perturb().

    Returns x with the points broken by any run replaced by their adversarial example."""
    x = x.detach().clone().float()
    y = y.detach().clone().long()
    adv = x.clone()
    acc = predict(model, x) == y
    torch.manual_seed(seed)  # after the clean forward (§4.6); seeds every CUDA device too
    targets = range(2, n_target_classes + 2) if loss == "dlr-targeted" else [None]
    for target_class in targets:  # the random stream continues across the 9 targets
        for _ in range(n_restarts):
            idx = acc.nonzero().flatten()
            if idx.numel() == 0:
                continue
            x_to_fool, y_to_fool = x[idx].clone(), y[idx].clone()
            if target_class is None:
                loss_fn = {"ce": ce_loss, "dlr": dlr_loss}[loss]
            else:
                with torch.no_grad():
                    y_target = aa_target(model(x_to_fool), target_class)
                loss_fn = lambda z, yy, t=y_target: dlr_targeted_loss(z, yy, t)  # noqa: E731
            _, acc_curr, _, adv_curr = _apgd_run(model, x_to_fool, y_to_fool, eps, loss_fn, n_iter=n_iter, rho=rho,
                                           eot_iter=eot_iter, warn=warn)
            broken = ~acc_curr
            acc[idx[broken]] = False
            adv[idx[broken]] = adv_curr[broken].clone()
    return adv


def projection_linf(points_to_project, w_hyperplane, b_hyperplane):
    """Smallest L-inf step d from each row t (in the box [0,1]) onto the hyperplane <w, t + d> = b.

    Ported step by step from fra31/auto-attack autoattack/fab_projections.py@a392200 (projection_linf);
    its operations and their order are kept exactly, for bit parity with the official FAB.

    MIT License. Copyright (c) 2020 Francesco Croce.
    Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
    associated documentation files (the "Software"), to deal in the Software without restriction,
    including without limitation the rights to use, copy, modify, merge, publish, distribute,
    sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions: The above copyright notice and this
    permission notice shall be included in all copies or substantial portions of the Software.
    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
    LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN
    NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY,
    WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
    SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
    """
    device = points_to_project.device
    t, w, b = points_to_project, w_hyperplane.clone(), b_hyperplane.clone()

    # orient every hyperplane so that the point lies on its negative side
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)

    a = (w < 0).float()
    d = (a - t) * (w != 0).float()  # the box corner each coordinate moves towards

    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)

    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)

    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = - ws * d.gather(1, indp2)

    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)

    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & (~c_l)
    lb = torch.zeros(c2.sum(), device=device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    nitermax = math.ceil(math.log2(w.shape[1]))

    # binary search over the sorted coordinates for the active set
    indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
    for _ in range(nitermax):
        counter4 = torch.floor((lb + ub) / 2)

        counter2 = counter4.long().unsqueeze(1)
        indcurr = indp_.gather(1, indp_.size(1) - 1 - counter2)
        b2 = (sb_.gather(1, counter2) - s_.gather(1, counter2) * p_.gather(1, indcurr)).squeeze(1)
        c = b_ - b2 > 0

        lb = torch.where(c, counter4, lb)
        ub = torch.where(c, ub, counter4)

    lb = lb.long()

    if c_l.any():
        lmbd_opt = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd_opt

    lmbd_opt = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd_opt, d[c2]) * a[c2] + torch.max(-lmbd_opt, d[c2]) * (1 - a[c2])

    return d * (w != 0).float()


def _fab_targeted_run(model, x, y, target_class, *, n_iter=100, alpha_max=0.1, eta=1.05, beta=0.9):
    """One FAB-T run (§4.3), no random start: minimal L-inf adversarial example towards one target."""
    x = x.detach().clone().float()
    with torch.no_grad():
        logits = model(x)
    correct = logits.max(1)[1] == y
    if correct.sum() == 0:
        return x
    pred = correct.nonzero().flatten()
    la_target = aa_target(logits, target_class)[pred]
    im2, la2 = x[pred].clone(), y[pred].clone()
    bs = len(im2)
    u = torch.arange(bs, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    adv, adv_c = im2.clone(), x.clone()
    res2 = 1e10 * torch.ones([bs], device=x.device)
    x1, x0 = im2.clone(), im2.clone().reshape([bs, -1])

    for _ in range(n_iter):
        with torch.no_grad():
            # linearise z_t - z_y at x1 (fab_pt.py get_diff_logits_grads_batch_targeted)
            im = x1.clone().requires_grad_()
            with torch.enable_grad():
                z = model(im)
                diffy = -(z[u, la2] - z[u, la_target])
                sumdiffy = diffy.sum()
            df = diffy.detach()
            dg = torch.autograd.grad(sumdiffy, im)[0]
            b = (-df + (dg * x1).reshape(bs, -1).sum(dim=-1))
            w = dg.reshape([bs, -1])

            # project x1 and x0 on the linearised boundary, then step between the two projections
            d3 = projection_linf(torch.cat((x1.reshape([bs, -1]), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1 = torch.reshape(d3[:bs], x1.shape)
            d2 = torch.reshape(d3[-bs:], x1.shape)
            a0 = d3.abs().max(dim=1, keepdim=True)[0].view(view)
            a0 = torch.max(a0, 1e-8 * torch.ones(a0.shape, device=x.device))
            a1, a2 = a0[:bs], a0[-bs:]
            alpha = torch.min(torch.max(a1 / (a1 + a2), torch.zeros(a1.shape, device=x.device)),
                              alpha_max * torch.ones(a1.shape, device=x.device))
            x1 = ((x1 + eta * d1) * (1 - alpha) + (im2 + d2 * eta) * alpha).clamp(0.0, 1.0)

            is_adv = predict(model, x1) != la2  # any wrong class, not only the target
            if is_adv.sum() > 0:
                ind = is_adv.nonzero().flatten()
                t = (x1[ind] - im2[ind]).reshape([len(ind), -1]).abs().max(dim=1)[0]
                closer = t < res2[ind]  # the official 0/1-mask blends, as selects (all values finite)
                adv[ind] = torch.where(closer.view(view), x1[ind], adv[ind])
                res2[ind] = torch.where(closer, t, res2[ind])
                x1[ind] = im2[ind] + (x1[ind] - im2[ind]) * beta  # backward step towards the clean point

    succ = (res2 < 1e10).nonzero().flatten()
    adv_c[pred[succ]] = adv[succ].clone()
    return adv_c


def fab_targeted(model, x, y, eps, *, seed=0, n_iter=100, n_target_classes=9, alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB-T (§4.3), one restart per target, as fab_base.py perturb(): a point counts as broken only if
    misclassified within eps."""
    adv = x.clone()
    with torch.no_grad():
        acc = model(x).max(1)[1] == y
        torch.manual_seed(seed)  # FAB-T draws nothing with one restart; kept for the official stream
        for target_class in range(2, n_target_classes + 2):
            idx = acc.nonzero().flatten()
            if idx.numel() == 0:
                continue
            x_to_fool, y_to_fool = x[idx].clone(), y[idx].clone()
            adv_curr = _fab_targeted_run(model, x_to_fool, y_to_fool, target_class, n_iter=n_iter,
                                         alpha_max=alpha_max, eta=eta, beta=beta)
            acc_curr = model(adv_curr).max(1)[1] == y_to_fool
            res = (x_to_fool - adv_curr).abs().reshape(len(x_to_fool), -1).max(1)[0]
            acc_curr = torch.max(acc_curr, res > eps)
            broken = ~acc_curr
            acc[idx[broken]] = False
            adv[idx[broken]] = adv_curr[broken].clone()
    return adv


def _margin(model, x, y):
    """z_y - max_{j!=y} z_j (Square's margin loss)."""
    logits = model(x)
    u = torch.arange(len(y), device=x.device)
    y_corr = logits[u, y].clone()
    logits[u, y] = -float("inf")
    return y_corr - logits.max(dim=-1)[0]


def _square_p(it, p_init):
    """Fraction of pixels changed at iteration `it` (square.py p_selection, resc_schedule=False)."""
    for bound, halvings in ((10, 0), (50, 1), (200, 2), (500, 3), (1000, 4), (2000, 5), (4000, 6), (6000, 7), (8000, 8)):
        if it <= bound:
            return p_init / 2 ** halvings
    return p_init / 512


def _square_run(model, x, y, eps, *, n_queries=5000, p_init=0.8):
    """One Square L-inf run (§4.4). Returns (queries used per point, x_best)."""
    c, h, w = x.shape[1:]
    n_features = c * h * w
    view = (-1,) + (1,) * (x.dim() - 1)
    # vertical stripes: one sign per image, channel and column
    x_best = torch.clamp(x + eps * torch.sign(2 * _rand([len(x), c, 1, w], x.device) - 1), 0., 1.)
    margin_min = _margin(model, x_best, y)
    loss_min = margin_min.clone()  # loss 'margin'
    queries = torch.ones(len(x), device=x.device)
    if (margin_min < 0.0).all():
        return queries, x_best

    for it in range(n_queries):
        idx = (margin_min > 0.0).nonzero().flatten()
        x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
        margin_min_curr, loss_min_curr = margin_min[idx], loss_min[idx]

        p = _square_p(it, p_init)
        s = max(int(round(math.sqrt(p * n_features / c))), 1)
        s = min(s, min(h, w))
        vh = int((0 + (h - s) * _rand([1], x.device)).long())
        vw = int((0 + (w - s) * _rand([1], x.device)).long())
        new_deltas = torch.zeros([c, h, w], device=x.device)  # one square and sign pattern for the whole batch
        new_deltas[:, vh:vh + s, vw:vw + s] = 2. * eps * torch.sign(2 * _rand([c, 1, 1], x.device) - 1)

        x_new = x_best_curr + new_deltas
        x_new = torch.min(torch.max(x_new, x_curr - eps), x_curr + eps)
        x_new = torch.clamp(x_new, 0., 1.)
        margin = _margin(model, x_new, y_curr)
        loss = margin

        # the official 0/1-mask blends, written as selects (all values finite)
        improved = loss < loss_min_curr
        loss_min[idx] = torch.where(improved, loss, loss_min_curr)
        improved = improved | (margin <= 0.)
        margin_min[idx] = torch.where(improved, margin, margin_min_curr)
        x_best[idx] = torch.where(improved.view(view), x_new, x_best_curr)
        queries[idx] += 1.
        if (margin_min <= 0.).all():
            break
    return queries, x_best


def square(model, x, y, eps, *, seed=0, n_queries=5000, p_init=0.8, return_queries=False):
    """Square attack (§4.4), one restart, as square.py perturb(); points already misclassified are skipped."""
    with torch.no_grad():
        adv = x.clone()
        acc = model(x).max(1)[1] == y
        torch.manual_seed(seed)
        queries = torch.zeros(len(x), device=x.device)
        idx = acc.nonzero().flatten()
        if idx.numel() != 0:
            x_to_fool, y_to_fool = x[idx].clone(), y[idx].clone()
            q, adv_curr = _square_run(model, x_to_fool, y_to_fool, eps, n_queries=n_queries, p_init=p_init)
            queries[idx] = q
            broken = model(adv_curr).max(1)[1] != y_to_fool
            adv[idx[broken]] = adv_curr[broken].clone()
    return (adv, queries) if return_queries else adv


# ---- official sanity checks (checks.py, §4.7): warnings, never errors ------------------------------

def sanity_checks(model, x, y, version, attacks, n_targets=9):
    """checks.py on the first batch, before the attacks: randomised model, probability outputs, gradients
    computed inside forward, too few classes. Returns the warnings."""
    warnings = []
    with torch.no_grad():
        if version != "rand":  # randomised defence: 5 passes must agree
            outs = [model(x) for _ in range(5)]
            correct = [(o.max(1)[1] == y).sum().item() for o in outs]
            unit = [o / ((o ** 2).view(len(o), -1).sum(-1).sqrt().view(-1, 1) + 1e-10) for o in outs]
            max_diff = max(((unit[i] - unit[j]) ** 2).view(len(x), -1).sum(-1).sqrt().max().item()
                           for i in range(5) for j in range(i + 1, 5))
            if len(set(correct)) > 1 or max_diff > 1e-4:
                warnings.append("the model looks randomised (outputs differ across passes): use --aa rand "
                                "(fra31/auto-attack flags_doc.md)")
        out = model(x)
        if out.max() < 1. + 1e-5 and out.min() > -1e-5 and ((out.sum(-1) - 1.).abs() < 1e-5).all():
            warnings.append("the outputs look like probabilities, not logits (fra31/auto-attack flags_doc.md)")
    n_cls = out.shape[-1]

    calls = 0  # a dynamic defence computes gradients inside its forward

    def tracer(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_name in ("grad", "backward", "_make_grads"):
            calls += 1

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        model(x)
    finally:
        sys.settrace(previous)
    if calls:
        warnings.append("the model computes gradients in its forward (a dynamic defence?): AutoAttack may "
                        "be insufficient (fra31/auto-attack flags_doc.md)")

    if ("apgd-dlr" in attacks or "apgd-t" in attacks) and n_cls <= 3:
        warnings.append(f"{n_cls} classes: the {'DLR' if n_cls <= 2 else 'targeted DLR'} loss is not defined")
    elif "apgd-t" in attacks and n_targets + 1 > n_cls:
        warnings.append(f"APGD-T uses {n_targets} target classes but only {n_cls - 1} exist")
    if "fab-t" in attacks and n_targets + 1 > n_cls:
        warnings.append(f"FAB-T uses {n_targets} target classes but only {n_cls - 1} exist")
    return warnings


# ---- the ensemble (run_standard_evaluation, §4.1) --------------------------------------------------

def run_aa_attack(name, model, x, y, eps, seed, version, warn, square_queries=5000):
    """One attack of the ensemble on one batch; Square also returns the queries it used per point."""
    if name in ("apgd-ce", "apgd-dlr"):
        return apgd(model, x, y, eps, loss=name[5:], seed=seed, eot_iter=20 if version == "rand" else 1, warn=warn)
    if name == "apgd-t":
        return apgd(model, x, y, eps, loss="dlr-targeted", seed=seed, warn=warn)
    if name == "fab-t":
        return fab_targeted(model, x, y, eps, seed=seed)
    if name == "square":
        return square(model, x, y, eps, seed=seed, n_queries=square_queries, return_queries=True)
    raise ValueError(name)


def autoattack(model, x, y, eps, *, version="standard", attacks=None, bs=250, seed=0, device="cpu",
               quiet=True, checks=True, square_queries=5000):
    """AutoAttack as run_standard_evaluation (§4.1): each attack only on the points still robust, always
    from the clean image, seeded per attack and batch; a point's result is its worst case over the attacks.

    x, y live on the CPU (batches move to `device`). Returns a dict with x_adv, y_adv, robust (per-point
    flags), cumulative accuracies after each attack, seconds per attack and the sanity warnings."""
    attacks = list(attacks or AA_VERSIONS[version])
    warnings = []
    if checks:
        warnings += sanity_checks(model, x[:bs].to(device), y[:bs].to(device), version, attacks)
    n = len(y)
    robust = torch.zeros(n, dtype=torch.bool)
    y_adv = torch.empty_like(y)
    with torch.no_grad():
        for lo in range(0, n, bs):
            pred = predict(model, x[lo:lo + bs].to(device))
            y_adv[lo:lo + bs] = pred.cpu()
            robust[lo:lo + bs] = (pred == y[lo:lo + bs].to(device)).cpu()
    cumulative = {"clean": robust.sum().item() / n}
    seconds = {}
    x_adv = x.clone()
    queries = torch.zeros(n)
    for name in attacks:
        start = time.perf_counter()
        num_robust = robust.sum().item()
        if num_robust == 0:  # nothing left to attack: the remaining attacks are skipped
            cumulative[name], seconds[name] = 0.0, 0.0
            continue
        robust_idx = robust.nonzero().flatten()  # ascending index order
        bar = Progress(name, num_robust, quiet)
        rank, world_size = common.world()
        mine = torch.zeros(n, dtype=torch.bool)
        for b, lo in enumerate(range(0, num_robust, bs)):
            idx = robust_idx[lo:lo + bs]
            if b % world_size != rank:  # torchrun: batches shared round robin; each is seeded on its own (§4.6)
                continue
            mine[idx] = True
            xb, yb = x[idx].clone().to(device), y[idx].clone().to(device)
            check_frozen(model, name)
            adv = run_aa_attack(name, model, xb, yb, eps, seed, version, warnings.append, square_queries)
            if name == "square":
                adv, q = adv
                queries[idx] = q.cpu()
            with torch.no_grad():
                out = model(adv).max(1)[1]
            broken = (out != yb).cpu()
            robust[idx[broken]] = False
            x_adv[idx[broken]] = adv[broken.to(adv.device)].detach().cpu()
            y_adv[idx[broken]] = out[broken.to(out.device)].cpu()
            bar.update(min(lo + bs, num_robust), f"robust {robust.sum().item() / n:.2%}")
        if world_size > 1:  # every rank takes the owners' results of this attack before the next one
            attacked = torch.zeros(n, dtype=torch.bool)
            attacked[robust_idx] = True
            robust, x_adv, y_adv, queries = (merge(t, mine, attacked, device) for t in (robust, x_adv, y_adv, queries))
        cumulative[name] = robust.sum().item() / n
        seconds[name] = time.perf_counter() - start
    # checks.py check_square_sr: a black-box attack beating the white-box ones signals gradient masking
    if "square" in cumulative and len(cumulative) > 2:
        best_other = min(v for k, v in cumulative.items() if k != "square")
        if cumulative["square"] < best_other - 0.002:
            warnings.append(f"Square lowered the robust accuracy by {best_other - cumulative['square']:.2%} after "
                            "the white-box attacks: the evaluation may be unreliable (gradient masking?)")
    return dict(x_adv=x_adv, y_adv=y_adv, robust=robust, cumulative=cumulative, seconds=seconds, warnings=warnings,
                square_queries=queries)


if __name__ == "__main__":
    main()
