"""IAD: Introspective Adversarial Distillation (Zhu, Yao, Han, Zhang, Liu, Niu, Zhou, Xu, Yang, ICLR 2022).

The student partially trusts its teacher: each sample's teacher guidance is weighted by how much the
adversarial teacher believes the true class on the student's adversarial example, a_i = P_T(x'_i|y_i)^β
(a constant), and the rest of the weight, 1 − a_i, goes to the student's own clean output
("introspection"), switched on after a warm-up. --variant picks one of IAD's four training scripts:

  iad1  L = α τ² KL(σ_τ(T(x)) ‖ σ_τ(S(x'))) + α (1/B) Σ_i (1 − a_i) KL(σ(S(x_i)) ‖ σ(S(x'_i))) + (1 − α) CE(S(x), y)
  iad2  L = λ_1 CE(S(x'), y) + λ_3 τ² KL(σ_τ(T_st(x')) ‖ σ_τ(S(x')))                      λ_1 = 1 − λ_2 − λ_3
          + λ_2 τ² [ (1/B) Σ_i a_i KL(σ_τ(T_at(x'_i)) ‖ σ_τ(S(x'_i))) + (1/B) Σ_i (1 − a_i) KL(σ(S(x_i)) ‖ σ(S(x'_i))) ]
  ard   iad1 without the introspection term (IAD's ARD.py: τ = 1, batchmean, the "ARD" rows of IAD's tables)
  akd2  iad2 with a_i = 1 and no introspection (IAD's AKD2.py: the "AKD²" rows)
  a_i = σ(T_at(x'_i))_{y_i}^β, detached                                       IAD Eq. 4; IAD-I.py, IAD-II.py
  x' = argmax_{‖x'-x‖∞ ≤ ε} CE(S(x'), y)                                        AttackPGD (as ARD's)
T = T_at is the adversarially trained teacher (--teacher), T_st the naturally trained one (--nat-teacher);
λ_1, λ_2, λ_3 are IAD Algorithm 1's weights of IAD-II (--lambda2, --lambda3), α is ARD's (1 − λ of IAD-I).

Before the warm-up ends (0-indexed epoch < --begin) iad1 and iad2 train with their base loss (a_i = 1
for iad2). KL is batchmean; the introspection target σ(S(x)) is not detached, untempered and, in iad1,
without τ². Defaults: τ = 1, α = 1, λ_2 = 0.5, λ_3 = 0.25, β = 0.1.

Teachers (ResNet-18, trained by the suite; IAD publishes none):
    python train_teacher.py --recipe sat-iad                       # AT teacher T / T_at: IAD Table 2 "AT" 83.06 / 46.70 AA
    python train_teacher.py --recipe natural-iad                   # natural teacher T_st (iad2, akd2)
    python train_teacher.py --recipe trades-iad                    # TRADES teacher for the "TRADES" rows
    (add --dataset cifar100 for CIFAR-100)
Headline commands, ResNet-18 student, AT teacher, IAD Table 2 (Natural / FGSM / PGD-20 / CW∞ / AA):
    python iad.py --teacher AT.pt                                          C-10 IAD-I   82.09 / 63.20 / 52.14 / 50.74 / 48.66
    python iad.py --variant iad2 --teacher AT.pt --nat-teacher ST.pt       C-10 IAD-II  83.21 / 63.54 / 51.85 / 50.67 / 48.58
    python iad.py --variant ard --teacher AT.pt                            C-10 ARD     83.13 / 64.11 / 51.36 / 50.37 / 48.05
    python iad.py --variant akd2 --teacher AT.pt --nat-teacher ST.pt       C-10 AKD²    83.52 / 63.91 / 51.36 / 50.36 / 48.08
    python iad.py --dataset cifar100 --teacher AT100.pt                    C-100 IAD-I  55.53 / 35.69 / 27.40 / 25.80 / 23.66
    python iad.py --dataset cifar100 --variant iad2 --teacher AT100.pt --nat-teacher ST100.pt
                                                                           C-100 IAD-II 57.26 / 35.94 / 27.50 / 25.68 / 24.06
    (TRADES teacher, C-10: IAD-I 80.63 / ... / 50.17 AA, IAD-II 83.76 / ... / 48.91 AA; docs/iad.md §5)
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset iad
Smoke run on CPU:
    python iad.py --teacher runs/<teacher-run>/best.pt --arch cnn_small --epochs 2 --begin 1 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-IAD-1  one lr decay, as the scripts' adjust_learning_rate (IAD §5.1: two)                       --lr-schedule paper
    D-IAD-2  introspection KL untempered (iad1: outside τ²) as the scripts; Algorithm 1 tempers it    --introspection-temp paper
    D-IAD-3  warm-up 80 for both variants on CIFAR-100 (IAD §5.1; the scripts have 60 / 40 only)      --begin
    D-IAD-4  AKD² as IAD's AKD2.py runs it (0.25 / 0.5 / 0.25, τ 1, batchmean), not Chen et al.'s     (no flag)
    D-IAD-5  TRADES rows' teacher: train_teacher.py --recipe trades-iad (IAD ships no TRADES script)  --teacher
Decisions, defaults and their sources in full: docs/iad.md. Official code: ZFancy/IAD@a8091a8 (IAD-I.py, IAD-II.py,
ARD.py, AKD2.py).
"""

