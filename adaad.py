"""AdaAD: Adaptive Adversarial Distillation (Huang, Chen, Wang, Lu, Cheng, Wang, CVPR 2023).

The inner maximisation does not search for the student's worst case under its own cross-entropy but for
the point where student and teacher disagree most, both queried at the same x'; the student then matches
the teacher there (and, with α < 1, on the clean image):

    x' = argmax_{‖x'-x‖∞ ≤ ε} KL(σ(T(x')) ‖ σ(S(x')))                       AT_helper.py adaad_inner_loss
    L  = α KL(σ(T(x')) ‖ σ(S(x'))) + (1 − α) KL(σ(T(x)) ‖ σ(S(x)))            main.py --method AdaAD
--variant adaiad is the paper's AdaIAD, AdaAD's x' with IAD-I's introspective loss (main.py --method
AdaAD_with_IAD1), after the warm-up (0-indexed epoch >= --begin):
    L  = α τ² KL(σ_τ(T(x')) ‖ σ_τ(S(x'))) + α (1/B) Σ_i (1 − a_i) KL(σ(S(x_i)) ‖ σ(S(x'_i)))
         + (1 − α) CE(S(x), y)
    a_i = σ(T(x'_i))_{y_i}^β, a constant; before the warm-up the middle term is absent.

Headline commands (CIFAR-10, ResNet-18 student, RobustBench's Chen2021LTD WRN-34-20 teacher):
    python adaad.py --teacher rb:Chen2021LTD_WRN34_20          (pip install -r requirements-robustbench.txt)
    python adaad.py --teacher Chen2021LTD_34_20.pt             (the same file, downloaded by hand; wrn34_20)
    python adaad.py --variant adaiad --teacher rb:Chen2021LTD_WRN34_20                      AdaIAD
    python adaad.py --dataset cifar100 --teacher rb:Chen2021LTD_WRN34_10                    CIFAR-100 (wrn34_10)
Published numbers: docs/adaad.md §5 (the paper's tables were not available to this project).
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset adaad
Smoke run on CPU:
    python adaad.py --teacher runs/<teacher-run>/best.pt --arch cnn_small --epochs 2 --train-subset 512 \\
        --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-ADAAD-1  search radius 8/255, step 2/255 (README's command; main.py's defaults: 16, 4)  --eps 16/255 --attack-step 4/255
    D-ADAAD-2  KL reduced as main.py: nn.KLDivLoss() (elemmean) on CIFAR-10, sum / B on CIFAR-100  --kl-reduction
    D-ADAAD-3  search through both S(x') and T(x'), student BN eval(), start x + 0.001·N(0, I)   --attack-bn, --rand-start
    D-ADAAD-4  best.pt by main.py's per-epoch PGD-10 (advertorch, clamped uniform start)         (no alternative)
    D-ADAAD-5  AdaIAD as the code: IAD-I's loss, τ 30, β 0.1, warm-up 60, untempered introspection  --temp --beta --begin
Decisions, defaults and their sources in full: docs/adaad.md. Official code: boyellow/AdaAD@9e5c6e5.
"""

import torch
import torch.nn.functional as F

import common

VARIANTS = ("adaad", "adaiad")
TEACHER_ARCHS = {"cifar10": "wrn34_20", "svhn": "wrn34_20", "cifar100": "wrn34_10"}  # main.py's two teachers


