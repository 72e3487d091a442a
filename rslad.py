"""RSLAD: Robust Soft Label Adversarial Distillation (Zi, Zhao, Ma, Jiang, ICCV 2021).

The student learns only from the teacher's soft labels on clean images, T(x): they are the target
of both distillation terms and of the inner maximisation. No hard label is used anywhere.

    L = k * [ a * KL(σ(T(x)) ‖ σ(S(x'))) + (1 - a) * KL(σ(T(x)) ‖ σ(S(x))) ]        RSLAD Eq. 3, a = 5/6
    x' = argmax_{‖x'-x‖∞ ≤ ε} KL(σ(T(x)) ‖ σ(S(x')))                               RSLAD Eq. 3, inner

Headline command (CIFAR-10, ResNet-18 student, TRADES WRN-34-10 teacher `model_cifar_wrn.pt`):
    python rslad.py --teacher model_cifar_wrn.pt
Published, RSLAD Table 3, best checkpoint (Clean / FGSM / PGD_SAT / PGD_TRADES / CW∞ / AA at 8/255):
    83.38 / 60.01 / 54.24 / 55.94 / 53.30 / 51.49      (last: 83.33 / 59.90 / 54.14 / 55.61 / 53.22 / 51.32)
Other rows:
    python rslad.py --teacher model_cifar_wrn.pt --arch mobilenet_v2                        83.40 / ... / 50.17 AA
    python rslad.py --dataset cifar100 --teacher cifar100_linf_wrn70-16_without.pt         57.74 / ... / 26.70 AA
    python rslad.py --dataset cifar100 --teacher cifar100_linf_wrn70-16_without.pt --arch mobilenet_v2   26.12 AA
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset rslad
Smoke run on CPU:
    python rslad.py --teacher runs/<teacher-run>/best.pt --arch cnn_small --epochs 2 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-RSLAD-1  teacher in fp32; RSLAD's CIFAR-100 script at HEAD crashes on a half teacher          --teacher-dtype fp16
    D-RSLAD-2  log_softmax; the CIFAR-100 scripts take torch.log(softmax), -inf on underflow       --log-of-softmax
    D-RSLAD-3  WRN-70-16 teacher with CIFAR-10 constants, as RSLAD's code builds it                --teacher-norm cifar100
    D-RSLAD-4  best.pt by PGD-20 (step 0.003) at epochs 20, 40, ..., 200 and every epoch from 215  --eval-every 1
    D-RSLAD-5  Table 6 ablation halves taken verbatim from ARD                                     --inner ard, --outer ard
    code vs paper: the KL is averaged over batch and classes (elemmean), x10 on CIFAR-100          --kl-reduction, --kl-scale
Decisions, defaults and their sources in full: docs/rslad.md. Official code: zibojia/RSLAD@c40e04f.
"""

import torch
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = common.parser("rslad", "RSLAD (Zi et al., ICCV 2021): robust soft label adversarial distillation")
    g = p.add_argument_group("models")
    common.add_teacher_args(p, g, arch_help="default: wrn34_10; dm_wrn70_16 on CIFAR-100",
                            norm_help="default: the suite checkpoint's record, else none; cifar10 for the "
                                      "WRN-70-16 on CIFAR-100, D-RSLAD-3")
    g.add_argument("--teacher-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 runs the teacher in half precision as RSLAD's CIFAR-100 script intended (D-RSLAD-1)")
    g.add_argument("--arch", choices=common.ARCHS, default="resnet18", help="student architecture (mobilenet_v2 for the MN-V2 rows)")
    g = p.add_argument_group("loss (RSLAD Eq. 3)")
    g.add_argument("--alpha", type=common.parse_float, default="5/6",
                   help="weight of the adversarial KL term (alpha in RSLAD Eq. 3; the code fixes 5/6)")
    g.add_argument("--kl-scale", type=common.parse_float, default=None,
                   help="factor k on both KL terms (default: 1 on CIFAR-10, 10 on CIFAR-100, as the official scripts)")
    g.add_argument("--kl-reduction", choices=["elemmean", "batchmean", "sum"], default="elemmean",
                   help="KL reduction (official: torch.mean over batch and classes = elemmean)")
    g.add_argument("--log-of-softmax", action="store_true",
                   help="compute log q as torch.log(softmax(.)) like the CIFAR-100 scripts (D-RSLAD-2)")
    g.add_argument("--outer", choices=["rslad", "ard"], default="rslad",
                   help="ard: replace the loss by ARD's (alpha 1, tau 30, elemmean) for RSLAD Table 6 (D-RSLAD-5; "
                        "with --inner ard, the other half)")
    g = p.add_argument_group("inner maximisation")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="PGD step size")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps")
    g.add_argument("--attack-bn", choices=["train", "eval"], default=None,
                   help="student BatchNorm mode during the attack (default: eval, rslad_loss.py; train with --inner ard)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default=None,
                   help="random start (default: normal001 = x + 0.001 N(0,I); uniform with --inner ard)")
    g.add_argument("--inner", choices=["rslad", "ard"], default="rslad",
                   help="ard: ARD's attack (CE on labels, train-mode BN, uniform start) for RSLAD Table 6")
    g = p.add_argument_group("optimisation (RSLAD §4.1)")
    g.add_argument("--epochs", type=common.positive_int, default=300, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=[215, 260, 285],
                   help="multiply lr by 0.1 after each of these epochs (the code's reading of 'at the 215th, ...')")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd20-monitor", eval_every=20, eval_all_from=215, seed=0)
    return common.parse(p, argv, resolve=resolve_defaults, rules={"alpha": ("in [0, 1]", lambda v: 0 <= v <= 1)},
                        unused=unused_flags), p


