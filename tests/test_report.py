"""tools/report.py and tools/published.json: the published rows, kept once, agree with every number the
scripts' docstrings quote; a smoke eval's JSON gets the row its script and preset target; no guessing; a run
that is not trained with the row's setting says so, and what differs, before any number; runs are named by
their method; a report of smoke runs says what it can show."""

import ast
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import eval_attacks as ea

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = json.loads((ROOT / "tools" / "published.json").read_text())
SCRIPTS = ["rslad", "ard", "train_teacher", "iad", "mtard", "ardir", "adt_aodt", "adaad", "peeraid"]

# a published accuracy in a docstring: two decimals, at least 1 (0.25 is a loss weight, 0.031 an eps)
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}\.\d{2})(?!\w|\.\d)")
# what may join two numbers of one quoted row: "83.38 / 60.01", "83.40 / ... / 50.17", "81.93 clean / 49.23"
JOIN = re.compile(r"^\s*(clean|AA)?\s*/\s*(\.\.\.\s*/\s*)?$")


def quoted_rows(text):
    """[(line, [numbers], text before them)]: each run of published-looking numbers joined as above."""
    out = []
    for line in text.splitlines():
        groups = []  # [start, end, numbers]
        for m in NUMBER.finditer(line):
            if float(m.group(1)) < 1:
                continue
            if groups and JOIN.match(line[groups[-1][1]:m.start()]):
                groups[-1][1:] = [m.end(), groups[-1][2] + [float(m.group(1))]]
            else:
                groups.append([m.start(), m.end(), [float(m.group(1))]])
        out += [(line, numbers, line[:start]) for start, _, numbers in groups]
    return out


def in_order(numbers, values, tol=0.005):
    it = iter(values)
    return all(any(abs(n - v) < tol for v in it) for n in numbers)


def all_rows():
    return [(t, r) for t in PUBLISHED["tables"] for r in t["rows"]]


def test_docstring_numbers_agree_with_published():
    """Every number a method script's docstring quotes belongs, in order, to one published row (MTARD's
    W-Robust figures: to (clean + robust) / 2 of one)."""
    rows = [[v for v in r["values"] if v is not None] for _, r in all_rows()]
    wrobust = [[(r[0] + v) / 2 for v in r[1:]] for r in rows]
    checked, bad = 0, []
    for name in SCRIPTS:
        path = ROOT / f"{name}.py"
        if not path.exists():
            continue
        for line, numbers, before in quoted_rows(ast.get_docstring(ast.parse(path.read_text())) or ""):
            derived = before.rstrip().endswith("W-Robust")  # rounded from a half: 47.895 is printed 47.90
            checked += 1
            if not any(in_order(numbers, r, 0.0051 if derived else 0.005) for r in (wrobust if derived else rows)):
                bad.append(f"{name}.py: {numbers} in {line.strip()!r}")
    assert checked > 40 and bad == [], "\n".join(bad)


def test_published_rows_are_well_formed():
    sources = {n: (ROOT / f"{n}.py").read_text() for n in SCRIPTS if (ROOT / f"{n}.py").exists()}
    ids = [t["id"] for t in PUBLISHED["tables"]]
    assert len(ids) == len(set(ids))
    report = load_report()
    for table, row in all_rows():
        assert table["preset"] is None or table["preset"] in ea.PRESETS, table["id"]
        assert set(table["columns"]) <= set(report.LABELS), table["id"]
        assert len(row["values"]) == len(table["columns"]) and any(v is not None for v in row["values"]), row
        assert row["dataset"] in common.DATASETS and row["arch"] in common.ARCHS
        assert row["kind"] in ("best", "last", None)
        if row["script"] not in sources:
            continue  # a script still being written
        src = sources[row["script"]]
        for key, value in row["flags"].items():
            flag = key.split(".")[0]
            # a teacher flag's _arch comes from common.add_teacher_args(prefix=...)
            base = flag[:-len("_arch")] if flag.endswith("_arch") else flag
            teacher_flag = base in ("teacher", "nat_teacher") and "add_teacher_args" in src
            assert f'"--{flag.replace("_", "-")}"' in src or teacher_flag, (row["label"], key)
            if flag.endswith("arch"):
                assert value in common.ARCHS, (row["label"], key)


