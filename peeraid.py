"""PeerAiD: Improving Adversarial Distillation from a Specialized Peer Tutor (Jung, Jang, Song, Lee, CVPR 2024).

No pretrained teacher: a peer P is trained from scratch together with the student S, on the student's own
adversarial examples, and tutors it. The attack raises the student's divergence from the peer's clean
prediction; the peer learns x' with the labels and the student's soft labels; the student distils the
peer on x' and its own clean prediction. An SWA average of the student, from the first lr decay on, is
the reported model.

    x' = argmax_{‖x'-x‖∞ ≤ ε} KL_sum(σ(sg P(x)) ‖ σ(S(x')))                   attack_function.py LinfPeerAttack
    L_peer = γ1 CE(P(x'), y) + γ2 τp² KL(σ_τp(S(x')) ‖ σ_τp(P(x')))                     main.py train_kd
    L_student = λ1 CE(S(x'), y) + λ2 T² KL(σ_T(sg P(x')) ‖ σ_T(S(x'))) + λ3 T² KL(σ_T(S(x)) ‖ σ_T(S(x')))
    one backward of L_peer + L_student: the student also takes L_peer's gradient through its KL target
with KL = elemmean (nn.KLDivLoss()), T = 5, τp = 1, γ1 = 1, λ = (0, 1, 1), γ2 = 0.1 (CIFAR-100: 1).

Headline commands (ResNet-18 student and peer, 300 epochs, SWA student reported), PeerAiD Table 1:
    python peeraid.py                                   # CIFAR-10
    python peeraid.py --dataset cifar100                # CIFAR-100 (gamma2 1)
    python peeraid.py --arch wrn34_10 --peer-arch wrn34_10 [--dataset cifar100]    # the WRN-34-10 rows
Published numbers: docs/peeraid.md §5 (the paper's tables were not available to this project).
Evaluate as main.py does after training (FGSM, PGD-20 from an unclamped uniform start, AutoAttack):
    python eval_attacks.py runs/<run>/best.pt --preset peeraid
Smoke run on CPU (SWA from epoch 2; cnn_small needs the lower lr, docs/peeraid.md §6):
    python peeraid.py --arch cnn_small --peer-arch cnn_small --epochs 3 --lr-milestones 1 2 --lr 0.02 \\
        --peer-lr 0.02 --train-subset 512 --test-subset 128

Where the paper, the code and this script part ways (flag for the alternative):
    D-PEER-1  best.pt = the SWA student (its own PGD-10 best, from the SWA start); before, the plain student  --no-swa
    D-PEER-2  one SGD with a parameter group (own lr) per model = the code's two SGDs
    D-PEER-3  SWA's BatchNorm pass: one more shuffled, augmented pass over the training set, drawn afresh
    D-PEER-4  --swa-start S: average after every epoch E > S; default the first milestone (swa_s_start)  --swa-start
    D-PEER-5  --lr-milestones: the code's 0-indexed decay epochs as written (x0.1 from epoch 215, 260, 285)
    D-PEER-6  defaults of the published commands, not main.py's argparse defaults            --temp 6 --lambda1 1
    D-PEER-7  monitor: test_kd's PGD-10 (unclamped uniform start, CE mean) every epoch, student and SWA
Decisions, defaults and their sources in full: docs/peeraid.md. Official code: jaewonalive/PeerAiD@cd12e92.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# models/wide_resnet.py: PeerAiD builds its WRN-34-10 without TRADES' unused sub_block1
ARCH_KWARGS = {"wrn34_10": {"sub_block1": False}}
SWA_NAME = "SWA PGD-10"  # best["name"] once best.pt holds the SWA student


def parse_args(argv=None):
    p = common.parser("peeraid", "PeerAiD (Jung et al., CVPR 2024): adversarial distillation from a peer tutor")
    g = p.add_argument_group("models (both from scratch, no input normalisation)")
    g.add_argument("--arch", choices=common.ARCHS, default="resnet18", help="student architecture (--s_type)")
    g.add_argument("--peer-arch", choices=common.ARCHS, default="resnet18", help="peer architecture (--p_type)")
    g = p.add_argument_group("loss (main.py train_kd; defaults of training_scripts/*.sh, D-PEER-6)")
    g.add_argument("--temp", type=common.parse_float, default=5.0,
                   help="temperature T of the student's two KL terms (--temperature; main.py's argparse sets 6)")
    g.add_argument("--peer-temp", type=common.parse_float, default=1.0,
                   help="temperature tau_p of the peer's KL term (--re_kd_temperature)")
    g.add_argument("--gamma1", type=common.parse_float, default=1.0,
                   help="weight of the peer's CE(P(x'), y) (--gamma1)")
    g.add_argument("--gamma2", type=common.parse_float, default=None,
                   help="weight of the peer's KL towards the student on x' (--gamma2; default: 0.1 on CIFAR-10 and "
                        "SVHN, 1 on CIFAR-100, as the published commands)")
    g.add_argument("--lambda1", type=common.parse_float, default=0.0,
                   help="weight of the student's CE(S(x'), y) (--lamb1; main.py's argparse sets 1)")
    g.add_argument("--lambda2", type=common.parse_float, default=1.0,
                   help="weight of the student's KL to the peer on x' (--lamb2)")
    g.add_argument("--lambda3", type=common.parse_float, default=1.0,
                   help="weight of the student's KL from its clean to its adversarial prediction (--lamb3)")
    g.add_argument("--kl-reduction", choices=["elemmean", "batchmean", "sum"], default="elemmean",
                   help="reduction of the three KL terms (official nn.KLDivLoss() = mean over batch and classes = "
                        "elemmean; the others are for experiments)")
    g = p.add_argument_group("inner maximisation (attack_function.py LinfPeerAttack)")
    g.add_argument("--eps", type=common.parse_float, default="8/255", help="L-inf radius epsilon (main.py epsilon)")
    g.add_argument("--attack-step", type=common.parse_float, default="2/255", help="PGD step size (main.py alpha)")
    g.add_argument("--attack-steps", type=common.positive_int, default=10, help="PGD steps (--k_train)")
    g.add_argument("--rand-start", choices=["uniform", "uniform-clamp", "normal001", "none"], default="normal001",
                   help="random start (official: x + 0.001 N(0, I), not clamped)")
    g = p.add_argument_group("optimisation (configs/PeerAiD_*.json; one SGD, a parameter group per model)")
    g.add_argument("--epochs", type=common.positive_int, default=300, help="training epochs (epochs)")
    g.add_argument("--batch-size", type=common.positive_int, default=128, help="training batch size (batch_size)")
    g.add_argument("--lr", type=common.parse_float, default=0.1, help="initial lr of the student (lr_student)")
    g.add_argument("--peer-lr", type=common.parse_float, default=0.1, help="initial lr of the peer (lr_peer)")
    g.add_argument("--momentum", type=common.parse_float, default=0.9, help="SGD momentum of both (main.py)")
    g.add_argument("--wd", type=common.parse_float, default=2e-4, help="SGD weight decay of both (weight_decay)")
    g.add_argument("--lr-milestones", type=common.positive_int, nargs="*", default=[214, 259, 284],
                   help="lr x0.1 after each listed epoch, for both models (lr_decay_epochs_student/_peer, the code's "
                        "0-indexed decay epochs, D-PEER-5)")
    g.add_argument("--swa", action=argparse.BooleanOptionalAction, default=True,
                   help="stochastic weight averaging of the student, reported as best.pt (--swa_s, D-PEER-1) "
                        "(default: on)")
    g.add_argument("--swa-start", type=common.non_negative_int, default=None,
                   help="average the student after every epoch E > S (swa_s_start; default: the first of "
                        "--lr-milestones, D-PEER-4)")
    common.add_run_args(p, monitors=MONITORS, monitor="pgd10-peeraid", eval_every=1, seed=0, test_batch_size=128)
    at_least_0 = ("a number >= 0", lambda v: v >= 0)
    rules = {"gamma1": at_least_0, "gamma2": at_least_0, "lambda1": at_least_0, "lambda2": at_least_0,
             "lambda3": at_least_0, "peer_temp": ("a positive number", lambda v: v > 0),
             "peer_lr": ("a positive number below 3.4e38 (float32)", lambda v: 0 < v < common.FLOAT32_MAX)}
    return common.parse(p, argv, resolve=resolve_defaults, rules=rules, unused=unused_flags), p


def resolve_defaults(args):
    """Defaults that depend on the data set and the schedule (docs/peeraid.md §3)."""
    if args.gamma2 is None:
        args.gamma2 = 1.0 if args.dataset == "cifar100" else 0.1  # D-PEER-6: resnet18_cifar10.sh 0.1, _cifar100.sh 1
    if args.swa and args.swa_start is None:
        if not args.lr_milestones:
            common.fail("--swa starts after the first of --lr-milestones; with none, pass --swa-start S or --no-swa")
        args.swa_start = min(args.lr_milestones)  # D-PEER-4: main.py swa_s_start = lr_decay_epochs_student[0]


def unused_flags(args):
    """The flags this configuration does not read: typed, they end the run with one line."""
    unused = dict.fromkeys(["unsafe_load", "override_record"],
                           "is not read: PeerAiD loads no checkpoint file (student and peer train from scratch)")
    if not args.swa:
        unused["swa_start"] = "is read by --swa only"
    return unused


# --------------------------------------------------------------------------------------
# Inner maximisation (attack_function.py: LinfPeerAttack)
# --------------------------------------------------------------------------------------

def random_start(x_nat, eps, start):
    """The named starts of docs/conventions.md; none of them is clamped unless its name says so."""
    if start == "normal001":
        return x_nat + 0.001 * torch.randn_like(x_nat)
    if start == "none":
        return x_nat.clone()
    x_adv = x_nat + torch.empty_like(x_nat).uniform_(-eps, eps)
    return x_adv.clamp(0, 1) if start == "uniform-clamp" else x_adv


def inner_max(student, logits_peer_nat, x_nat, args):
    """x' maximising KL_sum(σ(P(x)) ‖ σ(S(x'))) (KLDivLoss(reduce=False) summed) towards the peer's fixed clean
    prediction; the labels play no part. The student attacks in eval() mode (its BatchNorm statistics do not
    move) and is in train() on return."""
    student.eval()
    p_peer = F.softmax(logits_peer_nat.float(), dim=1)
    x_adv = random_start(x_nat, args.eps, args.rand_start)
    with common.input_grad_only(student):  # no weight gradients: a compiled backward computes them
        for _ in range(args.attack_steps):
            x_adv.requires_grad_(True)
            with common.autocast(args.amp, x_nat.device):
                logits_adv = student(x_adv)
            loss = kl_div(p_peer, F.log_softmax(logits_adv.float(), dim=1), "sum")
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


def loss_fn(logits_peer_adv, logits_target, logits_adv, logits_nat, y, args):
    """L_peer + L_student as train_kd computes them; returns the loss and its logged terms. `logits_target` and
    `logits_adv` are the student's two train-mode passes on x'; neither is detached (nor is `logits_nat`)."""
    tp, t, red = args.peer_temp, args.temp, args.kl_reduction
    k = common.global_sum_factor(red)  # --kl-reduction sum under torchrun
    ce_peer = F.cross_entropy(logits_peer_adv, y)
    # the target σ(S(x')/τp) keeps its graph: this term also trains the student (F.kl_div differentiates its target)
    kl_peer = k * kl_div(F.softmax(logits_target / tp, dim=1), F.log_softmax(logits_peer_adv / tp, dim=1), red)
    loss_peer = args.gamma1 * ce_peer + args.gamma2 * tp * tp * kl_peer
    log_q = F.log_softmax(logits_adv / t, dim=1)
    ce = F.cross_entropy(logits_adv, y)  # weight λ1 = 0 by default
    kl_peer_to_student = k * kl_div(F.softmax(logits_peer_adv.detach() / t, dim=1), log_q, red)
    kl_nat = k * kl_div(F.softmax(logits_nat / t, dim=1), log_q, red)
    loss_student = args.lambda1 * ce + args.lambda2 * t * t * kl_peer_to_student + args.lambda3 * t * t * kl_nat
    loss = loss_peer + loss_student
    return loss, {"loss": loss, "loss_peer": loss_peer, "loss_student": loss_student, "ce_peer": ce_peer,
                  "kl_peer": kl_peer, "ce": ce, "kl_peer_to_student": kl_peer_to_student, "kl_nat": kl_nat}


def train_step(student, peer, optimizer, x_nat, y, args):
    """One batch as train_kd: P(x) in eval() under no_grad, the attack on S in eval(), then the train-mode
    passes P(x'), S(x'), S(x'), S(x), in this order, one backward, one step of both models."""
    plain_peer = common.unwrap(peer, keep_compiled=True)
    plain_peer.eval()
    with torch.no_grad(), common.autocast(args.amp, x_nat.device):
        logits_peer_nat = plain_peer(x_nat).float().clone()  # a copy: a compiled model's output memory is reused
    plain_peer.train()
    x_adv = inner_max(common.unwrap(student, keep_compiled=True), logits_peer_nat, x_nat, args)
    with common.autocast(args.amp, x_nat.device):
        logits_peer_adv = peer(x_adv).float()
        logits_target = student(x_adv).float()  # the peer's target
        logits_adv = student(x_adv).float()  # a second train-mode pass on x': BN statistics move twice, as the code
        logits_nat = student(x_nat).float()
    loss, terms = loss_fn(logits_peer_adv, logits_target, logits_adv, logits_nat, y, args)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def lr_at(epoch, args, lr=None):
    """lr of 1-indexed `epoch` from the initial `lr` (default: the student's): x0.1 after each milestone.
    D-PEER-5: adjust_learning_rate divides by 10 for each decay epoch d <= e, 0-indexed e = epoch - 1: d < epoch."""
    return (args.lr if lr is None else lr) * 0.1 ** sum(epoch > m for m in args.lr_milestones)


# --------------------------------------------------------------------------------------
# SWA of the student (utils/SWA.py: moving_average, bn_update)
# --------------------------------------------------------------------------------------

def swa_average(swa, student, n):
    """θ_swa ← (1 − a) θ_swa + a θ_S with a = 1/(n + 1), over parameters only: the running mean of the n + 1
    students averaged so far (the first call copies the student)."""
    a = 1.0 / (n + 1)
    with torch.no_grad():
        for p_swa, p in zip(common.unwrap(swa).parameters(), common.unwrap(student).parameters()):
            p_swa.mul_(1.0 - a).add_(p * a)


def bn_update(swa, batches, args):
    """The SWA model's BatchNorm statistics from one train() pass: running mean and variance reset to 0 and 1,
    then momentum b/(n + b) per batch, i.e. the cumulative average over the pass; momenta restored after."""
    model = common.unwrap(swa)  # not compiled: the momentum changes at every batch
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    model.train()
    n = 0
    with torch.no_grad():
        for x, _ in batches:
            for m in bns:
                m.momentum = len(x) / (n + len(x))
            with common.autocast(args.amp, x.device):
                model(x)
            n += len(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


# --------------------------------------------------------------------------------------
# Monitor: the test-set attack that selects best.pt, model in eval(), at the epochs of --eval-every
# --------------------------------------------------------------------------------------

# D-PEER-7: test_kd's LinfPGDAttack.perturb(x, y, 10) after every epoch, on the student and, from the SWA start,
# on the SWA student; x + U(-eps, eps) not clamped, F.cross_entropy (mean); test batch 128 (the training batch)
MONITORS = {
    "pgd10-peeraid": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_mean", bn="eval"),
}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def build(arch, num_classes):
    return common.build_model(arch, num_classes, None, **ARCH_KWARGS.get(arch, {}))  # no normalisation, as the code


def main(argv=None):
    args, _ = parse_args(argv)
    run = common.Run("peeraid", args, args.arch)
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    num_classes = common.DATASETS[args.dataset]

    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.prepare_student(build(args.arch, num_classes), args, device)
    peer = common.prepare_student(build(args.peer_arch, num_classes), args, device)
    with torch.random.fork_rng(devices=[]):  # no draw from the run's generator: --no-swa trains the same two models
        swa = common.prepare_model(build(args.arch, num_classes), args, device) if args.swa else None
    # D-PEER-2: the code's two SGDs as one with a group per model (SGD updates every parameter on its own)
    optimizer = common.sgd([{"params": list(student.parameters()), "lr": args.lr},
                            {"params": list(peer.parameters()), "lr": args.peer_lr}], args.lr, args.momentum, args.wd)
    attack = MONITORS[args.monitor]
    swa_state = {"swa_n": 0} if args.swa else None  # last.pt's `extra`: the count, and the SWA model once it exists
    start, best = run.begin(student, optimizer, monitor=attack, peer=peer, extra=swa_state)
    if swa_state is not None and "swa" in swa_state:  # resumed after the SWA start
        common.unwrap(swa).load_state_dict(swa_state.pop("swa"))

    for epoch in range(start, args.epochs + 1):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, args)
        optimizer.param_groups[1]["lr"] = lr_at(epoch, args, args.peer_lr)
        student.train()
        peer.train()
        totals, n_seen = {}, 0
        with common.EpochTimer(device) as timer:
            for x_nat, y in run.batches(train_data, epoch):
                common.broadcast_buffers(student, peer)  # torchrun: rank 0's BatchNorm statistics, as nn.DataParallel
                terms = train_step(student, peer, optimizer, x_nat, y, args)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v.detach() * len(y)
                n_seen += len(y)
            if args.swa and epoch > args.swa_start:  # D-PEER-4: swa_s_start counts from 0, so "epoch >= S" there
                swa_average(swa, student, swa_state["swa_n"])
                swa_state["swa_n"] += 1
                bn_update(swa, train_data.epoch(-epoch), args)  # D-PEER-3: a fresh draw of the augmented set
                common.broadcast_buffers(swa)
        swa_on = args.swa and swa_state["swa_n"] > 0
        metrics = run.train_metrics(epoch, totals, n_seen, optimizer, student, peer, *([swa] if swa_on else []))
        metrics["peer_lr"] = optimizer.param_groups[1]["lr"]
        if swa_on:
            metrics["swa_n"] = swa_state["swa_n"]
        if common.is_monitor_epoch(args, epoch):
            m = common.monitor(student, test_data, attack, tf32=args.monitor_tf32)
            metrics.update(test_clean=m["clean"], test_robust=m["robust"], test_classes=m["classes"],
                           monitor_seconds=round(m["seconds"], 2))
            metrics["peer_clean"] = common.monitor(peer, test_data, None)["clean"]
            if swa_on:  # D-PEER-1: from the first SWA epoch, best.pt follows the SWA student's own PGD-10
                s = common.monitor(swa, test_data, attack, tf32=args.monitor_tf32)
                metrics.update(swa_clean=s["clean"], swa_robust=s["robust"])
                # the comparison restarts at the first SWA epoch; after it, strictly greater
                if best.get("name") != SWA_NAME or s["robust"] > best["value"]:
                    best = {"epoch": epoch, "value": s["robust"], "name": SWA_NAME}
            elif best["value"] is None or m["robust"] > best["value"]:  # strictly greater: a tie keeps the earlier epoch
                best = {"epoch": epoch, "value": m["robust"]}
        record = run.log_epoch(epoch, metrics, best, seconds=timer.seconds)
        if best["epoch"] == epoch:  # best.pt before last.pt: a failed write never leaves last.pt ahead of best.pt
            run.save_best(swa if best.get("name") == SWA_NAME else student, record, best, peer=peer)
        extra = swa_state if not swa_on else {**swa_state, "swa": {k: v.detach().cpu() for k, v in
                                                                    common.unwrap(swa).state_dict().items()}}
        run.save_last(student, optimizer, record, best, extra=extra, peer=peer)
    common.say(f"reported checkpoint (D-PEER-1): {run.dir / 'best.pt'} ({best.get('name') or args.monitor}, epoch "
               f"{best['epoch']}); evaluate it with python eval_attacks.py {run.dir / 'best.pt'} --preset peeraid")


if __name__ == "__main__":
    main()
