"""ADT and AODT: Adversarial (Online) Distillation Training (anonymous CVPR submission, paper ID 644).

The robust model M^r (`student`, a WRN-34-10 trained from scratch) is pulled, on the adversarial
example x', towards the logits of a *natural* model M^n on the clean x. In ADT, M^n is a fixed,
naturally trained teacher (an ensemble: the mean of its members' logits); in AODT it is a peer
trained from scratch jointly with M^r, by one SGD over both models. No label enters ADT's loss.

    ADT   L = MSE(M^r(x'), sg(M^n(x)))                                                     ADT Eq. 2
    AODT  L = MSE(M^r(x'), sg(M^n(x))) + β · CE(M^n(x), y)            β = 1               ADT Eq. 3, D-ADT-2
    +ALP     + α · MSE(M^r(x'), M^r(x))                               α = 1               ADT Eq. 4
    +TRADES  + α · KL(σ(M^r(x)) ‖ σ(M^r(x')))  and TRADES' KL attack  α = 0 or 6         ADT Eq. 5
    x' = argmax_{‖x'-x‖∞ ≤ 0.031} CE(M^r(x'), y)  ("noisy BIM", ADT Eq. 1; 10 steps of 0.007)
    AODT ablation (ADT §4.4, Eq. 6-9): --aodt-loss l1 (MSE, default), l2 (MSE + CE), l3 (KD, T = 4,
    β' = 0.1, with the paper's literal 2β'T² factor), l4 (KL + CE); β·CE(M^n(x), y) is added to each.

Headline commands (CIFAR-10; add --dataset cifar100 for the second pair of numbers). Published
clean / FGSM^20 (PGD-20, step 0.003, ε 0.031, white-box), averages of 2 runs, C-10 | C-100:
    python adt_aodt.py --method adt --teacher wrn34_10:natural.pt                    ADT          89.00 / 56.07 | 67.72 / 30.20
    python adt_aodt.py --method aodt                                                 AODT         87.08 / 56.60 | 66.29 / 34.30
    python adt_aodt.py --method adt --reg alp --teacher wrn34_10:natural.pt          ADT+ALP      86.58 / 55.74 | 63.46 / 31.27
    python adt_aodt.py --method aodt --reg alp                                       AODT+ALP     85.05 / 57.60 | 62.67 / 35.25
    python adt_aodt.py --method adt --reg trades --teacher wrn34_10:natural.pt       ADT+TRADES(α=0)   89.06 / 56.75 | 71.27 / 28.70
    python adt_aodt.py --method aodt --reg trades                                    AODT+TRADES(α=0)  88.22 / 57.55 | 70.03 / 33.01
    python adt_aodt.py --method aodt --reg trades --reg-weight 6                     AODT+TRADES(α=6)  81.98 / 57.78 | 60.43 / 35.50
    python adt_aodt.py --method aodt --aodt-loss l2      (l3, l4)                    Table 5, C-10: l1 87.53 / 57.35, l2 88.35 / 55.70,
                                                                                     l3 83.56 / 47.18, l4 88.41 / 54.78
ADT Tables 2-3; the peer is ResNet-18 or ResNet-152 per row as the captions say (--peer-arch). The
paper's ADT teacher is an ensemble of a WRN-34-10 and a CIFAR InceptionResNetV2 that is defined
nowhere; the default is the natural WRN-34-10 alone, and --teacher may be repeated to add members.
Make the natural WRN-34-10 teacher (ADT §4.3: 95.80% on CIFAR-10, 78.76% on CIFAR-100) with:
    python train_teacher.py --recipe natural-rslad --arch wrn34_10 [--dataset cifar100]
Evaluate the reported (last) checkpoint; the robust model is the checkpoint's `model`, AODT's peer
is stored next to it as `peer`:
    python eval_attacks.py runs/<run>/last.pt --preset adt
Smoke run on CPU:
    python adt_aodt.py --method aodt --arch cnn_small --peer-arch cnn_small --epochs 2 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-ADT-1   MSE averaged over batch and classes (F.mse_loss)                          --mse-reduction sum-classes
    D-ADT-2   AODT: L trains M^r only, the peer learns from β·CE (its target detached in L) --no-detach-peer
    D-ADT-3   one SGD over M^r and the peer, same lr, schedule, momentum, weight decay
    D-ADT-4   CE attack summed, eval-mode BN, unclamped uniform start                   --attack-bn train, --rand-start
    D-ADT-5   teacher = mean of the members' logits; default the natural WRN-34-10 alone  repeat --teacher
    D-ADT-6   peer ResNet-18 / ResNet-152 as each table caption says, no normalisation  --peer-arch
    D-ADT-7   l4's KL with the peer as target (the paper writes KL in TRADES' order)
    D-ADT-8   best.pt by FGSM^20 every epoch, last.pt reported (nothing is selected)     --report best
    D-ADT-9   +TRADES uses TRADES' KL attack and clean pass also at alpha = 0           --reg none
    D-ADT-10  the tables' "FGSM" is one step of 0.003 from a uniform start              eval_attacks.py --preset adt
    code vs paper: TRADES' adjust_learning_rate decays a third time, after epoch 99     --lr-milestones 74 89 99
Decisions, defaults and their sources in full: docs/adt_aodt.md. Official code: none; "the code" is the one the
paper builds on, yaodongyu/TRADES@6e8e11b (trades.py, train_trades_cifar10.py), the reference for every gap.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = common.parser("adt_aodt", "ADT / AODT (CVPR submission 644): adversarial (online) distillation training")
    g = p.add_argument_group("method (ADT §3)")
    g.add_argument("--method", choices=["adt", "aodt"], default="adt",
                   help="adt: fixed natural teacher (Eq. 2); aodt: natural peer trained jointly from scratch (Eq. 3)")
    g.add_argument("--reg", choices=["none", "alp", "trades"], default="none",
                   help="combination of ADT §3.3: alp adds alpha*MSE(M^r(x'), M^r(x)) (Eq. 4); trades adds "
                        "alpha*KL(σ(M^r(x)) ‖ σ(M^r(x'))) and uses TRADES' KL attack (Eq. 5, D-ADT-9)")
    g.add_argument("--reg-weight", type=common.parse_float, default=None,
                   help="alpha of Eq. 4-5 (default: 1 for alp, 0 for trades: the headline +TRADES rows; 6 for "
                        "the AODT+TRADES(alpha=6) row)")
    g.add_argument("--aodt-loss", choices=["l1", "l2", "l3", "l4"], default="l1",
                   help="AODT's L (ADT §4.4, Table 5): l1 MSE (Eq. 6), l2 MSE + CE (Eq. 7), l3 KD (Eq. 8), "
                        "l4 KL + CE (Eq. 9)")
    g.add_argument("--temp", type=common.parse_float, default=4.0, help="l3 only: temperature T of Eq. 8")
    g.add_argument("--l3-beta", type=common.parse_float, default=0.1, help="l3 only: beta' of Eq. 8")
    g.add_argument("--mse-reduction", choices=["mean", "sum-classes"], default="mean",
                   help="MSE over B x C logits: mean over all entries (F.mse_loss) or sum over classes, mean over "
                        "the batch (D-ADT-1)")
    g = p.add_argument_group("models")
    g.add_argument("--arch", choices=common.ARCHS, default="wrn34_10",
                   help="robust model M^r, random init (ADT §4: the WRN-34-10 of TRADES)")
    g.add_argument("--teacher", action="append", type=absolute_member, default=None, metavar="ARCH:CKPT[:NORM]",
                   help="ADT: a naturally trained member of M^n (repeat the flag for an ensemble: logits averaged, "
                        "D-ADT-5); ARCH may be left out for a suite checkpoint, else wrn34_10 is assumed; NORM one of "
                        "none, cifar10, cifar100 (default: the suite checkpoint's record, else none)")
    g.add_argument("--peer-arch", choices=common.ARCHS, default=None,
                   help="AODT: the peer M^n, random init, no normalisation (default: resnet18 for --reg none and alp, "
                        "resnet152 for trades on CIFAR-10; resnet152 for none and trades, resnet18 for alp on "
                        "CIFAR-100; D-ADT-6)")
    g.add_argument("--peer-beta", type=common.parse_float, default=1.0,
                   help="AODT: weight beta of the peer's CE(M^n(x), y) (ADT Eq. 3)")
    g.add_argument("--detach-peer", action=argparse.BooleanOptionalAction, default=True,
                   help="AODT: the peer's logits are a constant target in L, so that L trains M^r only and the peer "
                        "learns from beta*CE (D-ADT-2: --no-detach-peer, the joint reading of Eq. 3, collapses to a "
                        "constant classifier in every setting tried, docs/adt_aodt.md §6) (default: on)")
    g = p.add_argument_group("inner maximisation (ADT §4 training details)")
    g.add_argument("--eps", type=common.parse_float, default="0.031", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default="0.007", help="PGD step size (eta_1)")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps (K)")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="eval",
                   help="BatchNorm mode of M^r during the attack (TRADES' code attacks in eval())")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default=None,
                   help="random start (default: uniform, x + U(-eps, eps) unclamped; normal001 with --reg trades, "
                        "trades.py)")
    g = p.add_argument_group("optimisation (ADT §4; one SGD over M^r and the AODT peer)")
    g.add_argument("--epochs", type=common.positive_int, default=100, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size (m)")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate (eta_2)")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=[74, 89],
                   help="multiply lr by 0.1 after each of these epochs (transition epochs 75 and 90, ADT §4)")
    g.add_argument("--report", choices=["last", "best"], default="last",
                   help="checkpoint the run reports at its end (TRADES' code and the paper select nothing)")
    common.add_run_args(p, monitors=MONITORS, monitor="fgsm20-trades", eval_every=1, seed=1)
    p.resume_may_change.add("teacher")  # moved files; load_teachers checks they hold the same bytes
    rules = {"reg_weight": ("a number >= 0", lambda v: v >= 0), "peer_beta": ("a number >= 0", lambda v: v >= 0),
             "l3_beta": ("in [0, 1]", lambda v: 0 <= v <= 1)}
    return common.parse(p, argv, resolve=resolve_defaults, rules=rules, unused=unused_flags), p


# the peer each table caption names (Table 2 per data set; Tables 1 and 3 per combination)
PEER_ARCH = {("cifar10", "none"): "resnet18", ("cifar10", "alp"): "resnet18", ("cifar10", "trades"): "resnet152",
             ("cifar100", "none"): "resnet152", ("cifar100", "alp"): "resnet18", ("cifar100", "trades"): "resnet152"}


def resolve_defaults(args):
    """Defaults that depend on the method, the combination and the data set (docs/adt_aodt.md §3)."""
    if args.method == "adt" and not args.teacher:
        common.fail("--method adt needs --teacher ARCH:CKPT (a naturally trained model, e.g. from train_teacher.py "
                    "--recipe natural-rslad --arch wrn34_10); --method aodt trains its own")
    if args.method == "aodt" and args.peer_arch is None:
        args.peer_arch = PEER_ARCH[("cifar100" if args.dataset == "cifar100" else "cifar10", args.reg)]
    if args.reg_weight is None:
        args.reg_weight = 1.0 if args.reg == "alp" else 0.0  # ADT §4.2: ALP alpha = 1; headline +TRADES rows alpha = 0
    if args.rand_start is None:
        args.rand_start = "normal001" if args.reg == "trades" else "uniform"  # trades.py: x + 0.001 N(0, I)


def unused_flags(args):
    """The flags this configuration does not read: {dest: why}; typing one of them is an error."""
    unused = {}
    if args.method == "adt":
        unused.update(dict.fromkeys(["peer_arch", "peer_beta", "detach_peer", "aodt_loss", "temp", "l3_beta"],
                                    "is read by --method aodt only, not by adt"))
    else:
        unused["teacher"] = "is read by --method adt only; AODT trains its peer (--peer-arch) from scratch"
        unused.update(dict.fromkeys(["unsafe_load", "override_record"],
                                    "is read by --method adt only, which loads --teacher files"))
        if args.aodt_loss != "l3":
            unused.update(dict.fromkeys(["temp", "l3_beta"], f"is read by --aodt-loss l3 only, not by {args.aodt_loss}"))
        if args.aodt_loss in ("l3", "l4") and args.reg != "alp":
            unused["mse_reduction"] = (f"is read by the MSE terms only (--aodt-loss l1, l2 or --reg alp), not by "
                                       f"--aodt-loss {args.aodt_loss} with --reg {args.reg}")
    if args.reg == "none":
        unused["reg_weight"] = "is read by --reg alp and trades only, not by none"
    return unused


# --------------------------------------------------------------------------------------
# Inner maximisation (ADT Eq. 1; TRADES trades.py for --reg trades)
# --------------------------------------------------------------------------------------

def random_start(x_nat, eps, start):
    """The named starts of docs/conventions.md; none of them is clamped unless its name says so."""
    if start == "normal001":
        return x_nat + 0.001 * torch.randn_like(x_nat)
    if start == "none":
        return x_nat.clone()
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-eps, eps)
    return x_adv.clamp(0, 1) if start == "uniform-clamp" else x_adv


def inner_max(student, x_nat, y, args):
    """x' for M^r alone (the teacher or peer is never attacked and never takes part): CE_sum on the labels
    ("noisy BIM", ADT Eq. 1), or with --reg trades TRADES' KL_sum(σ(M^r(x)) ‖ σ(M^r(x'))).

    M^r attacks in eval() mode, as TRADES' code does, and is in train() on return.
    """
    student.train(args.attack_bn == "train")
    trades = args.reg == "trades"
    if trades and args.attack_bn == "eval":
        with torch.no_grad(), common.autocast(args.amp, x_nat.device):
            p_nat = F.softmax(student(x_nat).float(), dim=1)  # trades.py recomputes M^r(x) each step; constant in eval()
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            if trades:
                if args.attack_bn == "train":  # trades.py order, M^r(x') then M^r(x): here both move the BN statistics
                    with torch.no_grad(), common.autocast(args.amp, x_nat.device):
                        p_nat = F.softmax(student(x_nat).float(), dim=1)
                loss = kl_div(p_nat, F.log_softmax(logits_adv.float(), dim=1), "sum")  # nn.KLDivLoss(size_average=False)
            else:
                loss = F.cross_entropy(logits_adv.float(), y, reduction="sum")  # D-ADT-4: CE summed, eval BN, uniform start
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + args.attack_step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x_nat - args.eps), x_nat + args.eps).clamp(0, 1)
    student.train()
    return x_adv.detach()


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------

def kl_div(p, log_q, reduction, eps=0.0):
    """KL(p ‖ q) = Σ p (log(p + eps) − log q) with the suite's reductions (docs/conventions.md); 0·log 0 = 0.
    With eps = 0 this is exactly what F.kl_div / nn.KLDivLoss compute."""
    e = torch.xlogy(p, p + eps) - p * log_q
    if reduction == "sum":
        return e.sum()
    return e.sum() / len(p) if reduction == "batchmean" else e.mean()


def mse(a, b, reduction):
    """(a − b)² averaged over all B·C logits (F.mse_loss), or summed over classes and averaged over the batch."""
    e = (a - b) ** 2
    return e.mean() if reduction == "mean" else e.sum() / len(e)


def distill_term(logits_adv, logits_teacher, y, args):
    """L of ADT Eq. 2-3 (O^r = M^r(x'), O^n = M^n(x)); for AODT one of the Table 5 choices (Eq. 6-9)."""
    if args.method == "adt" or args.detach_peer:
        logits_teacher = logits_teacher.detach()  # ADT: sg(O^n), a fixed teacher; AODT: unless --no-detach-peer
    choice = args.aodt_loss if args.method == "aodt" else "l1"
    if choice in ("l1", "l2"):
        terms = {"mse": mse(logits_adv, logits_teacher, args.mse_reduction)}  # Eq. 2 / Eq. 6
        if choice == "l1":
            return terms["mse"], terms
        terms["ce"] = F.cross_entropy(logits_adv, y)
        return terms["mse"] + terms["ce"], terms  # Eq. 7
    if choice == "l3":  # Eq. 8, softCE(p, q) = (1/B) Σ_i −Σ_c q log p with the peer's q as target
        b, t = args.l3_beta, args.temp
        terms = {"ce": F.cross_entropy(logits_adv, y),
                 "kd": -(F.softmax(logits_teacher / t, dim=1) * F.log_softmax(logits_adv / t, dim=1)).sum(1).mean()}
        return (1 - b) * terms["ce"] + 2 * b * t * t * terms["kd"], terms  # the factor 2β'T² as printed
    # Eq. 9; D-ADT-7: the paper's D_KL(O^r_s ‖ O^n_s) in TRADES' prediction-first notation = KL(O^n_s ‖ O^r_s)
    terms = {"kl": kl_div(F.softmax(logits_teacher, dim=1), F.log_softmax(logits_adv, dim=1), "batchmean"),
             "ce": F.cross_entropy(logits_adv, y)}
    return terms["kl"] + terms["ce"], terms


def loss_fn(logits_adv, logits_nat, logits_teacher, y, args):
    """ADT Eq. 2-5: L, AODT's β·CE on the peer, and the ALP or TRADES term; returns the loss and its logged terms.
    `logits_nat` = M^r(x) (None with --reg none); `logits_teacher` = the ADT ensemble's or the AODT peer's M^n(x)."""
    loss, terms = distill_term(logits_adv, logits_teacher, y, args)
    if args.method == "aodt":
        terms["ce_peer"] = F.cross_entropy(logits_teacher, y)  # ADT Eq. 3: β · CE(σ(M^n(x)), y)
        loss = loss + args.peer_beta * terms["ce_peer"]
    if args.reg == "alp":  # Eq. 4: logit pairing, gradient through both M^r(x') and M^r(x)
        terms["alp"] = mse(logits_adv, logits_nat, args.mse_reduction)
        loss = loss + args.reg_weight * terms["alp"]
    elif args.reg == "trades":  # Eq. 5 = trades.py: (1/B)·KLDivLoss(sum), target σ(M^r(x)) not detached
        terms["trades_kl"] = kl_div(F.softmax(logits_nat, dim=1), F.log_softmax(logits_adv, dim=1), "batchmean")
        loss = loss + args.reg_weight * terms["trades_kl"]  # weight 0 in the headline rows, but M^r(x) still ran
    return loss, {"loss": loss, **terms}


def train_step(student, teacher, optimizer, x_nat, y, args):
    """One batch as ADT Algorithm 1: the attack on M^r, then the forward passes M^n(x), M^r(x') [, M^r(x)], in
    this order. `teacher` is M^n: ADT's frozen ensemble (no gradient) or AODT's peer (train mode, trained by
    `optimizer`)."""
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
    with common.autocast(args.amp, x_nat.device):
        if args.method == "adt":
            with torch.no_grad():
                logits_teacher = teacher(x_nat).float()  # Algorithm 1 line 9, eval mode
        else:
            logits_teacher = teacher(x_nat).float()  # the peer's only pass, [x]
        logits_adv = student(x_adv).float()  # Algorithm 1 line 10
        # TRADES' order, adversarial first; a separate pass with its own batch statistics
        logits_nat = student(x_nat).float() if args.reg != "none" else None
    loss, terms = loss_fn(logits_adv, logits_nat, logits_teacher, y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`: x0.1 after each milestone, i.e. 1-74: 0.1, 75-89: 0.01, 90-100: 0.001 (ADT §4)."""
    return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)


# --------------------------------------------------------------------------------------
# M^n: ADT's teacher ensemble or AODT's peer
# --------------------------------------------------------------------------------------

class MeanLogits(nn.Module):
    """An ensemble of frozen members whose logits are averaged."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x).float() for m in self.members]).mean(0)


def absolute_member(text):
    """--teacher's ARCH:CKPT[:NORM] with CKPT made absolute: a resumed run may start from another folder."""
    arch, path, norm = common.parse_model_spec(text, "--teacher")
    return ":".join([*([arch] if arch else []), path, *([] if norm == "auto" else [norm or "none"])])


def load_teachers(args, device):
    """Load, freeze and place every --teacher member. Returns the ensemble (their mean logits), the members
    and what the loader found, one entry per member: {"arch": [...], "norm": [...], "sha256": [...]}
    (`Run.begin(teachers=...)` records them in args.json). A resumed run refuses a file with other bytes."""
    saved = getattr(args, "teacher_sha256", None)  # on --resume: the saved run's record
    if saved is not None and len(saved) != len(args.teacher):
        common.fail(f"the run started with {len(saved)} --teacher member(s); {len(args.teacher)} given")
    members, info = [], {"arch": [], "norm": [], "sha256": []}
    for i, text in enumerate(args.teacher):
        arch, path, norm = common.parse_model_spec(text, "--teacher")
        model, found = common.load_model(path, arch=arch, num_classes=common.DATASETS[args.dataset], norm=norm,
                                         device=device, unsafe=args.unsafe_load, arch_flag="--teacher ARCH:CKPT",
                                         default_arch="wrn34_10", dataset=args.dataset, norm_flag="--teacher ...:NORM",
                                         override_record=args.override_record)
        if not found["suite"] and saved is None:
            common.warn_unrecorded(path, args.dataset, found)
        digest = common.file_sha256(path)
        if saved is not None and digest != saved[i]:
            common.fail(f"--teacher {path} is not the file the run started with (sha256 {digest[:12]}… vs {saved[i][:12]}…)")
        norm_name = common.norm_name(found["norm"])
        common.say(f"teacher {i}: {path} -> {found['arch']} {found['arch_kwargs'] or ''} norm {norm_name}"
                   f" (container {found['container']}, stripped {found['prefixes'] or 'nothing'})")
        members.append(common.prepare_model(common.freeze(model), args, device))
        info["arch"].append(found["arch"])
        info["norm"].append(norm_name)
        info["sha256"].append(digest)
    return common.freeze(MeanLogits(members)), members, info


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-ADT-8: TRADES' pgd_attack_cifar10.py FGSM^20 (PGD-20) after every epoch; best.pt kept, last.pt reported
MONITORS = {
    "fgsm20-trades": dict(eps=0.031, steps=20, step=0.003, start="uniform", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("adt_aodt", args, args.arch, variant=args.method)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    peer = members = None
    if args.method == "adt":
        teacher, members, teacher_info = load_teachers(args, device)
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    params = list(student.parameters())
    if args.method == "aodt":  # random init, no normalisation
        peer = teacher = common.prepare_student(common.build_model(args.peer_arch, num_classes, None), args, device)
        params += list(peer.parameters())
    # D-ADT-3: one SGD over M^r and the peer, same lr, schedule, momentum and weight decay
    optimizer = common.sgd(params, args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    start, best = run.begin(student, optimizer, monitor=attack, peer=peer,
                            teachers={"teacher": teacher_info} if args.method == "adt" else None)
    if not run.resumed and args.method == "adt":
        common.measure_teacher(run, teacher, test_data, attack)
        if len(members) > 1:
            run.log({"epoch": 0, **{f"teacher{i}/clean": common.monitor(m, test_data, None)["clean"]
                                    for i, m in enumerate(members)}})
    models = (student,) if peer is None else (student, peer)

    for epoch in range(start, args.epochs + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, args)
        for model in models:
            model.train()
        totals, n_seen = {}, 0
        with common.EpochTimer(device) as timer:
            for x_nat, y in run.batches(train_data, epoch):
                common.broadcast_buffers(*models)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                terms = train_step(student, teacher, optimizer, x_nat, y, args)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v.detach() * len(y)
                n_seen += len(y)
        metrics = run.train_metrics(epoch, totals, n_seen, optimizer, *models)
        if common.is_monitor_epoch(args, epoch):
            m = common.monitor(student, test_data, attack, tf32=args.monitor_tf32)
            metrics.update(test_clean=m["clean"], test_robust=m["robust"], test_classes=m["classes"],
                           monitor_seconds=round(m["seconds"], 2))
            if peer is not None:
                metrics["peer_clean"] = common.monitor(peer, test_data, None)["clean"]
            if best["value"] is None or m["robust"] > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                best = {"epoch": epoch, "value": m["robust"]}
        record = run.log_epoch(epoch, metrics, best, seconds=timer.seconds)
        if best["epoch"] == epoch:  # best.pt before last.pt: a failed write never leaves last.pt ahead of best.pt
            run.save_best(student, record, best, peer=peer)
        run.save_last(student, optimizer, record, best, peer=peer)
    common.say(f"reported checkpoint (D-ADT-8): {run.dir / (args.report + '.pt')}; evaluate it with "
               f"python eval_attacks.py {run.dir / (args.report + '.pt')} --preset adt")


if __name__ == "__main__":
    main()
