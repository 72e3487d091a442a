"""Our numbers next to the paper's: a Markdown report from eval_attacks.py JSONs, ready for a README.

    python tools/report.py runs/*/best_eval_rslad.json runs/*/last_eval_adt.json > RESULTS.md

For each JSON, the training script and flags eval_attacks.py recorded from a suite checkpoint, the
data set, the student architecture, the checkpoint kind (best/last) and the eval preset select the
rows of tools/published.json that the run targets (the rule is written in that file: every key of a
row must equal the run's; a row with more matching flags hides a less specific one). Facts the JSON
lacks (a file not trained by the suite, a teacher file no longer at its recorded path) can be given
with --set KEY=VALUE, e.g. --set teacher.recipe=sat-iad; nothing is guessed.

A matching row is not yet a comparison like for like. Each run gets a block under each table it
targets, and the block's first line, before any number, says whether the run was trained with the
row's setting or lists every difference: each recorded training flag against the value the script
itself resolves for the row's command (its own parse_args, given the row's flags and placeholder
teacher paths), so epochs, training subset, batch size, learning rate and schedule, the teachers'
architectures and every method flag; a teacher trained by train_teacher.py against its recipe (read
from the args.json beside the file); one run where the paper averages several; a --set that
overrides a recorded value. Paths, the device, the seed and other bookkeeping are not compared; speed
flags (--amp, --compile, ...) get a note of their own. The published numbers, ours and the
difference in percentage points follow, then what differs on the test side (a test subset, an
overridden preset, AutoAttack fast).

A run that matches no row is one line: our numbers, the nearest row and what differs. Every run is
named by its folder and checkpoint followed by its method: the script and the flags that select the
method (--variant, --method, --combo, --recipe, ...). When every run is at smoke scale, one line at
the top says what such a report can show.

Reads the JSONs, and imports the training script of each matched row (so torch) for its defaults.
Exit status 2 with one line on a bad input.
"""

import argparse
import contextlib
import importlib
import io
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = Path(__file__).resolve().parent / "published.json"

LABELS = {"clean": "Clean", "aa_fast": "AA (fast)", "aa_rand": "AA (rand)", "fgsm": "FGSM", "fgsm_rand": "FGSM (rand. start)", "fgsm_adt": "FGSM (ADT)",
          "pgd_sat": "PGD_SAT", "pgd_trades": "PGD_TRADES", "pgd20": "PGD-20", "pgd10": "PGD-10", "fgsm20": "FGSM^20",
          "fgsm1000": "FGSM^1000", "cw": "CW∞", "cw20": "CW^20", "cw1000": "CW^1000", "autoattack": "AA",
          "transfer_pgd20": "PGD-20 transfer", "transfer_cw": "CW∞ transfer", "transfer_fgsm20": "FGSM^20 transfer",
          "square_bb": "Square"}
FULL_TEST_SET = {"cifar10": 10000, "cifar100": 10000, "svhn": 26032}
FULL_TRAIN_SET = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257}
METHOD_KEYS = ("script", "dataset", "variant", "combo", "method", "reg", "recipe", "inner", "outer", "aodt_loss")

# The checkpoint flags each training script requires: its defaults are read with placeholders there.
PLACEHOLDERS = {"rslad": ["--teacher", "-"], "ard": ["--teacher", "-"], "iad": ["--teacher", "-"],
                "mtard": ["--teacher", "-", "--nat-teacher", "-"], "ardir": ["--teacher", "-"],
                "adt_aodt": [], "adaad": ["--teacher", "-"], "peeraid": [], "train_teacher": []}
TEACHERS = {"teacher": "teacher", "nat_teacher": "natural teacher", "peer": "peer"}
# The teacher architecture of the paper where a row's flags do not name it: each script's default for a
# file that does not say (docs/iad.md, ardir.md, adt_aodt.md §4). Compared only where the run has that teacher.
PAPER_TEACHER_ARCH = {("iad", "nat_teacher_arch"): "resnet18", ("ardir", "teacher_arch"): "preact_resnet18",
                      ("adt_aodt", "teacher_arch"): ["wrn34_10"]}