def resolve_defaults(args):
    """Defaults that depend on the data set or the Table 6 switches (docs/rslad.md §3)."""
    if args.kl_scale is None:
        args.kl_scale = 10.0 if args.dataset == "cifar100" else 1.0  # RSLAD README: "keep consistent with CIFAR-10"
    if args.attack_bn is None:
        args.attack_bn = "train" if args.inner == "ard" else "eval"
    if args.rand_start is None:
        args.rand_start = "uniform" if args.inner == "ard" else "normal001"


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    if args.outer == "ard":  # loss_fn_ard: ARD's loss with its own constants
        why = "is not read by --outer ard (ARD's loss: alpha 1, tau 30, elemmean)"
        return {"alpha": why, "kl_scale": why, "kl_reduction": why, "log_of_softmax": why}
    return {}


# --------------------------------------------------------------------------------------
# Inner maximisation (rslad_loss.py: rslad_inner_loss)
# --------------------------------------------------------------------------------------

def random_start(x_nat, eps, start):
    """The named starts of docs/conventions.md; none of them is clamped unless its name says so."""
    if start == "normal001":
        return x_nat + 0.001 * torch.randn_like(x_nat)
    if start == "none":
        return x_nat.clone()
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-eps, eps)
    return x_adv.clamp(0, 1) if start == "uniform-clamp" else x_adv


def inner_max(student, x_nat, y, logits_teacher, args):
    """x' maximising KL_sum(σ(T(x)) ‖ σ(S(x'))) (RSLAD Eq. 3 inner; KLDivLoss(reduce=False) then torch.sum).

    The student attacks in eval() mode (rslad_loss.py calls model.eval()) and is back in train() on return.
    With --inner ard the objective is ARD's CE_sum on the labels instead (RSLAD Table 6).
    """
    student.train(args.attack_bn == "train")
    p_teacher = F.softmax(logits_teacher, dim=1)
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            if args.inner == "rslad":
                loss = kl_div(p_teacher, F.log_softmax(logits_adv.float(), dim=1), "sum")
            else:
                loss = F.cross_entropy(logits_adv.float(), y, reduction="sum")  # ARD main.py AttackPGD
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


def log_probs(logits, args):
    """The student's log q: F.log_softmax, or torch.log(F.softmax(.)) as the CIFAR-100 scripts with --log-of-softmax."""
    return torch.log(F.softmax(logits, dim=1)) if args.log_of_softmax else F.log_softmax(logits, dim=1)


