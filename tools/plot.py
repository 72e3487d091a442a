"""PNG figures of training runs and evaluations; several runs share one figure.

    python tools/plot.py runs/rslad__* runs/ard__* --out figures/           # training curves
    python tools/plot.py runs/*/best_eval_rslad.json --out figures/        # eps curve and per-class bars

Inputs are run folders (or their metrics.jsonl) and eval_attacks.py JSONs, in any mix. Written to --out:
    training.png   one panel per logged loss term, clean and robust accuracy (train and test; a second
                   model's accuracy, such as AODT's peer_clean, in line styles of its own; the teachers'
                   epoch-0 accuracies as thin horizontal lines), lr and images/s against epoch (integer
                   ticks), with the selected epoch marked (best.pt's; the last epoch for runs that report
                   last.pt); the runs' colours in a legend above the panels, the line styles below
    eps_curve.png  robust accuracy against eps, for the JSONs holding an --eps-sweep (clean at eps 0)
    per_class.png  per-class accuracy bars of clean and each attack, one row of panels per JSON, one
                   colour per attack across the rows and one legend beside them
Each panel is --panel-size inches at --dpi, so a figure's size in pixels is known in advance.

Each run is labelled by what differs between the runs plotted, read from their args.json: the script,
method, variant or recipe where those differ, then up to three other flags that differ between the runs
that share them ("lr 0.05" against "lr 0.02"); paths, the environment and other bookkeeping are not
compared. A run with nothing of its own is labelled by its folder's name, as is a run plotted alone.
Evaluations are labelled the same way, from the training flags recorded in each JSON and the
evaluation's own settings, followed by the checkpoint's file name.

Plotting is an optional extra: pip install -r requirements-plot.txt (matplotlib). The training and
evaluation scripts never import it.
"""

import argparse
import json
import math
import sys
from pathlib import Path

SKIP = {"epoch", "seconds", "monitor_seconds", "best_epoch", "best_value", "diverged", "test_classes"}
ACCURACY_SUFFIXES = ("clean", "robust", "wrobust", "acc")
COLUMNS = 3
LEGEND_FONT = 9  # points: about 12 pixels at the default --dpi 100
# labels: the flags that say what a run is, compared first; bookkeeping that never tells two runs apart
IDENTITY = ("script", "method", "variant", "recipe")
BOOKKEEPING = {"env", "resumes", "data_dir", "runs_dir", "resume", "data_sha256", "progress_every", "tensorboard",
               "unsafe_load", "override_record"}
LABEL_FLAGS = 3  # at most this many flags in a label after the identity, then "+N more"
# accuracy of the trained model: test_* and train_*; any other prefix (AODT's peer_) is a second model
MAIN_MODEL = ("test", "train")
OTHER_MODEL_STYLES = [(0, (7, 2, 1, 2, 1, 2)), (0, (12, 4)), (0, (1, 3)), (0, (4, 2, 4, 2, 1, 2))]


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
        if not isinstance(run_args, dict):
            run_args = {}
        return "run", {"name": metrics.parent.name, "records": records, "args": run_args, "path": str(path)}
    try:
        result = json.loads(path.read_text())
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        fail(f"{path} is neither a run folder nor valid JSON ({e})")
    if not isinstance(result, dict) or result.get("schema") != "suite-eval/1":
        fail(f"{path} is not an eval_attacks.py result (no schema suite-eval/1)")
    ckpt = Path(result.get("checkpoint") or path)
    training = result.get("training") or {}
    # what the evaluation compares on: the training flags, then the evaluation's own settings
    flags = {"script": training.get("script"), **(training.get("args") or {})} if training else {}
    flags.update({"preset": result.get("preset"), "eval eps": result.get("eps_str") or result.get("eps"),
                  "n_ex": result.get("n_ex"), **{f"eval {k}": v for k, v in (result.get("overrides") or {}).items()}})
    return "eval", {"name": f"{ckpt.parent.name}/{ckpt.name}", "result": result, "args": flags, "path": str(path),
                    "checkpoint": ckpt.name}


