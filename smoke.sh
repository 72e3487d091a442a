#!/usr/bin/env bash
# The whole pipeline at smoke scale on a small CNN: a SAT teacher (train_teacher.py), an RSLAD and an
# ARD student distilled from it, and an evaluation of each (eval_attacks.py, AutoAttack "fast").
# Minutes on a CPU. Extra arguments go to every script, e.g. --data-dir DIR (a folder in the standard
# cifar-10-batches-py layout; default ./data, downloaded there when possible) or --device cpu.
#
#   bash smoke.sh                      # CIFAR-10 downloaded into ./data
#   bash smoke.sh --data-dir DIR       # a folder holding cifar-10-batches-py/
set -euo pipefail
cd "$(dirname "$0")"
out=runs/smoke-$(date +%Y%m%d-%H%M%S)
size=(--arch cnn_small --train-subset 1024 --test-subset 200 --batch-size 128)

echo "== 1/4 teacher: SAT (IAD's recipe) on cnn_small"
python train_teacher.py --recipe sat-iad "${size[@]}" --epochs 3 --lr 0.02 --runs-dir "$out/teacher" "$@"
teacher=$(ls -d "$out"/teacher/*/)best.pt

echo "== 2/4 student: RSLAD"
python rslad.py --teacher "$teacher" "${size[@]}" --epochs 2 --eval-every 1 --lr 0.02 --runs-dir "$out/rslad" "$@"
echo "== 3/4 student: ARD"
python ard.py --teacher "$teacher" "${size[@]}" --epochs 2 --lr 0.02 --runs-dir "$out/ard" "$@"

echo "== 4/4 evaluation (clean, FGSM, PGD_SAT, PGD_TRADES, CW-inf, AutoAttack fast) on 200 test images"
for student in "$out"/rslad/*/best.pt "$out"/ard/*/best.pt; do
    python eval_attacks.py "$student" --n-ex 200 --aa fast --quiet "$@"
done
echo "smoke run complete: $out"