def load_report():
    import importlib.util
    spec = importlib.util.spec_from_file_location("report", ROOT / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)
    return proc


def report_text(*args):
    """The report, run in this process: the training scripts it imports for a matched row's defaults (and
    torch) are already loaded here, where a new process would load them again."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_report().main([str(a) for a in args])
    return out.getvalue()


# ---- a smoke eval of a suite checkpoint that targets IAD Table 2's IAD-I row ------------------------------

IAD1 = {"script": "iad", "dataset": "cifar10", "arch": "resnet18", "variant": "iad1", "teacher_arch": "resnet18",
        "temp": 1.0, "beta": 0.1, "alpha": 1.0, "lambda2": 0.5, "lambda3": 0.25, "begin": 60, "epochs": 200,
        "runs_dir": "runs"}


@pytest.fixture(scope="module")
def iad_eval(tmp_path_factory, cifar_dir):
    """eval_attacks.py --preset iad on a (random-weight) ResNet-18 suite checkpoint whose args say iad.py
    --variant iad1 with an AT teacher (a suite file recording --recipe sat-iad)."""
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    teacher = tmp / "AT.pt"
    common.save_checkpoint(teacher, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=200,
                           dataset="cifar10", args={"script": "train_teacher", "recipe": "sat-iad"}))
    (tmp / "runs" / "iad__cifar10__resnet18__s1__x").mkdir(parents=True)
    ckpt = tmp / "runs" / "iad__cifar10__resnet18__s1__x" / "best.pt"
    args = {**IAD1, "teacher": str(teacher), "teacher_sha256": common.file_sha256(teacher)}
    common.save_checkpoint(ckpt, common.checkpoint_dict(common.build_model("resnet18").eval(), kind="best", epoch=180,
                           dataset="cifar10", args=args))
    out = tmp / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval_attacks.py"), str(ckpt), "--preset", "iad", "--attacks",
                           "fgsm_rand", "--aa", "off", "--n-ex", "8", "--bs", "8", "--data-dir", str(cifar_dir),
                           "--device", "cpu", "--json", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=300, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_report_prints_the_targeted_row(iad_eval):
    j = json.loads(iad_eval.read_text())
    proc = report(iad_eval)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "### IAD (Zhu et al., ICLR 2022) Table 2 (`eval_attacks.py --preset iad`, ε = 8/255)" in text
    assert "| published row | | Clean | FGSM (rand. start) | PGD-20 | CW∞ | AA |" in text
    name = "`iad__cifar10__resnet18__s1__x/best` (iad --variant iad1)"
    # every recorded flag is IAD-I's, but the teacher file has no args.json beside it: said, before the numbers
    status = f"{name}: the published setting in every recorded flag; not checked: the teacher's training record"
    assert status in text and text.index(status) < text.index("| published row |")
    assert "| IAD-I, AT teacher, CIFAR-10 | paper | 82.09 | 63.20 | 52.14 | 50.74 | 48.66 |" in text
    clean, fgsm = 100 * j["clean"]["acc"], 100 * j["attacks"]["fgsm_rand"]["acc"]
    assert f"| | ours | {clean:.2f} | {fgsm:.2f} | — | — | — |" in text
    assert f"| | Δ | {clean - 82.09:+.2f} | {fgsm - 63.20:+.2f} | — | — | — |" in text
    assert "TRADES teacher" not in text and "Tables 5-6" not in text  # neither the other teacher nor the ablations
    assert "first 8 of 10000 test images" in text and "attacks=fgsm_rand" in text and "AutoAttack not run" in text
    assert text.count("| paper |") == 1 and "Runs without a published row" not in text


def test_report_refuses_to_guess(iad_eval, tmp_path):
    j = json.loads(iad_eval.read_text())
    # the teacher file is gone: AT and TRADES rows cannot be told apart, so neither is printed
    j["training"]["teachers"]["teacher"] = {"path": "AT.pt", "found": False}
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps(j))
    text = report_text(gone)
    assert "| paper |" not in text and "No row of tools/published.json matches" in text
    assert "teacher.recipe not recorded (--set teacher.recipe=...)" in text
    assert "Ours, `--preset iad`:" in text and f"| {100 * j['clean']['acc']:.2f} |" in text  # ours alone
    text = report_text(gone, "--set", "teacher.recipe=trades-iad")
    assert "| IAD-I, TRADES teacher, CIFAR-10 | paper | 80.63 | 63.14 | 53.84 | 51.60 | 50.17 |" in text
    # another preset, another arch, another kind: each says what differs and prints no numbers
    # (the nearest row: the same preset first, so RSLAD's re-run of IAD-I for an eval with the rslad preset)
    for change, why, label in ((("preset", "rslad"), "teacher_arch resnet18 ≠ wrn34_10", "IAD (RSLAD's re-run)"),
                               (("arch", "cnn_small"), "arch cnn_small ≠ resnet18", "IAD-I, AT teacher, CIFAR-10")):
        k = dict(j, **dict([change]))
        k["training"]["teachers"]["teacher"] = {"found": True, "recipe": "sat-iad"}
        path = tmp_path / f"{change[0]}.json"
        path.write_text(json.dumps(k))
        text = report_text(path)
        assert "| paper |" not in text and why in text and f"«{label}" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = report(bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1


def test_more_specific_rows_win_and_fractions_match():
    rep = load_report()
    result = {"schema": "suite-eval/1", "checkpoint": "runs/ard__x/best.pt", "dataset": "cifar10", "arch": "resnet18",
              "preset": "rslad", "eps": 8 / 255, "eps_str": "8/255", "n_ex": 10000, "overrides": {},
              "clean": {"acc": 0.84}, "attacks": {"fgsm": {"acc": 0.6}, "autoattack": {"acc": 0.49}},
              "training": {"script": "ard", "kind": "best", "args": {"alpha": 1, "temp": 30.0, "ce_input": "clean",
                                                                     "teacher_arch": "wrn34_10", "epochs": 300,
                                                                     "lr_milestones": [215, 260, 285]}}}
    text = rep.render(PUBLISHED, [("ard", result, rep.facts(result, {}))])
    assert "ARD-300" in text and "Runs without a published row" not in text
    assert "| ARD, ResNet-18, CIFAR-10, best |" not in text  # the 200-epoch row is hidden by ARD-300
    assert "| | Δ | -0.40 | +0.19 | — | — | — | -0.70 |" in text  # 84.00 - 84.40, 60.00 - 59.81, 49.00 - 49.70
    assert rep.same(5 / 6, "5/6") and rep.same([1, 2], [1.0, 2.0])
    assert not rep.same("RC", "CC") and not rep.same(None, 0) and not rep.same(None, [215])


# ---- the training setting, names, smoke scale: eval JSONs written directly, nothing trained ----------------

def defaults(script, *argv):
    """The flags `script`.py resolves for a command, from its own parser: what args.json holds after such a run."""
    args, _ = importlib.import_module(script).parse_args(list(argv))
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def eval_json(args, *, script, kind="best", preset="rslad", eps=8 / 255, n_ex=10000, folder=None, teachers=None):
    """An eval_attacks.py result of a suite checkpoint trained with `args` (as eval_attacks.py records it)."""
    folder = folder or f"{script}__{args.get('dataset', 'cifar10')}__{args['arch']}__s0__x"
    return {"schema": "suite-eval/1", "checkpoint": f"runs/{folder}/{kind}.pt",
            "dataset": args.get("dataset", "cifar10"), "arch": args["arch"], "preset": preset, "eps": eps,
            "eps_str": "8/255", "n_ex": n_ex, "overrides": {},
            "clean": {"acc": 0.1}, "attacks": {"fgsm": {"acc": 0.05}, "autoattack": {"acc": 0.04}},
            "training": {"script": script, "kind": kind, "epoch": 1, "args": {"script": script, **args},
                         "teachers": teachers or {}}}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def block(text, source):
    """The non-empty lines of the section `### <source> ...` of a report."""
    section = next(s for s in text.split("### ")[1:] if s.startswith(source))
    return [line for line in section.splitlines()[1:] if line.strip()]


def test_forced_match_names_every_difference_before_the_numbers(tmp_path, capsys):
    """A 1-epoch cnn_small run on 512 images, forced onto RSLAD's ResNet-18 row with --set: the first line of
    its block says it is not the published setting and lists each difference, the teacher's included."""
    rep = load_report()
    teacher = tmp_path / "runs" / "train_teacher-sat-iad__x" / "best.pt"
    write(teacher.parent / "args.json", {**defaults("train_teacher", "--recipe", "sat-iad", "--arch", "cnn_small"),
                                         "script": "train_teacher", "epochs": 3, "train_subset": 1024})
    args = {**defaults("rslad", "--teacher", str(teacher), "--arch", "cnn_small", "--epochs", "1", "--train-subset",
                       "512", "--test-subset", "200", "--batch-size", "64", "--lr", "0.02", "--eval-every", "1",
                       "--amp", "bf16"), "teacher_arch": "cnn_small", "teacher_norm": "none", "teacher_sha256": "ab"}
    entry = {"path": str(teacher), "found": True, "suite": True, "same_file": True, "script": "train_teacher",
             "recipe": "sat-iad", "arch": "cnn_small", "dataset": "cifar10", "kind": "best", "epoch": 3}
    result = eval_json(args, script="rslad", n_ex=200, teachers={"teacher": entry})
    result["overrides"] = {"aa": "fast", "eps": 0.03137254901960784, "step": 0.007000000216066837}  # float32 tail
    path = write(tmp_path / "forced.json", result)
    rep.main([str(path), "--set", "arch=resnet18", "--set", "teacher_arch=wrn34_10"])
    text = capsys.readouterr().out
    name = "`rslad__cifar10__cnn_small__s0__x/best` (rslad)"
    for source in ("RSLAD (Zi et al., ICCV 2021) Tables 3-4", "MTARD (Zhao et al., ECCV 2022) Table 2"):
        lines = block(text, source)
        first = lines[1]  # after the table's note, before any number
        assert first.startswith(f"{name}: NOT the published setting: 1 epoch (paper 300), train subset 512 (paper "
                                "50000), batch size 64 (paper 128), lr 0.02 (paper 0.1), student cnn_small (paper "
                                "resnet18; `--set arch=resnet18` overrides the record), teacher cnn_small (paper "
                                "wrn34_10; `--set teacher_arch=wrn34_10` overrides the record), teacher trained off "
                                "its recipe sat-iad [3 epochs (recipe 200), train subset 1024 (recipe 50000)"), first
        assert "`--eval-every 1` (paper 20)" in first and "monitor's test subset 200 (paper 10000)" in first
        assert "amp" not in first and lines[2].startswith("| published row |")
        speed = "- speed and precision flags (same method, numbers may move slightly): `--amp bf16` (paper off)."
        assert speed in lines
        assert ("- test side: first 200 of 10000 test images; preset overridden: aa=fast, eps=8/255, step=0.007"
                in "\n".join(lines))
    assert not re.search(r"\d\.\d{7}", text)  # numbers at a fixed precision, no float32 tails


