"""Shared fixtures: tiny data sets written in the standard on-disk layouts, so that the real reading
code runs in every test. The images are learnable: each class has its own colour pattern plus noise."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    import torch

    import common
    torch.manual_seed(0)
    model = common.build_model("cnn_small")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    common.save_checkpoint(path, common.checkpoint_dict(model, kind="best", epoch=1, dataset="cifar10", args={}))
    return path


def sgd_first_step(params, grads, lr, wd):
    """First step of SGD(momentum, weight_decay) written out: the momentum buffer starts as g + wd*p."""
    return [p - lr * (g + wd * p) for p, g in zip(params, grads)]