import torch
import torch.nn.functional as F

import common

VARIANTS = ("iad1", "iad2", "ard", "akd2")
TWO_TEACHERS = ("iad2", "akd2")  # they add the naturally trained teacher T_st
INTROSPECTIVE = ("iad1", "iad2")  # they add the introspection term after the warm-up


def parse_args(argv=None):
    p = common.parser("iad", "IAD (Zhu et al., ICLR 2022): introspective adversarial distillation, with IAD's ARD and AKD2")
    g = p.add_argument_group("models")
    g.add_argument("--variant", choices=VARIANTS, default="iad1",
                   help="iad1: IAD-I.py; iad2: IAD-II.py; ard: IAD's ARD.py; akd2: IAD's AKD2.py")
    common.add_teacher_args(p, g, what="adversarial teacher", arch_help="default: resnet18",
                            norm_help="default: the suite checkpoint's record, else none",
                            help="adversarially trained teacher T (T_at in IAD-II): train_teacher.py --recipe sat-iad, "
                                 "or trades-iad for the TRADES rows (D-IAD-5)")
    common.add_teacher_args(p, g, prefix="nat_teacher", what="natural teacher", required=False,
                            help="naturally trained teacher T_st, required by iad2 and akd2 (train_teacher.py "
                                 "--recipe natural-iad)",
                            arch_help="default: resnet18", norm_help="default: the suite checkpoint's record, else none")
    g.add_argument("--arch", choices=common.ARCHS, default="resnet18", help="student architecture (IAD Table 2: ResNet-18)")
    g = p.add_argument_group("loss (IAD Eq. 3-4, IAD-I.py, IAD-II.py)")
    g.add_argument("--temp", type=common.parse_float, default=1.0, help="distillation temperature (tau in IAD §5.1)")
    g.add_argument("--alpha", type=common.parse_float, default=1.0,
                   help="iad1, ard: weight of the distillation terms; 1 - alpha weighs CE(S(x), y) (1 - lambda in IAD Algorithm 1)")
    g.add_argument("--lambda2", type=common.parse_float, default=0.5,
                   help="iad2, akd2: weight of the adversarial-teacher bracket (lambda_2 in IAD Algorithm 1 and §5.1)")
    g.add_argument("--lambda3", type=common.parse_float, default=0.25,
                   help="iad2, akd2: weight of the natural-teacher term (lambda_3); CE(S(x'), y) gets "
                        "lambda_1 = 1 - lambda2 - lambda3")
    g.add_argument("--beta", type=common.parse_float, default=0.1,
                   help="iad1, iad2: sharpening exponent of a_i = P_T(x'|y)^beta (beta in IAD Eq. 4)")
    g.add_argument("--begin", type=int, default=None,
                   help="iad1, iad2: 0-indexed first epoch with introspection, i.e. the warm-up length (default: "
                        "60 for iad1 and 40 for iad2 on CIFAR-10 and SVHN, 80 for both on CIFAR-100, D-IAD-3)")
    g.add_argument("--introspection-temp", choices=["code", "paper"], default="code",
                   help="iad1, iad2: code: introspection KL untempered (iad1: also without tau^2); paper: Algorithm 1, "
                        "sigma_tau on both sides and inside the tau^2 bracket (D-IAD-2)")
    g = p.add_argument_group("inner maximisation (AttackPGD in IAD's scripts)")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="PGD step size")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="train",
                   help="student BatchNorm mode during the attack (official: train, every attack pass updates BN)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="uniform",
                   help="random start (official: x + U(-eps, eps), not clamped)")
    g = p.add_argument_group("optimisation (IAD §5.1, the scripts' defaults)")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay")
    g.add_argument("--lr-schedule", choices=["code", "paper"], default="code",
                   help="code: one decay after epoch 100 (adjust_learning_rate bug); paper: decays after 100 and 150 (D-IAD-1)")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=None,
                   help="replace the schedule: lr x0.1 after each listed epoch (shortened runs)")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd10-ard", eval_every=1, seed=1, test_batch_size=128)
    unit = ("in [0, 1]", lambda v: 0 <= v <= 1)
    rules = {"alpha": unit, "lambda2": unit, "lambda3": unit, "beta": ("a number >= 0", lambda v: v >= 0),
             "begin": ("an integer >= 0", lambda v: v >= 0)}
    return common.parse(p, argv, resolve=resolve_defaults, rules=rules, unused=unused_flags), p


