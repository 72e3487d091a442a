"""Our numbers next to the paper's: a Markdown table from eval_attacks.py JSONs, ready for a README.

    python tools/report.py runs/*/best_eval_rslad.json runs/*/last_eval_adt.json > RESULTS.md

For each JSON, the training script and flags eval_attacks.py recorded from a suite checkpoint, the
data set, the student architecture, the checkpoint kind (best/last) and the eval preset select the
rows of tools/published.json that the run targets (the rule is written in that file: every key of a
row must equal the run's; a row with more matching flags hides a less specific one). Each row is
printed with the published numbers, ours and the difference in percentage points, grouped by the
paper's table. A run that matches no row is listed with the nearest rows and what differs; nothing is
guessed. Facts the JSON lacks (a file not trained by the suite, a teacher file no longer at its
recorded path) can be given with --set KEY=VALUE, e.g. --set teacher.recipe=sat-iad.

Reads JSON only (no torch). Exit status 2 with one line on a bad input.
"""

import argparse
import json
import math
import sys
from pathlib import Path

PUBLISHED = Path(__file__).resolve().parent / "published.json"

LABELS = {"clean": "Clean", "aa_fast": "AA (fast)", "aa_rand": "AA (rand)", "fgsm": "FGSM", "fgsm_rand": "FGSM (rand. start)", "fgsm_adt": "FGSM (ADT)",
          "pgd_sat": "PGD_SAT", "pgd_trades": "PGD_TRADES", "pgd20": "PGD-20", "fgsm20": "FGSM^20",
          "fgsm1000": "FGSM^1000", "cw": "CW∞", "cw20": "CW^20", "cw1000": "CW^1000", "autoattack": "AA",
          "transfer_pgd20": "PGD-20 transfer", "transfer_cw": "CW∞ transfer", "transfer_fgsm20": "FGSM^20 transfer",
          "square_bb": "Square"}
FULL_TEST_SET = {"cifar10": 10000, "cifar100": 10000, "svhn": 26032}
ROW_KEYS = ("script", "dataset", "arch", "kind", "preset")
METHOD_KEYS = ("script", "dataset", "variant", "combo", "method", "reg", "recipe", "inner", "outer", "aodt_loss")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, as every script of the suite
        fail(f"{message} (see --help)")


def number(value):
    """A float from a number or a fraction string such as '5/6'; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        num, sep, den = value.partition("/")
        try:
            return float(num) / float(den) if sep else float(num)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def same(ours, theirs):
    """Equality of a recorded flag and a row's value: numbers (and fractions) to 1e-9, lists item by item."""
    if isinstance(ours, list) or isinstance(theirs, list):
        return (isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs)
                and all(same(a, b) for a, b in zip(ours, theirs)))
    a, b = number(ours), number(theirs)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return ours == theirs


def load_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror or e}")
    except ValueError as e:
        fail(f"{path} is not valid JSON ({e})")


def facts(result, overrides):
    """What the run is, as flat keys: the training flags, script, dataset, arch, kind, preset, and
    `<teacher flag>.recipe` for each teacher file eval_attacks.py found with the recorded bytes. A key
    that is absent is unknown; a flag recorded as null is known to be null."""
    training = result.get("training") or {}
    out = dict(training.get("args") or {})
    known = dict(script=training.get("script"), dataset=result.get("dataset"), arch=result.get("arch"),
                 kind=training.get("kind"), preset=result.get("preset"))
    for key, teacher in (training.get("teachers") or {}).items():
        if teacher.get("found") and teacher.get("same_file", True):
            known[f"{key}.recipe"] = teacher.get("recipe")
    out.update({k: v for k, v in known.items() if v is not None})
    out.update(overrides)
    return out


def compare(table, row, run):
    """(differences, unknown keys) of one row against the run's facts; a row matches when both are empty."""
    wanted = {"script": row["script"], "dataset": row["dataset"], "arch": row["arch"], **row["flags"]}
    if row.get("kind") is not None:
        wanted["kind"] = row["kind"]
    if table.get("preset") is not None:
        wanted["preset"] = table["preset"]
    diffs, unknown = [], []
    for key, value in wanted.items():
        if key not in run:
            unknown.append(key)
        elif not same(run.get(key), value):
            diffs.append((key, run.get(key), value))
    return diffs, unknown