def show_value(key, value):
    """A flag's value as a label shows it: 8/255 for a radius or step, 4 significant digits, on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float):
        k = value * 255
        if ("eps" in key or "step" in key) and 0 < value < 1 and abs(k - round(k)) < 1e-6:
            return f"{round(k)}/255"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(key, v) for v in value) or "[]"
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    return text if len(text) <= 32 else "…" + text[-31:]  # a path: its end tells it apart


def show_flag(key, value):
    return show_value(key, value) if key == "script" else f"{key} {show_value(key, value)}"


def differing(flags, keys):
    """The keys, in their order, whose values are not the same in all of `flags` (a missing key counts)."""
    return [k for k in keys if len({json.dumps(f.get(k, "<missing>"), sort_keys=True, default=str) for f in flags}) > 1]


def label_items(items):
    """Set item['name'] of each run (or evaluation) to what tells it apart from the others plotted.

    The identity flags (script, method, variant, recipe) that differ come first; then, among the items
    that share them, up to LABEL_FLAGS other flags that differ, in args.json's order. An item with nothing
    of its own keeps its folder's name. Evaluations end with the checkpoint's file name."""
    flags = [{k: v for k, v in item.get("args", {}).items() if k not in BOOKKEEPING} for item in items]
    labels = [[] for _ in items]
    if len(items) > 1:
        identity = differing(flags, IDENTITY)
        prefixes = [tuple(show_flag(k, f[k]) for k in identity if f.get(k) is not None) for f in flags]
        for prefix in dict.fromkeys(prefixes):
            group = [i for i, p in enumerate(prefixes) if p == prefix]
            keys = list(dict.fromkeys(k for i in group for k in flags[i] if k not in IDENTITY))
            keys = differing([flags[i] for i in group], keys)
            for i in group:
                own = [show_flag(k, flags[i][k]) for k in keys if k in flags[i]]
                if len(own) > LABEL_FLAGS:
                    own = own[:LABEL_FLAGS] + [f"+{len(own) - LABEL_FLAGS} more"]
                labels[i] = [*prefix, *own]
    names = []
    for item, words in zip(items, labels):
        if not words:
            names.append(item["name"])  # the folder's name (and the checkpoint's, for an evaluation)
        elif "checkpoint" in item:
            names.append(f"{' '.join(words)}, {item['checkpoint']}")
        else:
            names.append(" ".join(words))
    # the same label twice (flags alike, or unreadable): the folder's name, then the path given, tells them apart
    for extra in ([item["name"] for item in items], [item["path"] for item in items]):
        repeated = {n for n in names if names.count(n) > 1}
        names = [f"{n} ({e})" if n in repeated and e not in n else n for n, e in zip(names, extra)]
    for item, name in zip(items, names):
        item["name"] = name


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


def figure_legend(fig, fallback_ax, handles, where, title=None):
    """A legend outside the panels (`where`: "upper center", "lower center", "right upper"), in as many
    columns as the figure's width holds (one when beside the panels); inside `fallback_ax` with a
    matplotlib older than 3.7, which cannot place one outside."""
    # an entry's width in inches: its text at about 0.55 em a character, plus the sample line and spacing
    widths = [len(h.get_label()) * 0.55 * LEGEND_FONT / 72 + 0.8 for h in handles]

    def fits(n):  # matplotlib fills the columns one after the other, each as wide as its widest entry
        rows = math.ceil(len(widths) / n)
        return sum(max(widths[c:c + rows]) for c in range(0, len(widths), rows)) <= 0.95 * fig.get_figwidth()

    ncol = 1 if where.startswith("right") else max([n for n in range(1, len(handles) + 1) if fits(n)] or [1])
    try:
        return fig.legend(handles=handles, loc=f"outside {where}", ncol=ncol, fontsize=LEGEND_FONT, title=title,
                          title_fontsize=LEGEND_FONT, frameon=False)
    except ValueError:  # matplotlib < 3.7: no "outside" locations
        return fallback_ax.legend(handles=handles, fontsize=LEGEND_FONT, loc="best", title=title,
                                  title_fontsize=LEGEND_FONT)


def model_of(key):
    """Which model an accuracy key measures: None for the trained model (test_*, train_*), else its prefix."""
    for sep in ("_", "/"):
        if sep in key:
            prefix = key.split(sep, 1)[0]
            return None if prefix in MAIN_MODEL else prefix
    return None


def accuracy_style(key):
    """Line style of an accuracy key: clean solid, robust dashed, W-Robust dash-dot, train accuracy dotted."""
    last = key.rsplit("/", 1)[-1]
    styles = (("wrobust", "-."), ("robust", "--"), ("clean", "-"))
    return next((style for suffix, style in styles if last.endswith(suffix)), ":")


def accuracy_styles(keys):
    """key -> (line style, marker, legend text), in legend order: the trained model's keys by accuracy_style
    with a dot (test before train, clean before robust); a second model's keys (AODT's peer_clean) each in a
    dash pattern of their own, with a cross, the model named in the legend text."""
    order = ("-", "--", "-.", ":")
    main = sorted((k for k in keys if model_of(k) is None), key=lambda k: (not k.startswith("test"),
                                                                            order.index(accuracy_style(k)), k))
    others = sorted(k for k in keys if model_of(k) is not None)
    styles = {k: (accuracy_style(k), ".", k) for k in main}
    for i, k in enumerate(others):
        styles[k] = (OTHER_MODEL_STYLES[i % len(OTHER_MODEL_STYLES)], "x", f"{k} ({model_of(k)} model)")
    return styles


def training_figure(plt, runs, args):
    """The training.png figure, not yet saved."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    panels = panels_of(runs)
    fig, axes = grid(plt, len(panels), args)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    acc_keys = next((keys for title, keys in panels if title.startswith("accuracy")), [])
    styles = accuracy_styles(acc_keys)
    drawn, teacher_lines, marked = set(), False, False
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
                style, marker, _ = styles[key] if is_acc else ("-", ".", None)
                ax.plot([e for e, _ in pts], [scale * v for _, v in pts], linestyle=style, color=colour,
                        marker=marker if len(pts) < 30 else None, label=run["name"], gid=key)
                if is_acc:
                    drawn.add(key)
                    if chosen is not None and key.startswith("test_") and chosen in dict(pts):
                        ax.plot([chosen], [100 * dict(pts)[chosen]], "*", color=colour, markersize=11)
                        marked = True
            if is_acc:  # the teachers' accuracies, logged once at epoch 0
                for key, v in next((r for r in run["records"] if r.get("epoch") == 0), {}).items():
                    if key != "epoch" and isinstance(v, (int, float)):
                        ax.axhline(100 * v, color=colour, linewidth=0.7, linestyle=accuracy_style(key), alpha=0.5)
                        teacher_lines = True
            if chosen is not None:
                ax.axvline(chosen, color=colour, linestyle=":", linewidth=1)
                marked = True
    for ax, (title, keys) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if title == "lr" and all(r.get("lr", 1) > 0 for run in runs for r in run["records"]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    # above the panels, which colour is which run; below, what the line styles and marks mean
    handles = [Line2D([], [], color=colours[i % len(colours)], linewidth=2, label=run["name"])
               for i, run in enumerate(runs)]
    figure_legend(fig, axes[0], handles, "upper center", "runs (colour)")
    acc = next((ax for ax, (t, _) in zip(axes, panels) if t.startswith("accuracy")), None)
    lines = [Line2D([], [], color="black", linestyle=style, marker=marker, label=text)
             for k, (style, marker, text) in styles.items() if k in drawn]
    if teacher_lines:
        lines.append(Line2D([], [], color="black", linewidth=0.7, alpha=0.5, label="teacher, epoch 0"))
    if marked:
        lines.append(Line2D([], [], color="black", linestyle=":", marker="*", markersize=9,
                            label="selected epoch (every panel)"))
    if lines:
        figure_legend(fig, acc if acc is not None else axes[0], lines, "lower center", "accuracy (line style)")
    return fig


def plot_training(plt, runs, args, out):
    fig = training_figure(plt, runs, args)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    return out


def eps_figure(plt, evals, args):
    """The eps_curve.png figure, not yet saved."""
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
    figure_legend(fig, ax, ax.get_legend_handles_labels()[0], "lower center")  # below: never over a curve
    return fig


def plot_eps_curve(plt, evals, args, out):
    fig = eps_figure(plt, evals, args)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    return out


def per_class_series(result):
    """[(name, per-class accuracies in %)]: clean and each top-level attack (not the Q grid)."""
    return [(k, [None if a is None else 100 * a for a in v["acc"]])
            for k, v in (result.get("per_class") or {}).items() if not k.startswith("quant.")]


def per_class_figure(plt, evals, args):
    """The per_class.png figure, not yet saved: one colour per attack in every row, one legend for all."""
    from matplotlib.patches import Patch
    n_classes = max(len(e["result"]["per_class"]["clean"]["acc"]) for e in evals)
    w, h = args.panel_size
    width = max(w * 2, 0.5 * n_classes + 2)
    fig, axes = plt.subplots(len(evals), 1, figsize=(width, h * len(evals)), dpi=args.dpi, squeeze=False,
                             layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(name for e in evals for name, _ in per_class_series(e["result"])))
    colour = {name: colours[j % len(colours)] for j, name in enumerate(names)}
    for ax, e in zip(axes[:, 0], evals):
        series = per_class_series(e["result"])
        bar = 0.8 / len(series)
        for j, (name, accs) in enumerate(series):
            xs = [c + (j - (len(series) - 1) / 2) * bar for c in range(len(accs))]
            ax.bar(xs, [0 if a is None else a for a in accs], width=bar, label=name, color=colour[name])
        classes = e["result"].get("class_names") or [str(c) for c in range(n_classes)]
        ax.set_xticks(range(len(classes)), classes, rotation=45 if n_classes <= 20 else 90, fontsize=LEGEND_FONT)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{e['name']}\nper-class accuracy (n = {e['result'].get('n_ex')})", fontsize=LEGEND_FONT + 1)
        ax.grid(axis="y", alpha=0.3)
    figure_legend(fig, axes[0, 0], [Patch(color=colour[name], label=name) for name in names], "right upper")
    return fig


def plot_per_class(plt, evals, args, out):
    fig = per_class_figure(plt, evals, args)
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
    label_items(runs)
    label_items(evals)
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
