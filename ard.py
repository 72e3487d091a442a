"""ARD: Adversarially Robust Distillation (Goldblum, Fowl, Feizi, Goldstein, AAAI 2020).

The student's adversarial example x' (PGD on its own cross-entropy) is pulled towards the teacher's
tempered soft label on the clean image; an optional clean cross-entropy term keeps the hard labels.

    L = α τ² KL(σ_τ(T(x)) ‖ σ_τ(S(x'))) + (1 − α) CE(S(x), y)                      ARD (restated in ARDIR §2.3, RSLAD Table 1)
    x' = argmax_{‖x'-x‖∞ ≤ ε} CE(S(x'), y)                                          ARD main.py AttackPGD

Headline command (CIFAR-10, MobileNetV2 student, TRADES WRN-34-10 teacher `model_cifar_wrn.pt`):
    python ard.py --teacher model_cifar_wrn.pt
Published re-runs of the official code with this teacher (Clean / FGSM / PGD_SAT / PGD_TRADES / CW∞ / AA at 8/255):
    RSLAD Table 3, MobileNetV2, best: 83.20 / 58.06 / 50.86 / 52.87 / 50.39 / 48.34
    RSLAD Table 3, ResNet-18 (--arch resnet18), best: 83.93 / 59.31 / 52.05 / 54.20 / 51.22 / 49.19
    CIFAR-100 (--dataset cifar100 --teacher cifar100_linf_wrn70-16_without.pt), MobileNetV2 best: 59.83 / ... / 25.53
    (RSLAD ranks "best" by PGD_TRADES: add --monitor pgd20-monitor to select the same way.)
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset ard
Smoke run on CPU:
    python ard.py --teacher runs/<teacher-run>/best.pt --arch cnn_small --epochs 2 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-ARD-1  CIFAR-100 teacher: DeepMind WRN-70-16 with CIFAR-10 constants, as RSLAD re-ran ARD   --teacher-norm cifar100
    D-ARD-2  student MobileNetV2, the official default                                           --arch resnet18
    D-ARD-3  best.pt by the code's per-epoch PGD-10 (the code ranks nothing)                     --monitor pgd20-monitor
    D-ARD-4  CE term on the clean x, as the code (ARDIR Eq. 5 writes x')                          --ce-input adv
    D-ARD-5  RSLAD's ARD-300 schedule                                                            --lr-milestones 215 260 285
    code vs paper: adjust_learning_rate decays once (0.1 -> 0.01 after epoch 100), not twice     --lr-schedule paper
Decisions, defaults and their sources in full: docs/ard.md. Official code: goldblum/AdversariallyRobustDistillation@779ade3.
"""

import torch
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = common.parser("ard", "ARD (Goldblum et al., AAAI 2020): adversarially robust distillation")
    g = p.add_argument_group("models")
    common.add_teacher_args(p, g, arch_help="default: wrn34_10; dm_wrn70_16 on CIFAR-100",
                            norm_help="default: the suite checkpoint's record, else none; cifar10 for the "
                                      "WRN-70-16 on CIFAR-100, D-ARD-1")
    g.add_argument("--arch", choices=common.ARCHS, default="mobilenet_v2",
                   help="student architecture (official default MobileNetV2, D-ARD-2; resnet18 for RSLAD/MTARD rows)")
    g = p.add_argument_group("loss")
    g.add_argument("--alpha", type=common.parse_float, default=1.0,
                   help="weight of the distillation term; 1 - alpha weighs the clean CE (alpha in ARD)")
    g.add_argument("--temp", type=common.parse_float, default=30.0, help="distillation temperature (tau in ARD)")
    g.add_argument("--kl-reduction", choices=["elemmean", "batchmean", "sum"], default="elemmean",
                   help="KL reduction (official nn.KLDivLoss() = mean over batch and classes = elemmean)")
    g.add_argument("--ce-input", choices=["clean", "adv"], default="clean",
                   help="input of the CE term: clean x (official code, RSLAD Table 1) or x' (ARDIR Eq. 5; "
                        "reuses S(x') and drops the clean pass) (D-ARD-4)")
    g = p.add_argument_group("inner maximisation (ARD main.py config)")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="PGD step size")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="train",
                   help="student BatchNorm mode during the attack (official: train, every attack pass updates BN)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="uniform",
                   help="random start (official: x + U(-eps, eps), not clamped)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="training batch size (default: 128; 256 on CIFAR-100 as main.py)")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay")
    g.add_argument("--lr-schedule", choices=["code", "paper"], default="code",
                   help="code: one decay after epoch 100 (adjust_learning_rate bug); paper: decays after 100 and 150")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=None,
                   help="replace the schedule: lr x0.1 after each listed epoch, e.g. 215 260 285 for ARD-300 (D-ARD-5)")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd10-ard", eval_every=1, seed=0, test_batch_size=100)
    return common.parse(p, argv, resolve=resolve_defaults, rules={"alpha": ("in [0, 1]", lambda v: 0 <= v <= 1)},
                        unused=unused_flags), p