def nearness(diffs, unknown):
    """Sort key of a row that does not match: first the same preset, then the same method (script, data set,
    variant, ...), then the fewest other differences, architectures last (a smoke run differs only there)."""
    keys = [k for k, _, _ in diffs]
    return (keys.count("preset"), sum(k in METHOD_KEYS for k in keys),
            sum(k not in METHOD_KEYS and k != "preset" and not k.endswith("arch") for k in keys) + len(unknown),
            sum(k.endswith("arch") for k in keys))


def specific(matches):
    """Drop a row whose flags are a strict subset of another matching row's (ARD-300 hides ARD)."""
    keys = [{(k, json.dumps(v)) for k, v in row["flags"].items()} for _, row in matches]
    return [m for i, m in enumerate(matches) if not any(keys[i] < other for other in keys)]


def ours(result, metric):
    """Our accuracy in % for a published column, or None when it was not run."""
    attacks = result.get("attacks", {})
    if metric == "clean":
        rec = result.get("clean")
    elif metric.startswith("transfer_"):
        rec = attacks.get("transfer", {}).get(metric[len("transfer_"):])
    else:
        rec = attacks.get(metric)
    return None if not rec or rec.get("acc") is None else 100 * rec["acc"]


def measured(result):
    """The columns a JSON can fill: clean, each white-box attack, AutoAttack, transfer and Square."""
    attacks = result.get("attacks", {})
    cols = ["clean"] + [k for k, v in attacks.items() if isinstance(v, dict) and "acc" in v and k != "square_bb"]
    cols += [f"transfer_{k}" for k in attacks.get("transfer", {})]
    return cols + (["square_bb"] if "square_bb" in attacks else [])


def worst(result, metric):
    key = {"transfer_pgd20": "transfer.pgd20", "transfer_cw": "transfer.cw", "transfer_fgsm20": "transfer.fgsm20"}
    rec = (result.get("per_class") or {}).get(key.get(metric, metric))
    if not rec:
        return None
    names = result.get("class_names")
    name = names[rec["worst_class"]] if names else str(rec["worst_class"])
    return f"{100 * rec['worst_acc']:.2f} ({name})"


def cell(value, signed=False):
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def run_names(results):
    """<run folder>/<checkpoint stem> for each result; one more parent folder where two would be equal."""
    ckpts = [Path(result.get("checkpoint") or path) for path, result in results]
    names = [f"{c.parent.name}/{c.stem}" for c in ckpts]
    return [f"{c.parent.parent.name}/{n}" if names.count(n) > 1 else n for c, n in zip(ckpts, names)]


def caveats(result, table, row):
    """Why a comparison may not be like for like, one short phrase each."""
    notes = []
    n, full = result.get("n_ex"), FULL_TEST_SET.get(result.get("dataset"))
    if n and full and n < full:
        notes.append(f"first {n} of {full} test images")
    if result.get("overrides"):
        notes.append("preset overridden: " + ", ".join(f"{k}={v}" for k, v in result["overrides"].items()))
    eps = number(table.get("eps"))
    if eps is not None and result.get("eps") is not None and not math.isclose(eps, result["eps"], rel_tol=1e-6):
        notes.append(f"ε {result.get('eps_str')} (published: {table['eps']})")
    if "autoattack" in table["columns"] and "autoattack" not in result.get("attacks", {}):
        other = [k for k in ("aa_fast", "aa_rand") if k in result.get("attacks", {})]
        notes.append(f"AA column needs --aa standard (ran {other[0]})" if other else "AutoAttack not run")
    if row.get("note"):
        notes.append(row["note"])
    return notes


