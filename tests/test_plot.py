"""tools/plot.py: PNGs of the expected size from a smoke run's metrics.jsonl (several runs on one figure)
and from eval JSONs; a one-line error when matplotlib, an optional extra, is missing. On run folders written
here: each run is labelled by the flag that tells it apart, a second model's accuracy has a line style of its
own, epoch axes have integer ticks, and every panel with more than one curve has a legible legend."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


# ---------------------------------------------------------------------------------------------
# Labels, line styles, ticks and legends, on run folders and eval JSONs written here (no training)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool():
    """tools/plot.py as a module, and pyplot."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("plot_tool", ROOT / "tools" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.pyplot()


FIGURE = SimpleNamespace(dpi=50, panel_size=(4.0, 3.0))


def teacher_args(time, **flags):
    """args.json of a train_teacher run; the bookkeeping (paths, environment, data hashes) differs every time."""
    return {"script": "train_teacher", "recipe": "sat-iad", "arch": "cnn_small", "epochs": 3, "lr": 0.05,
            "eps": 8 / 255, "seed": 1, "data_dir": f"/data/{time}", "runs_dir": f"/runs/{time}", "resume": None,
            "data_sha256": {"train": time}, "env": {"date": time}, **flags}


def write_run(root, args, records):
    time = args["env"]["date"]
    folder = root / f"{args['script']}__cifar10__cnn_small__s1__{time}"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def epochs(n=3, **per_epoch):
    """metrics.jsonl lines of epochs 1..n; a keyword gives each epoch's value as a function of the epoch."""
    return [{"epoch": e, "lr": 0.05, "loss": 2.0 / e, "train_acc": 0.2 * e, "test_clean": 0.1 * e,
             "test_robust": 0.05 * e, "seconds": 1.0, "images_per_s": 100.0 + e, "best_epoch": e,
             "best_value": 0.05 * e,
             **{k: f(e) for k, f in per_epoch.items()}} for e in range(1, n + 1)]


def write_eval(run, kind="best"):
    """A minimal eval_attacks.py JSON of run/<kind>.pt: its training record, an eps sweep, per-class accuracy."""
    args = json.loads((run / "args.json").read_text())
    per_class = {k: {"acc": [0.1 * c for c in range(10)]} for k in ("clean", "pgd_sat", "aa_fast")}
    result = {"schema": "suite-eval/1", "checkpoint": str(run / f"{kind}.pt"), "preset": "rslad", "eps": 8 / 255,
              "eps_str": "8/255", "n_ex": 64, "overrides": {"aa": "fast"}, "clean": {"acc": 0.5},
              "training": {"script": args["script"], "kind": kind,
                           "args": {k: v for k, v in args.items() if k != "env"}},
              "per_class": per_class, "eps_sweep": {"attack": "pgd_sat", "points": [
                  {"eps": k / 255, "acc": 0.5 - 0.02 * k} for k in (2, 8, 16)]}}
    path = run / f"{kind}_eval_rslad.json"
    path.write_text(json.dumps(result))
    return path


def read(module, paths):
    items = [module.read_input(p)[1] for p in paths]
    module.label_items(items)
    return items


def test_runs_are_labelled_by_the_flags_that_tell_them_apart(tool, tmp_path):
    module, _ = tool
    a = write_run(tmp_path, teacher_args("20260101-000000"), epochs())
    b = write_run(tmp_path, teacher_args("20260101-000001", lr=0.02), epochs())
    assert [r["name"] for r in read(module, [a, b])] == ["lr 0.05", "lr 0.02"]
    assert [e["name"] for e in read(module, [write_eval(a), write_eval(b)])] == ["lr 0.05, best.pt", "lr 0.02, best.pt"]
    # IAD's variant comes first and alone: what tells the runs apart is the method, not the flags it sets
    i1 = write_run(tmp_path, {**teacher_args("20260101-000002"), "script": "iad", "variant": "iad1"}, epochs())
    i2 = write_run(tmp_path, {**teacher_args("20260101-000003", lr=0.02), "script": "iad", "variant": "iad2"}, epochs())
    assert [r["name"] for r in read(module, [i2, i1])] == ["variant iad2", "variant iad1"]
    # a radius reads as a fraction of 255; two flags that differ are both named
    e16 = write_run(tmp_path, teacher_args("20260101-000004", eps=16 / 255, seed=2), epochs())
    assert [r["name"] for r in read(module, [a, e16])] == ["eps 8/255 seed 1", "eps 16/255 seed 2"]
    # nothing in args.json differs (only paths and the environment): the folders' names
    same = write_run(tmp_path, teacher_args("20260101-000005"), epochs())
    assert [r["name"] for r in read(module, [a, same])] == [a.name, same.name]
    # three runs, two of them alike: the label, then the folder's name
    assert [r["name"] for r in read(module, [a, b, same])] == [f"lr 0.05 ({a.name})", "lr 0.02",
                                                                f"lr 0.05 ({same.name})"]
    # different scripts: the script and its method, recipe or variant
    aodt = write_run(tmp_path, {"script": "adt_aodt", "method": "aodt", "report": "last", "lr": 0.05,
                                "env": {"date": "20260101-000006"}}, epochs())
    assert [r["name"] for r in read(module, [a, aodt])] == ["train_teacher recipe sat-iad", "adt_aodt method aodt"]