def loss_fn(logits_adv, logits_nat, logits_teacher, args):
    """RSLAD Eq. 3 as the official scripts compute it; returns the loss and its logged terms."""
    p_teacher = F.softmax(logits_teacher, dim=1)
    k = args.kl_scale * common.global_sum_factor(args.kl_reduction)  # --kl-reduction sum under torchrun
    # official kl_loss: p * (log(p + 1e-5) - log q), then torch.mean over B x C (elemmean), times k
    kl_adv = k * kl_div(p_teacher, log_probs(logits_adv, args), args.kl_reduction, eps=1e-5)
    kl_nat = k * kl_div(p_teacher, log_probs(logits_nat, args), args.kl_reduction, eps=1e-5)
    loss = args.alpha * kl_adv + (1 - args.alpha) * kl_nat  # RSLAD Eq. 3 outer, alpha = 5/6
    return loss, {"loss": loss, "kl_adv": kl_adv, "kl_nat": kl_nat}


def loss_fn_ard(logits_adv, logits_nat, logits_teacher, args):
    """--outer ard (RSLAD Table 6): ARD's loss, α = 1, τ = 30, elemmean; S(x) ran and weighs 0."""
    tau = 30.0
    kl = tau * tau * kl_div(F.softmax(logits_teacher / tau, dim=1), F.log_softmax(logits_adv / tau, dim=1), "elemmean")
    return kl, {"loss": kl, "kl_adv": kl}


def train_step(student, teacher, optimizer, x_nat, y, args):
    """One batch as the scripts' train(): T(x) once, the attack, then the forward passes S(x'), S(x), in this order."""
    # --teacher-dtype fp16: the half teacher runs outside bf16 autocast (its BatchNorm would get bf16 inputs)
    with torch.no_grad(), common.autocast(args.amp if args.teacher_dtype == "fp32" else "off", x_nat.device):
        x_t = x_nat.half() if args.teacher_dtype == "fp16" else x_nat
        # serves the attack and both loss terms; a copy, since a compiled teacher's output lives in CUDA-graph
        # memory that the attack's calls reuse (--compile-mode reduce-overhead)
        logits_teacher = teacher(x_t).float().clone()
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, logits_teacher, args)
    with common.autocast(args.amp, x_nat.device):  # two separate passes, each with its own batch statistics
        logits_adv = student(x_adv).float()
        logits_nat = student(x_nat).float()
    loss, terms = (loss_fn_ard if args.outer == "ard" else loss_fn)(logits_adv, logits_nat, logits_teacher, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`: the scripts multiply by 0.1 after finishing epochs 215, 260, 285."""
    return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-RSLAD-4: the scripts' attack_pgd at epochs 20, 40, ..., 200 and every epoch from 215 (the defaults above)
MONITORS = {
    "pgd20-monitor": dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("rslad", args, args.arch)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    default_teacher = "dm_wrn70_16" if args.dataset == "cifar100" else "wrn34_10"
    teacher, teacher_info = common.load_teacher(args, device, default_teacher)
    if args.teacher_dtype == "fp16":
        teacher = teacher.half()  # RSLAD's CIFAR-100 script before 9e7a108
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    start, best = run.begin(student, optimizer, monitor=attack, teachers={"teacher": teacher_info})
    if not run.resumed and args.teacher_dtype == "fp32":  # a half teacher is not measured
        common.measure_teacher(run, teacher, test_data, attack)
        if args.dataset == "cifar100":  # docs/rslad.md §4: both normalisations of WRN-70-16
            common.measure_norms(run, teacher, test_data)

    for epoch in range(start, args.epochs + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, args)
        student.train()
        totals, n_seen = {}, 0
        with common.EpochTimer(device) as timer:
            for x_nat, y in run.batches(train_data, epoch):
                common.broadcast_buffers(student)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                terms = train_step(student, teacher, optimizer, x_nat, y, args)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v.detach() * len(y)
                n_seen += len(y)
        metrics = run.train_metrics(epoch, totals, n_seen, optimizer, student)
        if common.is_monitor_epoch(args, epoch):
            m = common.monitor(student, test_data, attack, tf32=args.monitor_tf32)
            metrics.update(test_clean=m["clean"], test_robust=m["robust"], test_classes=m["classes"],
                           monitor_seconds=round(m["seconds"], 2))
            if best["value"] is None or m["robust"] > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                best = {"epoch": epoch, "value": m["robust"]}
        record = run.log_epoch(epoch, metrics, best, seconds=timer.seconds)
        if best["epoch"] == epoch:  # best.pt before last.pt: a failed write never leaves last.pt ahead of best.pt
            run.save_best(student, record, best)
        run.save_last(student, optimizer, record, best)


if __name__ == "__main__":
    main()
