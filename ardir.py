"""ARDIR: Adversarial Robust Distillation with Internal Representation (Takahashi, Yamada, Yamanaka,
Yamashita, arXiv 2211.00239, 2022). No official code exists: this is a reading of the paper.

ARD with label correction, plus a distance between the student's stage outputs on its own adversarial
example x' and the teacher's stage outputs on the teacher input ẋ (the clean x for RC and CC; for RA a
PGD example against the teacher). The student's logits and features come from one forward pass.

    L = (1 − β) t² (1/B) Σ_i KL(q_i ‖ σ_t(S(x'_i))) + β (1/B) Σ_i IR_i                  ARDIR Eq. 6, 12
    q_i = onehot(y_i) if argmax T(ẋ_i) ≠ y_i, else σ_t(T(ẋ_i))                            ARDIR Algorithm 1
    IR_i = sqrt( Σ_l (1/(H_l W_l)) Σ_{h,w} Σ_c (û^S_l − û^T_l)² + 1e-12 )                  ARDIR Eq. 7-11 (LPIPS)
    û = φ / (‖φ‖₂ over channels at each position + 1e-10),  φ^S_l = φ_l(S; x'),  φ^T_l = φ_l(T; ẋ)
    x' = argmax_{‖x'-x‖∞ ≤ ε} CE(S(x'), y)                                                 ARDIR Eq. 2-3

Headline commands (PreActResNet-18 student and teachers, 200 epochs) and the published rows they target
(Clean / FGSM / PGD-20 / AA, %, best-PGD checkpoint; ARDIR Table 2 for CIFAR-10, Table 3 for SVHN):
    python ardir.py --teacher <sat-ardir>/best.pt                          # ARDIR (RC) β 0.6: 82.67 / 60.42 / 54.79 / 50.14
    python ardir.py --teacher <natural-ardir>/best.pt --combo CC           # ARDIR (CC) β 0.4: 85.56 / 60.49 / 52.14 / 49.01
    python ardir.py --teacher <sat-ardir>/best.pt --combo RA               # ARDIR (RA) β 0.1: 81.77 / 58.77 / 55.25 / 47.56
    python ardir.py --teacher <sat-ardir>/best.pt --beta 0                 # ARD (RC) t 1:     83.14 / 60.57 / 53.96 / 48.24
    python ardir.py --teacher <natural-ardir>/best.pt --beta 0 --combo CC  # ARD (CC) t 1:     81.77 / 57.12 / 52.57 / 48.00
    python ardir.py --teacher <sat-ardir>/best.pt --beta 0 --combo RA      # ARD (RA) t 1:     82.46 / 61.83 / 58.34 / 47.21
    python ardir.py --dataset svhn --teacher <sat-ardir-svhn>/best.pt      # ARDIR (RC) β 0.8: 91.14 / 65.86 / 57.47 / 49.44
        --combo CC: 92.99 / 66.76 / 54.50 / 47.30 (β 0.2);  --combo RA: 90.89 / 64.62 / 56.95 / 47.79 (β 0.2)
        ARD (--beta 0): RC with --temp 30 90.34 / 63.56 / 52.57 / 46.83;  CC 89.77 / 60.97 / 51.50 / 44.11;
        RA 91.13 / 64.53 / 56.00 / 44.54
    The SAT teacher itself: 80.94 / 56.57 / 52.29 / 47.87 (CIFAR-10), 90.67 / 61.75 / 52.47 / 44.94 (SVHN).
    RA's PGD overstates its robustness (the paper reads it as gradient obfuscation): judge RA by AA.
Teachers (train_teacher.py; the SVHN recipe uses step 1/255 and no flip):
    python train_teacher.py --recipe sat-ardir [--dataset svhn]            # robust teacher for RC and RA
    python train_teacher.py --recipe natural-ardir [--dataset svhn]        # clean teacher for CC
Evaluate with: python eval_attacks.py runs/<run>/best.pt --preset ardir
Smoke run on CPU (cnn_small has the stages layer1..layer3):
    python ardir.py --teacher runs/<teacher-run>/best.pt --arch cnn_small --ir-layers layer1,layer2,layer3 \
        --epochs 2 --train-subset 512 --test-subset 128

β and t were chosen by the authors on test AutoAttack accuracy and best.pt is selected on test PGD-20, as
the paper does; both are test-set selection.

Where the paper, IAD's ARD.py and this script part ways, or neither says (flag for the alternative):
    D-ARDIR-1   channel-wise unit normalisation as LPIPS                                    --ir-norm spatial-sum (Eq. 10)
    D-ARDIR-2   keep Eq. 7's outer square root                                              --no-ir-sqrt (LPIPS's square)
    D-ARDIR-3   a corrected sample's target is the exact one-hot; the IR term is never corrected
    D-ARDIR-4   IR over the raw outputs of layer1..layer4                                   --ir-layers
    D-ARDIR-5   student attack in train-mode BN from an unclamped uniform start, CE summed  --attack-bn, --rand-start
    D-ARDIR-6   best.pt by PGD-20 (step a, uniform-clamp start) every epoch                 --eval-every
    D-ARDIR-7   KL batchmean with a t² factor                                               --kl-reduction, --no-t2
    D-ARDIR-8   batch 128; SVHN crop without flip; epoch 100 is the first at 0.01           --batch-size, --lr-schedule iad-code
    D-ARDIR-9   the student's input in the IR term is x' (Eq. 11-12 write x)
    D-ARDIR-10  the unused clean pass S(x) of IAD's ARD.py stays among the forward passes   --no-clean-forward
Decisions, defaults and their sources in full: docs/ardir.md. No official code exists; the gaps follow
ZFancy/IAD:ARD.py@a8091a8.
"""

