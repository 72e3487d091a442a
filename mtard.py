"""MTARD: Multi-Teacher Adversarial Robustness Distillation (Zhao, Yu, Sun, Zhang, Wei, ECCV 2022).

RSLAD's recipe with two teachers: an adversarially trained teacher T_adv (--teacher) labels the student's
adversarial example, a naturally trained teacher T_nat (--nat-teacher) labels the clean image, and the
Adaptive Normalization Loss (ANL) moves the weight towards the teacher whose loss has fallen less.

    L_adv = k * KL(σ(T_adv(x')) ‖ σ(S(x')))        L_nat = k * KL(σ(T_nat(x)) ‖ σ(S(x)))      MTARD outer loss
    L = w_adv * L_adv + w_nat * L_nat                                                          MTARD L_total(t)
    x' = argmax_{‖x'-x‖∞ ≤ ε} CE(S(x'), y)                                                     MTARD inner
    ANL, every iteration, before the backward pass, from the detached loss values:
    r_i = (L_i / L_i(first batch))^β,  w_nat ← w_nat − r_w (w_nat − r_nat / (r_adv + r_nat)),  w_adv = 1 − w_nat
with KL = elemmean of p (log(p + 1e-5) − log q), k = 1 (10 on CIFAR-100), β = 1, r_w = 0.025 decayed
with the lr, w_adv = w_nat = 0.5 at the start.

Headline commands (ResNet-18 student; CIFAR-10: TRADES WRN-34-10 `model_cifar_wrn.pt` and MTARD's
ResNet-56 clean teacher from the MTARD README; CIFAR-100: DeepMind's WRN-70-16 and a WRN-22-6 trained here):
    python mtard.py --teacher model_cifar_wrn.pt --nat-teacher cifar10_resnnet56resnet18-CIFAR10_RSLAD0_9318.pth
    python mtard.py --dataset cifar100 --teacher cifar100_linf_wrn70-16_without.pt --nat-teacher <wrn22-6 run>/best.pt
Published, MTARD Table 2 (Clean / FGSM / PGD_SAT / PGD_TRADES / CW∞ at 8/255; W-Robust = (clean + robust)/2):
    CIFAR-10   87.36 / 61.20 / 50.73 / 53.60 / 48.57     W-Robust 74.28 / 69.05 / 70.48 / 67.97
    CIFAR-100  64.30 / 31.49 / 24.95 / 26.75 / 23.42     W-Robust 47.90 / 44.63 / 45.53 / 43.86
MTARD Table 4 (black-box, CIFAR-10, PGD-20 / CW∞ transfer / Square): 65.17 / 64.65 / 79.99.
Clean teachers, re-trained when the published file is not at hand (RSLAD's natural recipe):
    python train_teacher.py --recipe natural-rslad --arch resnet56                                    # CIFAR-10, 93.18% published
    python train_teacher.py --recipe natural-rslad --dataset cifar100 --arch dm_wrn22_6 --norm cifar10  # CIFAR-100
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset mtard
Smoke run on CPU (any checkpoints common.load_model reads as the teachers):
    python mtard.py --teacher runs/<sat-run>/best.pt --nat-teacher runs/<natural-run>/best.pt --arch cnn_small \\
        --epochs 2 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-MTARD-1  CIFAR-10 clean teacher: ResNet-56, the MTARD README's file                           --nat-teacher-arch
    D-MTARD-2  CIFAR-100 adversarial teacher: DeepMind WRN-70-16 with CIFAR-10 constants, as RSLAD  --teacher-norm cifar100
    D-MTARD-3  CIFAR-100 clean teacher: a DeepMind-flavour WRN-22-6 trained by the suite            --nat-teacher-arch
    D-MTARD-4  ANL every iteration, update-then-use, as the code                                    --anl-every epoch
    D-MTARD-5  best.pt by the monitor's robust accuracy, the value the code puts in each file name  --select wrobust
Decisions, defaults and their sources in full: docs/mtard.md. Official code: zhaoshiji123/MTARD@6480a1b (mtard/).
"""