# Not part of the setting: where things are, where and how verbosely it ran, records of files; a seed is one
# draw of the same setting.
BOOKKEEPING = {"script", "env", "resumes", "data_dir", "runs_dir", "device", "progress_every", "tensorboard",
               "resume", "unsafe_load", "override_record", "test_batch_size", "data_sha256", "seed", "rb_model_dir"}
# Speed and precision: the method is the same and the numbers may move a little; a note, not a difference.
SPEED = ("amp", "compile", "compile_mode", "channels_last", "no_tf32", "deterministic", "monitor_tf32")
# The differences named first, in this order; the other flags follow in the order of args.json.
FIRST = ("epochs", "iterations", "train_subset", "batch_size", "lr", "lr_schedule", "lr_milestones", "dataset",
         "arch", "teacher_arch", "nat_teacher_arch", "peer_arch")
# Smoke scale: a student this small, fewer epochs or fewer training images than these.
SMOKE_ARCHS = ("cnn_small",)
SMOKE_EPOCHS = 10
SMOKE_TRAIN = 5000


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


def fmt(value):
    """A value as the report prints it: a float to 6 significant digits (no float32 tail such as
    0.07000000029802322), as k/255 where a long decimal is one; lists item by item; None as none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = f"{value:.6g}"
        steps = value * 255
        digits = re.sub(r"\D|^[0.]+", "", text.lstrip("-"))
        if len(digits) > 4 and 0 < abs(value) < 1 and abs(steps - round(steps)) < 1e-6:
            return f"{round(steps)}/255"
        return text
    if isinstance(value, (list, tuple)):
        return " ".join(fmt(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


def apart(ours, theirs):
    """fmt() of two values that differ, with every digit where the fixed precision would print them alike."""
    a, b = fmt(ours), fmt(theirs)
    return (repr(ours), repr(theirs)) if a == b else (a, b)


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


# ---- the training setting of a matched run against the row's ------------------------------------------

def row_command(row):
    """The row's command line: --dataset, --arch and each of its flags (`teacher.recipe` is a fact of the
    teacher file, not a flag)."""
    argv = ["--dataset", row["dataset"], "--arch", row["arch"]]
    for key, value in row["flags"].items():
        if "." not in key:
            argv.append("--" + key.replace("_", "-"))
            argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return argv


_DEFAULTS = {}


def script_defaults(script, argv):
    """The flags `script`.py resolves for the command `argv`, from its own parse_args with placeholders for
    the checkpoint flags it requires (as tools/bench_train.py does): (dict, None), or (None, why not)."""
    key = (script, tuple(argv))
    if key not in _DEFAULTS:
        _DEFAULTS[key] = _script_defaults(script, list(argv))
    return _DEFAULTS[key]


def _script_defaults(script, argv):
    if script not in PLACEHOLDERS:
        return None, f"{script}.py is not a training script of the suite"

    def given(flag, default=None):
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else default
    fill = list(PLACEHOLDERS[script])
    if script == "iad" and given("--variant") in ("iad2", "akd2"):
        fill += ["--nat-teacher", "-"]
    if script == "adt_aodt" and given("--method", "adt") == "adt":
        fill += ["--teacher", "wrn34_10:-"]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            args, _ = importlib.import_module(script).parse_args(fill + argv)
    except SystemExit:
        return None, f"{script}.py refused the row's command ({said.getvalue().strip()})"
    except Exception as e:  # noqa: BLE001 - e.g. no torch here: the setting goes unchecked, the numbers still print
        return None, f"cannot import {script}.py ({type(e).__name__}: {e})"
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}, None


def from_file(key):
    """A teacher's architecture, normalisation or layout: read from the file where no flag gives it."""
    return any(key == f"{t}_{s}" for t in TEACHERS for s in ("arch", "norm", "shortcut_from"))


