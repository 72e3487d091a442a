"""tools/report.py and tools/published.json: the published rows, kept once, agree with every number the
scripts' docstrings quote; a smoke eval's JSON gets the row its script and preset target; no guessing."""

import ast
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
SCRIPTS = ["rslad", "ard", "train_teacher", "iad", "mtard", "ardir", "adt_aodt"]

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
            teacher_flag = base in ("teacher", "adv_teacher", "nat_teacher") and "add_teacher_args" in src
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


# ---- a smoke eval of a suite checkpoint that targets IAD Table 2's IAD-I row ------------------------------

IAD1 = {"script": "iad", "dataset": "cifar10", "arch": "resnet18", "variant": "iad1", "teacher_arch": "resnet18",
        "temp": 1.0, "beta": 0.1, "alpha": 1.0, "alpha1": 0.5, "alpha2": 0.25, "begin": 60, "epochs": 200,
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
    assert "| run | published row | | Clean | FGSM (rand. start) | PGD-20 | CW∞ | AA |" in text
    name = "iad__cifar10__resnet18__s1__x/best"
    assert f"| `{name}` | IAD-I, AT teacher, CIFAR-10 | paper | 82.09 | 63.20 | 52.14 | 50.74 | 48.66 |" in text
    clean, fgsm = 100 * j["clean"]["acc"], 100 * j["attacks"]["fgsm_rand"]["acc"]
    assert f"| | | ours | {clean:.2f} | {fgsm:.2f} | — | — | — |" in text
    assert f"| | | Δ | {clean - 82.09:+.2f} | {fgsm - 63.20:+.2f} | — | — | — |" in text
    assert "TRADES teacher" not in text and "Tables 5-6" not in text  # neither the other teacher nor the ablations
    assert "first 8 of 10000 test images" in text and "attacks=fgsm_rand" in text and "AutoAttack not run" in text
    assert text.count("| paper |") == 1 and "Runs without a published row" not in text


def test_report_refuses_to_guess(iad_eval, tmp_path):
    j = json.loads(iad_eval.read_text())
    # the teacher file is gone: AT and TRADES rows cannot be told apart, so neither is printed
    j["training"]["teachers"]["teacher"] = {"path": "AT.pt", "found": False}
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps(j))
    text = report(gone).stdout
    assert "| paper |" not in text and "no row of tools/published.json matches" in text
    assert "teacher.recipe not recorded (--set teacher.recipe=...)" in text
    assert "Ours, `--preset iad`:" in text and f"| {100 * j['clean']['acc']:.2f} |" in text  # ours alone
    text = report(gone, "--set", "teacher.recipe=trades-iad").stdout
    assert "| IAD-I, TRADES teacher, CIFAR-10 | paper | 80.63 | 63.14 | 53.84 | 51.60 | 50.17 |" in text
    # another preset, another arch, another kind: each says what differs and prints no numbers
    for change, why in ((("preset", "rslad"), "preset 'rslad' ≠ 'iad'"),
                        (("arch", "cnn_small"), "arch 'cnn_small' ≠ 'resnet18'")):
        k = dict(j, **dict([change]))
        k["training"]["teachers"]["teacher"] = {"found": True, "recipe": "sat-iad"}
        path = tmp_path / f"{change[0]}.json"
        path.write_text(json.dumps(k))
        text = report(path).stdout
        assert "| paper |" not in text and why in text and "«IAD-I, AT teacher, CIFAR-10»" in text
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
    assert "| | | Δ | -0.40 | +0.19 | — | — | — | -0.70 |" in text  # 84.00 - 84.40, 60.00 - 59.81, 49.00 - 49.70
    assert rep.same(5 / 6, "5/6") and rep.same([1, 2], [1.0, 2.0])
    assert not rep.same("RC", "CC") and not rep.same(None, 0) and not rep.same(None, [215])