def parse_args(argv=None):
    p = common.parser("adaad", "AdaAD (Huang et al., CVPR 2023): adaptive adversarial distillation, and AdaIAD")
    g = p.add_argument_group("models")
    g.add_argument("--variant", choices=VARIANTS, default="adaad",
                   help="adaad: main.py --method AdaAD; adaiad: --method AdaAD_with_IAD1 (AdaIAD)")
    common.add_teacher_args(p, g, arch_help="default: wrn34_20 (Chen2021LTD_WRN34_20); wrn34_10 on CIFAR-100",
                            norm_help="default: the suite checkpoint's record, else none (the RobustBench files "
                                      "take [0, 1] inputs)",
                            help="robust teacher: rb:NAME for a RobustBench model (rb:Chen2021LTD_WRN34_20 on "
                                 "CIFAR-10, rb:Chen2021LTD_WRN34_10 on CIFAR-100) or a checkpoint file")
    g.add_argument("--arch", choices=common.ARCHS, default="resnet18",
                   help="student architecture (main.py --model resnet18; mobilenet_v2 for the MobileNetV2 rows)")
    g = p.add_argument_group("loss (main.py train())")
    g.add_argument("--alpha", type=common.parse_float, default=1.0,
                   help="adaad: weight of KL at x', 1 - alpha weighs KL at x (--AdaAD_alpha); adaiad: weight of the "
                        "distillation terms, 1 - alpha weighs CE(S(x), y) (--IAD_alpha)")
    g.add_argument("--kl-reduction", choices=["elemmean", "batchmean", "sum"], default=None,
                   help="adaad: KL reduction (default: elemmean, nn.KLDivLoss(), on CIFAR-10 and SVHN; batchmean, "
                        "main.py's sum / B, on CIFAR-100; D-ADAAD-2)")
    g.add_argument("--temp", type=common.parse_float, default=30.0, help="adaiad: distillation temperature (--temp)")
    g.add_argument("--beta", type=common.parse_float, default=0.1,
                   help="adaiad: exponent of the trust a_i = P_T(y|x')^beta (--IAD_beta)")
    g.add_argument("--begin", type=int, default=60,
                   help="adaiad: 0-indexed first epoch with introspection, the warm-up length (--IAD_begin)")
    g = p.add_argument_group("inner maximisation (AT_helper.py adaad_inner_loss)")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf search radius epsilon (D-ADAAD-1)")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="step size")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="steps (--num_steps)")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="eval",
                   help="student BatchNorm mode during the search (official: eval, BN_eval=True)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="normal001",
                   help="random start (official: x + 0.001 N(0, I), not clamped)")
    g = p.add_argument_group("optimisation (main.py: SGD, piecewise schedule)")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size (--bs)")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate (--lr_max)")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=5e-4, help="SGD weight decay")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=[100, 150],
                   help="lr x0.1 after each listed epoch (lr_decay's piecewise points for 200 epochs)")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd10-madry", eval_every=1, seed=0, test_batch_size=400)
    rules = {"alpha": ("in [0, 1]", lambda v: 0 <= v <= 1), "beta": ("a number >= 0", lambda v: v >= 0),
             "begin": ("an integer >= 0", lambda v: v >= 0)}
    return common.parse(p, argv, resolve=resolve_defaults, rules=rules, unused=unused_flags), p


def resolve_defaults(args):
    """The KL reduction by data set (docs/adaad.md §3)."""
    if args.variant == "adaad" and args.kl_reduction is None:
        args.kl_reduction = "batchmean" if args.dataset == "cifar100" else "elemmean"  # D-ADAAD-2


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    readers = {"kl_reduction": ("adaad",), "temp": ("adaiad",), "beta": ("adaiad",), "begin": ("adaiad",)}
    return {dest: f"is read by --variant {' and '.join(variants)} only, not by {args.variant}"
            for dest, variants in readers.items() if args.variant not in variants}


def introspection_on(epoch, args):
    """main.py `if epoch >= args.IAD_begin` with 0-indexed epochs; `epoch` here is 1-indexed."""
    return args.variant == "adaiad" and epoch - 1 >= args.begin


# --------------------------------------------------------------------------------------
# Inner maximisation (AT_helper.py: adaad_inner_loss)
# --------------------------------------------------------------------------------------

def random_start(x_nat, eps, start):
    """The named starts of docs/conventions.md; none of them is clamped unless its name says so."""
    if start == "normal001":
        return x_nat + 0.001 * torch.randn_like(x_nat)
    if start == "none":
        return x_nat.clone()
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-eps, eps)
    return x_adv.clamp(0, 1) if start == "uniform-clamp" else x_adv


def inner_max(student, teacher, x_nat, args):
    """x' maximising KL_sum(σ(T(x')) ‖ σ(S(x'))) (KLDivLoss(reduction='none') summed); no labels.

    D-ADAAD-3: the gradient flows through both models (the teacher's output is not detached), the student
    is in eval() (BN_eval=True) and the teacher in eval(); the student is in train() on return.
    """
    student.train(args.attack_bn == "train")
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv, logits_teacher = student(x_adv), teacher(x_adv)
            loss = kl_div(F.softmax(logits_teacher.float(), dim=1), F.log_softmax(logits_adv.float(), dim=1), "sum")
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


