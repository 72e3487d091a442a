"""common.py: data reading, the device-resident loader, checkpoints (suite format, formats met in the
wild, every bad input), the monitor. Architectures are in test_architectures.py."""

import argparse
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import N_TEST, N_TRAIN_PER_FILE, synthetic_images

import common


def expect_exit(capsys, fn, *args, match, **kwargs):
    """fn must stop with exit status 2 and a one-line error containing `match`."""
    with pytest.raises(SystemExit) as e:
        fn(*args, **kwargs)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and match in err[-1], err


# ---------------------------------------------------------------------------------------------
# Reading the standard layouts
# ---------------------------------------------------------------------------------------------

def test_cifar10_reads_every_file_in_order(cifar_dir):
    x, y = common.load_split("cifar10", cifar_dir, train=True, download=False)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.shape == (5 * N_TRAIN_PER_FILE, 3, 32, 32)
    expected = [synthetic_images(N_TRAIN_PER_FILE, 10, i) for i in range(1, 6)]  # the fixture's seeds
    assert torch.equal(x, torch.from_numpy(np.concatenate([e[0] for e in expected])))
    assert torch.equal(y, torch.from_numpy(np.concatenate([e[1] for e in expected])))
    xt, yt = common.load_split("cifar10", cifar_dir, train=False, subset=50, download=False)
    assert xt.shape == (50, 3, 32, 32)
    assert torch.equal(xt, torch.from_numpy(synthetic_images(N_TEST, 10, 100)[0][:50]))


def test_cifar100_uses_fine_labels(cifar100_dir):
    x, y = common.load_split("cifar100", cifar100_dir, train=True, download=False)
    _, y_ref = synthetic_images(200, 100, 1)
    assert x.shape == (200, 3, 32, 32) and torch.equal(y, torch.from_numpy(y_ref)) and int(y.max()) > 19


def test_svhn_layout_and_label_10_is_0(svhn_dir):
    x, y = common.load_split("svhn", svhn_dir, train=False, download=False)
    x_ref, y_ref = synthetic_images(40, 10, 4)
    assert torch.equal(x, torch.from_numpy(x_ref)) and torch.equal(y, torch.from_numpy(y_ref))
    assert int(y.min()) == 0 and int(y.max()) <= 9


def test_real_dev_copy_reads_if_present():
    root = common.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-dev"
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip("shared dev data not present")
    x, y = common.load_split("cifar10", root, train=False, download=False)
    assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) > 0


def test_missing_data_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    expect_exit(capsys, common.load_split, "cifar10", tmp_path, True, download=False, match="--data-dir")

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(common, "_download", offline)
    expect_exit(capsys, common.load_split, "cifar100", tmp_path, False, match="download failed")


def test_corrupt_data_file_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"not a pickle")
    expect_exit(capsys, common.load_split, "cifar10", tmp_path, False, download=False, match="test_batch")


# ---------------------------------------------------------------------------------------------
# The device-resident loader and its augmentation
# ---------------------------------------------------------------------------------------------

def probe_images(n):
    """Channel 0 encodes the source column, channel 1 the source row (values 10 + 7*index, never 0)."""
    ramp = (10 + 7 * torch.arange(32)).to(torch.uint8)
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, 0] = ramp[None, None, :]
    x[:, 1] = ramp[None, :, None]
    x[:, 2] = 255
    return x


def decode(out, pad=4):
    """Recover (top, left, flipped) of each crop from the probe encoding."""
    src_row = (out[:, 1, 16, 16].long() - 10) // 7
    top = src_row - 16 + pad
    flipped = out[:, 0, 16, 15] > out[:, 0, 16, 16]
    src_col = (out[:, 0, 16, 16].long() - 10) // 7
    left = torch.where(flipped, src_col - (31 - 16 - pad), src_col - 16 + pad)
    return top, left, flipped


def reference_crop(img, top, left, flipped, pad=4):
    padded = np.pad(img.numpy(), ((0, 0), (pad, pad), (pad, pad)))  # zero fill, as RandomCrop(padding=4)
    crop = padded[:, top:top + 32, left:left + 32]
    return torch.from_numpy(crop[:, :, ::-1].copy() if flipped else crop)