def resolve_defaults(args):
    """The warm-up length by variant and data set, and the natural teacher of iad2 and akd2 (docs/iad.md §3)."""
    if args.variant in TWO_TEACHERS and args.nat_teacher is None:
        common.fail(f"--variant {args.variant} needs the natural teacher: --nat-teacher CKPT "
                    "(python train_teacher.py --recipe natural-iad)")
    if args.variant in INTROSPECTIVE and args.begin is None:
        # IAD §5.1 "60/80 and 40/80 epochs" (CIFAR-10/CIFAR-100); the scripts only have 60 / 40
        args.begin = 80 if args.dataset == "cifar100" else (60 if args.variant == "iad1" else 40)
    if args.variant in TWO_TEACHERS and args.lambda2 + args.lambda3 > 1:
        common.fail(f"--lambda2 + --lambda3 must be at most 1 (CE weight lambda_1 = 1 - lambda2 - lambda3), "
                    f"got {args.lambda2 + args.lambda3:g}")


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    readers = {"alpha": ("iad1", "ard"), "lambda2": TWO_TEACHERS, "lambda3": TWO_TEACHERS,
               "beta": INTROSPECTIVE, "begin": INTROSPECTIVE, "introspection_temp": INTROSPECTIVE,
               **{f"nat_teacher{s}": TWO_TEACHERS for s in ("", "_arch", "_norm", "_shortcut_from")}}
    unused = {dest: f"is read by --variant {' and '.join(variants)} only, not by {args.variant}"
              for dest, variants in readers.items() if args.variant not in variants}
    if args.lr_milestones is not None:
        unused["lr_schedule"] = "is not read when --lr-milestones replaces the schedule"
    return unused


def introspection_on(epoch, args):
    """IAD-I.py / IAD-II.py `if epoch >= args.begin` with 0-indexed epochs; `epoch` here is 1-indexed."""
    return args.begin is not None and epoch - 1 >= args.begin


# --------------------------------------------------------------------------------------
# Inner maximisation (IAD-I.py, IAD-II.py, ARD.py, AKD2.py: AttackPGD, the same in all four)
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