def render(published, runs, show_worst=False):
    """The Markdown text: one section per published table with the runs that target it, then the runs
    that match no row."""
    groups, unmatched, unmeasured = {}, [], []
    for name, result, run in runs:
        matches, near = [], []
        for table in published["tables"]:
            for row in table["rows"]:
                diffs, unknown = compare(table, row, run)
                if not diffs and not unknown:
                    matches.append((table, row))
                else:
                    near.append((nearness(diffs, unknown), diffs, unknown, table, row))
        for table, row in specific(matches):
            if all(ours(result, c) is None for c in table["columns"]):  # e.g. black-box rows of a white-box eval
                unmeasured.append((name, table, row))
            else:
                groups.setdefault(table["id"], (table, []))[1].append((name, result, row))
        if not matches:
            unmatched.append((name, result, run, sorted(near, key=lambda t: t[0])))

    lines = []
    for table, entries in groups.values():
        head = f"### {table['source']}"
        if table.get("preset"):
            head += f" (`eval_attacks.py --preset {table['preset']}`, ε = {table['eps']})"
        cols = table["columns"]
        lines += [head, ""]
        if table.get("note"):
            lines += [table["note"] + ".", ""]
        lines.append("| run | published row | | " + " | ".join(LABELS.get(c, c) for c in cols) + " |")
        lines.append("|---|---|---|" + "---:|" * len(cols))
        notes = []
        for name, result, row in entries:
            paper = row["values"]
            mine = [ours(result, c) for c in cols]
            delta = [None if a is None or b is None else a - b for a, b in zip(mine, paper)]
            lines.append(f"| `{name}` | {row['label']} | paper | " + " | ".join(cell(v) for v in paper) + " |")
            lines.append("| | | ours | " + " | ".join(cell(v) for v in mine) + " |")
            lines.append("| | | Δ | " + " | ".join(cell(v, signed=True) for v in delta) + " |")
            if show_worst:
                lines.append("| | | ours, worst class | " + " | ".join(worst(result, c) or "—" for c in cols) + " |")
            why = caveats(result, table, row)
            if why:
                notes.append(f"- `{name}`: " + "; ".join(why) + ".")
        lines += [""] + notes + ([""] if notes else [])
    if unmeasured:
        lines += ["### Published rows these runs target but did not measure", ""]
        for name, table, row in unmeasured:
            cols = ", ".join(LABELS.get(c, c) for c in table["columns"])
            lines.append(f"- `{name}`: {table['source']}, «{row['label']}» ({cols})"
                         + (f": {table['note']}" if table.get("note") else ""))
        lines.append("")
    if unmatched:
        lines += ["### Runs without a published row", ""]
        by_preset = {}
        for name, result, run, _ in unmatched:
            by_preset.setdefault(run.get("preset"), []).append((name, result))
        for preset, entries in by_preset.items():  # our numbers alone, nothing to compare them with
            cols = list(dict.fromkeys(c for _, result in entries for c in measured(result)))
            lines.append(f"Ours, `--preset {preset}`:")
            lines += ["", "| run | " + " | ".join(LABELS.get(c, c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
            lines += [f"| `{name}` | " + " | ".join(cell(ours(result, c)) for c in cols) + " |" for name, result in entries]
            lines.append("")
        for name, _, run, near in unmatched:
            what = ", ".join(f"{k} {run[k]}" for k in ROW_KEYS if k in run)
            lines.append(f"- `{name}` ({what}): no row of tools/published.json matches."
                         + ("" if "script" in run else " The JSON names no training script (not a suite checkpoint?): "
                            "give it with --set script=NAME and the row's flags."))
            same_script = [n for n in near if n[4]["script"] == run.get("script")] or near
            for _, diffs, unknown, table, row in same_script[:3]:
                parts = [f"{k} {o!r} ≠ {t!r}" for k, o, t in diffs]
                parts += [f"{k} not recorded (--set {k}=...)" for k in unknown]
                lines.append(f"  - nearest: {table['source']}, «{row['label']}»: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)


def parse_set(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. --set teacher.recipe=sat-iad")
        try:
            out[key] = json.loads(value)  # numbers, null, lists
        except ValueError:
            out[key] = value
    return out


def main(argv=None):
    p = Parser(prog="tools/report.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("results", nargs="+", help="JSON files written by eval_attacks.py")
    p.add_argument("--published", default=str(PUBLISHED), help="the published rows (default: tools/published.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fact the JSON lacks or gets wrong, for every result, e.g. teacher.recipe=sat-iad, "
                        "script=rslad")
    p.add_argument("--worst-class", action="store_true", help="add a line with our worst-class accuracy per column")
    args = p.parse_args(argv)
    published = load_json(args.published, "published rows")
    extra = parse_set(args.set)
    results = []
    for path in args.results:
        result = load_json(path, "eval result")
        if not isinstance(result, dict) or result.get("schema") != "suite-eval/1":
            fail(f"{path} is not an eval_attacks.py result (no schema suite-eval/1)")
        results.append((path, result))
    runs = [(name, result, facts(result, extra)) for name, (_, result) in zip(run_names(results), results)]
    print(render(published, runs, args.worst_class))


if __name__ == "__main__":
    main()
