"""What a newcomer meets: the progress lines, --help, the order of errors, the numbers in the JSON."""

import json
import re
import time

from conftest import ROOT, run_script

import common

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "1", "--device", "cpu"]


def test_progress_lines_name_their_seconds_and_say_the_selection_caveat_once(cifar_dir, teacher_ckpt, tmp_path,
                                                                          capsys, monkeypatch):
    """The teacher's measurement (here made slow) is not part of epoch 1's time, so the ETA after epoch 1 of 3
    is two epochs, not two epochs plus the measurement; each epoch line comes before its best.pt line; the
    test-set selection caveat is said once per run."""
    import rslad
    measure = common.measure_teacher
    monkeypatch.setattr(common, "measure_teacher", lambda *a, **k: (time.sleep(3), measure(*a, **k))[1])
    rslad.main(["--teacher", str(teacher_ckpt), *TINY, "--epochs", "3", "--eval-every", "1", "--lr", "0.05",
                "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    epochs = [i for i, ln in enumerate(out) if ln.startswith("epoch ")]
    first = out[epochs[0]]
    assert re.search(r"train \d+\.\ds \+ monitor \d+\.\ds  run ETA 0:00:0\d$", first), first  # not 0:00:06 or more
    best = [i for i, ln in enumerate(out) if ln.startswith("  best.pt <- epoch")]
    assert best and all(out[i - 1].startswith("epoch ") for i in best)  # after the line of its epoch
    assert sum("selected on the test set" in ln for ln in out) == 1 and "selected on the test set" in out[best[0]]


def test_help_shows_every_default_and_works_everywhere(tmp_path):
    proc = run_script(ROOT / "rslad.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and re.search(r"--seed SEED\s+seed of torch, numpy and random \(default: 0\)",
                                              proc.stdout), proc.stdout
    proc = run_script(ROOT / "tools" / "bench_train.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "Time K training steps" in proc.stdout, proc.stderr
    proc = run_script(ROOT / "train_teacher.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "  sat-iad: arch resnet18, epochs 200, batch-size 128, lr 0.1, wd 0.0002, lr-milestones 99,149, " \
           "eps 8/255, attack-step 2/255" in proc.stdout
    proc = run_script(ROOT / "eval_attacks.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "(§ numbers below: docs/eval_attacks.md)" in proc.stdout


def test_a_missing_teacher_is_named_before_any_download(teacher_ckpt, tmp_path):
    """`rslad.py --teacher nope.pt` without data reported the failed CIFAR-10 download and left an empty ./data."""
    proc = run_script(ROOT / "rslad.py", "--teacher", "nope.pt", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == f"error: checkpoint not found: {tmp_path / 'nope.pt'}\n"
    assert not any(tmp_path.iterdir())
    proc = run_script(ROOT / "rslad.py", "--teacher", teacher_ckpt, "--arch", "cnn_small", cwd=tmp_path)
    assert proc.returncode == 2 and "download failed" in proc.stderr
    assert not (tmp_path / "data").exists()  # the folder the failed download made is gone


def test_eval_json_accuracies_have_no_float32_digits(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "eval_attacks.py", teacher_ckpt, "--data-dir", cifar_dir, "--n-ex", "40", "--attacks",
                      "fgsm", "--aa", "off", "--device", "cpu", "--json", tmp_path / "e.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "e.json").read_text())
    for acc in (out["clean"]["acc"], out["attacks"]["fgsm"]["acc"]):
        assert acc * 40 == round(acc * 40) and len(repr(acc)) <= 6, acc  # k/40, printed short: 0.775, not 0.77499997
    assert "acc&clean: points both clean-correct and robust" in proc.stdout
