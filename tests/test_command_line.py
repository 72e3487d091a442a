"""The base as a user meets it: --resume alone, refused values, a diverging run, failed writes, the
loader's answers to odd files, --help, and the pattern every method file shares. Each test runs the
scripts the way a user types them (subprocesses) where the behaviour is about the command line."""

import contextlib
import importlib
import inspect
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, check_resume_alone, run_script

import ard
import common
import eval_attacks
import rslad
import train_teacher as tt

TINY = ["--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--attack-steps", "2", "--lr", "0.02", "--device", "cpu"]


def one_line_error(proc, status=2):
    """The process ended with `status`, its stderr holds one line `error: ...` and no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def student_args(script, teacher, data):
    return ([] if script == "train_teacher.py" else ["--teacher", teacher]) + \
        (["--recipe", "sat-iad"] if script == "train_teacher.py" else []) + [*TINY, "--data-dir", data]


# ---------------------------------------------------------------------------------------------
# --resume alone
# ---------------------------------------------------------------------------------------------

# rslad.py and train_teacher.py stand for the students and the teachers (ard.py's main() has rslad's form; the other
# method files test their own resume in-process: conftest.check_resume_in_process)
@pytest.mark.parametrize("script", ["rslad.py", "train_teacher.py"])
def test_resume_alone_after_a_kill_equals_the_uninterrupted_run(script, cifar_dir, teacher_ckpt, tmp_path):
    extra = ["--eval-every", "1"] if script == "rslad.py" else []
    full, part = check_resume_alone(script, student_args(script, teacher_ckpt, cifar_dir) + extra, tmp_path)
    saved = json.loads((part / "args.json").read_text())
    assert saved["epochs"] == 2 and saved["data_dir"] == str(cifar_dir)  # the saved flags, not the defaults
    assert len(saved["resumes"]) == 1 and saved["resumes"][0]["changed"] == {}


@pytest.fixture(scope="module")
def finished_run_once(cifar_dir, teacher_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished_run")
    proc = run_script(ROOT / "rslad.py", "--teacher", teacher_ckpt, *TINY, "--lr", "0.05", "--epochs", "1",
                      "--data-dir", cifar_dir, "--runs-dir", tmp / "runs", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp / "runs").iterdir()
    return run


@pytest.fixture()
def finished_run(finished_run_once, tmp_path):
    """A 1-epoch RSLAD run saved with --lr 0.05 (not the default 0.1): the module's one run, copied into this
    test's folder (a run resumes in the folder of its last.pt)."""
    return Path(shutil.copytree(finished_run_once, tmp_path / "runs" / finished_run_once.name))