def resolve_defaults(args):
    """Defaults that depend on the data set (docs/ard.md §3)."""
    if args.batch_size is None:
        args.batch_size = 256 if args.dataset == "cifar100" else 128  # main.py builds a 256 loader for CIFAR-100


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    if args.lr_milestones is not None:
        return {"lr_schedule": "is replaced by --lr-milestones"}
    return {}


# --------------------------------------------------------------------------------------
# Inner maximisation (main.py: AttackPGD)
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
    """x' maximising CE_sum(S(x'), y) (F.cross_entropy(size_average=False)); the teacher plays no part.

    The official attack runs with the student in train() mode, so each of its forwards updates the
    BatchNorm running statistics; the student is in train() on return.
    """
    student.train(args.attack_bn == "train")
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y, reduction="sum")
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


def loss_fn(logits_adv, logits_nat, logits_teacher, y, args):
    """ARD's loss as main.py computes it; returns the loss and its logged terms."""
    tau = args.temp
    kl = kl_div(F.softmax(logits_teacher / tau, dim=1), F.log_softmax(logits_adv / tau, dim=1), args.kl_reduction)
    kl = kl * common.global_sum_factor(args.kl_reduction)  # --kl-reduction sum under torchrun
    ce = F.cross_entropy(logits_nat, y)
    loss = args.alpha * tau * tau * kl + (1 - args.alpha) * ce  # weight 0 by default, but S(x) still ran
    return loss, {"loss": loss, "kl": kl, "ce": ce}


def train_step(student, teacher, optimizer, x_nat, y, args):
    """One batch as main.py train(): the attack, then the forward passes S(x'), T(x), S(x), in this order."""
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
    with common.autocast(args.amp, x_nat.device):
        logits_adv = student(x_adv).float()  # the logits AttackPGD returns: one more train-mode pass on x'
        with torch.no_grad():
            logits_teacher = teacher(x_nat).float()  # T on the clean x
        logits_nat = student(x_nat).float() if args.ce_input == "clean" else logits_adv
    loss, terms = loss_fn(logits_adv, logits_nat, logits_teacher, y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`."""
    if args.lr_milestones is not None:
        return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)
    if args.lr_schedule == "paper":  # decays at 100 and 150 (IAD paper §5.1, describing the setup it copies from ARD)
        return args.lr * 0.1 ** ((epoch > 100) + (epoch > 150))
    # code: main.py@779ade3 adjust_learning_rate multiplies the *initial* lr by 0.1 when the 0-indexed
    # epoch is 100 or 150, so it sets 0.01 twice and never reaches 0.001; --lr-schedule paper
    return args.lr * (0.1 if epoch > 100 else 1.0)


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-ARD-3: main.py test()'s PGD-10 after every epoch (the code ranks nothing); RSLAD ranked its ARD re-runs by PGD-20
MONITORS = {
    "pgd10-ard": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_sum", bn="eval"),
    "pgd20-monitor": dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("ard", args, args.arch)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    default_teacher = "dm_wrn70_16" if args.dataset == "cifar100" else "wrn34_10"
    teacher, teacher_info = common.load_teacher(args, device, default_teacher)
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    start, best = run.begin(student, optimizer, monitor=attack, teachers={"teacher": teacher_info})
    if not run.resumed:
        common.measure_teacher(run, teacher, test_data, attack)

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
