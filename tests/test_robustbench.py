"""rb:NAME sources (docs/common.md §4.1): RobustBench zoo models as teachers (common.load_teacher) and as
eval_attacks.py's model and transfer surrogate. Offline: every zoo file is written here, in RobustBench's cache
layout <rb-model-dir>/<dataset>/Linf/<name>.pt, from the zoo's own constructor with seeded random weights, and
the downloader is replaced by one that fails. Skipped only where robustbench is not installed
(requirements-robustbench.txt)."""

import argparse
import json
import shutil
import sys
import warnings

import pytest
import torch

from conftest import args_for

import common

common._alias_autoattack()  # robustbench 1.1.1 imports `autoattack`; pyautoattack installs it as `pyautoattack`
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # import-time deprecation notes of robustbench's dependencies
    pytest.importorskip("robustbench")

import ard  # noqa: E402
import eval_attacks  # noqa: E402
import iad  # noqa: E402
import mtard  # noqa: E402
from robustbench import utils as rb_utils  # noqa: E402
from robustbench.model_zoo import model_dicts  # noqa: E402
from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel  # noqa: E402

# one intra-op thread (conftest): on a shared 2-core machine, spinning worker threads slow these small forwards
# many-fold; the results do not depend on it
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated:DeprecationWarning")]  # robustbench's swish

SMALL = "Gowal2021Improving_R18_ddpm_100m"  # a DeepMind PreActResNet-18 (12.5M parameters) that normalises inside itself
CPU = torch.device("cpu")


def zoo_entry(name, dataset="cifar10"):
    return model_dicts[BenchmarkDataset(dataset)][ThreatModel.Linf][name]