def kl_rows(p, log_q):
    """Per-sample KL(p_i ‖ q_i): KLDivLoss(reduce=False)(log_q, p).sum(dim=1)."""
    return (torch.xlogy(p, p) - p * log_q).sum(1)


def trust(logits_guide, y, beta):
    """a_i = σ(T(x'_i))_{y_i}^β (IAD Eq. 4), a constant: the scripts turn each into a Python float."""
    with torch.no_grad():
        return F.softmax(logits_guide, dim=1).gather(1, y[:, None]).squeeze(1).pow(beta)


def introspection(logits_adv, logits_self, a, tau):
    """(1/B) Σ_i (1 − a_i) KL(σ_τ(S(x_i)) ‖ σ_τ(S(x'_i))); the target S(x) is not detached (IAD Eq. 3)."""
    rows = kl_rows(F.softmax(logits_self / tau, dim=1), F.log_softmax(logits_adv / tau, dim=1))
    return (rows * (1 - a)).sum() / len(rows)


def loss_fn(logits_adv, logits_nat, logits_teacher, y, args, logits_self=None, logits_guide=None):
    """iad1 (IAD-I.py) and, with logits_self None, ard (ARD.py; IAD-I.py before the warm-up ends).
    logits_teacher is T(x) on the clean x and is not weighted by a_i (IAD footnote 1); a_i comes from
    logits_guide = T(x')."""
    tau = args.temp
    kl = kl_div(F.softmax(logits_teacher / tau, dim=1), F.log_softmax(logits_adv / tau, dim=1), "batchmean")
    ce = F.cross_entropy(logits_nat, y)
    loss = args.alpha * tau * tau * kl + (1 - args.alpha) * ce  # CE weight 0 by default, but S(x) still ran
    terms = {"kl": kl, "ce": ce}
    if logits_self is not None:
        a = trust(logits_guide, y, args.beta)
        paper = args.introspection_temp == "paper"  # the code: untempered and outside tau^2
        intro = introspection(logits_adv, logits_self, a, tau if paper else 1.0)
        loss = loss + args.alpha * (tau * tau if paper else 1.0) * intro
        terms.update(intro=intro, trust=a.mean())
    return loss, {"loss": loss, **terms}


# D-IAD-4: AKD² as IAD's AKD2.py runs it (0.25 / 0.5 / 0.25, tau 1, batchmean), not the original recipe
def loss_fn_akd2(logits_adv, logits_teacher, logits_st, y, args, logits_self=None):
    """iad2 (IAD-II.py) and, with logits_self None, akd2 (AKD2.py; IAD-II.py before the warm-up ends).
    Both teachers saw x'; after the warm-up the adversarial-teacher term is weighted by a_i (from the
    same T_at(x')) and the introspection term joins it inside the lambda_2 tau^2 bracket."""
    tau = args.temp
    log_q = F.log_softmax(logits_adv / tau, dim=1)
    ce = F.cross_entropy(logits_adv, y)
    kl_st = kl_div(F.softmax(logits_st / tau, dim=1), log_q, "batchmean")
    terms = {"ce": ce, "kl_st": kl_st}
    if logits_self is None:
        kl_at = kl_div(F.softmax(logits_teacher / tau, dim=1), log_q, "batchmean")
        bracket = kl_at
    else:
        a = trust(logits_teacher, y, args.beta)
        kl_at = (kl_rows(F.softmax(logits_teacher / tau, dim=1), log_q) * a).sum() / len(a)
        # the code: untempered (inside the lambda_2 tau^2 bracket); --introspection-temp paper tempers it
        intro = introspection(logits_adv, logits_self, a, tau if args.introspection_temp == "paper" else 1.0)
        bracket = kl_at + intro
        terms.update(intro=intro, trust=a.mean())
    loss = (1 - args.lambda2 - args.lambda3) * ce + args.lambda2 * tau * tau * bracket + args.lambda3 * tau * tau * kl_st
    return loss, {"loss": loss, "kl_at": kl_at, **terms}