def test_crop_and_flip_match_a_reference_and_are_uniform():
    torch.manual_seed(0)
    n = 9000
    x = probe_images(n)
    out = common.random_crop_flip(x, pad=4, flip=True)
    top, left, flipped = decode(out)
    for i in range(0, n, 97):  # every sampled image equals pad-crop-flip done by hand
        assert torch.equal(out[i], reference_crop(x[i], int(top[i]), int(left[i]), bool(flipped[i])))
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and offsets.min() == 0 and offsets.max() == 8
        chi2 = float(((counts - n / 9) ** 2 / (n / 9)).sum())
        assert chi2 < 26.1, counts  # chi-square, 8 dof, p = 0.001
    assert abs(flipped.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    # zeros appear exactly where the offset puts the padding, nowhere else
    blank = out[:, 2] == 0
    for i in range(0, n, 211):
        t, l = int(top[i]), int(left[i])
        rows = torch.zeros(32, dtype=torch.bool)
        rows[:max(0, 4 - t)] = True
        rows[32 - max(0, t - 4):] = True
        cols = torch.zeros(32, dtype=torch.bool)
        cols[:max(0, 4 - l)] = True
        cols[32 - max(0, l - 4):] = True
        if flipped[i]:
            cols = cols.flip(0)
        assert torch.equal(blank[i], rows[:, None] | cols[None, :])


def test_no_flip_for_svhn_and_pad2_for_madry():
    torch.manual_seed(1)
    out = common.random_crop_flip(probe_images(2000), pad=2, flip=False)
    top, left, flipped = decode(out, pad=2)
    assert not flipped.any()
    assert set(top.tolist()) == set(range(5)) and set(left.tolist()) == set(range(5))


def test_loader_epochs_batches_and_order(cifar_dir):
    x, y = common.load_split("cifar10", cifar_dir, train=True, download=False)
    loader = common.DeviceLoader(x, y, 100, train=True)
    assert len(loader) == 4  # 320 images, last partial batch of 20 kept
    torch.manual_seed(0)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [100, 100, 100, 20]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(torch.sort(seen).values, torch.sort(y).values)  # a permutation of the labels
    second = torch.cat([b[1] for b in loader])
    assert not torch.equal(seen, second)  # fresh permutation each epoch
    assert len(common.DeviceLoader(x, y, 100, train=True, drop_last=True)) == 3
    test = common.DeviceLoader(x, y, 128, train=False)
    xt = torch.cat([b[0] for b in test])
    assert torch.equal(xt, x.float() / 255)  # in order, unaugmented
    cl = common.DeviceLoader(x, y, 64, train=False, channels_last=True)
    assert next(iter(cl))[0].is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the suite's format
# ---------------------------------------------------------------------------------------------

def suite_ckpt(tmp_path, arch="cnn_small", num_classes=10, norm=None, name="best.pt"):
    torch.manual_seed(0)
    model = common.build_model(arch, num_classes, norm)
    ck = common.checkpoint_dict(model, kind="best", epoch=3, dataset="cifar10", args={"lr": 0.1},
                                metrics={"test_clean": 0.5}, select={"monitor": "clean", "value": 0.5, "epoch": 3})
    path = tmp_path / name
    common.save_checkpoint(path, ck)
    return model, path


def test_suite_checkpoint_round_trip(tmp_path):
    model, path = suite_ckpt(tmp_path, norm="cifar100")
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "cnn_small" and raw["kind"] == "best" and raw["epoch"] == 3
    assert raw["norm"] == {"mean": list(common.NORMS["cifar100"][0]), "std": list(common.NORMS["cifar100"][1])}
    loaded, info = common.load_model(path)
    assert info["suite"] and info["arch"] == "cnn_small" and info["dataset"] == "cifar10" and not loaded.training
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))  # recorded normalisation restored
    with pytest.raises(SystemExit):  # an explicit normalisation that contradicts the record is refused
        common.load_model(path, norm=None)
    plain, _ = common.load_model(path, norm=None, override_record=True)
    assert not torch.allclose(plain(x), model(x))


