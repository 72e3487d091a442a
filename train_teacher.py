"""Teachers and baseline rows: natural training, SAT (PGD-AT) and TRADES, as their official code runs them.

Each `--recipe` reproduces one official code path (the published teacher files: docs/train_teacher.md §4):

| recipe          | source                                               | reproduces                                   |
|-----------------|------------------------------------------------------|----------------------------------------------|
| natural-rslad   | RSLAD §4.1 (no code)                                 | Natural rows; MTARD's ResNet-56, ADT's WRN   |
| natural-iad     | ZFancy/IAD:pre_train/ST.py@a8091a8                   | IAD-II / AKD² standard teacher T_st          |
| natural-ardir   | natural-iad + PreActResNet-18, wd 5e-4               | ARDIR clean teacher                          |
| sat-madry       | MadryLab/cifar10_challenge@f15682d, ported           | SAT rows of RSLAD/MTARD tables               |
| sat-iad         | ZFancy/IAD:pre_train/AT.py@a8091a8                   | IAD's AT teacher; black-box surrogate        |
| sat-ardir       | ARDIR §4.1 + IAD's AT script                         | ARDIR SAT teacher: 80.94 / 52.29 (C-10)      |
| trades          | yaodongyu/TRADES:trades.py@6e8e11b                   | TRADES rows of RSLAD Tables 3-4 (β = 6)      |
| trades-iad      | TRADES loss + IAD's settings                         | IAD Table 2 TRADES rows                      |

Headline commands:
    python train_teacher.py --recipe trades --arch resnet18          # RSLAD Table 3 TRADES ResNet-18: 81.93 clean / 49.23 AA
    python train_teacher.py --recipe sat-madry --arch resnet18       # RSLAD Table 3 SAT ResNet-18: 83.38 clean / 45.83 AA
    python train_teacher.py --recipe sat-iad --arch resnet18         # IAD's AT teacher: 83.06 clean / 46.70 AA
Smoke run on CPU:
    python train_teacher.py --recipe sat-iad --arch cnn_small --epochs 2 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-TEACH-1  RSLAD's and MTARD's SAT rows: sat-madry, the code RSLAD's README names        --recipe sat-iad
    D-TEACH-2  MTARD's ResNet-56 clean teacher, if re-trained: natural-rslad (file name)     --epochs, --lr-milestones
    D-TEACH-3  ADT's natural WRN-34-10: natural-rslad, which has ADT's schedule              overrides
    D-TEACH-4  trades-iad: TRADES' loss and attack, IAD's eps, step, schedule, selection     --recipe trades
    D-TEACH-5  ARDIR's teachers: IAD's scripts, PreActResNet-18, wd 5e-4, PGD-20 selection   --attack-bn train
    D-TEACH-6  the black-box surrogate: sat-iad --arch resnet50                              any recipe
    D-TEACH-7  trades keeps TRADES' eps 0.031 and step 0.007 (RSLAD: 8/255)                  --eps 8/255 --attack-step 2/255
    D-TEACH-8  sat-madry: no per-image standardisation, no logging passes
    D-TEACH-9  best.pt of trades and sat-madry by pgd20-monitor (neither code selects)       --monitor
Decisions, defaults and their sources in full: docs/train_teacher.md. Official code: each recipe's source above.
"""

import math

import torch
import torch.nn.functional as F

import common

