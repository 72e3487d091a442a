"""PNG figures of training runs and evaluations; several runs share one figure.

    python tools/plot.py runs/rslad__* runs/ard__* --out figures/           # training curves
    python tools/plot.py runs/*/best_eval_rslad.json --out figures/        # eps curve and per-class bars

Inputs are run folders (or their metrics.jsonl) and eval_attacks.py JSONs, in any mix. Written to --out:
    training.png   one panel per logged loss term, clean and robust accuracy (train and test; the
                   teachers' epoch-0 accuracies as thin horizontal lines), lr and images/s against epoch,
                   with the selected epoch marked (best.pt's; the last epoch for runs that report last.pt)
    eps_curve.png  robust accuracy against eps, for the JSONs holding an --eps-sweep (clean at eps 0)
    per_class.png  per-class accuracy bars of clean and each attack, one row of panels per JSON
Each panel is --panel-size inches at --dpi, so a figure's size in pixels is known in advance.

Plotting is an optional extra: pip install -r requirements-plot.txt (matplotlib). The training and
evaluation scripts never import it.
"""

import argparse
import json
import math
import sys
from pathlib import Path

SKIP = {"epoch", "seconds", "monitor_seconds", "best_epoch", "best_value", "diverged"}
ACCURACY_SUFFIXES = ("clean", "robust", "wrobust", "acc")
COLUMNS = 3


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, as every script of the suite
        fail(f"{message} (see --help)")


def pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("tools/plot.py needs matplotlib, an optional extra: pip install -r requirements-plot.txt")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def read_input(path):
    """('run', dict) for a run folder or metrics.jsonl, ('eval', dict) for an eval_attacks.py JSON."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if metrics.name == "metrics.jsonl":
        if not metrics.is_file():
            fail(f"{path}: no metrics.jsonl (expected a run folder, a metrics.jsonl or an eval JSON)")
        records = []
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a killed run
                continue
        args_file = metrics.parent / "args.json"
        try:
            run_args = json.loads(args_file.read_text()) if args_file.is_file() else {}
        except ValueError:
            run_args = {}
        return "run", {"name": run_label(metrics.parent.name), "records": records, "args": run_args,
                       "folder": metrics.parent.resolve()}
    try:
        result = json.loads(path.read_text())
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        fail(f"{path} is neither a run folder nor valid JSON ({e})")
    if not isinstance(result, dict) or result.get("schema") != "suite-eval/1":
        fail(f"{path} is not an eval_attacks.py result (no schema suite-eval/1)")
    ckpt = Path(result.get("checkpoint") or path)
    return "eval", {"name": f"{run_label(ckpt.parent.name)}/{ckpt.stem}", "result": result, "folder": ckpt.parent}


def run_label(folder):
    """runs/<script>__<dataset>__<arch>__s<seed>__<time> -> <script> <dataset> <arch> s<seed>."""
    parts = folder.split("__")
    return " ".join(parts[:4]) if len(parts) == 5 else folder


def distinct_names(items):
    """Prefix the parent folder's name to labels that two inputs share (runs of the same second in two places)."""
    names = [item["name"] for item in items]
    for item, name in zip(items, names):
        if names.count(name) > 1:
            item["name"] = f"{item['folder'].parent.name}/{name}"


def selected_epoch(run):
    """(epoch, what) the run reports: best.pt's epoch, or the last epoch for runs that report last.pt."""
    epochs = [r for r in run["records"] if r.get("epoch", 0) > 0]
    if not epochs:
        return None, None
    if run["args"].get("report") == "last":
        return epochs[-1]["epoch"], "last.pt (reported)"
    best = epochs[-1].get("best_epoch")
    return (best, "best.pt") if best is not None else (None, None)


def panels_of(runs):
    """Panel name -> keys, in a fixed order: the loss terms, accuracy, lr, images/s."""
    terms, acc = [], []
    for run in runs:
        for r in run["records"]:
            if r.get("epoch", 0) <= 0:
                continue
            for k, v in r.items():
                if k in SKIP or k in ("lr", "images_per_s") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                target = acc if k.endswith(ACCURACY_SUFFIXES) else terms
                if k not in target:
                    target.append(k)
    panels = [(k, [k]) for k in terms]
    if acc:
        panels.append(("accuracy (%)", acc))
    panels += [("lr", ["lr"]), ("images/s", ["images_per_s"])]
    return panels


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def grid(plt, n, args, ncols=COLUMNS):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    w, h = args.panel_size
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), dpi=args.dpi, squeeze=False,
                             layout="constrained")
    flat = [a for row in axes for a in row]
    for extra in flat[n:]:
        extra.set_visible(False)
    return fig, flat[:n]


def accuracy_style(key):
    """Line style of an accuracy key: clean solid, robust dashed, W-Robust dash-dot, train accuracy dotted."""
    last = key.rsplit("/", 1)[-1]
    styles = (("wrobust", "-."), ("robust", "--"), ("clean", "-"))
    return next((style for suffix, style in styles if last.endswith(suffix)), ":")


