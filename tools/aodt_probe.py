"""Per-step probe of AODT training (adt_aodt.py --method aodt): why the joint objective can slide into a
constant classifier. It runs adt_aodt.py's own attack, loss and SGD step on the training data, step for
step as the script would, and logs per step:

- every loss term (mse, ce_peer, loss);
- the mean L2 norm of the logits of M^r on x' and of the peer M^n on x, and their mean distance;
- how many classes each model predicts in the batch, and how often the two predictions agree;
- the gradient norm each term sends to each model (M^r, peer), computed before the step from the same graph.

    python tools/aodt_probe.py --out probe.jsonl -- --method aodt --arch cnn_small --peer-arch cnn_small \
        --lr 0.02 --data-dir DIR [any adt_aodt.py flag]

Every flag after `--` is adt_aodt.py's (e.g. --detach-peer, --mse-reduction sum-classes); --steps caps the run
(default: all the steps of --epochs). The test-set monitor runs at the end of each epoch (clean accuracy and
classes predicted of both models). One JSON line per step and per epoch end.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import adt_aodt  # noqa: E402
import common  # noqa: E402


def grad_norm(term, params):
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None) or torch.zeros(())))


def probe_step(student, peer, optimizer, x_nat, y, args):
    """adt_aodt.train_step for --method aodt, with the measurements taken from its graph before the update."""
    x_adv = adt_aodt.inner_max(student, x_nat, y, args)
    logits_peer = peer(x_nat).float()
    logits_adv = student(x_adv).float()
    loss, terms = adt_aodt.loss_fn(logits_adv, None, logits_peer, y, args)
    s_params, p_params = list(student.parameters()), list(peer.parameters())
    row = {k: float(v) for k, v in terms.items()}
    for name in [k for k in terms if k != "loss"]:
        row[f"grad/{name}/robust"] = grad_norm(terms[name], s_params)
        row[f"grad/{name}/peer"] = grad_norm(terms[name], p_params)
    pred_r, pred_n = logits_adv.argmax(1), logits_peer.argmax(1)
    row.update({"logit_norm/robust_adv": float(logits_adv.norm(dim=1).mean()),
                "logit_norm/peer_nat": float(logits_peer.norm(dim=1).mean()),
                "logit_dist": float((logits_adv - logits_peer).norm(dim=1).mean()),
                "classes/robust_adv": int(pred_r.unique().numel()), "classes/peer_nat": int(pred_n.unique().numel()),
                "agree": float((pred_r == pred_n).float().mean()),
                "acc/robust_adv": float((pred_r == y).float().mean()), "acc/peer_nat": float((pred_n == y).float().mean())})
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON lines file")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps")
    mine = p.parse_args(ours)
    args, _ = adt_aodt.parse_args(["--method", "aodt", "--device", "cpu", *theirs])
    device = common.setup_device(args)
    common.seed_everything(args.seed)
    n = common.DATASETS[args.dataset]
    train_data = common.train_loader(args, args.batch_size, device=device)
    test_data = common.test_loader(args, device=device)
    student = common.build_model(args.arch, n).to(device)
    peer = common.build_model(args.peer_arch, n, None).to(device)
    optimizer = common.sgd(list(student.parameters()) + list(peer.parameters()), args.lr, args.momentum, args.wd)
    step, start = 0, time.perf_counter()
    with open(mine.out, "w") as out:
        for epoch in range(1, args.epochs + 1):
            for g in optimizer.param_groups:
                g["lr"] = adt_aodt.lr_at(epoch, args)
            student.train(), peer.train()
            for x_nat, y in train_data.epoch(epoch):
                step += 1
                row = probe_step(student, peer, optimizer, x_nat, y, args)
                out.write(json.dumps({"step": step, "epoch": epoch, **row}) + "\n")
                out.flush()
                if mine.steps and step >= mine.steps:
                    break
            m_r = common.monitor(student, test_data, adt_aodt.MONITORS["fgsm20-trades"])
            m_n = common.monitor(peer, test_data, None)
            end = {"epoch_end": epoch, "step": step, "seconds": round(time.perf_counter() - start, 1),
                   "robust_clean": m_r["clean"], "robust_fgsm20": m_r["robust"], "robust_classes": m_r["classes"],
                   "peer_clean": m_n["clean"], "peer_classes": m_n["classes"]}
            out.write(json.dumps(end) + "\n")
            print(json.dumps(end), flush=True)
            if mine.steps and step >= mine.steps:
                break


if __name__ == "__main__":
    main()
