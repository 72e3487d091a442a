"""tools/gpu_check.py on the CPU: its arguments, its bookkeeping (a failing check, the time budget) and its
dry path (--device cpu --tiny), which runs every check's code: check 1 compares the CPU with itself, the
compiled configurations run on aot_eager, AutoAttack runs against pyautoattack, ddp is skipped."""

import importlib.util
import json
import math
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script

import common

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

SCRIPT = ROOT / "tools" / "gpu_check.py"
VARIANT_NAMES = [
    "rslad", "rslad --inner ard --outer ard", "ard",
    "iad --variant iad1", "iad --variant iad2", "iad --variant ard", "iad --variant akd2", "mtard",
    "ardir --combo RC", "ardir --combo CC", "ardir --combo RA",
    "adt_aodt --method adt", "adt_aodt --method aodt", "adt_aodt --method adt --reg alp",
    "adt_aodt --method aodt --reg trades", "adaad", "adaad --variant adaiad", "peeraid",
    "train_teacher --recipe natural-rslad", "train_teacher --recipe sat-iad", "train_teacher --recipe trades",
]
CONFIGS = ("bf16-channels-last", "reduce-overhead")


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--tiny"], "the following arguments are required: --out"),
    (["--device", "cpu", "--tiny", "--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "cpu", "--tiny", "--only", "eager,nope"], "unknown check nope"),
    (["--device", "cpu", "--tiny", "--budget-seconds", "-5"], "must be positive"),
    (["--device", "cpu", "--tiny", "--budget-seconds", "nan"], "not a finite number"),
    (["--device", "cpu"], "this check needs CUDA; --device cpu is only for --tiny"),
    (["--device", "tpu", "--tiny"], "--device tpu"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv + ([] if "required" in message else ["--out", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_cpu_without_tiny_exits_2_from_the_command_line(tmp_path):
    proc = run_script(SCRIPT, "--device", "cpu", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: this check needs CUDA; --device cpu is only for --tiny\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default --device cuda would run the real checks")
def test_default_device_without_cuda_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "CUDA is not available" in err


# --------------------------------------------------------------------------------------
# Bookkeeping: a failing check, the budget (checks replaced by stand-ins, in this process)
# --------------------------------------------------------------------------------------

def read_json(out):
    return json.loads((out / "gpu_check.json").read_text())


def test_a_failing_check_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch, capsys):
    def broken(ctx, details):
        details["partial"] = 1.5
        raise RuntimeError("first line of the message\nthe line that names the cause")

    def refused(ctx, details):
        common.fail("a teacher file is missing")

    ran = []
    monkeypatch.setattr(gpu_check, "check_eager", refused)
    monkeypatch.setattr(gpu_check, "check_compiled", broken)
    monkeypatch.setattr(gpu_check, "check_bench", lambda ctx, d: ran.append("bench") or ("pass", None, "fine"))
    out = tmp_path / "out"
    backend, threads = common.COMPILE_BACKEND, torch.get_num_threads()
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--only", "eager,compiled,bench"])
    assert rc == 1 and ran == ["bench"]
    assert common.COMPILE_BACKEND == backend and torch.get_num_threads() == threads  # restored
    checks = read_json(out)["checks"]
    assert list(checks) == list(gpu_check.CHECKS)
    assert checks["eager"]["status"] == "fail" and checks["eager"]["reason"] == "error: a teacher file is missing"
    assert checks["compiled"]["status"] == "fail"
    assert checks["compiled"]["reason"] == "RuntimeError: ... the line that names the cause"
    assert checks["compiled"]["details"] == {"partial": 1.5} and "Traceback" in checks["compiled"]["traceback"]
    assert checks["bench"]["status"] == "pass"
    assert [checks[c]["status"] for c in ("autoattack", "ddp")] == ["skip", "skip"]
    assert checks["ddp"]["reason"] == "not selected (--only)"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])]
    assert [ln.split()[:2] for ln in lines] == [["FAIL", "eager"], ["FAIL", "compiled"], ["PASS", "bench"],
                                                ["SKIP", "autoattack"], ["SKIP", "ddp"]]


def test_the_budget_cuts_a_check_short_and_skips_the_rest(tmp_path, monkeypatch):
    """Variants take 0.3 s each against a budget of 1 s: the first ones run, the rest of check 1 and every
    later check are skipped for the budget, and nothing failed: exit status 0."""
    def slow(method, flags, ctx):
        time.sleep(0.3)
        return {"terms": {}, "terms_max_rel_diff": 0.0, "update_rel_diff": 0.0, "param_max_abs_diff": 0.0,
                "buffers_max_rel_diff": 0.0}, []
    monkeypatch.setattr(gpu_check, "eager_variant", slow)
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--budget-seconds", "1"]) == 0
    checks = read_json(out)["checks"]
    variants = checks["eager"]["details"]["variants"]
    ran = [v for v in variants if v["status"] == "pass"]
    assert 1 <= len(ran) < len(variants) and all(v["status"] == "skip" and v["reason"] == "budget"
                                                 for v in variants[len(ran):])
    assert checks["eager"]["status"] == "skip" and checks["eager"]["reason"].startswith(
        f"budget: {len(variants) - len(ran)} of {len(variants)} variants not run")
    assert all(checks[c]["status"] == "skip" and checks[c]["reason"].startswith("budget")
               for c in ("compiled", "bench", "autoattack", "ddp"))


# --------------------------------------------------------------------------------------
# The dry path, once, in a subprocess
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        proc = run_script(SCRIPT, "--device", "cpu", "--tiny", "--out", tmp / "out", cwd=tmp)
    path = tmp / "out" / "gpu_check.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return proc, report


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_dry_path_passes_and_names_every_check(dry):
    proc, report = dry
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    aa = "pass" if importlib.util.find_spec("pyautoattack") else "skip"
    assert {c: r["status"] for c, r in report["checks"].items()} == {
        "eager": "pass", "compiled": "pass", "bench": "pass", "autoattack": aa, "ddp": "skip"}
    assert report["checks"]["ddp"]["reason"] == "needs 2 GPUs (the device is the CPU)"
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["compile_backend"] == "aot_eager"
    assert env["cpu_threads"] == 1
    assert "--tiny" in env["command"] and report["tiny"] is True
    assert all(is_number(r["seconds"]) and r["seconds"] >= 0 for r in report["checks"].values())


def test_dry_path_summary_has_one_line_per_check(dry):
    proc, report = dry
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, device cpu")
    assert lines[1].startswith("command: ") and "gpu_check.py --device cpu --tiny --out" in lines[1]
    rows = [ln for ln in lines if ln.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])]
    assert [ln.split()[:2] for ln in rows] == [[r["status"].upper(), c] for c, r in report["checks"].items()]
    assert lines[-1].startswith("result: 0 failed")