import torch
import torch.nn.functional as F

import common

# Architectures of teacher files that do not say what they hold, per data set (docs/mtard.md §3-4).
TEACHER_ARCHS = {
    "teacher": {"cifar10": "wrn34_10", "cifar100": "dm_wrn70_16"},
    "nat_teacher": {"cifar10": "resnet56", "cifar100": "dm_wrn22_6"},  # D-MTARD-1 (ResNet-56), D-MTARD-3 (WRN-22-6)
}


def parse_args(argv=None):
    p = common.parser("mtard", "MTARD (Zhao et al., ECCV 2022): multi-teacher adversarial robustness distillation")
    g = p.add_argument_group("models")
    common.add_teacher_args(p, g, what="adversarial teacher T_adv",
                            arch_help="default: wrn34_10 on CIFAR-10 (TRADES); dm_wrn70_16 on CIFAR-100",
                            norm_help="default: the suite checkpoint's record, else none; cifar10 for the "
                                      "WRN-70-16 on CIFAR-100, D-MTARD-2")
    common.add_teacher_args(p, g, prefix="nat_teacher", what="clean teacher T_nat",
                            arch_help="default: resnet56 on CIFAR-10; dm_wrn22_6 on CIFAR-100",
                            norm_help="default: the suite checkpoint's record, else none; cifar10 for the "
                                      "WRN-22-6 on CIFAR-100")
    g.add_argument("--arch", choices=common.ARCHS, default="resnet18", help="student architecture")
    g = p.add_argument_group("loss and Adaptive Normalization Loss (MTARD L_total, w_i(t))")
    g.add_argument("--kl-scale", type=common.parse_float, default=None,
                   help="factor k on both KL terms (default: 1 on CIFAR-10, 10 on CIFAR-100, as the official scripts)")
    g.add_argument("--rw", type=common.parse_float, default=0.025,
                   help="weight learning rate (r_w in MTARD w_i(t); the code's weight_learn_rate)")
    g.add_argument("--rw-decay", choices=["lr", "none"], default="lr",
                   help="lr: r_w is multiplied by 0.1 after the same epochs as the lr (the scripts); none: constant")
    g.add_argument("--anl-beta", type=common.parse_float, default=1.0,
                   help="exponent on the relative losses (beta in MTARD r_i(t); the code's bert)")
    g.add_argument("--w-init", type=common.parse_float, default=0.5,
                   help="initial weight w_adv of the adversarial teacher; w_nat = 1 - w_adv (the code: 1/2 each)")
    g.add_argument("--anl-every", choices=["iter", "epoch"], default="iter",
                   help="iter: ANL update every iteration from the batch's losses (the code); epoch: once per epoch "
                        "from the epoch-mean losses relative to epoch 1's, used from the next epoch (D-MTARD-4)")
    g = p.add_argument_group("inner maximisation")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="PGD step size")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="eval",
                   help="student BatchNorm mode during the attack (mtard_loss.py: eval)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="normal001",
                   help="random start (mtard_loss.py: x + 0.001 N(0,I), not clamped)")
    g = p.add_argument_group("optimisation (the scripts; RSLAD §4.1)")
    g.add_argument("--epochs", type=common.positive_int, default=300, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=[215, 260, 285],
                   help="multiply lr (and r_w) by 0.1 after each of these epochs (the scripts)")
    g.add_argument("--select", choices=["robust", "wrobust"], default="robust",
                   help="best.pt by the monitor's robust accuracy, or by W-Robust = (clean + robust)/2 as B-MTARD")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd20-monitor", eval_every=20, eval_all_from=215, eval_first=True,
                        seed=0)
    rules = {"rw": ("in [0, 1]", lambda v: 0 <= v <= 1), "w_init": ("in [0, 1]", lambda v: 0 <= v <= 1),
             # a negative beta moves the weight towards the teacher whose loss fell most; (L/L0)^1000 overflows
             "anl_beta": ("in (0, 10]", lambda v: 0 < v <= 10)}
    return common.parse(p, argv, resolve=resolve_defaults, rules=rules, unused=unused_flags), p


