"""Shared fixtures: tiny data sets written in the standard on-disk layouts, so that the real reading
code runs in every test. The images are learnable: each class has its own colour pattern plus noise."""

import contextlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

N_TRAIN_PER_FILE = 64  # 5 files -> 320 training images
N_TEST = 128


def synthetic_images(n, num_classes, seed):
    """uint8 [n, 3, 32, 32] and labels: class k is a horizontal/vertical colour ramp keyed by k, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    for i, k in enumerate(y):
        colour = np.array([(k * 37) % 10, (k * 53) % 10, (k * 71) % 10], dtype=np.float32)[:, None, None] / 10
        pattern = ramp[None, :, None] if k % 2 else ramp[None, None, :]
        x[i] = 0.15 + 0.7 * colour * pattern
    x += rng.normal(0, 0.08, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)


def write_cifar10(root, seed=0):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        x, y = synthetic_images(N_TRAIN_PER_FILE, 10, seed + i)
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}, fh)
    x, y = synthetic_images(N_TEST, 10, seed + 100)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, fh)
    return Path(root)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A folder holding cifar-10-batches-py/ in torchvision's pickle layout (320 train / 128 test images)."""
    return write_cifar10(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name, n, seed in (("train", 200, 1), ("test", 50, 2)):
        x, y = synthetic_images(n, 100, seed)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": x.reshape(n, -1), b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()}, fh)
    return root


@pytest.fixture(scope="session")
def svhn_dir(tmp_path_factory):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path_factory.mktemp("svhn")
    for name, n, seed in (("train_32x32.mat", 120, 3), ("test_32x32.mat", 40, 4)):
        x, y = synthetic_images(n, 10, seed)
        labels = np.where(y == 0, 10, y)  # SVHN stores digit 0 as label 10
        scipy_io.savemat(root / name, {"X": np.transpose(x, (2, 3, 1, 0)), "y": labels[:, None]})
    return root


def run_script(*args, cwd, timeout=600):
    """Run a suite script in a subprocess; returns the CompletedProcess (stdout+stderr captured)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A cnn_small teacher in the suite's checkpoint format (seeded random weights)."""
    import common
    torch.manual_seed(0)
    model = common.build_model("cnn_small")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    common.save_checkpoint(path, common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar10", args={}))
    return path


def read_metrics(run_dir):
    """metrics.jsonl as a list of dicts."""
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_best_reloads(run_dir, data_dir, n_test):
    """best.pt reloads through common.load_model and scores, on the first n_test test images, exactly
    the clean accuracy logged for its epoch; returns the loaded best.pt dict."""
    import common
    best = torch.load(run_dir / "best.pt", weights_only=True)
    model, _ = common.load_model(run_dir / "best.pt")
    x, y = common.load_split(best["dataset"], data_dir, train=False, subset=n_test, download=False)
    with torch.no_grad():
        acc = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    logged = next(m for m in read_metrics(run_dir) if m["epoch"] == best["epoch"])["test_clean"]
    assert acc == logged, (acc, logged)
    return best


def check_first_step(student, terms, ref, loss, lr, wd):
    """`student` after the script's first SGD step (and its logged loss) equals `ref` updated by hand
    from `loss`, computed independently on ref: loss to 1e-6, parameters to 1e-5, BN buffers to 1e-6.
    SGD(momentum, weight_decay) written out: the first momentum buffer is g + wd*p."""
    assert abs(terms["loss"].item() - loss.item()) <= 1e-6
    params = [q.detach() for q in ref.parameters()]
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for got, p, g in zip(student.parameters(), params, grads):
        assert torch.allclose(got, p - lr * (g + wd * p), atol=1e-5)
    for got, want in zip(student.buffers(), ref.buffers()):
        assert torch.allclose(got.float(), want.float(), atol=1e-6)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (AutoAttack parity, §10.1 of eval_attacks.md: another thread count may
    reorder float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn(seed=0):
    """Two 3x3 convolutions and a linear layer, 10 classes, fixed seeded weights, eval() and frozen. The
    head is rescaled and its bias centred on a seeded calibration batch so that uniform-noise inputs
    spread over the classes (the attack tests and the AutoAttack parity tests use it)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    calib = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 100))
    with torch.no_grad():
        net[-1].weight.mul_(10 / net(calib).std(0).mean())
        net[-1].bias.zero_()
        net[-1].bias.sub_(net(calib).mean(0))
    return net.eval().requires_grad_(False)


def same(a, b):
    """Exact equality of nested dicts/lists of tensors and primitives (bitwise for tensors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _timing_free(records):
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "images_per_s"} for r in records]


def descendants(pid):
    """Every process below `pid` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in children.read_text().split()]
                out += kids
                todo += kids
    return out


def check_resume_alone(script, argv, tmp_path, epochs=2, launcher=None):
    """What a user does after a crash: `script argv --epochs N` runs uninterrupted in one folder; the same
    command in a second folder is killed (SIGKILL to it and every process below it) as soon as its first last.pt
    exists, i.e. during a later epoch; then `script --resume <that run>/last.pt` alone finishes it.
    The two runs must end equal: last.pt's model, peer, optimizer state, epoch and `extra`, and
    metrics.jsonl except timings. `launcher` (e.g. torchrun's command) prefixes every command.
    Returns the two run folders (uninterrupted, resumed)."""
    import os
    import signal
    import time
    launch = list(launcher or [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launch, str(ROOT / script), *map(str, argv), "--epochs", str(epochs)]
    full = subprocess.run([*cmd, "--runs-dir", str(tmp_path / "full")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = subprocess.Popen([*cmd, "--runs-dir", str(tmp_path / "part")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "part").glob("*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    finished = proc.poll() is not None
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers live in sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not finished, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    (full_dir,), (part_dir,) = (list((tmp_path / d).iterdir()) for d in ("full", "part"))
    killed_at = torch.load(part_dir / "last.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < epochs
    resumed = subprocess.run([*launch, str(ROOT / script), "--resume", str(part_dir / "last.pt")],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch {killed_at}" in resumed.stdout
    assert_same_end(full_dir, part_dir, epochs)
    return full_dir, part_dir


def assert_same_end(full_dir, part_dir, epochs, keys=("model", "peer", "extra")):
    """An uninterrupted run and a resumed one ended equal: last.pt's epoch, `keys` and optimizer state, and
    metrics.jsonl except timings."""
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (full_dir, part_dir))
    assert a["epoch"] == b["epoch"] == epochs
    for key in keys:
        assert same(a.get(key), b.get(key)), key
    assert len(a["optimizer"]["state"]) > 0 and same(a["optimizer"], b["optimizer"])
    assert _timing_free(read_metrics(full_dir)) == _timing_free(read_metrics(part_dir))


class _Stopped(Exception):
    pass


def run_stopped_after(module, argv, epoch):
    """`module.main(argv)` stopped right after epoch `epoch`'s last.pt is written (an exception out of
    common.Run.save_last): the state a kill at any later moment of the next epoch would leave."""
    save_last = common.Run.save_last

    def stop(self, model, optimizer, record, best, **kw):
        save_last(self, model, optimizer, record, best, **kw)
        if record["epoch"] == epoch:
            raise _Stopped

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Stopped):
        mp.setattr(common.Run, "save_last", stop)
        module.main(argv)


def check_resume_in_process(module, argv, tmp_path, epochs=2):
    """check_resume_alone without the subprocesses (the kill itself is tested for rslad.py and train_teacher.py
    in test_command_line): `module.main(argv --epochs N)` runs uninterrupted in one folder; the same call in a
    second folder stops after epoch 1 (run_stopped_after); then `module.main(["--resume", <that run>/last.pt])`
    alone finishes it. The same end as check_resume_alone's, plus the generator states and best.pt.
    Returns the two run folders (uninterrupted, resumed)."""
    import io
    argv = [*map(str, argv), "--epochs", str(epochs)]
    module.main([*argv, "--runs-dir", str(tmp_path / "full")])
    run_stopped_after(module, [*argv, "--runs-dir", str(tmp_path / "part")], 1)
    (full_dir,), (part_dir,) = (list((tmp_path / d).iterdir()) for d in ("full", "part"))
    assert torch.load(part_dir / "last.pt", weights_only=True)["epoch"] == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(["--resume", str(part_dir / "last.pt")])
    assert "after epoch 1" in out.getvalue()
    assert_same_end(full_dir, part_dir, epochs, keys=("model", "peer", "extra", "rng"))
    assert (full_dir / "best.pt").exists() == (part_dir / "best.pt").exists()
    if (full_dir / "best.pt").exists():
        a, b = (torch.load(d / "best.pt", weights_only=True) for d in (full_dir, part_dir))
        assert same(a["model"], b["model"]) and a.get("select") == b.get("select")
    return full_dir, part_dir


# ---------------------------------------------------------------------------------------------
# Parsed arguments of a training script, as its tests need them
# ---------------------------------------------------------------------------------------------

# The flags each script refuses to parse without. The checkpoint paths are placeholders: parse_args
# does not open them.
REQUIRED_ARGV = {
    "rslad": ["--teacher", "t.pt"],
    "ard": ["--teacher", "t.pt"],
    "ardir": ["--teacher", "t.pt"],
    "iad": ["--teacher", "t.pt"],
    "adt_aodt": [],
    "mtard": ["--teacher", "a.pt", "--nat-teacher", "n.pt"],
    "train_teacher": [],
    "adaad": ["--teacher", "t.pt"],
    "peeraid": [],
}

# Flags required only by some values of another flag: script -> (flag, its default, {value: argv}).
REQUIRED_ARGV_FOR = {
    "iad": ("--variant", "iad1", {"iad2": ["--nat-teacher", "st.pt"], "akd2": ["--nat-teacher", "st.pt"]}),
    "adt_aodt": ("--method", "adt", {"adt": ["--teacher", "t.pt"]}),
}


def args_for(module, *extra):
    """`module.parse_args` of `extra` plus the flags the script requires (REQUIRED_ARGV, and REQUIRED_ARGV_FOR
    given the value of e.g. --variant or --method in `extra`); returns the parsed namespace. Choices
    such as --variant, --method or --recipe are ordinary flags in `extra`: args_for(iad, "--variant", "iad2")."""
    name = module.__name__
    argv = list(REQUIRED_ARGV[name])
    if name in REQUIRED_ARGV_FOR:
        flag, value, needs = REQUIRED_ARGV_FOR[name]
        for i, word in enumerate(extra[:-1]):  # the last occurrence wins, as in argparse
            if word == flag:
                value = extra[i + 1]
        argv += needs.get(value, [])
    args, _ = module.parse_args([*argv, *extra])
    return args


# ---------------------------------------------------------------------------------------------
# Numpy references and tiny models for step-parity tests
# ---------------------------------------------------------------------------------------------

def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_kl_terms(teacher, student, eps=0.0):
    """Elementwise p (log(p + eps) - log q), float64, p = softmax(teacher), q = softmax(student)."""
    p = np.exp(np_log_softmax(teacher))
    return p * (np.log(p + eps) - np_log_softmax(student))


def random_logits(b, c, seed, scale=3.0, dtype=torch.float64):
    """Fixed logits, float64 by default: the loss functions are dtype-agnostic, so the formula checks
    compare float64 with float64 and a 1e-6 tolerance is not eaten by float32 cancellation (τ² = 900)."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=torch.float64)).to(dtype)


def setup_models(seed=0):
    """A train-mode cnn_small student, a frozen cnn_small teacher and a seeded batch of 16 CIFAR-shaped
    images with labels: (student, teacher, x, y)."""
    import common
    torch.manual_seed(seed)
    student = common.build_model("cnn_small").train()
    teacher = common.freeze(common.build_model("cnn_small"))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return student, teacher, x, y
