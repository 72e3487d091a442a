"""Run the official AutoAttack (pyautoattack 0.2.0, test-only dependency) on the points, seed and batch
size of an eval_attacks.py JSON, and compare the per-point robust flags and the wall time.

    python eval_attacks.py CKPT --json ours.json [--n-ex N]
    python tools/aa_vs_official.py CKPT ours.json --data-dir DIR
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("ours", help="the JSON eval_attacks.py wrote (AutoAttack standard)")
    p.add_argument("--data-dir", default="./data")
    args = p.parse_args()
    from pyautoattack import AutoAttack

    ours = json.loads(Path(args.ours).read_text())
    aa = ours["attacks"]["autoattack"]
    model, _ = common.load_model(args.checkpoint, arch=ours["arch"], norm=None if ours["norm"] is None else
                                 (tuple(ours["norm"]["mean"]), tuple(ours["norm"]["std"])))
    model = common.freeze(model)  # eval(), frozen parameters: as eval_attacks.py
    x, y = common.load_split(ours["dataset"], args.data_dir, train=False, subset=ours["n_ex"], download=False)
    x = x.float() / 255
    logging.basicConfig(level=logging.DEBUG, format="%(message)s", stream=sys.stdout)
    adversary = AutoAttack(model, norm="Linf", eps=ours["eps"], version="standard", seed=aa["seed"], device="cpu")
    start = time.perf_counter()
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=aa["bs"])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        official = model(x_adv).argmax(1) == y
    mine = torch.tensor(aa["robust_flags"], dtype=torch.bool)
    print(f"official AutoAttack: robust {official.float().mean().item():.4%} in {seconds:.1f} s")
    print(f"eval_attacks.py:     robust {aa['acc']:.4%} in {aa['seconds']['total']:.1f} s")
    print(f"per-point robust flags equal: {torch.equal(official, mine)} ({int((official != mine).sum())} differ)")


if __name__ == "__main__":
    main()