def differences(recorded, defaults, script):
    """([(key, ours, paper's)], [(key, ours, paper's)]): the recorded training flags that differ from the
    defaults resolved for the row, and the speed flags that do. Bookkeeping, teacher paths and hashes are
    skipped, and what the script reads from a teacher file where neither the row nor the paper fixes it."""
    found, speed = [], []
    dataset = defaults.get("dataset")
    for key, ours in recorded.items():
        if key in BOOKKEEPING or key in TEACHERS or key.endswith("_sha256") or key.startswith("_"):
            continue
        theirs = defaults.get(key)
        if theirs is None and from_file(key):
            theirs = None if ours is None else PAPER_TEACHER_ARCH.get((script, key))
            if theirs is None:
                continue
        elif key not in defaults:
            continue  # a flag the script no longer has
        if key in ("train_subset", "test_subset"):  # none: the whole split
            full = (FULL_TRAIN_SET if key == "train_subset" else FULL_TEST_SET).get(dataset)
            ours, theirs = ours or full, theirs or full
        if not same(ours, theirs):
            (speed if key in SPEED else found).append((key, ours, theirs))
    order = {k: i for i, k in enumerate(FIRST)}
    found.sort(key=lambda d: order.get(d[0], len(FIRST)))  # stable: the rest keep the order of args.json
    return found, speed


def phrase(key, ours, theirs, ref="paper", extra=""):
    """One difference in words: '1 epoch (paper 300)', '`--eval-every 1` (paper 20)'."""
    mine, paper = apart(ours, theirs)
    paren = f"({ref} {paper}{extra})"
    if key == "epochs":
        return f"{mine} epoch{'' if ours == 1 else 's'} {paren}"
    if key == "iterations":
        return f"{mine} iterations {paren}"
    words = {"train_subset": "train subset", "test_subset": "monitor's test subset", "batch_size": "batch size",
             "lr": "lr", "lr_milestones": "lr milestones", "arch": "student", "dataset": "data set"}
    if key in words:
        return f"{words[key]} {mine} {paren}"
    if key.endswith("_arch") and key[:-len("_arch")] in TEACHERS:
        return f"{TEACHERS[key[:-len('_arch')]]} {mine} {paren}"
    flag = "--" + key.replace("_", "-")
    return f"`{flag}` {mine} {paren}" if isinstance(ours, bool) else f"`{flag} {mine}` {paren}"


def teacher_files(result):
    """[(who, entry)] for the teacher files the run names: eval_attacks.py's record of each, and for
    adt_aodt's list of --teacher ARCH:CKPT[:NORM], which that record does not follow, entries made here
    ({path, found, same_file}; a suite file is one with a train_teacher.py args.json beside it)."""
    training = result.get("training") or {}
    out = [(TEACHERS.get(k, k), e) for k, e in (training.get("teachers") or {}).items()]
    args = training.get("args") or {}
    specs = args.get("teacher") if training.get("script") == "adt_aodt" else None
    if specs and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for i, spec in enumerate(specs if isinstance(specs, list) else []):
        _, path, _ = importlib.import_module("common").parse_model_spec(str(spec), "--teacher")  # ARCH:CKPT[:NORM]
        entry = {"path": path, "found": Path(path).is_file()}
        hashes = args.get("teacher_sha256") or []
        if entry["found"] and i < len(hashes):
            entry["same_file"] = importlib.import_module("common").file_sha256(path) == hashes[i]
        beside = Path(path).parent / "args.json"
        if entry["found"] and beside.is_file():
            entry.update(suite=True, script="train_teacher")  # its script is read from that file below
        out.append((f"teacher {i + 1}" if len(specs) > 1 else "teacher", entry))
    return out