# Every default a recipe sets (docs/train_teacher.md §1). Milestones: lr is multiplied by 0.1 *after* each
# listed epoch (iteration for sat-madry), so [74, 89] means 1-74: 0.1, 75-89: 0.01, 90-: 0.001.
RECIPES = {
    "natural-rslad": dict(kind="natural", arch="resnet18", epochs=100, batch_size=128, lr=0.1, wd=2e-4,
                          lr_milestones=[74, 89], monitor="clean", seed=0),
    "natural-iad": dict(kind="natural", arch="resnet18", epochs=200, batch_size=128, lr=0.1, wd=2e-4,
                        lr_milestones=[99, 149], monitor="clean", seed=1),
    # IAD's ST.py with PreActResNet-18 and ARDIR's wd 5e-4
    "natural-ardir": dict(kind="natural", arch="preact_resnet18", epochs=200, batch_size=128, lr=0.1, wd=5e-4,
                          lr_milestones=[99, 149], monitor="clean", seed=1),
    # Madry config.json: 80k iterations, boundaries 40k/60k, pad 2, remainder dropped, wd on DW only,
    # train-mode BN in the attack, CE summed over the batch in pgd_attack.py. D-TEACH-8: no per-image
    # standardisation, no logging passes
    "sat-madry": dict(kind="sat", arch="resnet18", iterations=80000, batch_size=128, lr=0.1, wd=2e-4,
                      lr_milestones=[40000, 60000], pad=2, eps=8 / 255, attack_step=2 / 255, attack_steps=10,
                      rand_start="uniform-clamp", attack_bn="train", attack_loss="ce_sum", wd_scope="weights",
                      monitor="pgd20-monitor", seed=0),
    "sat-iad": dict(kind="sat", arch="resnet18", epochs=200, batch_size=128, lr=0.1, wd=2e-4,
                    lr_milestones=[99, 149], eps=8 / 255, attack_step=2 / 255, attack_steps=10,
                    rand_start="uniform-clamp", attack_bn="eval", attack_loss="ce_mean", monitor="pgd10-madry",
                    seed=1),
    # D-TEACH-5: IAD's AT.py with PreActResNet-18, ARDIR's wd 5e-4 and PGD-20 selection (SVHN step 1/255)
    "sat-ardir": dict(kind="sat", arch="preact_resnet18", epochs=200, batch_size=128, lr=0.1, wd=5e-4,
                      lr_milestones=[99, 149], eps=8 / 255, attack_step=2 / 255, attack_steps=10,
                      rand_start="uniform-clamp", attack_bn="eval", attack_loss="ce_mean", monitor="pgd20-sat",
                      seed=1),
    # train_trades_cifar10.py: 76 epochs, adjust_learning_rate decays from epochs 75, 90, 100.
    # D-TEACH-7: eps 0.031 / step 0.007 kept
    "trades": dict(kind="trades", arch="wrn34_10", epochs=76, batch_size=128, lr=0.1, wd=2e-4,
                   lr_milestones=[74, 89, 99], eps=0.031, attack_step=0.007, attack_steps=10, beta=6.0,
                   rand_start="normal001", attack_bn="eval", monitor="pgd20-monitor", seed=1),
    # D-TEACH-4: TRADES loss and attack with IAD's eps/step/K, schedule and selection
    "trades-iad": dict(kind="trades", arch="resnet18", epochs=200, batch_size=128, lr=0.1, wd=2e-4,
                       lr_milestones=[99, 149], eps=8 / 255, attack_step=2 / 255, attack_steps=10, beta=6.0,
                       rand_start="normal001", attack_bn="eval", monitor="pgd10-madry", seed=1),
}
COMMON_DEFAULTS = dict(pad=4, wd_scope="all", momentum=0.9, attack_loss=None, iterations=None, epochs=None)


def parse_args(argv=None):
    p = common.parser("train_teacher", "Natural training, SAT and TRADES teachers and baselines (docs/train_teacher.md)",
                      epilog=recipes_table())
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                   help="official code path to reproduce; sets every default below (docs/train_teacher.md §1)")
    g = p.add_argument_group("overrides (default: the recipe's value, docs/train_teacher.md §1.9)")
    g.add_argument("--arch", choices=common.ARCHS, help="architecture")
    g.add_argument("--norm", choices=["none", "cifar10", "cifar100"],
                   help="normalisation inside the model (docs/common.md §2; default: none, cifar10 for dm_wrn*)")
    g.add_argument("--epochs", type=common.positive_int, help="epochs (passes over the data for sat-madry)")
    g.add_argument("--iterations", type=common.positive_int, help="sat-madry: training iterations (Madry max_num_training_steps)")
    g.add_argument("--batch-size", type=common.positive_int, help="training batch size")
    g.add_argument("--lr", type=common.parse_float, help="initial SGD learning rate")
    g.add_argument("--wd", type=common.parse_float, help="SGD weight decay (sat-madry: on conv and linear weights only)")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*",
                   help="multiply lr by 0.1 after each of these epochs (iterations for sat-madry)")
    g.add_argument("--eps", type=common.parse_float, help="L-inf radius of the training attack")
    g.add_argument("--attack-step", type=common.parse_float, help="step size of the training attack")
    g.add_argument("--attack-steps", type=common.positive_int, help="steps of the training attack")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"],
                   help="random start of the training attack (docs/conventions.md)")
    g.add_argument("--attack-bn", choices=["train", "eval"], help="BatchNorm mode of the model during the attack")
    g.add_argument("--beta", type=common.parse_float, help="TRADES: weight of the KL term (beta, TRADES Eq. 5)")
    g.add_argument("--pad", type=int, help="zero padding of the random crop")
    common.add_run_args(p, monitors=MONITORS, monitor=None, seed=None)
    return common.parse(p, argv, resolve=resolve_defaults, unused=unused_flags, rules={
        "beta": ("a number >= 0", lambda v: v >= 0), "pad": ("a number >= 0", lambda v: v >= 0)}), p