def train_step(student, teacher, nat_teacher, optimizer, x_nat, y, epoch, args):
    """One batch as the variant's official train(): the attack, then the forward passes, in this order

    iad1: S(x'), T(x), S(x') unused, [T(x'), S(x) introspection target,] S(x) CE     ard:  S(x'), T(x), S(x) CE
    iad2: S(x'), T_at(x'), T_st(x'), [S(x) introspection target]                     akd2: S(x'), T_at(x'), T_st(x')
    ([...]: from the warm-up on; the student in train(), the teachers in eval()).
    """
    intro = introspection_on(epoch, args)
    logits_self = logits_guide = None
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
    with common.autocast(args.amp, x_nat.device):
        logits_adv = student(x_adv).float()  # the logits AttackPGD returns: one more train-mode pass on x'
        if args.variant in ("iad1", "ard"):
            with torch.no_grad():
                logits_teacher = teacher(x_nat).float()  # T on the clean x
                if args.variant == "iad1":
                    student(x_adv)  # IAD-I.py `basicop`: unused, but this train-mode pass moves the BN statistics
                    if intro:
                        logits_guide = teacher(x_adv).float()  # `guide` = T(x'), only for a_i
            if intro:
                logits_self = student(x_nat).float()  # introspection target, not detached
            logits_nat = student(x_nat).float()  # a separate CE pass, weight 0 by default
        else:
            with torch.no_grad():
                logits_teacher = teacher(x_adv).float()  # T_at on x'; also IAD-II.py's `guide`
                logits_st = nat_teacher(x_adv).float()  # T_st on x'
            if intro:
                logits_self = student(x_nat).float()  # introspection target, not detached
    if args.variant in ("iad1", "ard"):
        loss, terms = loss_fn(logits_adv, logits_nat, logits_teacher, y, args, logits_self, logits_guide)
    else:
        loss, terms = loss_fn_akd2(logits_adv, logits_teacher, logits_st, y, args, logits_self)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`."""
    if args.lr_milestones is not None:
        return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)
    if args.lr_schedule == "paper":  # decays at 100 and 150 (IAD §5.1 "divided by 10 at Epoch 100 and Epoch 150")
        return args.lr * 0.1 ** ((epoch > 100) + (epoch > 150))
    # code: IAD-I.py@a8091a8 adjust_learning_rate multiplies the *initial* lr by 0.1 when the 0-indexed
    # epoch is 100 or 150, so it sets 0.01 twice and never reaches 0.001; --lr-schedule paper
    return args.lr * (0.1 if epoch > 100 else 1.0)


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# the scripts' test(): AttackPGD's PGD-10 in eval() after every epoch, whose best is their bestpoint.pth.tar
MONITORS = {
    "pgd10-ard": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_sum", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("iad", args, args.arch, variant=args.variant)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    teacher, teacher_info = common.load_teacher(args, device, "resnet18")
    teachers, nat_teacher = {"teacher": teacher_info}, None
    if args.variant in TWO_TEACHERS:
        nat_teacher, teachers["nat_teacher"] = common.load_teacher(args, device, "resnet18", prefix="nat_teacher")
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    start, best = run.begin(student, optimizer, monitor=attack, teachers=teachers)
    if not run.resumed:
        common.measure_teacher(run, teacher, test_data, attack)
        if nat_teacher is not None:
            common.measure_teacher(run, nat_teacher, test_data, attack, prefix="nat_teacher")

    for epoch in range(start, args.epochs + 1):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(epoch, args)
        student.train()
        totals, n_seen = {}, 0
        with common.EpochTimer(device) as timer:
            for x_nat, y in run.batches(train_data, epoch):
                common.broadcast_buffers(student)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                terms = train_step(student, teacher, nat_teacher, optimizer, x_nat, y, epoch, args)
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