def teacher_checks(result):
    """(differences, not checked), in words, for the teacher files the run names: a file changed since the
    run started; a teacher trained by train_teacher.py (its args.json beside the file) off its recipe."""
    found, unknown = [], []
    for who, entry in teacher_files(result):
        if not entry.get("found"):
            unknown.append(f"the {who} file ({entry.get('path')}) was not found")
        elif entry.get("same_file") is False:
            found.append(f"the {who} file at {entry.get('path')} is not the one the run trained with (sha256)")
        elif not entry.get("suite"):
            continue  # a published file, not trained here: nothing recorded to check
        elif entry.get("script") != "train_teacher":
            unknown.append(f"the {who} was trained by {entry.get('script')}.py, whose setting is not checked here")
        else:
            record = Path(str(entry.get("path"))).parent / "args.json"
            try:
                targs = json.loads(record.read_text())
            except (OSError, ValueError):
                unknown.append(f"the {who}'s training record ({record}) was not readable")
                continue
            if targs.get("script") != "train_teacher":
                unknown.append(f"the {who} was trained by {targs.get('script')}.py, whose setting is not checked here")
                continue
            argv = [x for flag in ("recipe", "arch", "dataset") if targs.get(flag)
                    for x in (f"--{flag}", str(targs[flag]))]
            defaults, why = script_defaults("train_teacher", argv)
            if defaults is None:
                unknown.append(f"the {who}'s training: {why}")
                continue
            off, _ = differences(targs, defaults, "train_teacher")
            if off:
                found.append(f"{who} trained off its recipe {targs.get('recipe')} ["
                             + ", ".join(phrase(k, o, t, "recipe") for k, o, t in off) + "]")
    return found, unknown


def setting(result, run, table, row):
    """(first line, notes): whether the run was trained with the row's setting, every difference when not;
    notes for speed flags and for what could not be checked."""
    record = facts(result, {})
    overridden = {k: v for k, v in run.items() if k in record and not same(record[k], v)}  # --set against the record
    training = result.get("training")
    if not training or not isinstance(training.get("args"), dict):
        forced = ", ".join(f"`--set {k}={fmt(v)}` overrides the recorded {fmt(record[k])}"
                           for k, v in overridden.items())
        return ((f"NOT the published setting: {forced}; " if forced else "")
                + "training not recorded: its setting is NOT checked against the row's."), []
    recorded = {"dataset": result.get("dataset"), "arch": result.get("arch"), **training["args"]}
    found, speed, unknown = [], [], []
    defaults, why = script_defaults(row["script"], row_command(row))
    if defaults is None:
        unknown.append(f"the training flags ({why})")
    else:
        found, speed = differences(recorded, defaults, row["script"])
    said = {k for k, _, _ in found if k in overridden}
    parts = [f"`--set {k}={fmt(v)}` overrides the recorded {fmt(record[k])}"
             for k, v in overridden.items() if k not in said]
    words = [phrase(k, o, t, extra=f"; `--set {k}={fmt(overridden[k])}` overrides the record" if k in said else "")
             for k, o, t in found]
    lead = sum(k in FIRST for k, _, _ in found)  # epochs ... teachers' architectures, then the teacher files
    teacher_found, teacher_unknown = teacher_checks(result)
    unknown += teacher_unknown
    parts += words[:lead] + teacher_found
    if (table.get("runs") or 1) > 1:
        parts.append(f"one run (paper: mean of {table['runs']})")
    parts += words[lead:]
    notes = []
    if speed:
        notes.append("speed and precision flags (same method, numbers may move slightly): "
                     + ", ".join(phrase(k, o, t) for k, o, t in speed))
    if parts:
        if unknown:
            notes.append("not checked: " + "; ".join(unknown))
        return "NOT the published setting: " + ", ".join(parts) + ".", notes
    if unknown:
        return "the published setting in every recorded flag; not checked: " + "; ".join(unknown) + ".", notes
    return "the published setting (every training flag as the script resolves the row's command).", notes


# ---- our numbers ---------------------------------------------------------------------------------------

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