def test_rng_state_round_trip_is_weights_only(tmp_path):
    import random
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached value behind
    common.save_checkpoint(tmp_path / "rng.pt", {"rng": common._rng_state()})
    expected = (random.gauss(0, 1), random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    common._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.gauss(0, 1), random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_is_atomic(tmp_path, monkeypatch):
    _, path = suite_ckpt(tmp_path)
    before = path.read_bytes()

    def crash(src, dst):  # killed after the temp file is written, before the rename
        assert Path(src).read_bytes() != before
        raise KeyboardInterrupt
    monkeypatch.setattr(common.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"x": torch.zeros(1)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


# ---------------------------------------------------------------------------------------------
# Checkpoints met in the wild (common.md §3-4)
# ---------------------------------------------------------------------------------------------

WILD = [  # (container key or None, prefix)
    (None, ""),                 # TRADES model_cifar_wrn.pt, DeepMind, MTARD students: raw state_dict
    (None, "module."),          # RSLAD students, MTARD ResNet-56 (DataParallel)
    ("state_dict", "module."),  # IAD bestpoint.pth.tar
    ("state_dict", "model."),   # RobustBench
    ("net", ""),                # ARD epoch=<e>.t7
    ("student", "module."),     # RSLAD CIFAR-100 revisions
    ("last", ""),               # RobustBench Andriushchenko2020Understanding
    ("model", "_orig_mod."),    # a torch.compile'd model saved raw
]


@pytest.mark.parametrize("key,prefix", WILD)
def test_wild_formats_load_strictly(tmp_path, key, prefix):
    torch.manual_seed(0)
    ref = common.build_model("cnn_small", 10).eval()
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    obj = sd if key is None else {key: sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": []}}
    if key == "state_dict":
        obj.update(test_nat_acc=0.8, test_pgd10_acc=0.5)
    path = tmp_path / "wild.pt"
    torch.save(obj, path)
    model, info = common.load_model(path, arch="cnn_small")
    assert info["container"] == key and info["prefixes"] == ([prefix] if prefix else []) and not info["suite"]
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), ref(x))


def test_num_classes_read_from_head_and_checked(tmp_path, capsys):
    ref = common.build_model("cnn_small", 100)
    path = tmp_path / "c100.pt"
    torch.save(ref.state_dict(), path)
    model, info = common.load_model(path, arch="cnn_small")
    assert info["num_classes"] == 100 and model(torch.rand(1, 3, 32, 32)).shape == (1, 100)
    expect_exit(capsys, common.load_model, path, arch="cnn_small", num_classes=10, match="100-class")


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path):
    ref = common.build_model("cnn_small")
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    common.load_model(tmp_path / "old.pt", arch="cnn_small")


def test_wrn_sub_block1_detected(tmp_path):
    torch.manual_seed(0)
    for with_sub in (True, False):
        ref = common.build_model("wrn34_10", 10, sub_block1=with_sub).eval()
        torch.save(ref.state_dict(), tmp_path / "wrn.pt")
        model, info = common.load_model(tmp_path / "wrn.pt", arch="wrn34_10")
        assert info["arch_kwargs"]["sub_block1"] is with_sub
        x = torch.rand(1, 3, 32, 32)
        assert torch.equal(model(x), ref(x))


def test_preact_final_bn_detected(tmp_path):
    for final_bn in (False, True):
        ref = common.build_model("preact_resnet18", 10, final_bn=final_bn)
        torch.save({"state_dict": ref.state_dict()}, tmp_path / "p.pt")
        _, info = common.load_model(tmp_path / "p.pt", arch="preact_resnet18", arch_kwargs={"shortcut_from": "act"})
        assert info["arch_kwargs"]["final_bn"] is final_bn