def resolve_defaults(args):
    """Defaults that depend on the data set (docs/mtard.md §3)."""
    if args.kl_scale is None:
        args.kl_scale = 10.0 if args.dataset == "cifar100" else 1.0  # mtard_resnet18_cifar100.py: 10*torch.mean


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    if args.rw == 0:  # the ANL never moves the weights
        why = "is not read with --rw 0 (the weights stay at --w-init)"
        return {"anl_beta": why, "rw_decay": why, "anl_every": why}
    return {}


# --------------------------------------------------------------------------------------
# Inner maximisation (mtard_loss.py: mtard_inner_loss_ce)
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
    """x' maximising CE_mean(S(x'), y) on the hard labels (MTARD inner; nn.CrossEntropyLoss()).

    The student attacks in eval() mode (mtard_loss.py calls model.eval()) and is back in train() on return.
    """
    student.train(args.attack_bn == "train")
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y)
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


def anl_state(args, device):
    """ANL state, float64 on the device (the code's Python floats); saved in last.pt's `extra`."""
    w_adv = torch.tensor(args.w_init, dtype=torch.float64, device=device)
    return {"w_adv": w_adv, "w_nat": 1 - w_adv, "L_adv0": None, "L_nat0": None, "r_w": args.rw}


def anl_update(anl, kl_adv, kl_nat, args):
    """One Adaptive Normalization Loss step (MTARD w_i(t)) from detached loss values; no host sync."""
    # under torchrun the ranks' mean losses, so that every rank holds the same weights
    l_adv, l_nat = common.all_mean(kl_adv.detach().double()), common.all_mean(kl_nat.detach().double())
    if anl["L_adv0"] is None:  # the very first batch of training (the code's init_loss_*); never reset
        anl["L_adv0"], anl["L_nat0"] = l_adv, l_nat
    r_adv = (l_adv / anl["L_adv0"]) ** args.anl_beta
    r_nat = (l_nat / anl["L_nat0"]) ** args.anl_beta
    anl["w_nat"] = anl["w_nat"] - anl["r_w"] * (anl["w_nat"] - r_nat / (r_adv + r_nat))
    anl["w_adv"] = 1 - anl["w_nat"]


def loss_fn(logits_adv, logits_nat, logits_teacher, logits_nat_teacher, anl, args):
    """MTARD L_total as the official scripts compute it (update, then use); returns the loss and its logged terms."""
    # official kl_loss: p * (log(p + 1e-5) - log q), then torch.mean over B x C (elemmean), times k
    kl_adv = args.kl_scale * kl_div(F.softmax(logits_teacher, dim=1), F.log_softmax(logits_adv, dim=1),
                                    "elemmean", eps=1e-5)
    kl_nat = args.kl_scale * kl_div(F.softmax(logits_nat_teacher, dim=1), F.log_softmax(logits_nat, dim=1),
                                    "elemmean", eps=1e-5)
    if args.anl_every == "iter":  # the code: this batch's losses move the weights this batch uses
        anl_update(anl, kl_adv, kl_nat, args)
    # the code multiplies the fp32 losses by Python floats: the weights enter in the losses' dtype
    w_adv, w_nat = anl["w_adv"].to(kl_adv.dtype), anl["w_nat"].to(kl_nat.dtype)
    loss = w_adv * kl_adv + w_nat * kl_nat  # MTARD L_total(t)
    return loss, {"loss": loss, "kl_adv": kl_adv, "kl_nat": kl_nat, "w_adv": anl["w_adv"], "w_nat": anl["w_nat"]}