import argparse

import torch
import torch.nn.functional as F

import common

# ARDIR Tables 2-3: β per teacher combination; CIFAR-100, which the paper does not run, takes CIFAR-10's
BETAS = {"cifar10": {"RC": 0.6, "CC": 0.4, "RA": 0.1}, "svhn": {"RC": 0.8, "CC": 0.2, "RA": 0.2}}


def layer_list(text):
    """'layer1,layer2' -> ['layer1', 'layer2'] (module paths inside the model); for argparse `type=`."""
    names = [n.strip() for n in str(text).split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"not a comma list of distinct module names: {text!r}")
    return names


def parse_args(argv=None):
    p = common.parser("ardir", "ARDIR (Takahashi et al., arXiv 2211.00239): robust distillation with internal representation")
    g = p.add_argument_group("models")
    common.add_teacher_args(p, g, arch_help="default: preact_resnet18, ARDIR §4.1",
                            norm_help="default: the suite checkpoint's record, else none")
    g.add_argument("--arch", choices=common.ARCHS, default="preact_resnet18", help="student architecture (ARDIR §4.1)")
    g.add_argument("--combo", choices=["RC", "CC", "RA"], default="RC",
                   help="teacher combination (ARDIR §3.2): RC robust teacher on clean x (ARDIR's method), CC clean "
                        "teacher on clean x, RA robust teacher on a PGD example against itself")
    g = p.add_argument_group("loss (ARDIR Eq. 12, Algorithm 1)")
    g.add_argument("--beta", type=common.parse_float, default=None,
                   help="weight of the internal-representation term; 1 - beta weighs the KL (beta in ARDIR Eq. 12; "
                        "default: RC 0.6, CC 0.4, RA 0.1 on CIFAR-10 and CIFAR-100, RC 0.8, CC 0.2, RA 0.2 on SVHN, "
                        "Tables 2-3; 0 is the paper's ARD baseline)")
    g.add_argument("--temp", type=common.parse_float, default=1.0,
                   help="distillation temperature (t in ARDIR Eq. 12; every ARDIR row uses 1, SVHN's ARD (RC) row 30)")
    g.add_argument("--t2", action=argparse.BooleanOptionalAction, default=True,
                   help="multiply the KL term by t^2 (ARDIR Eq. 5, as ARD; a no-op at t = 1; default: on)")
    g.add_argument("--kl-reduction", choices=["batchmean", "elemmean", "sum"], default="batchmean",
                   help="KL reduction (D-ARDIR-7: batchmean as IAD's ARD.py, with --t2; elemmean is ARD's nn.KLDivLoss())")
    g.add_argument("--label-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="where the teacher misclassifies its input, its soft label becomes the one-hot label "
                        "(ARDIR Algorithm 1, §4.1; default: on)")
    g.add_argument("--ir-layers", type=layer_list, default="layer1,layer2,layer3,layer4",
                   help="comma list of modules whose raw outputs the IR term compares (D-ARDIR-4: the four stages of "
                        "PreActResNet-18, one map per stage as LPIPS; cnn_small has layer1..layer3; add conv1 for the stem)")
    g.add_argument("--ir-norm", choices=["channel", "spatial-sum"], default="channel",
                   help="normalisation of each feature map (D-ARDIR-1): channel = unit L2 norm over channels at each "
                        "position (LPIPS); spatial-sum = the literal Eq. 10, relu(phi) over its spatial sum per channel")
    g.add_argument("--ir-sqrt", action=argparse.BooleanOptionalAction, default=True,
                   help="outer square root of ARDIR Eq. 7 (D-ARDIR-2; --no-ir-sqrt: LPIPS's squared distance; "
                        "default: on)")
    g.add_argument("--clean-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="the unused train-mode pass S(x) after S(x'), which moves the BN statistics (IAD's ARD.py runs "
                        "it for its CE term, which weighs 0 at alpha = 1; D-ARDIR-10; default: on)")
    g = p.add_argument_group("inner maximisation (ARDIR §4.1; ZFancy/IAD:ARD.py AttackPGD for the rest)")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon")
    g.add_argument("--attack-step", type=common.parse_float, default=None,
                   help="PGD step size a (default: 2/255; 1/255 on SVHN, ARDIR §4.1)")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps (k in ARDIR §4.1)")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="train",
                   help="student BatchNorm mode during the attack (D-ARDIR-5: train as ARD.py, every attack pass updates BN)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="uniform",
                   help="random start of the student's and RA's teacher attack (ARD.py: x + U(-eps, eps), not clamped)")
    g = p.add_argument_group("optimisation (ARDIR §4.1)")
    g.add_argument("--epochs", type=common.positive_int, default=200, help="training epochs")
    g.add_argument("--batch-size", type=common.positive_int, default=128,
                   help="training batch size (not stated; 128 as IAD's ARD.py)")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", type=common.parse_float, default=5e-4, help="SGD weight decay")
    g.add_argument("--lr-schedule", choices=["paper", "iad-code"], default="paper",
                   help="paper: lr/10 at the 100th and 150th epoch (1-99 0.1, 100-149 0.01, 150- 0.001); "
                        "iad-code: the single decay of IAD's ARD.py (1-100 0.1, then 0.01)")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=None,
                   help="replace the schedule: lr x0.1 after each listed epoch (shortened runs)")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd20-sat", eval_every=1, seed=0)
    return common.parse(p, argv, resolve=resolve_defaults, rules={"beta": ("in [0, 1]", lambda v: 0 <= v <= 1)},
                        unused=unused_flags), p