def recipes_table():
    """Each recipe's values, for --help (the overrides' defaults)."""
    def fmt(v):
        if isinstance(v, float) and v < 1 and abs(v * 255 - round(v * 255)) < 1e-9:
            return f"{round(v * 255)}/255"
        return f"{v:g}" if isinstance(v, float) else ",".join(map(str, v)) if isinstance(v, list) else str(v)
    lines = ["recipe values (what each override defaults to; lr milestones in epochs, iterations for sat-madry):"]
    for name, r in RECIPES.items():
        lines.append(f"  {name}: " + ", ".join(f"{k.replace('_', '-')} {fmt(v)}" for k, v in r.items() if k != "kind"))
    return "\n".join(lines)


def resolve_defaults(args):
    """Every flag not given takes the recipe's value (docs/train_teacher.md §1)."""
    recipe = {**COMMON_DEFAULTS, **RECIPES[args.recipe], "norm": "default"}
    if args.recipe == "sat-madry" and args.epochs is not None and args.iterations is None:
        del recipe["iterations"]  # --epochs N alone: N full passes
    if args.recipe == "sat-ardir" and args.dataset == "svhn":
        recipe["attack_step"] = 1 / 255  # ARDIR §4.1: step 1/255 on SVHN
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def unused_flags(args):
    """The flags this recipe does not read: {dest: why}; typing one of them is an error."""
    kind = RECIPES[args.recipe]["kind"]
    unused = dict.fromkeys(["unsafe_load", "override_record"], "is read by the scripts that load a checkpoint; "
                                                                "train_teacher.py loads none")
    if kind == "natural":
        unused.update(dict.fromkeys(["eps", "attack_step", "attack_steps", "rand_start", "attack_bn"],
                                    f"is read by the sat-* and trades* recipes only, not by {args.recipe} (no attack)"))
    if kind != "trades":
        unused["beta"] = f"is read by --recipe trades and trades-iad only, not by {args.recipe}"
    if args.recipe != "sat-madry":
        unused["iterations"] = f"is read by the iteration-based recipe sat-madry only, not by {args.recipe}; use --epochs"
    elif args.iterations is not None:
        unused["epochs"] = "is not read by --recipe sat-madry with --iterations, which fixes the number of passes"
    return unused


# --------------------------------------------------------------------------------------
# Inner maximisation (Madry pgd_attack.py, IAD attack_generator.PGD, TRADES trades.py)
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
    """x' maximising CE(S(x'), y), summed or averaged as the recipe's code does (SAT recipes), or
    KL_sum(σ(S(x)) ‖ σ(S(x'))) (TRADES' trades.py).

    The student attacks in the recipe's BatchNorm mode (Madry: train(), so each of its forwards updates the
    BatchNorm running statistics; IAD's AT.py and trades.py: eval()) and is in train() on return.
    """
    student.train(args.attack_bn == "train")
    if args.kind == "trades":
        with torch.no_grad(), common.autocast(args.amp, x_nat.device):
            p_nat = F.softmax(student(x_nat).float(), dim=1)  # trades.py recomputes S(x) each step; constant in eval()
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            if args.kind == "trades":
                loss = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), p_nat, reduction="sum")  # TRADES trades.py
            else:
                loss = F.cross_entropy(logits_adv.float(), y, reduction="sum" if args.attack_loss == "ce_sum" else "mean")
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + args.attack_step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x_nat - args.eps), x_nat + args.eps).clamp(0, 1)
    student.train()
    return x_adv.clamp(0, 1).detach()


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------