def method(result):
    """The script and the flags that select its method, as a command: 'iad --variant iad2',
    'adt_aodt --method aodt', 'rslad --inner ard'; None for a checkpoint the suite did not train."""
    training = result.get("training") or {}
    script, args = training.get("script"), training.get("args") or {}
    if not script:
        return None
    flags = {"iad": [("variant", None)], "ardir": [("combo", None)], "train_teacher": [("recipe", None)],
             "rslad": [("inner", "rslad"), ("outer", "rslad")], "adaad": [("variant", "adaad")],
             "adt_aodt": [("method", None), ("reg", "none")]
             + ([("aodt_loss", "l1")] if args.get("method") == "aodt" else [])}
    words = [script] + [f"--{k.replace('_', '-')} {fmt(args[k])}" for k, default in flags.get(script, [])
                        if args.get(k) is not None and args[k] != default]
    if script == "ardir" and args.get("beta") == 0:
        words.append("--beta 0")  # ARD with the ARDIR label combination, another method of the tables
    return " ".join(words)


def run_names(results):
    """'`<run folder>/<checkpoint stem>` (method)' for each result, one more parent folder where two
    paths would read the same."""
    ckpts = [Path(result.get("checkpoint") or path) for path, result in results]
    paths = [f"{c.parent.name}/{c.stem}" for c in ckpts]
    paths = [f"{c.parent.parent.name}/{n}" if paths.count(n) > 1 else n for c, n in zip(ckpts, paths)]
    return [f"`{p}` ({method(result) or 'not a suite checkpoint'})" for p, (_, result) in zip(paths, results)]


def eval_side(result, table, row):
    """What differs on the test side, one short phrase each."""
    notes = []
    n, full = result.get("n_ex"), FULL_TEST_SET.get(result.get("dataset"))
    if n and full and n < full:
        notes.append(f"first {n} of {full} test images")
    if result.get("overrides"):
        notes.append("preset overridden: " + ", ".join(f"{k}={fmt(v)}" for k, v in result["overrides"].items()))
    eps = number(table.get("eps"))
    if eps is not None and result.get("eps") is not None and not math.isclose(eps, result["eps"], rel_tol=1e-6):
        notes.append(f"ε {result.get('eps_str') or fmt(result['eps'])} (published: {table['eps']})")
    if "autoattack" in table["columns"] and "autoattack" not in result.get("attacks", {}):
        other = [k for k in ("aa_fast", "aa_rand") if k in result.get("attacks", {})]
        notes.append(f"AA column needs --aa standard (ran {other[0]})" if other else "AutoAttack not run")
    if row.get("note"):
        notes.append(row["note"])
    return notes


def smoke_scale(result):
    """Whether a run is at smoke scale: a tiny student, a few epochs or a few training images."""
    args = (result.get("training") or {}).get("args") or {}
    epochs, subset = args.get("epochs"), args.get("train_subset")
    return bool(args) and (result.get("arch") in SMOKE_ARCHS or (isinstance(epochs, int) and epochs < SMOKE_EPOCHS)
                           or (isinstance(subset, int) and subset < SMOKE_TRAIN))


def smoke_line(results):
    """The line that opens a report of smoke runs only: their scale, and what such a report can show."""
    args = [(r.get("training") or {}).get("args") or {} for r in results]
    archs = ", ".join(sorted({str(r.get("arch")) for r in results}))
    epochs = sorted({a["epochs"] for a in args if isinstance(a.get("epochs"), int)})
    subsets = [a.get("train_subset") for a in args]
    scale = [archs]
    if epochs:
        span = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
        scale.append(f"{span} epoch{'' if epochs == [1] else 's'}")
    if all(isinstance(s, int) for s in subsets):
        scale.append(f"{'at most ' if len(set(subsets)) > 1 else ''}{max(subsets)} training images")
    return (f"**Smoke scale** ({', '.join(scale)}): this checks the pipeline end to end (training, checkpoints, "
            "evaluation, this report). Accuracies near chance are expected, and it says nothing about the published "
            "numbers.")


def short_source(table):
    """'RSLAD Tables 3-4' for 'RSLAD (Zi et al., ICCV 2021) Tables 3-4'."""
    return re.sub(r"\s*\([^)]*\)", "", table["source"])