def resolve_defaults(args):
    """Defaults that depend on the data set or the combination (docs/ardir.md §3)."""
    if args.beta is None:
        args.beta = BETAS["svhn" if args.dataset == "svhn" else "cifar10"][args.combo]
    if args.attack_step is None:
        args.attack_step = 1 / 255 if args.dataset == "svhn" else 2 / 255  # ARDIR §4.1


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    unused = {}
    if args.beta == 0:  # the paper's ARD baseline: the IR term weighs 0 (still computed and logged as `ir`)
        why = "shapes only the IR term, which --beta 0 weighs 0"
        unused.update(ir_norm=why, ir_sqrt=why)
    if args.lr_milestones is not None:
        unused["lr_schedule"] = "is replaced by --lr-milestones"
    return unused


# --------------------------------------------------------------------------------------
# Inner maximisation (ARDIR Eq. 2; ZFancy/IAD:ARD.py AttackPGD)
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

    As IAD's ARD.py, the student attacks in train() mode, so each of its forwards updates the BatchNorm
    running statistics; the student is in train() on return.
    """
    student.train(args.attack_bn == "train")
    x_adv = pgd_ce_sum(student, x_nat, y, args)
    student.train()
    return x_adv


def teacher_inner_max(teacher, x_nat, y, args):
    """RA's teacher input ẋ = x + η_T (ARDIR Algorithm 1): the same PGD, against the frozen teacher in eval mode."""
    return pgd_ce_sum(teacher, x_nat, y, args)