def loss_fn(logits_adv, logits_nat, teacher_adv, teacher_nat, args):
    """AdaAD's outer loss as main.py computes it (no temperature); returns the loss and its logged terms."""
    kl_adv = kl_div(F.softmax(teacher_adv, dim=1), F.log_softmax(logits_adv, dim=1), args.kl_reduction)
    kl_nat = kl_div(F.softmax(teacher_nat, dim=1), F.log_softmax(logits_nat, dim=1), args.kl_reduction)
    factor = common.global_sum_factor(args.kl_reduction)  # --kl-reduction sum under torchrun
    kl_adv, kl_nat = kl_adv * factor, kl_nat * factor
    loss = args.alpha * kl_adv + (1 - args.alpha) * kl_nat  # weight 0 by default, but S(x) still ran
    return loss, {"loss": loss, "kl_adv": kl_adv, "kl_nat": kl_nat}


# D-ADAAD-5: main.py's AdaAD_with_IAD1 branch: IAD-I.py's loss with T(x') as the teacher term's input
def loss_fn_adaiad(logits_adv, logits_self, logits_ce, teacher_adv, y, args):
    """AdaIAD; `logits_self` = S(x), the introspection target (not detached), None before the warm-up ends;
    `logits_ce` = the separate S(x) pass of the CE term. a_i comes from the same T(x') (main.py's `guide`)."""
    tau = args.temp
    kl = kl_div(F.softmax(teacher_adv / tau, dim=1), F.log_softmax(logits_adv / tau, dim=1), "batchmean")
    ce = F.cross_entropy(logits_ce, y)
    loss = args.alpha * tau * tau * kl + (1 - args.alpha) * ce
    terms = {"kl": kl, "ce": ce}
    if logits_self is not None:
        with torch.no_grad():  # main.py: each a_i is a Python float (.item())
            a = F.softmax(teacher_adv, dim=1).gather(1, y[:, None]).squeeze(1).pow(args.beta)
        rows = kl_rows(F.softmax(logits_self, dim=1), F.log_softmax(logits_adv, dim=1))
        intro = (rows * (1 - a)).sum() / len(rows)  # untempered and outside tau^2, as the code
        loss = loss + args.alpha * intro
        terms.update(intro=intro, trust=a.mean())
    return loss, {"loss": loss, **terms}


def train_step(student, teacher, optimizer, x_nat, y, epoch, args):
    """One batch as main.py train(): the search (S, T in eval), then, student in train(), the passes
    adaad:  S(x), S(x'), T(x), T(x')                 adaiad: S(x), S(x'), T(x'), [S(x) introspection target,] S(x) CE
    ([...]: from the warm-up on). main.py runs T(x') twice in adaiad (`guide`, `teacher_outputs`); an eval()
    pass of a frozen model is pure, so it runs once here."""
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), teacher, x_nat, args)
    with common.autocast(args.amp, x_nat.device):
        logits_nat = student(x_nat).float()  # main.py's `ori_outputs` (its train accuracy)
        logits_adv = student(x_adv).float()
        with torch.no_grad():
            teacher_nat = teacher(x_nat).float() if args.variant == "adaad" else None
            teacher_adv = teacher(x_adv).float()
        if args.variant == "adaiad":
            logits_self = student(x_nat).float() if introspection_on(epoch, args) else None
            logits_ce = student(x_nat).float()  # a separate CE pass, weight 0 by default
    if args.variant == "adaad":
        loss, terms = loss_fn(logits_adv, logits_nat, teacher_adv, teacher_nat, args)
    else:
        loss, terms = loss_fn_adaiad(logits_adv, logits_self, logits_ce, teacher_adv, y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`: main.py lr_decay's piecewise schedule, lr_max until the 0-indexed epoch 100,
    /10 until 150, /100 after (its only 200-epoch points)."""
    return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-ADAAD-4: main.py test(): advertorch LinfPGDAttack (rand_init clamped to the box, nn.CrossEntropyLoss()),
# Madry's PGD-10, after every epoch; best_PGD10_acc_model.pth keeps the strictly best epoch
MONITORS = {
    "pgd10-madry": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("adaad", args, args.arch, variant=args.variant)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    teacher, teacher_info = common.load_teacher(args, device, TEACHER_ARCHS[args.dataset])
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
                terms = train_step(student, teacher, optimizer, x_nat, y, epoch, args)
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
