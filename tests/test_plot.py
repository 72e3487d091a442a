"""tools/plot.py: PNGs of the expected size from a smoke run's metrics.jsonl (several runs on one figure)
and from eval JSONs; a one-line error when matplotlib, an optional extra, is missing."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def png_size(path):
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def plot(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cifar_dir):
    """A two-epoch SAT teacher run on the fixture data, and its best.pt evaluated with an eps sweep."""
    tmp = tmp_path_factory.mktemp("plot")
    proc = subprocess.run([sys.executable, str(ROOT / "train_teacher.py"), "--recipe", "sat-iad", "--arch", "cnn_small",
                           "--epochs", "2", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
                           "--data-dir", str(cifar_dir), "--device", "cpu", "--runs-dir", str(tmp / "runs")],
                          capture_output=True, text=True, timeout=300, cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp / "runs").iterdir()
    proc = subprocess.run([sys.executable, str(ROOT / "eval_attacks.py"), str(run / "best.pt"), "--preset", "iad",
                           "--attacks", "fgsm_rand,pgd20", "--aa", "off", "--n-ex", "20", "--bs", "20", "--eps-sweep",
                           "2/255,8/255,16/255", "--data-dir", str(cifar_dir), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, run, run / "best_eval_iad.json"


def test_plot_writes_pngs_of_the_expected_size(smoke_run, tmp_path):
    pytest.importorskip("matplotlib")
    tmp, run, result = smoke_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and {"loss", "lr", "images_per_s", "test_clean"} <= set(records[0])
    # a second run on the same figure, with its own loss terms, a teacher line and last.pt reported
    other = tmp_path / "adt_aodt__cifar10__cnn_small__s1__x"
    other.mkdir()
    lines = [{"epoch": 0, "teacher/clean": 0.5, "teacher/robust": 0.1}]
    lines += [{"epoch": e, "lr": 0.1, "loss": 2.0 / e, "mse": 1.0 / e, "test_clean": 0.1 * e, "test_robust": 0.05 * e,
               "seconds": 1.0, "images_per_s": 100.0 + e, "best_epoch": 1, "best_value": 0.05} for e in (1, 2, 3)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (other / "args.json").write_text(json.dumps({"script": "adt_aodt", "report": "last"}))
    out = tmp_path / "figures"
    proc = plot(run, other / "metrics.jsonl", result, "--out", out, "--dpi", "50", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eps_curve.png", "per_class.png", "training.png"]
    # panels: loss, mse, accuracy, lr, images/s -> 3 columns x 2 rows of 4 x 3 inches at 50 dpi
    assert png_size(out / "training.png") == (3 * 4 * 50, 2 * 3 * 50)
    assert png_size(out / "eps_curve.png") == (6 * 50, int(4.5 * 50))
    assert png_size(out / "per_class.png") == (8 * 50, 3 * 50)  # one eval, 10 classes: 8 x 3 inches
    assert all((out / n).stat().st_size > 5000 for n in ("training.png", "eps_curve.png", "per_class.png"))


def test_plot_without_matplotlib_says_how_to_install(smoke_run, tmp_path):
    _, run, _ = smoke_run
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['tools/plot.py', {str(run)!r}, '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'tools' / 'plot.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: tools/plot.py needs matplotlib, an optional extra: pip install -r requirements-plot.txt"]
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    for bad in (tmp_path / "x.json", tmp_path / "missing", tmp_path):
        proc = plot(bad, "--out", tmp_path / "o", cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1


def test_training_and_evaluation_scripts_never_import_matplotlib():
    scripts = [p for p in ROOT.glob("*.py")] + [ROOT / "common.py"]
    assert len(scripts) > 4
    assert [p.name for p in scripts if "matplotlib" in p.read_text()] == []
    assert "matplotlib" in (ROOT / "requirements-plot.txt").read_text()
    assert "matplotlib" not in (ROOT / "requirements.txt").read_text()