def plot_training(plt, runs, args, out):
    from matplotlib.lines import Line2D
    panels = panels_of(runs)
    fig, axes = grid(plt, len(panels), args)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    acc_keys = set()
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        epochs = [r for r in run["records"] if r.get("epoch", 0) > 0]
        chosen, _ = selected_epoch(run)
        for ax, (title, keys) in zip(axes, panels):
            is_acc = title.startswith("accuracy")
            for key in keys:
                pts = [(r["epoch"], r[key]) for r in epochs if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                scale = 100 if is_acc else 1
                ax.plot([e for e, _ in pts], [scale * v for _, v in pts], accuracy_style(key) if is_acc else "-",
                        color=colour, marker="." if len(pts) < 30 else None, label=run["name"])
                if is_acc:
                    acc_keys.add(key)
                    if chosen is not None and key.startswith("test_") and chosen in dict(pts):
                        ax.plot([chosen], [100 * dict(pts)[chosen]], "*", color=colour, markersize=11)
            if is_acc:  # the teachers' accuracies, logged once at epoch 0
                for key, v in next((r for r in run["records"] if r.get("epoch") == 0), {}).items():
                    if key != "epoch" and isinstance(v, (int, float)):
                        ax.axhline(100 * v, color=colour, linewidth=0.7, linestyle=accuracy_style(key), alpha=0.5)
            if chosen is not None:
                ax.axvline(chosen, color=colour, linestyle=":", linewidth=1)
    for ax, (title, keys) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "lr" and all(r.get("lr", 1) > 0 for run in runs for r in run["records"]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    # one legend for the runs (colours), one for what the accuracy lines and marks mean
    handles = [Line2D([], [], color=colours[i % len(colours)], label=run["name"]) for i, run in enumerate(runs)]
    axes[0].legend(handles=handles, fontsize=6, loc="best")
    acc = next((ax for ax, (t, _) in zip(axes, panels) if t.startswith("accuracy")), None)
    if acc is not None:
        styles = [Line2D([], [], color="black", linestyle=accuracy_style(k), label=k) for k in sorted(acc_keys)]
        styles += [Line2D([], [], color="black", linewidth=0.7, alpha=0.5, label="teacher, epoch 0"),
                   Line2D([], [], color="black", linestyle=":", marker="*", label="selected epoch")]
        acc.legend(handles=styles, fontsize=6, loc="best")
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    return out


def plot_eps_curve(plt, evals, args, out):
    w, h = args.panel_size
    fig, ax = plt.subplots(figsize=(w * 1.5, h * 1.5), dpi=args.dpi, layout="constrained")
    for e in evals:
        r, sweep = e["result"], e["result"]["eps_sweep"]
        xs = [0.0] + [255 * p["eps"] for p in sweep["points"]]
        ys = [100 * r["clean"]["acc"]] + [100 * p["acc"] for p in sweep["points"]]
        ax.plot(xs, ys, "o-", label=f"{e['name']} ({sweep['attack']})")
        ax.axvline(255 * r["eps"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("ε (× 1/255); dotted: the preset's ε")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("robust accuracy against ε (ε = 0: clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    return out


def per_class_series(result):
    """[(name, per-class accuracies in %)]: clean and each top-level attack (not the Q grid)."""
    return [(k, [None if a is None else 100 * a for a in v["acc"]])
            for k, v in (result.get("per_class") or {}).items() if not k.startswith("quant.")]


def plot_per_class(plt, evals, args, out):
    n_classes = max(len(e["result"]["per_class"]["clean"]["acc"]) for e in evals)
    w, h = args.panel_size
    width = max(w * 2, 0.5 * n_classes + 2)
    fig, axes = plt.subplots(len(evals), 1, figsize=(width, h * len(evals)), dpi=args.dpi, squeeze=False,
                             layout="constrained")
    for ax, e in zip(axes[:, 0], evals):
        series = per_class_series(e["result"])
        bar = 0.8 / len(series)
        for j, (name, accs) in enumerate(series):
            xs = [c + (j - (len(series) - 1) / 2) * bar for c in range(len(accs))]
            ax.bar(xs, [0 if a is None else a for a in accs], width=bar, label=name)
        names = e["result"].get("class_names") or [str(c) for c in range(n_classes)]
        ax.set_xticks(range(len(names)), names, rotation=45 if n_classes <= 20 else 90, fontsize=7)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{e['name']}: per-class accuracy (n = {e['result'].get('n_ex')})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6, ncol=min(len(series), 6))
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    return out


def main(argv=None):
    p = Parser(prog="tools/plot.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("inputs", nargs="+", help="run folders, metrics.jsonl files and eval_attacks.py JSONs")
    p.add_argument("--out", default="figures", help="folder the PNGs are written to (default: figures)")
    p.add_argument("--dpi", type=int, default=100, help="dots per inch (default: 100)")
    p.add_argument("--panel-size", type=float, nargs=2, default=(4.0, 3.0), metavar=("W", "H"),
                   help="size of one panel in inches (default: 4 3)")
    args = p.parse_args(argv)
    if args.dpi <= 0 or min(args.panel_size) <= 0:
        fail("--dpi and --panel-size must be positive")
    runs, evals = [], []
    for path in args.inputs:
        kind, item = read_input(path)
        (runs if kind == "run" else evals).append(item)
    distinct_names(runs)
    distinct_names(evals)
    plt = pyplot()
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {out}: {e.strerror or e}")
    written = []
    if runs:
        written.append(plot_training(plt, runs, args, out / "training.png"))
    sweeps = [e for e in evals if e["result"].get("eps_sweep")]
    if sweeps:
        written.append(plot_eps_curve(plt, sweeps, args, out / "eps_curve.png"))
    classes = [e for e in evals if (e["result"].get("per_class") or {}).get("clean")]
    if classes:
        written.append(plot_per_class(plt, classes, args, out / "per_class.png"))
    skipped = [e["name"] for e in evals if e not in sweeps and e not in classes]
    if skipped:
        print(f"note: no eps sweep and no per-class data in {', '.join(skipped)} "
              "(written by an older eval_attacks.py?)")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