def randomized(net, seed, keep=()):
    """`net` in eval() with every floating tensor of its state_dict but `keep` drawn from a seeded generator
    (BatchNorm running statistics included, variances positive): eval-mode logits depend on every entry."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if v.is_floating_point() and k not in keep:
            r = torch.randn(v.shape, generator=g) * 0.1
            v = r.abs() + 0.5 if k.endswith("running_var") else r
        sd[k] = v
    net.load_state_dict(sd)
    return net.eval()


def write_zoo_file(root, name, obj, dataset="cifar10"):
    path = root / dataset / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """(cache folder, the zoo network it holds as SMALL's file, seeded random weights)."""
    root = tmp_path_factory.mktemp("rb_models")
    torch.manual_seed(0)
    net = randomized(zoo_entry(SMALL)["model"](), seed=1)
    write_zoo_file(root, SMALL, net.state_dict())
    return root, net


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Nothing here touches the network: robustbench's downloader fails as it does offline."""
    def offline(gdrive_id, fname_save):
        raise ConnectionError("no network in the tests")
    monkeypatch.setattr(rb_utils, "download_gdrive_new", offline)


def one_line_exit(capsys, fn, *a, **k):
    """fn(*a, **k) exits with status 2 and one line 'error: ...' on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        fn(*a, **k)
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning:")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- the teacher ---------------------------------------------------------------------------------------

def test_rb_teacher_is_the_zoo_model_frozen_and_recorded(zoo_cache, tmp_path):
    root, net = zoo_cache
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(root), "--runs-dir", str(tmp_path / "runs"))
    assert args.teacher == f"rb:{SMALL}" and args.rb_model_dir == str(root)  # not made a path by parse()
    teacher, info = common.load_teacher(args, CPU, "wrn34_10")
    path = root / "cifar10" / "Linf" / f"{SMALL}.pt"
    assert info["arch"] == f"rb:{SMALL}" and info["norm"] == "in-model" and info["path"] == str(path)
    assert info["sha256"] == common.file_sha256(path) and info["dataset"] == "cifar10" and info["num_classes"] == 10
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert common.unwrap(teacher).mean is None  # measure_norms has no constants to swap
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(teacher(x), net(x))
    with pytest.raises(ValueError, match="no intermediate outputs"):
        teacher(x, stages=("layer_0",))

    run = common.Run("ard", args, "cnn_small")  # args.json records the teacher as for a file
    student = common.build_model("cnn_small")
    run.begin(student, torch.optim.SGD(student.parameters(), lr=0.1), monitor=ard.MONITORS[args.monitor],
              teachers={"teacher": info})
    saved = json.loads((run.dir / "args.json").read_text())
    assert (saved["teacher"], saved["teacher_arch"], saved["teacher_norm"], saved["teacher_sha256"]) == (
        f"rb:{SMALL}", f"rb:{SMALL}", "in-model", info["sha256"])


def test_resume_reads_a_moved_cache_and_refuses_another_file(zoo_cache, tmp_path, capsys):
    """A resumed run gets its rb: teacher from the saved flags; --rb-model-dir may name a moved cache; the file
    must hold the bytes the run started with (the sha256 in args.json), as for a teacher file."""
    root, net = zoo_cache
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(root))
    _, info = common.load_teacher(args, CPU, "wrn34_10")
    recorded = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    recorded.update(script="ard", teacher_arch=info["arch"], teacher_norm=info["norm"], teacher_sha256=info["sha256"])
    last = tmp_path / "last.pt"
    torch.save({"kind": "last", "optimizer": {}, "args": json.loads(common.json_dumps(recorded))}, last)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    resumed, _ = ard.parse_args(["--resume", str(last), "--rb-model-dir", str(moved)])
    assert resumed.teacher == f"rb:{SMALL}" and resumed.teacher_sha256 == info["sha256"]
    teacher, again = common.load_teacher(resumed, CPU, "wrn34_10")
    assert again["path"].startswith(str(moved)) and again["sha256"] == info["sha256"]
    torch.manual_seed(3)
    write_zoo_file(moved, SMALL, randomized(zoo_entry(SMALL)["model"](), seed=4).state_dict())
    err = one_line_exit(capsys, common.load_teacher, resumed, CPU, "wrn34_10")
    assert f"--teacher rb:{SMALL} (" in err and "is not the file the run started with" in err


def test_one_rb_model_dir_flag_for_two_teachers():
    for module, extra in ((iad, ("--variant", "iad2")), (mtard, ())):
        _, p = module.parse_args(list(extra) + ["--teacher", "rb:A", "--nat-teacher", "n.pt"])
        assert [a.dest for a in p._actions].count("rb_model_dir") == 1
        assert "rb_model_dir" in p.resume_may_change


def test_missing_normalisation_constants_keep_the_constructors(tmp_path):
    """Some zoo files lack the constants their constructor sets (Wong2020Fast: mu, sigma); the constructor's
    values stay, as in robustbench; every other key must be there."""
    torch.manual_seed(0)
    net = randomized(zoo_entry("Wong2020Fast")["model"](), seed=5, keep=("mu", "sigma"))
    sd = {f"module.{k}": v for k, v in net.state_dict().items() if k not in ("mu", "sigma")}
    write_zoo_file(tmp_path, "Wong2020Fast", {"state_dict": sd})
    model, info = common.load_robustbench("rb:Wong2020Fast", "cifar10", tmp_path)
    assert info["kept_constants"] == ["mu", "sigma"] and info["prefixes"] == ["module."]
    assert info["container"] == "state_dict"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


# ---- one line and exit status 2 ------------------------------------------------------------------------

@pytest.mark.parametrize("source, dataset, words", [
    ("rb:NoSuchModel2099", "cifar10", ["not a RobustBench cifar10 Linf model", "robustbench.model_zoo"]),
    (f"rb:{SMALL[:-1]}", "cifar10", [f"did you mean rb:{SMALL}?"]),
    ("rb:Chen2021LTD_WRN34_20", "cifar100", ["not a RobustBench cifar100 Linf model"]),
    (f"rb:{SMALL}", "svhn", ["RobustBench has no svhn models", "--dataset cifar10 or cifar100"]),
    ("rb:", "cifar10", ["name a RobustBench model"]),
    ("rb:Debenedetti2022Light_XCiT-S12", "cifar10", ["served by timm", "not supported"]),
    ("rb:Chen2020Adversarial", "cifar10", ["ensemble", "not supported"]),
])
def test_zoo_errors(source, dataset, words, tmp_path, capsys):
    args = args_for(ard, "--teacher", source, "--dataset", dataset, "--rb-model-dir", str(tmp_path))
    err = one_line_exit(capsys, common.load_teacher, args, CPU, "wrn34_10")
    assert err.startswith(f"error: --teacher {source}") and all(w in err for w in words), err


def test_a_missing_file_is_downloaded_into_the_cache_or_said_where_it_belongs(zoo_cache, tmp_path, monkeypatch,
                                                                              capsys):
    cache = tmp_path / "cache"
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(cache))
    err = one_line_exit(capsys, common.load_teacher, args, CPU, "wrn34_10")
    expected = cache / "cifar10" / "Linf" / f"{SMALL}.pt"
    assert str(expected) in err and "download failed (ConnectionError)" in err
    assert zoo_entry(SMALL)["gdrive_id"] in err  # to fetch it by hand
    assert not cache.exists()  # no empty cache folder left behind
    fetched = []  # robustbench's downloader, as if the network were there: it writes the file it is given

    def download(gdrive_id, fname_save):
        fetched.append((gdrive_id, str(fname_save)))
        shutil.copy(zoo_cache[0] / "cifar10" / "Linf" / f"{SMALL}.pt", fname_save)
    monkeypatch.setattr(rb_utils, "download_gdrive_new", download)
    _, info = common.load_teacher(args, CPU, "wrn34_10")
    assert fetched == [(zoo_entry(SMALL)["gdrive_id"], str(expected))] and info["path"] == str(expected)


def test_without_robustbench_one_line_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # `import robustbench` raises ImportError
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(tmp_path))
    err = one_line_exit(capsys, common.load_teacher, args, CPU, "wrn34_10")
    assert "pip install -r requirements-robustbench.txt" in err


def test_pickle_files_need_unsafe_load_and_keys_must_match(tmp_path, capsys):
    """The zoo file is read as every checkpoint (weights_only=True); --unsafe-load admits pickle, and then the
    keys are checked strictly against the zoo architecture."""
    write_zoo_file(tmp_path, SMALL, {"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)})
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(tmp_path))
    assert "pass --unsafe-load if you trust the file" in one_line_exit(capsys, common.load_teacher, args, CPU, "x")
    args.unsafe_load = True
    err = one_line_exit(capsys, common.load_teacher, args, CPU, "x")
    assert f"does not match the zoo architecture of rb:{SMALL}" in err and "unexpected keys ['w']" in err


@pytest.mark.parametrize("broken, message", [
    ("nan", "holds NaN values; the model is broken"),
    ("no_state_dict", "holds no state_dict"),
    ("size", "size mismatch for"),
])
def test_a_broken_zoo_file_is_refused_in_one_line(broken, message, zoo_cache, tmp_path, capsys):
    """The zoo file goes through the checks of every checkpoint (common._state_dict_of, _check_finite,
    _load_state): a NaN weight, a file with no state_dict and a tensor of another shape each stop the run."""
    sd = {k: v.clone() for k, v in zoo_cache[1].state_dict().items()}
    key = next(k for k, v in sd.items() if k.endswith("weight") and v.dim() == 4)
    if broken == "nan":
        sd[key].view(-1)[0] = float("nan")
    elif broken == "size":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    write_zoo_file(tmp_path, SMALL, {"epoch": 3} if broken == "no_state_dict" else sd)
    args = args_for(ard, "--teacher", f"rb:{SMALL}", "--rb-model-dir", str(tmp_path))
    err = one_line_exit(capsys, common.load_teacher, args, CPU, "wrn34_10")
    assert message in err and f"{SMALL}.pt" in err
    if broken == "nan":
        assert key in err
    if broken == "size":
        assert f"does not match the zoo architecture of rb:{SMALL}: size mismatch for {key}" in err


@pytest.mark.parametrize("flag, value", [("--teacher-arch", "wrn34_10"), ("--teacher-norm", "cifar10"),
                                         ("--teacher-shortcut-from", "act")])
def test_teacher_flags_that_do_not_apply_are_refused(flag, value, tmp_path, capsys):
    args = args_for(ard, "--teacher", f"rb:{SMALL}", flag, value, "--rb-model-dir", str(tmp_path))
    assert f"{flag} does not apply to --teacher rb:{SMALL}" in one_line_exit(capsys, common.load_teacher, args, CPU, "x")


# ---- the suite's registry against the zoo's architectures ----------------------------------------------

def test_wrn34_20_is_chen2021ltd_wrn34_20_and_wrn34_10_the_cifar100_one():
    """The suite's wrn34_20 holds exactly the keys and shapes of RobustBench's CIFAR-10 Chen2021LTD_WRN34_20
    (built on the meta device: 185M parameters), and wrn34_10 those of the CIFAR-100 Chen2021LTD_WRN34_10; the
    forward passes agree exactly, checked at width 1 of the same classes (a full-width pass costs seconds)."""
    for name, dataset, arch, classes, sub_block1 in (("Chen2021LTD_WRN34_20", "cifar10", "wrn34_20", 10, False),
                                                    ("Chen2021LTD_WRN34_10", "cifar100", "wrn34_10", 100, True)):
        with torch.device("meta"):
            theirs, ours = zoo_entry(name, dataset)["model"](), common.build_model(arch, classes)
        assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
        torch.manual_seed(0)
        narrow = randomized(type(theirs)(depth=34, widen_factor=1, num_classes=classes, sub_block1=sub_block1), seed=7)
        suite = common.build_model(arch, classes, widen_factor=1).eval()
        suite.load_state_dict(narrow.state_dict(), strict=True)
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            assert torch.equal(suite(x), narrow(x)), name


# ---- eval_attacks.py -----------------------------------------------------------------------------------

def test_eval_attacks_evaluates_an_rb_model_and_uses_one_as_surrogate(zoo_cache, cifar_dir, tmp_path):
    root, net = zoo_cache
    out = tmp_path / "eval.json"
    eval_attacks.main([f"rb:{SMALL}", "--rb-model-dir", str(root), "--dataset", "cifar10", "--data-dir", str(cifar_dir),
                       "--device", "cpu", "--n-ex", "3", "--bs", "3", "--attacks", "none", "--aa", "off",
                       "--transfer-from", f"rb:{SMALL}", "--transfer-attacks", "fgsm", "--json", str(out), "--quiet"])
    j = json.loads(out.read_text())
    path = root / "cifar10" / "Linf" / f"{SMALL}.pt"
    assert (j["checkpoint"], j["arch"], j["norm"], j["sha256"]) == (str(path), f"rb:{SMALL}", "in-model",
                                                                    common.file_sha256(path))
    x, y = common.load_split("cifar10", cifar_dir, train=False, subset=3, download=False)
    with torch.no_grad():
        assert j["clean"]["n_correct"] == int((net(x.float() / 255).argmax(1) == y).sum())
    assert j["attacks"]["transfer"]["fgsm"]["source"]["arch"] == f"rb:{SMALL}"