def test_published_setting_gets_no_such_line(tmp_path, capsys):
    """args.json at the row's defaults (the published teacher file, not trained here) and the full test set:
    the block says so; a speed flag is a note only; ADT's tables average 2 runs, so one run is a difference."""
    rep = load_report()
    args = {**defaults("rslad", "--teacher", "/files/trades_wrn34_10.pt", "--teacher-arch", "wrn34_10", "--amp", "bf16",
                       "--compile"), "teacher_norm": "none", "teacher_sha256": "ab", "data_sha256": {"train": "cd"},
            "seed": 3, "device": "cuda", "runs_dir": "/elsewhere", "env": {"torch": "2"}}
    entry = {"path": "/files/trades_wrn34_10.pt", "found": True, "suite": False, "same_file": True}
    path = write(tmp_path / "ok.json", eval_json(args, script="rslad", teachers={"teacher": entry}))
    rep.main([str(path)])
    text = capsys.readouterr().out
    lines = block(text, "RSLAD (Zi et al., ICCV 2021) Tables 3-4")
    assert lines[1] == ("`rslad__cifar10__resnet18__s0__x/best` (rslad): the published setting (every training flag "
                        "as the script resolves the row's command).")
    assert "NOT the published setting" not in text and "Smoke scale" not in text
    assert "`--amp bf16` (paper off), `--compile` on (paper off)" in text
    adt = {**defaults("adt_aodt", "--method", "adt", "--teacher", "wrn34_10:/files/natural.pt"),
           "teacher_arch": ["wrn34_10"]}  # recorded from the file
    path = write(tmp_path / "adt.json", eval_json(adt, script="adt_aodt", kind="last", preset="adt", eps=0.031))
    rep.main([str(path)])
    first = block(capsys.readouterr().out, "ADT/AODT (CVPR submission 644) Tables 2-3")[1]
    assert first.endswith("(adt_aodt --method adt): NOT the published setting: one run (paper: mean of 2).")