def loss_fn(student, x_nat, x_adv, y, args):
    """The recipe's loss as its code computes it, the forward passes in its order (docs/train_teacher.md §1);
    returns the loss, its logged terms and the logits the training accuracy counts."""
    with common.autocast(args.amp, x_nat.device):
        if args.kind == "natural":
            logits = student(x_nat).float()
            loss = F.cross_entropy(logits, y)
            return loss, {"loss": loss}, logits
        if args.kind == "sat":
            logits = student(x_adv).float()
            loss = F.cross_entropy(logits, y)
            return loss, {"loss": loss}, logits
        # TRADES Eq. 5 as trades.py computes it: the forward passes S(x), S(x'), S(x), in this order; the KL
        # target is not detached
        logits_nat = student(x_nat).float()
        loss_ce = F.cross_entropy(logits_nat, y)
        logits_adv = student(x_adv).float()
        p_nat = F.softmax(student(x_nat).float(), dim=1)
    loss_kl = F.kl_div(F.log_softmax(logits_adv, dim=1), p_nat, reduction="batchmean")
    loss = loss_ce + args.beta * loss_kl
    return loss, {"loss": loss, "ce": loss_ce, "kl": loss_kl}, logits_adv


def make_optimizer(student, args):
    if args.wd_scope == "weights":
        # Madry model.py decays only variables named DW (conv kernels, final linear weight)
        decay = [p for p in student.parameters() if p.ndim > 1]
        rest = [p for p in student.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(student.parameters()), "weight_decay": args.wd}]
    return common.sgd(groups, args.lr, args.momentum, args.wd)  # each group's weight_decay wins


def lr_at(step, args):
    """lr of 1-indexed epoch (iteration for sat-madry) `step`: x0.1 after each milestone."""
    return args.lr * 0.1 ** sum(step > m for m in args.lr_milestones)


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, student in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-TEACH-9: pgd20-monitor for trades and sat-madry, whose codes select nothing; the other recipes as their sources
MONITORS = {
    "clean": None,
    "pgd20-monitor": dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval"),
    "pgd10-madry": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
    "pgd20-sat": dict(eps=8 / 255, steps=20, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("train_teacher", args, args.arch, variant=args.recipe)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    train_data = common.train_loader(args, args.batch_size, device=device, pad=args.pad,
                                     drop_last=args.recipe == "sat-madry")  # Madry drops each pass's remainder
    test_data = common.test_loader(args, device=device)
    if args.recipe == "sat-madry":  # iteration-based: passes over the data, the last one cut short
        args.iterations = args.iterations or args.epochs * len(train_data)
        args.epochs = math.ceil(args.iterations / len(train_data))
    norm = None if args.norm == "none" else args.norm
    student = common.prepare_student(common.build_model(args.arch, num_classes, norm), args, device)
    optimizer = make_optimizer(student, args)
    attack = MONITORS[args.monitor]
    if args.monitor == "pgd20-sat" and args.dataset == "svhn":
        attack = {**attack, "step": 1 / 255}  # ARDIR §4.1: PGD step 1/255 on SVHN, at test as in training
    start, best = run.begin(student, optimizer, monitor=attack)

    for epoch in range(start, args.epochs + 1):
        if args.recipe != "sat-madry":
            for g in optimizer.param_groups:
                g["lr"] = lr_at(epoch, args)
        student.train()
        totals, n_seen, correct = {}, 0, torch.zeros((), device=device)
        with common.EpochTimer(device) as timer:
            for i, (x_nat, y) in enumerate(run.batches(train_data, epoch)):
                common.broadcast_buffers(student)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                if args.recipe == "sat-madry":
                    iteration = (epoch - 1) * len(train_data) + i + 1
                    if iteration > args.iterations:
                        break
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(iteration, args)
                x_adv = x_nat  # natural recipes: no attack
                if args.kind != "natural":
                    x_adv = inner_max(common.unwrap(student, keep_compiled=True), x_nat, y, args)
                loss, terms, logits = loss_fn(student, x_nat, x_adv, y, args)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                n_seen += len(y)
        metrics = {**run.train_metrics(epoch, totals, n_seen, optimizer, student), "train_acc": float(correct) / n_seen}
        if common.is_monitor_epoch(args, epoch):
            m = common.monitor(student, test_data, attack, tf32=args.monitor_tf32)
            metrics.update(test_clean=m["clean"], test_robust=m["robust"], test_classes=m["classes"],
                           monitor_seconds=round(m["seconds"], 2))
            value = m["clean"] if attack is None else m["robust"]  # the clean monitor ranks the clean accuracy
            if best["value"] is None or value > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                best = {"epoch": epoch, "value": value}
        record = run.log_epoch(epoch, metrics, best, seconds=timer.seconds)
        if best["epoch"] == epoch:  # best.pt before last.pt: a failed write never leaves last.pt ahead of best.pt
            run.save_best(student, record, best)
        run.save_last(student, optimizer, record, best)


if __name__ == "__main__":
    main()