def dash(line):
    """A line's style; matplotlib has no public getter for the dash pattern that a tuple style sets."""
    return line.get_linestyle(), getattr(line, "_unscaled_dash_pattern", None), line.get_marker()


def legends(fig):
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def assert_legible_legends(fig):
    """Every panel with more than one curve (or set of bars) has each of them named in a legend; every legend
    is at least 8 pt and lies inside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t.get_text() for leg in legends(fig) for t in leg.get_texts()]
    for leg in legends(fig):
        assert min(t.get_fontsize() for t in leg.get_texts()) >= 8
        box = leg.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1, box
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        curves = [c for c in [*ax.get_lines(), *ax.containers] if not c.get_label().startswith("_")]
        for c in curves if len(curves) > 1 else []:  # the runs, by colour
            assert c.get_label() in texts, (ax.get_title(), c.get_label(), texts)
        keys = {c.get_gid() for c in curves if getattr(c, "get_gid", lambda: None)()}
        for key in keys if len(keys) > 1 else []:  # the keys sharing a panel, by line style
            assert any(t.startswith(key) for t in texts), (ax.get_title(), key, texts)
    return texts


def test_peer_curves_integer_epochs_and_a_legend_for_every_panel(tool, tmp_path):
    module, plt = tool
    a = write_run(tmp_path, teacher_args("20260101-000000"), epochs())
    b = write_run(tmp_path, teacher_args("20260101-000001", lr=0.02), epochs())
    aodt = write_run(tmp_path, {"script": "adt_aodt", "method": "aodt", "report": "last", "lr": 0.05,
                                "env": {"date": "20260101-000002"}},
                     [{"epoch": 0, "teacher/clean": 0.5}]
                     + epochs(mse=lambda e: 1.0 / e, peer_clean=lambda e: 0.3 + 0.1 * e))
    runs = read(module, [a, b, aodt])
    fig = module.training_figure(plt, runs, FIGURE)
    try:
        acc = next(ax for ax in fig.axes if ax.get_title() == "accuracy (%)")
        curve = {(line.get_label(), line.get_gid()): line for line in acc.get_lines() if line.get_gid()}
        peer, student = curve[("adt_aodt method aodt", "peer_clean")], curve[("adt_aodt method aodt", "test_clean")]
        assert list(peer.get_ydata()) == pytest.approx([40, 50, 60])
        assert dash(peer) != dash(student)  # both are clean accuracy: the style tells the models apart
        texts = assert_legible_legends(fig)
        assert {"peer_clean (peer model)", "test_clean", "teacher, epoch 0"} <= set(texts)
        for ax in fig.axes:
            if ax.get_visible():
                assert ax.get_xticks().size and all(float(t).is_integer() for t in ax.get_xticks()), ax.get_title()
    finally:
        plt.close(fig)
    evals = read(module, [write_eval(a), write_eval(b), write_eval(aodt, "last")])
    for figure in (module.eps_figure, module.per_class_figure):
        fig = figure(plt, evals, FIGURE)
        try:
            assert_legible_legends(fig)
        finally:
            plt.close(fig)


def test_legends_stay_inside_the_panels_without_outside_placement(tool, tmp_path, monkeypatch):
    """matplotlib < 3.7 has no "outside" legend location; the legends then go inside a panel."""
    module, plt = tool
    from matplotlib.figure import Figure
    legend = Figure.legend

    def old_legend(self, *args, loc=None, **kwargs):
        if str(loc).startswith("outside"):
            raise ValueError(f"{loc!r} is not a valid value for loc")
        return legend(self, *args, loc=loc, **kwargs)

    monkeypatch.setattr(Figure, "legend", old_legend)
    a = write_run(tmp_path, teacher_args("20260101-000000"), epochs())
    b = write_run(tmp_path, teacher_args("20260101-000001", lr=0.02), epochs())
    fig = module.training_figure(plt, read(module, [a, b]), FIGURE)
    try:
        assert not fig.legends and {"lr 0.05", "lr 0.02", "test_robust"} <= set(assert_legible_legends(fig))
    finally:
        plt.close(fig)