# ---------------------------------------------------------------------------------------------
# Every bad input: one line, exit status 2
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path, capsys):
    expect_exit(capsys, common.load_model, tmp_path / "nope.pt", arch="cnn_small", match="not found")


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are not a checkpoint", "truncated"])
def test_corrupt_file(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save(common.build_model("cnn_small").state_dict(), path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    expect_exit(capsys, common.load_model, path, arch="cnn_small", match="is not a checkpoint")


def test_arch_missing_or_mismatched(tmp_path, capsys):
    torch.save(common.build_model("cnn_small").state_dict(), tmp_path / "raw.pt")
    expect_exit(capsys, common.load_model, tmp_path / "raw.pt", match="pass --teacher-arch", arch_flag="--teacher-arch")
    expect_exit(capsys, common.load_model, tmp_path / "raw.pt", arch="resnet18", match="missing keys")
    expect_exit(capsys, common.load_model, tmp_path / "raw.pt", arch="no_such_net", match="unknown architecture")
    _, path = suite_ckpt(tmp_path)
    expect_exit(capsys, common.load_model, path, arch="resnet18", match="holds a cnn_small")


def test_shape_mismatch_is_one_line(tmp_path, capsys):
    sd = common.build_model("cnn_small").state_dict()
    sd["layer1.0.weight"] = torch.zeros(sd["layer1.0.weight"].shape[0], 3, 5, 5)
    torch.save(sd, tmp_path / "shape.pt")
    expect_exit(capsys, common.load_model, tmp_path / "shape.pt", arch="cnn_small", match="size mismatch")


def test_pickle_needing_file_refused_unless_unsafe(tmp_path, capsys):
    sd = common.build_model("cnn_small").state_dict()
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, path)
    expect_exit(capsys, common.load_model, path, arch="cnn_small", match="--unsafe-load")
    model, info = common.load_model(path, arch="cnn_small", unsafe=True)
    assert info["container"] == "state_dict"


def test_fail_and_parse_float(capsys):
    assert common.parse_float("8/255") == 8 / 255 and common.parse_float("0.031") == 0.031
    assert common.parse_float("2e-4") == 2e-4
    with pytest.raises(argparse.ArgumentTypeError):
        common.parse_float("eight")
    expect_exit(capsys, common.fail, "something is wrong", match="something is wrong")


# ---------------------------------------------------------------------------------------------
# The monitor (common.md §7)
# ---------------------------------------------------------------------------------------------

PGD5 = dict(eps=8 / 255, steps=5, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval")


def test_monitor_counts_like_an_independent_loop(cifar_dir):
    torch.manual_seed(0)
    model = common.build_model("cnn_small").train()
    model.requires_grad_(True)
    x, y = common.load_split("cifar10", cifar_dir, train=False, subset=48, download=False)
    loader = common.DeviceLoader(x, y, 32, train=False)
    bn_before = model.layer1[1].running_mean.clone()
    global_state = torch.get_rng_state()
    got = common.monitor(model, loader, PGD5, seed=7)
    assert torch.equal(torch.get_rng_state(), global_state)  # the training run's generator is not touched
    got.pop("seconds")
    again = common.monitor(model, loader, PGD5, seed=7)
    assert again.pop("seconds") > 0 and again == got
    # independent: the monitor's own generator, PGD of docs/conventions.md written out here
    gen = torch.Generator().manual_seed(common.epoch_seed(7, 0))
    model.eval()
    clean = robust = 0
    classes = set()
    for xb, yb in loader:
        clean += (model(xb).argmax(1) == yb).sum().item()
        classes |= set(model(xb).argmax(1).tolist())
        xa = (xb + torch.empty_like(xb).uniform_(-8 / 255, 8 / 255, generator=gen)).clamp(0, 1)
        for _ in range(5):
            xa.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(xa), yb), xa)
            xa = torch.min(torch.max(xa.detach() + 0.003 * g.sign(), xb - 8 / 255), xb + 8 / 255).clamp(0, 1)
        robust += (model(xa).argmax(1) == yb).sum().item()
    assert got == {"clean": clean / len(y), "robust": robust / len(y), "classes": len(classes)}
    assert robust < clean
    assert torch.equal(model.layer1[1].running_mean, bn_before)  # eval() mode: statistics untouched
    model.train()
    with common.fp32_eval(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored


# docs/common.md §7, from the official monitors: one name, one attack, in every file that offers it
SPEC_MONITORS = {
    "pgd10-ard": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_sum", bn="eval"),
    "pgd20-monitor": dict(eps=8 / 255, steps=20, step=0.003, start="uniform-clamp", loss="ce_mean", bn="eval"),
    "pgd10-madry": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
    "pgd20-sat": dict(eps=8 / 255, steps=20, step=2 / 255, start="uniform-clamp", loss="ce_mean", bn="eval"),
    "pgd10-peeraid": dict(eps=8 / 255, steps=10, step=2 / 255, start="uniform", loss="ce_mean", bn="eval"),
    "fgsm20-trades": dict(eps=0.031, steps=20, step=0.003, start="uniform", loss="ce_mean", bn="eval"),
    "clean": None,
}


@pytest.mark.parametrize("name", ["rslad", "ard", "iad", "mtard", "ardir", "adt_aodt", "train_teacher", "adaad",
                                  "peeraid"])
def test_each_script_states_its_monitors_as_the_spec(name):
    module = importlib.import_module(name)
    assert module.MONITORS and all(module.MONITORS[k] == SPEC_MONITORS[k] for k in module.MONITORS), module.MONITORS
    assert not hasattr(common, "MONITORS")  # no per-paper table in common.py


def test_monitor_epochs():
    a = argparse.Namespace(eval_every=20, eval_all_from=215, eval_first=False, eval_last=True, epochs=300)
    got = [e for e in range(1, 301) if common.is_monitor_epoch(a, e)]
    assert got == list(range(20, 201, 20)) + list(range(215, 301))  # RSLAD's epoch set (rslad.md §3)