def test_dry_path_check1_runs_every_variant_and_the_cpu_equals_itself(dry):
    _, report = dry
    d = report["checks"]["eager"]["details"]
    assert [v["name"] for v in d["variants"]] == VARIANT_NAMES
    assert d["tolerances"] == gpu_check.TOL and d["reference_device"] == "cpu"
    for v in d["variants"]:
        assert v["status"] == "pass", v
        if not any(a.startswith("natural-") for a in v["argv"]):  # a natural recipe has no attack
            assert v["argv"][v["argv"].index("--rand-start") + 1] == "none"
        assert "loss" in v["terms"], v["name"]
        for name, t in v["terms"].items():
            assert is_number(t["cpu"]) and t["cpu"] == t["device"], (v["name"], name)
            assert t["abs_diff"] == 0 == t["rel_diff"], (v["name"], name)
        for key in ("terms_max_rel_diff", "update_rel_diff", "param_max_abs_diff", "buffers_max_rel_diff"):
            assert is_number(v[key]) and v[key] == 0, (v["name"], key)
        assert v["int_buffers_differ"] == []
    assert d["max"] == dict.fromkeys(("terms_max_rel_diff", "update_rel_diff", "param_max_abs_diff",
                                      "buffers_max_rel_diff"), 0)


def test_dry_path_compiled_configurations(dry):
    _, report = dry
    d = report["checks"]["compiled"]["details"]
    assert d["backend"] == "aot_eager" and [m["name"] for m in d["methods"]] == [
        " ".join([m, *f]) for m, f in gpu_check.COMPILED_VARIANTS]
    for m in d["methods"]:
        assert m["status"] == "pass", m
        for config in CONFIGS:
            r = m[config]
            assert len(r["losses"]) == 2 and all(is_number(v) for v in r["losses"]), (m["name"], config)
            assert r["losses"][0] == r["compiled_first_step"]["loss"]
            for key in ("unique_graphs_before", "unique_graphs_after_first_step", "unique_graphs_after", "recompiles"):
                assert isinstance(r[key], int) and r[key] >= 0, (m["name"], config, key)
            assert r["graphs_compiled"] == r["unique_graphs_after"] - r["unique_graphs_before"] >= 1
            assert r["unique_graphs_after"] == r["unique_graphs_after_first_step"] > 0
            assert r["max_rel_diff_compared"] <= r["rtol"]
            assert r["eager_first_step"].keys() == r["compiled_first_step"].keys()
        # bf16 autocast really ran (its first step differs from fp32); the fp32 capture computes the same numbers
        assert m["bf16-channels-last"]["rel_diff"]["loss"] > 0
        assert max(m["reduce-overhead"]["rel_diff"].values()) < 1e-6
        assert m["reduce-overhead"]["cuda_graphs"] is False and "not exercised" in m["reduce-overhead"]["note"]