def train_step(student, teacher, nat_teacher, optimizer, x_nat, y, anl, args):
    """One batch as the scripts' train(): T_nat(x), the attack, then the forward passes S(x'), T_adv(x'), S(x),
    in this order, the student in train()."""
    with torch.no_grad(), common.autocast(args.amp, x_nat.device):
        # a copy, since a compiled teacher's output lives in CUDA-graph memory that the attack's calls reuse
        logits_nat_teacher = nat_teacher(x_nat).float().clone()
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
    with common.autocast(args.amp, x_nat.device):  # two separate passes, each with its own batch statistics
        logits_adv = student(x_adv).float()
        with torch.no_grad():
            logits_teacher = teacher(x_adv).float()  # T_adv on the student's x'
        logits_nat = student(x_nat).float()
    loss, terms = loss_fn(logits_adv, logits_nat, logits_teacher, logits_nat_teacher, anl, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`: the scripts multiply by 0.1 after finishing epochs 215, 260, 285."""
    return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)


def rw_at(epoch, args):
    """r_w of 1-indexed `epoch`: the scripts multiply weight_learn_rate by 0.1 next to the lr, one step at a time."""
    r_w = args.rw
    if args.rw_decay == "lr":
        for m in args.lr_milestones:
            if epoch > m:
                r_w *= 0.1
    return r_w


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-MTARD-5: best.pt by the scripts' attack_pgd at epochs 1, 20, 40, ..., 200 and every epoch from 215 (the defaults above)
MONITORS = {
    "pgd20-monitor": dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("mtard", args, args.arch)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    teacher, teacher_info = common.load_teacher(args, device, TEACHER_ARCHS["teacher"].get(args.dataset))
    nat_teacher, nat_teacher_info = common.load_teacher(args, device, TEACHER_ARCHS["nat_teacher"].get(args.dataset),
                                                        prefix="nat_teacher")
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    anl = anl_state(args, device)
    start, best = run.begin(student, optimizer, monitor=attack, extra=anl,
                            teachers={"teacher": teacher_info, "nat_teacher": nat_teacher_info})
    anl.update({k: v.to(device) for k, v in anl.items() if isinstance(v, torch.Tensor)})
    if not run.resumed:
        for prefix, model in (("teacher", teacher), ("nat_teacher", nat_teacher)):
            common.measure_teacher(run, model, test_data, attack, prefix=prefix)
            if args.dataset == "cifar100":  # docs/mtard.md §4: both normalisations of the DeepMind teachers
                common.measure_norms(run, model, test_data, prefix=prefix)

    for epoch in range(start, args.epochs + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, args)
        anl["r_w"] = rw_at(epoch, args)
        student.train()
        totals, n_seen = {}, 0
        with common.EpochTimer(device) as timer:
            for x_nat, y in run.batches(train_data, epoch):
                common.broadcast_buffers(student)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                terms = train_step(student, teacher, nat_teacher, optimizer, x_nat, y, anl, args)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v.detach() * len(y)
                n_seen += len(y)
        if args.anl_every == "epoch":  # the epoch means move the next epoch's weights (--anl-every epoch)
            anl_update(anl, totals["kl_adv"] / n_seen, totals["kl_nat"] / n_seen, args)
        metrics = run.train_metrics(epoch, totals, n_seen, optimizer, student)
        metrics["r_w"] = anl["r_w"]
        if common.is_monitor_epoch(args, epoch):
            m = common.monitor(student, test_data, attack, tf32=args.monitor_tf32)
            wrobust = (m["clean"] + m["robust"]) / 2  # MTARD W-Robust
            metrics.update(test_clean=m["clean"], test_robust=m["robust"], test_wrobust=wrobust,
                           test_classes=m["classes"], monitor_seconds=round(m["seconds"], 2))
            if args.select == "wrobust":  # B-MTARD ranks W-Robust
                if best["value"] is None or wrobust > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                    best = {"epoch": epoch, "value": wrobust, "name": "W-Robust"}
            elif best["value"] is None or m["robust"] > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                best = {"epoch": epoch, "value": m["robust"]}
        record = run.log_epoch(epoch, metrics, best, seconds=timer.seconds)
        if best["epoch"] == epoch:  # best.pt before last.pt: a failed write never leaves last.pt ahead of best.pt
            run.save_best(student, record, best)
        extra = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in anl.items()}  # the ANL state
        run.save_last(student, optimizer, record, best, extra=extra)


if __name__ == "__main__":
    main()
