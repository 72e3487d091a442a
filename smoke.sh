#!/usr/bin/env bash
# The whole pipeline at smoke scale on a small CNN: a SAT and a natural teacher (train_teacher.py), a
# student of every method distilled from them, an evaluation of each (eval_attacks.py, AutoAttack
# "fast") and the report of our numbers next to the papers' rows (tools/report.py; a small CNN matches
# no published row, so it lists the nearest one). 3 min 55 s on 2 idle cores (time bash smoke.sh
# --data-dir DIR --device cpu, a 3,045-image CIFAR-10 subset). Extra arguments go to every training and
# evaluation script, e.g. --data-dir DIR or --device cpu.
#
#   bash smoke.sh                      # CIFAR-10 downloaded into ./data
#   bash smoke.sh --data-dir DIR       # a folder holding cifar-10-batches-py/
set -euo pipefail
cd "$(dirname "$0")"
out=runs/smoke-$(date +%Y%m%d-%H%M%S)
size=(--arch cnn_small --train-subset 1024 --test-subset 200 --batch-size 128 --lr 0.02)
student=("${size[@]}" --epochs 2 --eval-every 1)

echo "== teachers: SAT (IAD's recipe) and natural training, cnn_small"
python train_teacher.py --recipe sat-iad "${size[@]}" --epochs 3 --runs-dir "$out/sat" "$@"
python train_teacher.py --recipe natural-iad "${size[@]}" --epochs 3 --runs-dir "$out/natural" "$@"
sat=$(ls -d "$out"/sat/*/)best.pt
nat=$(ls -d "$out"/natural/*/)best.pt

echo "== students"
python rslad.py --teacher "$sat" "${student[@]}" --runs-dir "$out/rslad" "$@"
python ard.py --teacher "$sat" "${student[@]}" --runs-dir "$out/ard" "$@"
python iad.py --variant iad2 --teacher "$sat" --nat-teacher "$nat" --begin 1 "${student[@]}" --runs-dir "$out/iad" "$@"
python mtard.py --teacher "$sat" --nat-teacher "$nat" "${student[@]}" --runs-dir "$out/mtard" "$@"
python ardir.py --teacher "$sat" --ir-layers layer1,layer2,layer3 "${student[@]}" --runs-dir "$out/ardir" "$@"
python adt_aodt.py --method adt --teacher "cnn_small:$nat" "${student[@]}" --runs-dir "$out/adt" "$@"
python adaad.py --teacher "$sat" "${student[@]}" --runs-dir "$out/adaad" "$@"
# AODT and PeerAiD train both of their models from scratch, without a teacher: 6 epochs instead of 2
python adt_aodt.py --method aodt --peer-arch cnn_small "${student[@]}" --epochs 6 --runs-dir "$out/aodt" "$@"
python peeraid.py --peer-arch cnn_small --peer-lr 0.02 "${student[@]}" --epochs 6 --lr-milestones 4 5 --runs-dir "$out/peeraid" "$@"

echo "== evaluation (clean, FGSM, PGD, CW-inf, AutoAttack fast) on 200 test images"
preset() { case $1 in iad) echo iad;; ardir) echo ardir;; adt|aodt) echo adt;; adaad) echo adaad;; peeraid) echo peeraid;; *) echo rslad;; esac; }
for run in rslad ard iad mtard ardir adaad adt aodt peeraid; do
    ckpt=best.pt; [ "$(preset $run)" = adt ] && ckpt=last.pt  # ADT/AODT report last.pt (D-ADT-8)
    python eval_attacks.py "$out"/$run/*/$ckpt --preset "$(preset $run)" --n-ex 200 --aa fast --quiet "$@"
done

echo "== report"
python tools/report.py "$out"/*/*/*_eval_*.json
echo "smoke run complete: $out"