def test_dry_path_bench_numbers(dry):
    _, report = dry
    d = report["checks"]["bench"]["details"]
    assert isinstance(d["flops_per_step"], int) and d["flops_per_step"] > 0
    for name in ("eager-fp32", "bf16-channels-last-compile"):
        c = d["configs"][name]
        assert all(is_number(c[k]) and c[k] > 0 for k in ("seconds_per_step", "images_per_s", "tflops")), name
        assert c["epoch_seconds_projected"] == pytest.approx(50_000 / c["images_per_s"])
        assert c["tflops"] == pytest.approx(d["flops_per_step"] / c["seconds_per_step"] / 1e12)
        assert c["mfu"] is None and c["peak_tflops"] is None  # no peak for a CPU
    assert d["configs"]["eager-fp32"]["precision"] == "fp32"
    assert d["configs"]["bf16-channels-last-compile"]["precision"] == "bf16"
    mon = d["monitor"]
    assert mon["images_timed"] == 16 and is_number(mon["seconds_timed"]) and mon["seconds_timed"] > 0
    assert mon["projected_seconds"] == pytest.approx(mon["seconds_timed"] * 10_000 / 16)
    assert 0 <= mon["robust"] <= mon["clean"] <= 1


def test_dry_path_autoattack_matches_the_official_code(dry):
    pytest.importorskip("pyautoattack")
    _, report = dry
    d = report["checks"]["autoattack"]["details"]
    assert d["points"] == 16 and d["tolerance_points"] == 0 and d["flags_differ"] == 0 and d["differing_points"] == []
    assert d["square_queries"] == 500 and gpu_check.SIZES[False]["aa_square_queries"] == 5000  # "standard" off --tiny
    assert d["ours_robust"] == d["official_robust"]
    cum = d["ours_cumulative"]
    assert list(cum) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert cum["clean"] == 1.0 and 0 < cum["apgd-ce"] < 1  # labels = predictions; points left for APGD-T onwards
