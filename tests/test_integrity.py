"""No silent wrong result: data, checkpoints and runs checked where they enter, files others can read. Each
case is typed as a user types it; the checks are the exit status, the one line, and that nothing was written."""

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, write_cifar10

import common

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "1", "--epochs", "1", "--device", "cpu"]


def one_line_error(proc, *words):
    """Exit status 2 and a single 'error: ...' line on stderr that contains every word."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def cut_labels(folder, name, n):
    """Drop the last n labels (not images) of one CIFAR-10 file."""
    path = folder / "cifar-10-batches-py" / name
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    entry[b"labels"] = entry[b"labels"][:-n]
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


def set_label(folder, name, index, label):
    path = folder / "cifar-10-batches-py" / name
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    entry[b"labels"][index] = label
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


# --------------------------------------------------------------------------------------------------
# 1-2. Data: labels shifted against images, labels out of range
# --------------------------------------------------------------------------------------------------

def test_labels_cut_from_a_batch_file_stop_training_and_evaluation(tmp_path, teacher_ckpt):
    """7 labels cut from data_batch_1: the images and labels were joined separately, so every later label
    was shifted against its image and ard.py trained on it without a word (eval_attacks.py likewise)."""
    data = write_cifar10(tmp_path / "data")
    cut_labels(data, "data_batch_1", 7)
    proc = run_script(ROOT / "ard.py", "--teacher", teacher_ckpt, *TINY, "--train-subset", "100000",
                      "--data-dir", data, "--runs-dir", tmp_path / "runs", cwd=tmp_path)
    one_line_error(proc, "data_batch_1", "64 images but 57 labels")
    assert not (tmp_path / "runs").exists()
    cut_labels(data, "test_batch", 3)
    proc = run_script(ROOT / "eval_attacks.py", teacher_ckpt, "--data-dir", data, "--n-ex", "64", "--device", "cpu",
                      "--json", tmp_path / "e.json", cwd=tmp_path)
    one_line_error(proc, "test_batch", "128 images but 125 labels")
    assert not (tmp_path / "e.json").exists()


def test_a_label_37_in_cifar10_stops_before_anything_is_written(tmp_path, teacher_ckpt):
    """rslad.py never reads labels in its loss: it trained silently; the others ended in an IndexError
    traceback after the run folder existed."""
    data = write_cifar10(tmp_path / "data")
    set_label(data, "data_batch_2", 5, 37)
    for script in ("rslad.py", "mtard.py"):
        teachers = (["--teacher", teacher_ckpt, "--nat-teacher", teacher_ckpt] if script == "mtard.py"
                    else ["--teacher", teacher_ckpt])
        proc = run_script(ROOT / script, *teachers, *TINY, "--train-subset", "200", "--data-dir", data,
                          "--runs-dir", tmp_path / "runs", cwd=tmp_path)
        one_line_error(proc, "data_batch_2", "label 37 at index 5", "0..9")
    assert not (tmp_path / "runs").exists()


def test_svhn_labels_outside_1_to_10_are_refused(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    from conftest import synthetic_images
    x, y = synthetic_images(20, 10, 0)
    labels = np.where(y == 0, 10, y)
    labels[3] = 11
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": np.transpose(x, (2, 3, 1, 0)), "y": labels[:, None]})
    with pytest.raises(SystemExit) as e:
        common.load_split("svhn", tmp_path, train=False, download=False)
    assert e.value.code == 2


def test_a_subset_larger_than_the_split_says_so(cifar_dir, capsys):
    x, _ = common.load_split("cifar10", cifar_dir, train=True, subset=100000, download=False)
    assert len(x) == 320
    assert "the first 100000 images were asked for" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 3. A checkpoint with a NaN weight
# --------------------------------------------------------------------------------------------------

def test_a_nan_weight_is_refused_as_teacher_and_in_evaluation(tmp_path, cifar_dir):
    torch.manual_seed(0)
    model = common.build_model("cnn_small")
    with torch.no_grad():
        model.layer2[0].weight[0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    common.save_checkpoint(bad, common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar10", args={}))
    proc = run_script(ROOT / "eval_attacks.py", bad, "--data-dir", cifar_dir, "--n-ex", "8", "--device", "cpu",
                      cwd=tmp_path)
    one_line_error(proc, "nan.pt", "layer2.0.weight holds NaN")
    assert not list(tmp_path.glob("*.json"))
    proc = run_script(ROOT / "rslad.py", "--teacher", bad, *TINY, "--data-dir", cifar_dir, "--runs-dir",
                      tmp_path / "runs", cwd=tmp_path)
    one_line_error(proc, "layer2.0.weight holds NaN")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# 4. --eps 8/255/2
# --------------------------------------------------------------------------------------------------

def test_eps_with_two_slashes_is_refused(tmp_path, teacher_ckpt):
    proc = run_script(ROOT / "ard.py", "--teacher", teacher_ckpt, "--eps", "8/255/2", "--runs-dir", tmp_path / "runs",
                      cwd=tmp_path)
    one_line_error(proc, "--eps", "'8/255/2'", "one fraction a/b")
    assert common.parse_float("8/255") == 8 / 255 and common.parse_float("0.5/255") == 0.5 / 255
    assert common.parse_float("2e-4") == 2e-4


# --------------------------------------------------------------------------------------------------
# 5. The suite's record against the request: data set, normalisation
# --------------------------------------------------------------------------------------------------

def test_a_cifar10_teacher_is_refused_for_svhn_unless_insisted(tmp_path, teacher_ckpt, svhn_dir):
    argv = ["--teacher", teacher_ckpt, *TINY, "--dataset", "svhn", "--train-subset", "32", "--test-subset", "16",
            "--data-dir", svhn_dir, "--runs-dir", tmp_path / "runs"]
    proc = run_script(ROOT / "rslad.py", *argv, cwd=tmp_path)
    one_line_error(proc, "trained on cifar10, not svhn", "--override-record")
    assert not (tmp_path / "runs").exists()
    proc = run_script(ROOT / "rslad.py", *argv, "--override-record", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_eval_refuses_another_data_set_or_normalisation_than_the_record(tmp_path, teacher_ckpt, svhn_dir, cifar_dir):
    proc = run_script(ROOT / "eval_attacks.py", teacher_ckpt, "--dataset", "svhn", "--data-dir", svhn_dir,
                      "--device", "cpu", cwd=tmp_path)
    one_line_error(proc, "trained on cifar10, not svhn")
    proc = run_script(ROOT / "eval_attacks.py", teacher_ckpt, "--norm", "cifar10", "--data-dir", cifar_dir,
                      "--device", "cpu", cwd=tmp_path)
    one_line_error(proc, "records the normalisation none, not cifar10", "drop --norm")
    assert not list(tmp_path.rglob("*.json"))


def test_a_file_that_does_not_record_its_data_set_is_named_in_one_warning(tmp_path, cifar_dir):
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(common.build_model("cnn_small").state_dict(), path)
    proc = run_script(ROOT / "eval_attacks.py", path, "--arch", "cnn_small", "--data-dir", cifar_dir, "--n-ex", "8",
                      "--attacks", "fgsm", "--aa", "off", "--device", "cpu", "--json", tmp_path / "e.json",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "does not record its data set" in ln]
    assert len(warnings) == 1 and "taken as a cifar10 model with normalisation none" in warnings[0]


# --------------------------------------------------------------------------------------------------
# 6-7. Runs others, and later runs, can use: file modes, absolute paths, the data's fingerprint
# --------------------------------------------------------------------------------------------------

def test_run_files_get_the_umask_mode_and_resume_from_another_folder(tmp_path, cifar_dir, teacher_ckpt):
    """With a umask of 022 every file of a run is 0644 (mkstemp made them 0600: nobody else in a lab could
    read them), after a resume too; relative --teacher and --data-dir are stored absolute, so
    `--resume runs/<run>/last.pt` alone works from another folder; other data under the same path is refused."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(teacher_ckpt, work / "teacher.pt")
    shutil.copytree(cifar_dir, work / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*argv, cwd):
        return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                              timeout=600, env=env, preexec_fn=lambda: os.umask(0o022))

    proc = run(ROOT / "rslad.py", "--teacher", "teacher.pt", "--data-dir", "data", *TINY, "--runs-dir", "runs",
               "--eval-every", "1", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (work / "runs").iterdir()
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["teacher"] == str(work / "teacher.pt") and saved["data_dir"] == str(work / "data")
    assert set(saved["data_sha256"]) == {"train", "test"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run(ROOT / "rslad.py", "--resume", run_dir / "last.pt", "--epochs", "2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" in proc.stdout and not (elsewhere / "data").exists()
    for name in ("args.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name
    shutil.rmtree(work / "data")
    write_cifar10(work / "data", seed=5)  # other images under the same path
    proc = run(ROOT / "rslad.py", "--resume", run_dir / "last.pt", "--epochs", "3", cwd=elsewhere)
    one_line_error(proc, "train data in", "is not the data the run started with")
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2  # nothing lost


def test_an_unreadable_checkpoint_message(tmp_path, monkeypatch, capsys):
    """As another user meets a 0600 file: 'Permission denied', not 'corrupt or truncated'."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    path = tmp_path / "t.pt"
    path.write_bytes(b"x")
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(SystemExit) as e:
        common.load_checkpoint(path)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: cannot read {path}: Permission denied\n"


# --------------------------------------------------------------------------------------------------
# 8-9. One line instead of a traceback, and the smaller cases
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, argv, words", [
    ("rslad", ["--seed", "-1"], ["--seed must be an integer in [0,"]),
    ("rslad", ["--seed", "4294967296"], ["--seed must be an integer in [0,"]),
    ("rslad", ["--lr", "1e300"], ["--lr must be a positive number below 3.4e38"]),
    ("rslad", ["--epoch", "2"], ["unrecognized arguments: --epoch 2"]),
    ("rslad", ["--teacher", ""], ["--teacher is empty"]),
    ("iad", ["--variant", "iad2", "--nat-teacher", ""], ["--nat-teacher is empty"]),
    ("mtard", ["--anl-beta", "-1"], ["--anl-beta must be in (0, 10]"]),
    ("mtard", ["--anl-beta", "1000"], ["--anl-beta must be in (0, 10]"]),
])
def test_bad_values_are_one_line(script, argv, words, tmp_path, teacher_ckpt, capsys):
    import importlib
    module = importlib.import_module(script)
    teachers = {"rslad": ["--teacher", str(teacher_ckpt)], "iad": ["--teacher", str(teacher_ckpt)],
                "mtard": ["--teacher", str(teacher_ckpt), "--nat-teacher", str(teacher_ckpt)]}[script]
    with pytest.raises(SystemExit) as e:
        module.main([*teachers, *argv, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device, words", [("banana", "--device banana is not a device"),
                                           ("cuda:7", "--device cuda:7")])
def test_a_bad_device_is_one_line(device, words, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_device(device)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [(["bogus"], "invalid choice: 'bogus'"), (["rslad", "--steps", "0"], "--steps"),
                                         (["rslad", "--steps", "-1"], "--steps")])
def test_bench_train_bad_arguments_are_one_line(argv, words, tmp_path):
    proc = run_script(ROOT / "tools" / "bench_train.py", *argv, cwd=tmp_path)
    one_line_error(proc, words)


def test_runs_dir_that_is_a_file_and_teacher_with_a_bad_norm(tmp_path, teacher_ckpt, cifar_dir, capsys):
    import adt_aodt
    import rslad
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        rslad.main(["--teacher", str(teacher_ckpt), *TINY, "--data-dir", str(cifar_dir),
                    "--runs-dir", str(tmp_path / "afile")])
    assert "it is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        adt_aodt.main(["--method", "adt", "--teacher", f"cnn_small:{teacher_ckpt}:bogus", *TINY,
                       "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path / "runs")])
    assert "'bogus' is not a normalisation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        adt_aodt.main(["--method", "adt", "--teacher", f"resnet18:{teacher_ckpt}", *TINY,
                       "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path / "runs")])
    assert "pass --teacher cnn_small:CKPT" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resuming_a_finished_run_records_no_resume(tmp_path, cifar_dir, teacher_ckpt):
    import rslad
    rslad.main(["--teacher", str(teacher_ckpt), *TINY, "--data-dir", str(cifar_dir), "--runs-dir", str(tmp_path)])
    (run_dir,) = tmp_path.iterdir()
    before = (run_dir / "args.json").read_text()
    rslad.main(["--resume", str(run_dir / "last.pt")])
    assert (run_dir / "args.json").read_text() == before


def test_a_guessed_architecture_that_does_not_fit_asks_for_the_flag(tmp_path, capsys):
    path = tmp_path / "module.pt"
    torch.save(common.build_model("cnn_small"), path)  # a whole pickled module: --unsafe-load, no arch recorded
    with pytest.raises(SystemExit):
        common.load_model(path, unsafe=True, default_arch="wrn34_10", arch_flag="--teacher-arch")
    err = capsys.readouterr().err
    assert "its keys do not fit the default wrn34_10; pass --teacher-arch" in err


def test_an_eval_json_that_cannot_be_written_goes_to_stdout(tmp_path, cifar_dir, teacher_ckpt, monkeypatch, capsys):
    """A full disk after every attack ran: the results are printed, and the message says where they are."""
    import errno

    import eval_attacks

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.os, "fsync", full)  # the disk fills up after the attacks
    with pytest.raises(SystemExit) as e:
        eval_attacks.main([str(teacher_ckpt), "--data-dir", str(cifar_dir), "--n-ex", "8", "--attacks", "fgsm",
                           "--aa", "off", "--device", "cpu", "--json", str(tmp_path / "e.json"), "--quiet"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "No space left on device" in err and "printed to standard output" in err
    printed = json.loads(out[out.index("{"):])
    assert printed["attacks"]["fgsm"]["acc"] <= printed["clean"]["acc"] and not (tmp_path / "e.json").exists()