def pgd_ce_sum(model, x_nat, y, args):
    """PGD on CE_sum(model(x'), y) with the random start, steps and radius of the flags; the last iterate."""
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(model):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = model(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y, reduction="sum")
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + args.attack_step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x_nat - args.eps), x_nat + args.eps).clamp(0, 1)
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


def normalise_map(phi, ir_norm):
    """û of one stage output [B, C, H, W] (--ir-norm)."""
    if ir_norm == "channel":
        # LPIPS normalize_tensor (richzhang/PerceptualSimilarity:lpips/__init__.py@1c4cf7c), eps 1e-10;
        # vector_norm has sqrt(Σ φ²)'s value and a zero, not NaN, gradient where every channel is 0
        return phi / (torch.linalg.vector_norm(phi, dim=1, keepdim=True) + 1e-10)
    phi = F.relu(phi)  # --ir-norm spatial-sum: ARDIR Eq. 10, each channel map over its spatial sum
    return phi / (phi.sum((2, 3), keepdim=True) + 1e-10)


def ir_distance(feats_student, feats_teacher, args):
    """IR_i per sample (ARDIR Eq. 7-11): over the layers, the spatial mean (Eq. 8's 1/sqrt(W H), squared) of
    Σ_c (û^S − û^T)², summed; then the outer square root of Eq. 7 (--ir-sqrt)."""
    d = sum(((normalise_map(s, args.ir_norm) - normalise_map(t, args.ir_norm)) ** 2).sum(1).mean((1, 2))
            for s, t in zip(feats_student, feats_teacher))
    return torch.sqrt(d + 1e-12) if args.ir_sqrt else d  # 1e-12 keeps the gradient finite where d = 0


def loss_fn(logits_adv, feats_adv, logits_teacher, feats_teacher, y, args):
    """ARDIR Eq. 12 with Algorithm 1's label correction; returns the loss and its logged terms."""
    t = args.temp
    p_teacher = F.softmax(logits_teacher / t, dim=1)
    wrong = logits_teacher.argmax(1) != y
    if args.label_correction:  # D-ARDIR-3: the exact one-hot, not σ_t(onehot); the IR term is not corrected
        p_teacher = torch.where(wrong[:, None], F.one_hot(y, p_teacher.shape[1]).to(p_teacher.dtype), p_teacher)
    kl = kl_div(p_teacher, F.log_softmax(logits_adv / t, dim=1), args.kl_reduction)
    kl = kl * common.global_sum_factor(args.kl_reduction)  # --kl-reduction sum under torchrun
    ir = ir_distance(feats_adv, feats_teacher, args).mean()
    t2 = t * t if args.t2 else 1.0  # ARD's Eq. 5 factor
    loss = (1 - args.beta) * t2 * kl + args.beta * ir  # beta = 0: ARD (RC/CC/RA) with label correction
    return loss, {"loss": loss, "kl": kl, "ir": ir, "teacher_wrong": wrong.float().mean()}


