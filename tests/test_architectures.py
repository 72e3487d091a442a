"""Architectures (common.md §1-2): counts, golden state_dict keys, normalisation, DeepMind padding,
TRADES sub_block1, stage outputs, errors."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common import ARCHS, DMBlock, DMWideResNet, build_model, stage_outputs

DATA = Path(__file__).parent / "data"
LARGE = {"resnet152", "wrn34_10", "wrn34_20", "dm_wrn70_16", "dm_wrn28_10", "dm_wrn34_20"}  # tested on the meta device only

# common.md §1 table: arch -> (num_classes the count is quoted for, keys, parameters)
SPEC = {
    "resnet18": (10, 122, 11_173_962),
    "resnet50": (10, 320, 23_520_842),
    "resnet152": (10, 932, 58_156_618),
    "preact_resnet18": (10, 102, 11_171_146),
    "mobilenet_v2": (10, 344, 2_296_922),
    "wrn34_10": (10, 252, 48_262_586),
    "wrn34_20": (10, 191, 184_531_674),  # RobustBench's Chen2021LTD_WRN34_20: tests/test_robustbench.py
    "dm_wrn70_16": (100, 407, 266_888_756),
    "dm_wrn28_10": (10, 155, 36_479_194),
    "dm_wrn34_20": (100, 191, 184_646_964),
    "dm_wrn22_6": (100, 119, 9_693_108),
    "resnet56": (10, 344, 855_770),
}
# golden file stem -> (arch, switches)
GOLDEN = {name: (name, {}) for name in SPEC}
GOLDEN["wrn34_10_no_sub_block1"] = ("wrn34_10", {"sub_block1": False})
GOLDEN["preact_resnet18_final_bn"] = ("preact_resnet18", {"final_bn": True})


def meta_model(arch, num_classes=10, **kw):
    with torch.device("meta"):
        return build_model(arch, num_classes, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def read_golden(stem):
    """{key: shape} from tests/data/keys_<stem>.txt (generated from the official definitions)."""
    out = {}
    for line in (DATA / f"keys_{stem}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.split(",") if s)
    return out


def test_arch_list():
    assert ARCHS == ("resnet18", "resnet50", "resnet152", "preact_resnet18", "mobilenet_v2", "wrn34_10",
                     "wrn34_20", "dm_wrn70_16", "dm_wrn28_10", "dm_wrn34_20", "dm_wrn22_6", "resnet56", "cnn_small")


@pytest.mark.parametrize("arch", SPEC)
def test_key_and_parameter_counts(arch):
    num_classes, keys, params = SPEC[arch]
    model = meta_model(arch, num_classes)
    assert len(model.state_dict()) == keys
    assert n_params(model) == params


def test_variant_counts():
    full, lean = meta_model("wrn34_10"), meta_model("wrn34_10", sub_block1=False)
    assert (len(lean.state_dict()), n_params(lean)) == (191, 46_160_474)
    assert sum(k.startswith("sub_block1.") for k in full.state_dict()) == 61
    assert n_params(full.sub_block1) == 2_102_112
    bn = meta_model("preact_resnet18", final_bn=True)
    assert (len(bn.state_dict()), n_params(bn)) == (107, 11_172_170)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(arch, num_classes):
    model = meta_model(arch, num_classes)
    assert model(torch.rand(2, 3, 32, 32, device="meta")).shape == (2, num_classes)
    assert model.num_classes == num_classes


@pytest.mark.parametrize("stem", GOLDEN)
def test_state_dict_matches_official_keys(stem):
    arch, kw = GOLDEN[stem]
    golden = read_golden(stem)
    model = meta_model(arch, **kw)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == golden
    assert "mean" not in golden and "std" not in golden
    # a file with exactly the official keys and shapes loads strictly
    if arch in LARGE:
        sd = {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else None)
              for k, s in golden.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return
    torch.manual_seed(1)
    sd = {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s) for k, s in golden.items()}
    model = build_model(arch, **kw)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_buffers_not_in_state_dict(arch):
    plain, normed = meta_model(arch, norm=None), meta_model(arch, norm="cifar100")
    assert list(plain.state_dict()) == list(normed.state_dict())
    assert not any(k.split(".")[-1] in ("mean", "std") for k in normed.state_dict())
    assert plain.mean is None and plain.norm is None
    assert tuple(normed.mean.shape) == (1, 3, 1, 1) and tuple(normed.std.shape) == (1, 3, 1, 1)
    assert normed.norm == {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}
    default = meta_model(arch)
    assert default.norm == ({"mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
                            if arch.startswith("dm_wrn") else None)


def test_normalisation_is_applied_first():
    torch.manual_seed(0)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    normed = build_model("cnn_small", norm=(mean, std)).eval()
    plain = build_model("cnn_small", norm=None).eval()
    plain.load_state_dict(normed.state_dict(), strict=True)
    x = torch.rand(4, 3, 32, 32)
    x_n = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), plain(x_n), rtol=0, atol=1e-6)
    assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_dm_wrn_cifar10_and_cifar100_constants_differ():
    torch.manual_seed(0)
    c10 = DMWideResNet(depth=10, width=1, norm="cifar10").eval()  # the dm_wrn* class at its smallest depth
    c100 = DMWideResNet(depth=10, width=1, norm="cifar100").eval()
    c100.load_state_dict(c10.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (c10(x) - c100(x)).abs().max() > 1e-4
    assert meta_model("dm_wrn22_6").norm["mean"] == [0.4914, 0.4822, 0.4465]  # build_model default


def test_dm_stride2_pads_right_and_bottom_only():
    block = DMBlock(1, 2, stride=2).eval()  # stride 2 always changes width in a DM WRN
    seen = {}
    block.conv_0.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    x = torch.arange(1.0, 1 + 6 * 6).view(1, 1, 6, 6)
    act = F.silu(x / (1 + block.batchnorm_0.eps) ** 0.5)  # eval BN with fresh statistics
    with torch.no_grad():
        for k, expect in (((0, 0), act[..., ::2, ::2]),  # top-left tap: rows/cols 0, 2, 4, no top/left pad
                          ((2, 2), F.pad(act[..., 2::2, 2::2], (0, 1, 0, 1)))):  # bottom-right tap hits the pad
            block.conv_0.weight.zero_()
            block.conv_0.weight[0, 0, k[0], k[1]] = 1.0
            block(x)
            assert seen["inp"].shape == (1, 1, 7, 7)
            torch.testing.assert_close(seen["inp"][..., :6, :6], act)
            assert seen["inp"][..., 6, :].abs().sum() == 0 and seen["inp"][..., :, 6].abs().sum() == 0
            torch.testing.assert_close(seen["out"][:, :1], expect)
    # a stride-1 block pads all four sides: 6x6 -> 8x8 -> 6x6
    block1 = DMBlock(1, 1, stride=1).eval()
    block1.conv_0.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        block1(x)
    assert seen["inp"].shape == (1, 1, 8, 8) and seen["out"].shape == (1, 1, 6, 6)


SHORTCUT_CASES = {  # a widening block, its convs (first, last), shortcut, pre-activation BN or None for raw x
    "wrn": (lambda: build_model("wrn34_10", depth=10, widen_factor=1).block2.layer[0],
            "conv1", "conv2", "convShortcut", "bn1"),
    "dm": (lambda: DMWideResNet(depth=10, width=1).layer[1].block[0], "conv_0", "conv_1", "shortcut", "batchnorm_0"),
    "preact-act": (lambda: build_model("preact_resnet18").layer2[0], "conv1", "conv2", "shortcut", "bn1"),
    "preact-input": (lambda: build_model("preact_resnet18", shortcut_from="input").layer2[0],
                     "conv1", "conv2", "shortcut", None),
}


@pytest.mark.parametrize("case", SHORTCUT_CASES)
def test_projection_shortcut_input(case):
    """Residual branch zeroed: a widening block returns shortcut(act(bn(x))) for TRADES and DeepMind WRNs
    and the default PreActBlock (§1.2, §1.4, §1.5), shortcut(x) for shortcut_from='input'."""
    make, first, last, shortcut, bn = SHORTCUT_CASES[case]
    torch.manual_seed(0)
    block = make().eval()
    x = torch.randn(2, block.get_submodule(first).in_channels, 8, 8)
    act = F.silu if case == "dm" else F.relu
    with torch.no_grad():
        block.get_submodule(last).weight.zero_()
        expect = block.get_submodule(shortcut)(x if bn is None else act(block.get_submodule(bn)(x)))
        torch.testing.assert_close(block(x), expect, rtol=0, atol=1e-6)


def test_wrn34_10_sub_block1_takes_no_part_in_forward():
    torch.manual_seed(0)
    model = build_model("wrn34_10", depth=10, widen_factor=2)
    model(torch.rand(2, 3, 32, 32)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert len([n for n in grads if n.startswith("sub_block1.")]) == 7  # bn1 (2), conv1, bn2 (2), conv2, convShortcut
    for name, g in grads.items():
        assert (g is None) == name.startswith("sub_block1."), name


def test_wrn34_10_init():
    torch.manual_seed(0)
    model = build_model("wrn34_10", depth=10, widen_factor=8)  # block3 conv2: 512x512x3x3
    w = model.block3.layer[0].conv2.weight
    assert abs(w.std().item() / (2 / (9 * 512)) ** 0.5 - 1) < 0.01  # TRADES: N(0, sqrt(2/(k*k*out)))
    assert (model.fc.bias == 0).all() and (model.bn1.weight == 1).all() and (model.bn1.bias == 0).all()
    assert model.fc.weight.abs().max() <= 1 / 512 ** 0.5  # PyTorch default, U(-1/sqrt(in), 1/sqrt(in))


def test_resnet56_init():
    torch.manual_seed(0)
    w = build_model("resnet56").layer3[1].conv2.weight  # 64x64x3x3, fan_out = 576
    assert abs(w.std().item() / (2 / 576) ** 0.5 - 1) < 0.03


def test_preact_shortcut_source_matters():
    torch.manual_seed(0)
    act = build_model("preact_resnet18").eval()
    for m in act.modules():  # non-trivial BN so that relu(bn1(x)) != x
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    inp = build_model("preact_resnet18", shortcut_from="input").eval()
    inp.load_state_dict(act.state_dict(), strict=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (act(x) - inp(x)).abs().max() > 1e-4


@pytest.mark.parametrize("arch, shapes", [
    ("preact_resnet18", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
    ("resnet56", [(16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ("cnn_small", [(16, 16, 16), (32, 8, 8), (64, 4, 4)]),
])
def test_stage_outputs(arch, shapes):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        feats, logits = stage_outputs(model, x)
        assert [tuple(f.shape[1:]) for f in feats] == shapes and len(model.stage_names) == len(shapes)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        assert all(not m._forward_hooks for m in model.modules())  # hooks removed
        (stem,), _ = stage_outputs(model, x, ["conv1" if arch != "cnn_small" else "layer1.0"])
        assert stem.shape[2:] == (32, 32)
    model.train()  # exactly one forward: BatchNorm statistics move once
    stage_outputs(model, x)
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert first_bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("arch, shapes", [
    ("resnet18", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),
    ("mobilenet_v2", [(24, 32, 32), (32, 16, 16), (96, 8, 8), (320, 4, 4)]),
    ("wrn34_10", [(160, 32, 32), (320, 16, 16), (640, 8, 8)]),
    ("dm_wrn70_16", [(256, 32, 32), (512, 16, 16), (1024, 8, 8)]),
])
def test_stage_output_shapes_wide(arch, shapes):
    feats, logits = stage_outputs(meta_model(arch), torch.rand(2, 3, 32, 32, device="meta"))
    assert [tuple(f.shape[1:]) for f in feats] == shapes and logits.shape == (2, 10)


def test_arch_kwargs_recorded():
    assert meta_model("wrn34_10", sub_block1=False).arch_kwargs == {"depth": 34, "widen_factor": 10,
                                                                   "sub_block1": False}
    m = meta_model("preact_resnet18", final_bn=True)
    assert (m.arch, m.arch_kwargs) == ("preact_resnet18", {"shortcut_from": "act", "final_bn": True})
    assert meta_model("dm_wrn28_10").arch_kwargs == {"padding": 0, "activation": "swish"}
    assert meta_model("resnet18").arch_kwargs == {}


@pytest.mark.parametrize("call, words", [
    (lambda: build_model("resnet19"), ["resnet19", "resnet18", "cnn_small"]),
    (lambda: build_model("resnet18", norm="imagenet"), ["imagenet", "cifar10", "cifar100"]),
    (lambda: build_model("resnet18", norm=((0.5, 0.5), (0.2, 0.2))), ["mean, std"]),
    (lambda: build_model("resnet18", norm=((0.5,) * 3, (0.2, 0.0, 0.2))), ["mean, std"]),
    (lambda: build_model("resnet18", sub_block1=False), ["sub_block1"]),
    (lambda: build_model("preact_resnet18", shortcut_from="x"), ["act", "input"]),
    (lambda: stage_outputs(build_model("cnn_small"), torch.rand(1, 3, 32, 32), ["layer9"]), ["layer9"]),
])
def test_bad_arguments_raise_value_error(call, words):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