def test_names_carry_the_method_and_smoke_runs_are_listed_compactly(tmp_path):
    """Six smoke runs, ADT and AODT (and IAD's two variants) in folders of the same name: each name carries its
    method, each run is one line, and one line at the top says what smoke scale can show."""
    rep = load_report()
    small = ["--arch", "cnn_small", "--epochs", "2", "--train-subset", "1024", "--test-subset", "200", "--lr", "0.02"]
    sat, nat = ["--teacher", "/t/sat.pt"], ["--nat-teacher", "/t/nat.pt"]
    runs = [("adt", "adt_aodt", ["--method", "adt", "--teacher", "cnn_small:/t/nat.pt"], "adt"),
            ("aodt", "adt_aodt", ["--method", "aodt", "--peer-arch", "cnn_small"], "adt"),
            ("iad1", "iad", ["--variant", "iad1", "--begin", "1", *sat], "iad"),
            ("iad2", "iad", ["--variant", "iad2", "--begin", "1", *sat, *nat], "iad"),
            ("rslad", "rslad", sat, "rslad"),
            ("rslad6", "rslad", ["--inner", "ard", *sat], "rslad")]
    results = []
    for out, script, argv, preset in runs:  # old folder names, the script alone: adt and aodt read the same
        args = defaults(script, *argv, *small)
        args.update({k: "cnn_small" for k in ("teacher_arch", "nat_teacher_arch") if args.get(k[:-5])})  # from the file
        teachers = {"teacher": {"found": True, "suite": True, "recipe": "sat-iad"}} if script == "iad" else None
        result = eval_json(args, script=script, preset=preset, kind="last" if script == "adt_aodt" else "best",
                           n_ex=200, folder=f"{script}__same", teachers=teachers)
        result["checkpoint"] = f"runs/{out}/" + result["checkpoint"][len("runs/"):]
        results.append((result["checkpoint"], result))
    names = rep.run_names(results)
    for label in ("(adt_aodt --method adt)", "(adt_aodt --method aodt)", "(iad --variant iad1)",
                  "(iad --variant iad2)", "(rslad)", "(rslad --inner ard)"):
        assert sum(n.endswith(label) for n in names) == 1, (label, names)
    text = rep.render(PUBLISHED, [(n, r, rep.facts(r, {})) for n, (_, r) in zip(names, results)])
    lines = text.splitlines()
    assert lines[0] == ("**Smoke scale** (cnn_small, 2 epochs, 1024 training images): this checks the pipeline end to "
                        "end (training, checkpoints, evaluation, this report). Accuracies near chance are expected, "
                        "and it says nothing about the published numbers.")
    assert "| paper |" not in text and "nearest:" not in text
    for name in names:  # one line each: our numbers and the nearest row
        assert sum(name in line for line in lines) == 1, name
    assert ("«IAD-II, AT teacher, CIFAR-10»: arch cnn_small ≠ resnet18; teacher_arch cnn_small ≠ resnet18; "
            "begin 1 ≠ 40 |") in text
    assert len(lines) < 30


def test_numbers_print_at_a_fixed_precision():
    rep = load_report()
    assert rep.fmt(0.07000000029802322) == "0.07" and rep.fmt(0.03099999949336052) == "0.031"
    assert rep.fmt(8 / 255) == "8/255" and rep.fmt(0.2) == "0.2" and rep.fmt(5 / 6) == "0.833333"
    assert rep.fmt([215, 260, 285]) == "215 260 285" and rep.fmt(None) == "none" and rep.fmt(300) == "300"
    assert rep.apart(0.10000000149011612, 0.1) == ("0.10000000149011612", "0.1")  # unequal: never "0.1 ≠ 0.1"