def train_step(student, teacher, optimizer, x_nat, y, args):
    """One batch as ARDIR Algorithm 1: the student's attack, the teacher's input ẋ, then the forward passes
    S(x') (logits and stages from one pass), T(ẋ), S(x), in this order."""
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
    x_teacher = teacher_inner_max(teacher, x_nat, y, args) if args.combo == "RA" else x_nat  # ẋ
    with common.autocast(args.amp, x_nat.device):
        # D-ARDIR-9: the student's features in the IR term come from x' (Eq. 6), the same pass as its logits
        feats_adv, logits_adv = common.stage_outputs(student, x_adv, args.ir_layers)
        with torch.no_grad():
            feats_teacher, logits_teacher = common.stage_outputs(teacher, x_teacher, args.ir_layers)
            if args.clean_forward:
                student(x_nat)  # --clean-forward: output unused (ARD.py's CE at weight 0), kept: it moves BN statistics
    loss, terms = loss_fn(logits_adv.float(), [f.float() for f in feats_adv], logits_teacher.float(),
                          [f.float() for f in feats_teacher], y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args):
    """lr of 1-indexed `epoch`."""
    if args.lr_milestones is not None:
        return args.lr * 0.1 ** sum(epoch > m for m in args.lr_milestones)
    if args.lr_schedule == "iad-code":  # ZFancy/IAD:ARD.py@a8091a8 adjust_learning_rate sets 0.01 twice, never 0.001
        return args.lr * (0.1 if epoch > 100 else 1.0)
    # D-ARDIR-8: "divided by 10 at the 100th and 150th epoch" (ARDIR §4.1) read as ZFancy/IAD:pre_train/AT.py's
    # piecewise schedule, where epoch 100 is the first at 0.01 and epoch 150 the first at 0.001
    return args.lr * 0.1 ** ((epoch >= 100) + (epoch >= 150))


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-ARDIR-6: PGD-20 as at test (ARDIR §4.1) with the training step a, uniform-clamp start, every epoch
MONITORS = {
    "pgd20-sat": dict(eps=8 / 255, steps=20, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def check_ir_layers(student, teacher, args, device):
    """One line and exit 2 unless every --ir-layers module exists in both models and gives feature maps
    [B, C, H, W] of one shape in both (probed once, in eval mode, so no BatchNorm statistic moves)."""
    shapes = {}
    for role, model in (("student", student), ("teacher", teacher)):
        root = common.unwrap(model)
        for name in args.ir_layers:
            try:
                root.get_submodule(name)
            except AttributeError:
                common.fail(f"--ir-layers {name}: the {role} {root.arch} has no such module; its stages: "
                            f"{','.join(root.stage_names) or 'none'} (e.g. --ir-layers {','.join(root.stage_names)})")
        was_training = root.training
        root.eval()  # the module itself: a compiled model would compile a graph for this probe's shape
        try:
            with torch.no_grad():
                feats, _ = common.stage_outputs(root, torch.zeros(2, 3, 32, 32, device=device), args.ir_layers)
        except ValueError as e:
            common.fail(f"--ir-layers: the {role}: {e}")
        root.train(was_training)
        shapes[role] = [tuple(f.shape[1:]) if isinstance(f, torch.Tensor) and f.dim() == 4 else None for f in feats]
    for name, s, t in zip(args.ir_layers, shapes["student"], shapes["teacher"]):
        if s is None or t is None:
            common.fail(f"--ir-layers {name}: its output is not a feature map [B, C, H, W] in the "
                        f"{'student' if s is None else 'teacher'}; name a convolutional stage")
        if s != t:
            common.fail(f"--ir-layers {name}: the student's output is {'x'.join(map(str, s))} and the teacher's "
                        f"{'x'.join(map(str, t))}; the IR term compares maps of one shape (ARDIR uses one "
                        "architecture for both, §4.1)")


def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("ardir", args, args.arch, variant=args.combo)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    teacher, teacher_info = common.load_teacher(args, device, "preact_resnet18")
    train_data = common.train_loader(args, args.batch_size, device=device)  # SVHN cropped, not flipped
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(common.build_model(args.arch, num_classes), args, device)
    check_ir_layers(student, teacher, args, device)
    optimizer = common.sgd(student.parameters(), args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    if args.dataset == "svhn":
        attack = {**attack, "step": 1 / 255}  # the training step a on SVHN (ARDIR §4.1)
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