def test_resume_reads_typed_flags_from_argv(finished_run, tmp_path):
    last = finished_run / "last.pt"
    before = last.read_bytes()
    # --lr 0.1 is the parser's default, but typed next to --resume it is a change, and refused
    line = one_line_error(run_script(ROOT / "rslad.py", "--resume", last, "--lr", "0.1", cwd=tmp_path))
    assert "--lr 0.1 differs from the saved 0.05" in line and "--data-dir" in line
    line = one_line_error(run_script(ROOT / "rslad.py", "--resume", last, "--kl-scale", "2", cwd=tmp_path))
    assert "--kl-scale" in line
    assert last.read_bytes() == before
    # the saved value typed again is no change; --epochs may grow
    proc = run_script(ROOT / "rslad.py", "--resume", last, "--lr", "0.05", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(last, weights_only=True)["epoch"] == 2
    saved = json.loads((finished_run / "args.json").read_text())
    assert saved["epochs"] == 2 and saved["lr"] == 0.05 and saved["resumes"][0]["changed"] == {"epochs": 2}


def test_resume_accepts_a_moved_data_dir_and_teacher_but_not_another_teacher(finished_run, cifar_dir, tmp_path):
    import shutil
    last = finished_run / "last.pt"
    saved = json.loads((finished_run / "args.json").read_text())
    moved_data, moved_teacher = tmp_path / "moved-data", tmp_path / "moved-teacher.pt"
    shutil.copytree(cifar_dir, moved_data)
    shutil.copy(saved["teacher"], moved_teacher)
    proc = run_script(ROOT / "rslad.py", "--resume", last, "--data-dir", moved_data, "--teacher", moved_teacher,
                      "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(5)
    other = tmp_path / "other-teacher.pt"
    common.save_checkpoint(other, common.checkpoint_dict(common.build_model("cnn_small"), kind="best", epoch=1,
                                                         dataset="cifar10", args={}))
    line = one_line_error(run_script(ROOT / "rslad.py", "--resume", last, "--teacher", other, "--epochs", "3",
                                     cwd=tmp_path))
    assert "not the file the run started with" in line
    assert torch.load(last, weights_only=True)["epoch"] == 2


def test_resume_help_lists_the_flags_that_may_change(capsys):
    entry = "".join(help_options(rslad, capsys)["--resume"].split())  # argparse may wrap inside a flag name
    assert "only--compile,--compile-mode,--data-dir,--device,--epochs,--progress-every,--rb-model-dir,--runs-dir,--teacher,--tensorboard,--unsafe-loadmaybegivenagain" in entry


# ---------------------------------------------------------------------------------------------
# Values: one line, exit 2, before a run folder is made
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [(["--eps", "-1"], "--eps must be in [0, 1]"), (["--eps", "2"], "--eps must be in [0, 1]"),
              (["--lr", "-1"], "--lr must be a positive number"), (["--lr", "0"], "--lr must be a positive number"),
              (["--lr", "nan"], "not a finite number"), (["--lr", "inf"], "not a finite number"),
              (["--attack-step", "0"], "--attack-step must be a positive number"),
              (["--wd", "-0.0001"], "--wd must be a number >= 0"), (["--momentum", "1"], "--momentum must be in [0, 1)"),
              (["--momentum", "-0.1"], "--momentum must be in [0, 1)")]


SCRIPTS = [("rslad", rslad.main, ["--teacher", "t.pt"]), ("ard", ard.main, ["--teacher", "t.pt"]),
           ("train_teacher", tt.main, ["--recipe", "sat-iad"])]


@pytest.mark.parametrize("main,base,bad,match", [
    pytest.param(main, base, bad, match, id=f"{name}{' '.join(bad)}") for name, main, base in SCRIPTS
    for bad, match in BAD_VALUES if not (name == "train_teacher" and bad[0] == "--momentum")])  # recipes fix 0.9
def test_bad_values_are_refused_before_anything_is_written(main, base, bad, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*base, *bad, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["rslad.py", "ard.py", "train_teacher.py"])
def test_eps_minus_one_typed_by_a_user(script, cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / script, *student_args(script, teacher_ckpt, cifar_dir), "--eps", "-1", cwd=tmp_path)
    assert "--eps must be in [0, 1], got -1" in one_line_error(proc)
    assert not (tmp_path / "runs").exists()


def test_eval_attacks_refuses_bad_eps(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_attacks.resolve_protocol(eval_attacks.parse_args(["x.pt", "--eps", "2"]), "cifar10")
    assert e.value.code == 2 and "--eps must be in [0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------

def strict_json_lines(path):
    def refuse(name):
        raise ValueError(f"bare {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_lr_1e6_stops_with_one_line_and_no_nan_checkpoint(cifar_dir, teacher_ckpt, tmp_path):
    proc = run_script(ROOT / "rslad.py", "--teacher", teacher_ckpt, *TINY, "--lr", "1e6", "--epochs", "4",
                      "--eval-every", "1", "--data-dir", cifar_dir, cwd=tmp_path)
    line = one_line_error(proc, status=1)
    (run,) = (tmp_path / "runs").iterdir()
    records = strict_json_lines(run / "metrics.jsonl")  # strict JSON: no bare NaN
    diverged = records[-1]
    assert diverged["diverged"] and f"epoch {diverged['epoch']} diverged" in line
    for name in ("best.pt", "last.pt"):
        if (run / name).exists():  # only epochs before the diverged one were saved, with finite weights
            ck = torch.load(run / name, weights_only=True)
            assert ck["epoch"] < diverged["epoch"]
            assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


class NanAt:
    """Replaces a script's train_step: from call `n` on, the loss terms are NaN (the model stays finite),
    or, with `weights=True`, the weights become NaN after a finite step."""

    def __init__(self, module, n, weights=False):
        self.step, self.n, self.calls, self.weights = module.train_step, n, 0, weights

    def __call__(self, student, *a, **k):
        self.calls += 1
        terms = self.step(student, *a, **k)
        if self.calls >= self.n:
            if self.weights:
                with torch.no_grad():
                    next(student.parameters()).fill_(float("nan"))
            else:
                terms = {k: v * float("nan") for k, v in terms.items()}
        return terms


@pytest.mark.parametrize("weights", [False, True])
def test_divergence_keeps_the_last_finite_checkpoints(weights, cifar_dir, teacher_ckpt, tmp_path, monkeypatch, capsys):
    argv = ["--teacher", str(teacher_ckpt), *TINY, "--epochs", "3", "--eval-every", "1", "--data-dir", str(cifar_dir),
            "--runs-dir", str(tmp_path / "runs")]
    snapshots = {}
    real_save_last = common.Run.save_last

    def save_and_snapshot(self, model, optimizer, record, *a, **k):  # the epoch's last write
        out = real_save_last(self, model, optimizer, record, *a, **k)
        snapshots[record["epoch"]] = {n: (self.dir / n).read_bytes() for n in ("best.pt", "last.pt")}
        return out
    monkeypatch.setattr(common.Run, "save_last", save_and_snapshot)
    # 2 batches per epoch: NaN loss terms from epoch 2's first batch, or NaN weights after its last
    monkeypatch.setattr(rslad, "train_step", NanAt(rslad, n=4 if weights else 3, weights=weights))
    with pytest.raises(SystemExit) as e:
        rslad.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert err[0] == ("error: epoch 2 diverged: " + ("the weights of cnn_small" if weights else "loss, kl_adv, kl_nat")
                      + " not finite; last.pt and best.pt keep epoch 1; try a smaller --lr")
    (run,) = (tmp_path / "runs").iterdir()
    assert list(snapshots) == [1]
    assert {n: (run / n).read_bytes() for n in ("best.pt", "last.pt")} == snapshots[1]
    records = strict_json_lines(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[-1]["diverged"]
    assert (records[-1]["loss"] is None) is not weights


# ---------------------------------------------------------------------------------------------
# Writes: one line, exit 2, earlier checkpoints intact
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def read_only(folder):
    """Make `folder` refuse new files: chmod for a normal user, the immutable attribute for root (who
    ignores permissions). Skips the test where neither works on this file system."""
    folder = Path(folder)
    if os.geteuid() == 0:
        on, off = ["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]
    else:
        on, off = ["chmod", "a-w", str(folder)], ["chmod", "u+w", str(folder)]
    try:
        subprocess.run(on, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot make a folder read-only here: {e}")
    try:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("the folder stays writable for this user")
        except OSError:
            pass
        yield folder
    finally:
        subprocess.run(off, capture_output=True)


def test_read_only_run_folder(finished_run, tmp_path):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    with read_only(finished_run):
        proc = run_script(ROOT / "rslad.py", "--resume", finished_run / "last.pt", "--epochs", "2", cwd=tmp_path)
    line = one_line_error(proc)
    assert line.startswith(f"error: cannot write {finished_run}")
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


def test_full_disk(finished_run, tmp_path):
    """A file-size limit below a checkpoint's size makes every checkpoint write fail with an OS error
    (EFBIG), as a full disk (ENOSPC) would: one line, and last.pt of epoch 1 untouched."""
    last = finished_run / "last.pt"
    before = last.read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, len(before) // 4))
    proc = subprocess.run([sys.executable, str(ROOT / "rslad.py"), "--resume", str(last), "--epochs", "2"],
                          capture_output=True, text=True, cwd=tmp_path, preexec_fn=small_files, timeout=600)
    line = one_line_error(proc)
    assert line.startswith(f"error: cannot write {finished_run}") and ".pt: File too large" in line
    assert last.read_bytes() == before
    assert sorted(p.name for p in finished_run.iterdir()) == ["args.json", "best.pt", "last.pt", "metrics.jsonl"]


def test_eval_checks_its_output_before_attacking(finished_run, tmp_path):
    best, last = finished_run / "best.pt", finished_run / "last.pt"
    base = ["--n-ex", "16", "--bs", "16", "--aa", "off", "--attacks", "fgsm", "--device", "cpu", "--quiet",
            "--data-dir", json.loads((finished_run / "args.json").read_text())["data_dir"]]
    line = one_line_error(run_script(ROOT / "eval_attacks.py", best, *base, "--json", "/proc/no/such/eval.json",
                                     cwd=tmp_path))
    assert line.startswith("error: cannot write to /proc/no/such")
    for ck in (best, last):
        proc = run_script(ROOT / "eval_attacks.py", ck, *base, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    files = {p.name for p in finished_run.glob("*_eval_*.json")}
    assert files == {"best_eval_rslad.json", "last_eval_rslad.json"}  # two files, none overwritten
    first = (finished_run / "best_eval_rslad.json").read_text()
    line = one_line_error(run_script(ROOT / "eval_attacks.py", best, *base, cwd=tmp_path))
    assert "exists; pass --force" in line and (finished_run / "best_eval_rslad.json").read_text() == first
    proc = run_script(ROOT / "eval_attacks.py", best, *base, "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Loading odd files
# ---------------------------------------------------------------------------------------------

def expect_one_line(capsys, fn, *args, **kwargs):
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ")
    return err[-1]


def test_whole_pickled_module_loads_with_unsafe_load(tmp_path, capsys):
    torch.manual_seed(0)
    ref = common.build_model("cnn_small").eval()
    torch.save(ref, tmp_path / "module.pt")  # plain torch.save(model), common in the wild
    assert "--unsafe-load" in expect_one_line(capsys, common.load_model, tmp_path / "module.pt", arch="cnn_small")
    model, info = common.load_model(tmp_path / "module.pt", arch="cnn_small", unsafe=True)
    x = torch.rand(2, 3, 32, 32)
    assert info["container"] == "nn.Module" and torch.equal(model(x), ref(x))
    torch.save({"net": ref, "epoch": 3}, tmp_path / "wrapped.pt")
    model, info = common.load_model(tmp_path / "wrapped.pt", arch="cnn_small", unsafe=True)
    assert info["container"] == "net (nn.Module)" and torch.equal(model(x), ref(x))


def test_random_bytes_and_directories(tmp_path, capsys):
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    line = expect_one_line(capsys, common.load_model, tmp_path / "random.pt", arch="cnn_small", unsafe=True)
    assert "is not a checkpoint" in line and "weights_only" not in line
    line = expect_one_line(capsys, common.load_model, tmp_path, arch="cnn_small")
    assert line == f"error: {tmp_path} is a directory, not a checkpoint file"


def test_preact_shortcut_source_must_be_named(tmp_path, capsys):
    torch.manual_seed(0)
    ref = common.build_model("preact_resnet18", shortcut_from="input").eval()  # fast_adversarial's layout
    torch.save(ref.state_dict(), tmp_path / "preact.pt")
    line = expect_one_line(capsys, common.load_model, tmp_path / "preact.pt", arch="preact_resnet18")
    assert "--shortcut-from act" in line and "input" in line
    x = torch.rand(2, 3, 32, 32)
    right, _ = common.load_model(tmp_path / "preact.pt", arch="preact_resnet18", arch_kwargs={"shortcut_from": "input"})
    wrong, _ = common.load_model(tmp_path / "preact.pt", arch="preact_resnet18", arch_kwargs={"shortcut_from": "act"})
    assert torch.equal(right(x), ref(x)) and not torch.allclose(wrong(x), ref(x))  # both load strictly
    # a suite checkpoint records the switch; a contradicting flag is refused
    common.save_checkpoint(tmp_path / "suite.pt", common.checkpoint_dict(ref, kind="best", epoch=1, dataset="cifar10",
                                                                         args={}))
    model, info = common.load_model(tmp_path / "suite.pt")
    assert info["arch_kwargs"]["shortcut_from"] == "input" and torch.equal(model(x), ref(x))
    assert "records shortcut_from='input'" in expect_one_line(
        capsys, common.load_model, tmp_path / "suite.pt", arch_kwargs={"shortcut_from": "act"})


def test_teacher_shortcut_flag_reaches_the_loader(tmp_path, cifar_dir):
    torch.manual_seed(0)
    ref = common.build_model("preact_resnet18", shortcut_from="input")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "preact.pt")
    args, _ = ard.parse_args(["--teacher", str(tmp_path / "preact.pt"), "--teacher-arch", "preact_resnet18",
                              "--teacher-shortcut-from", "input"])
    teacher, info = common.load_teacher(args, "cpu", "wrn34_10")
    x = torch.rand(2, 3, 32, 32)
    assert info["arch_kwargs"]["shortcut_from"] == "input" and torch.equal(teacher(x), ref.eval()(x))


# ---------------------------------------------------------------------------------------------
# What a user of the repository reads: --help, and no pointers to files the repository lacks
# ---------------------------------------------------------------------------------------------

def help_options(module, capsys):
    """--help as {'--flag': 'its whole help entry on one line'}."""
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    entries = [" ".join(chunk.split()) for chunk in capsys.readouterr().out.split("\n  -")[1:]]
    return {"-" + entry.split()[0].rstrip(","): entry for entry in entries}


@pytest.mark.parametrize("module", [rslad, ard, tt, eval_attacks])
def test_help_states_each_default_once(module, capsys):
    options = help_options(module, capsys)
    assert len(options) > 20
    for entry in options.values():
        assert entry.count("(default") <= 1, entry
        assert "(default: None)" not in entry, entry


def test_help_shows_the_real_defaults(capsys):
    options = help_options(rslad, capsys)
    assert "(default: 8/255)" in options["--eps"] and "(default: 0.1)" in options["--lr"]
    assert "(default: 300)" in options["--epochs"] and "(default: pgd20-monitor)" in options["--monitor"]


def test_resolved_defaults_are_stated_in_help(capsys):
    for module, flags in ((rslad, ("--kl-scale", "--attack-bn", "--rand-start")), (ard, ("--batch-size",))):
        options = help_options(module, capsys)
        for flag in flags:
            assert "(default: " in options[flag], options[flag]


def test_repository_does_not_point_at_the_internal_spec():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    offenders = [f for f in tracked if f.endswith((".py", ".md", ".sh", ".txt")) and f != "tests/test_command_line.py"
                 and ("shared/spec" in (ROOT / f).read_text() or "shared/papers" in (ROOT / f).read_text())]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# The pattern the method files share
# ---------------------------------------------------------------------------------------------

def method_modules():
    names = ["rslad", "ard", "iad", "mtard", "ardir", "adt_aodt", "adaad", "peeraid"]
    return [importlib.import_module(n) for n in names if (ROOT / f"{n}.py").exists()]


@pytest.mark.parametrize("name", ["random_start", "kl_div"])
def test_method_files_share_one_form(name):
    sources = {m.__name__: inspect.getsource(getattr(m, name)) for m in method_modules() if hasattr(m, name)}
    assert "rslad" in sources and "ard" in sources
    assert len(set(sources.values())) == 1, sorted(sources)


def test_rslad_headline_loss_has_no_ablation_branch():
    assert "args.outer" not in inspect.getsource(rslad.loss_fn)
    args, _ = rslad.parse_args(["--teacher", "t.pt", "--outer", "ard", "--attack-steps", "1"])
    torch.manual_seed(0)
    student, teacher = common.build_model("cnn_small"), common.freeze(common.build_model("cnn_small"))
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    terms = rslad.train_step(student, teacher, opt, torch.rand(4, 3, 32, 32), torch.arange(4), args)
    assert set(terms) == {"loss", "kl_adv"}  # the Table 6 loss, from its own function



def test_tensorboard_flag(cifar_dir, teacher_ckpt, tmp_path, capsys):
    argv = ["--teacher", str(teacher_ckpt), *TINY, "--epochs", "1", "--data-dir", str(cifar_dir),
            "--runs-dir", str(tmp_path / "runs"), "--tensorboard"]
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:  # not installed: one line naming the package, before any folder exists
        with pytest.raises(SystemExit) as e:
            rslad.main(argv)
        assert e.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err
        assert not (tmp_path / "runs").exists()
        return
    rslad.main(argv)
    (run,) = (tmp_path / "runs").iterdir()
    assert list(run.glob("events.out.tfevents.*"))