def nearest(run, near):
    """The nearest row and what differs, in one table cell."""
    if "script" not in run:
        return ("the JSON names no training script (not a suite checkpoint?): give it with --set script=NAME and "
                "the row's flags")
    if not near:
        return "—"
    same_script = [n for n in near if n[4]["script"] == run.get("script")] or near
    _, diffs, unknown, table, row = same_script[0]
    parts = [f"{k} {' ≠ '.join(apart(o, t))}" for k, o, t in diffs]
    parts += [f"{k} not recorded (--set {k}=...)" for k in unknown]
    return f"{short_source(table)}, «{row['label']}»: " + "; ".join(parts)


def render(published, runs, show_worst=False):
    """The Markdown text: one section per published table with a block per run that targets it, then the
    runs that match no row."""
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
                groups.setdefault(table["id"], (table, []))[1].append((name, result, run, row))
        if not matches:
            unmatched.append((name, result, run, sorted(near, key=lambda t: t[0])))

    lines = []
    if runs and all(smoke_scale(result) for _, result, _ in runs):
        lines += [smoke_line([result for _, result, _ in runs]), ""]
    for table, entries in groups.values():
        head = f"### {table['source']}"
        if table.get("preset"):
            head += f" (`eval_attacks.py --preset {table['preset']}`, ε = {table['eps']})"
        cols = table["columns"]
        lines += [head, ""]
        if table.get("note"):
            lines += [table["note"] + ".", ""]
        for name, result, run, row in entries:
            first, notes = setting(result, run, table, row)
            lines += [f"{name}: {first}", ""]  # before any number
            lines.append("| published row | | " + " | ".join(LABELS.get(c, c) for c in cols) + " |")
            lines.append("|---|---|" + "---:|" * len(cols))
            paper = row["values"]
            mine = [ours(result, c) for c in cols]
            delta = [None if a is None or b is None else a - b for a, b in zip(mine, paper)]
            lines.append(f"| {row['label']} | paper | " + " | ".join(cell(v) for v in paper) + " |")
            lines.append("| | ours | " + " | ".join(cell(v) for v in mine) + " |")
            lines.append("| | Δ | " + " | ".join(cell(v, signed=True) for v in delta) + " |")
            if show_worst:
                lines.append("| | ours, worst class | " + " | ".join(worst(result, c) or "—" for c in cols) + " |")
            tested = eval_side(result, table, row)
            lines.append("")
            if tested:
                lines.append("- test side: " + "; ".join(tested) + ".")
            lines += [f"- {n}." for n in notes]
            if tested or notes:
                lines.append("")
    if unmeasured:
        lines += ["### Published rows these runs target but did not measure", ""]
        for name, table, row in unmeasured:
            cols = ", ".join(LABELS.get(c, c) for c in table["columns"])
            lines.append(f"- {name}: {table['source']}, «{row['label']}» ({cols})"
                         + (f": {table['note']}" if table.get("note") else ""))
        lines.append("")
    if unmatched:
        lines += ["### Runs without a published row", "",
                  "No row of tools/published.json matches these runs; the last column names the nearest row and what "
                  "differs (`--set KEY=VALUE` gives a fact the JSON lacks).", ""]
        by_preset = {}
        for entry in unmatched:
            by_preset.setdefault(entry[2].get("preset"), []).append(entry)
        for preset, entries in by_preset.items():  # our numbers alone, and how far the nearest row is
            cols = list(dict.fromkeys(c for _, result, _, _ in entries for c in measured(result)))
            lines += [f"Ours, `--preset {preset}`:", ""]
            lines.append("| run | " + " | ".join(LABELS.get(c, c) for c in cols)
                         + " | nearest published row: what differs |")
            lines.append("|---|" + "---:|" * len(cols) + "---|")
            lines += [f"| {name} | " + " | ".join(cell(ours(result, c)) for c in cols) + f" | {nearest(run, near)} |"
                      for name, result, run, near in entries]
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
                        "script=rslad; one that overrides a recorded value is named in the run's first line")
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
