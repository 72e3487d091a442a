"""torchrun on CPU (gloo, 2 processes) against one process: the global batch, BatchNorm per rank or
synchronised, the monitor's exact numbers, and --resume under torchrun."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, check_resume_alone

import common
import rslad

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*argv, tmp_path):
    proc = subprocess.run([*TORCHRUN, *map(str, argv)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def workers(cifar_dir, teacher_ckpt, tmp_path_factory):
    """The worker's results with BatchNorm per rank and with --sync-bn."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for mode, flags in (("per-rank", []), ("sync", ["--sync-bn"]), ("sync-sum", ["--sync-bn", "--kl-reduction", "sum"])):
        torchrun(ROOT / "tests" / "ddp_worker.py", tmp / f"{mode}.pt", cifar_dir, teacher_ckpt, *flags, tmp_path=tmp)
        out[mode] = torch.load(tmp / f"{mode}.pt", weights_only=True)
    return out


def single_process(cifar_dir, teacher_ckpt, *flags):
    """The worker's computation in this process, without torchrun."""
    args, _ = rslad.parse_args(["--teacher", str(teacher_ckpt), "--arch", "cnn_small", "--attack-steps", "2",
                                "--rand-start", "none", "--device", "cpu", "--data-dir", str(cifar_dir),
                                "--train-subset", "64", "--test-subset", "48", "--test-batch-size", "16", *flags])
    train_data, test_data = common.train_loader(args, 32, device="cpu"), common.test_loader(args, device="cpu")
    teacher, _ = common.load_teacher(args, "cpu", "cnn_small")
    torch.manual_seed(0)
    student = common.build_model("cnn_small")
    return args, train_data, test_data, teacher, student


def test_each_rank_takes_its_slice_of_the_same_global_batch(workers, cifar_dir, teacher_ckpt):
    _, train_data, _, _, _ = single_process(cifar_dir, teacher_ckpt)
    single = list(train_data.epoch(1))
    got = workers["per-rank"]["batches"]
    assert len(got) == len(single) == 2
    for (xs, ys), (x, y) in zip(got, single):
        assert [len(t) for t in ys] == [16, 16]
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)  # images, crops and flips


def test_monitor_under_two_ranks_equals_one_exactly(workers, cifar_dir, teacher_ckpt):
    _, _, test_data, _, student = single_process(cifar_dir, teacher_ckpt)
    one = common.monitor(student, test_data, rslad.MONITORS["pgd20-monitor"])
    assert workers["per-rank"]["world_size"] == 2
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(workers["per-rank"]["monitor"]) == drop(one) == drop(workers["sync"]["monitor"])
    assert 0 < one["clean"] and one["robust"] < one["clean"]  # a real attack, 3 test batches shared by 2 ranks


def test_ranks_hold_identical_weights_after_each_step(workers):
    for step in workers["per-rank"]["params"]:
        assert torch.equal(step[0], step[1])
    first, second = workers["per-rank"]["params"]
    assert not torch.equal(first[0], second[0])  # the weights did move
    # BatchNorm per rank: the ranks' running statistics differ (each saw its own half of the batch)
    assert not torch.equal(*workers["per-rank"]["buffers"][-1])


@pytest.mark.parametrize("mode, flags, steps", [("sync", [], 2), ("sync-sum", ["--kl-reduction", "sum"], 1)])
def test_sync_bn_equals_one_process_with_the_global_batch(workers, cifar_dir, teacher_ckpt, mode, flags, steps,
                                                          one_thread):
    """--sync-bn: the two ranks' steps equal one process's on the global batch. The workers run one thread
    each, and so does this reference (another thread count sums in another order: ~1e-4 apart after two
    steps). `--kl-reduction sum` too: each rank sums its slice and DDP averages the ranks' gradients, so
    the script multiplies the sum by the world size (without it the first step is 0.17 away). Its summed
    loss makes steps large enough at this lr that a second one amplifies rounding: one step is compared."""
    args, train_data, _, teacher, student = single_process(cifar_dir, teacher_ckpt, *flags)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    for _, (x_nat, y) in zip(range(steps), train_data.epoch(1)):
        rslad.train_step(student, teacher, optimizer, x_nat, y, args)
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    buffers = torch.cat([b.float().flatten() for b in student.buffers()])
    sync, per_rank = workers[mode], workers["per-rank"]
    for rank in (0, 1):
        assert torch.allclose(sync["params"][steps - 1][rank], params, atol=1e-5, rtol=0)
        assert torch.allclose(sync["buffers"][steps - 1][rank], buffers, atol=1e-5, rtol=0)
    # without --sync-bn the same steps give another model: the comparison above can fail
    assert not torch.allclose(per_rank["params"][steps - 1][0], params, atol=1e-5, rtol=0)


def test_resume_under_torchrun(cifar_dir, teacher_ckpt, tmp_path):
    argv = ["--teacher", teacher_ckpt, "--arch", "cnn_small", "--train-subset", "64", "--test-subset", "32",
            "--batch-size", "32", "--attack-steps", "2", "--lr", "0.02", "--eval-every", "1", "--device", "cpu",
            "--data-dir", cifar_dir]
    full, part = check_resume_alone("rslad.py", argv, tmp_path, launcher=TORCHRUN)
    ck = torch.load(part / "last.pt", weights_only=True)
    assert len(ck["rng_ranks"]) == 2 and ck["args"]["sync_bn"] is False


def test_eval_under_two_ranks_gives_the_same_numbers_and_flags(cifar_dir, tmp_path):
    """eval_attacks.py under torchrun: white-box attacks and AutoAttack (fast) shared by batches across
    2 ranks give the JSON of one process: every accuracy, per-class count and per-point robust flag."""
    import train_teacher
    train_teacher.main(["--recipe", "natural-iad", "--arch", "cnn_small", "--epochs", "4", "--lr", "0.05",
                        "--batch-size", "32", "--data-dir", str(cifar_dir), "--device", "cpu",
                        "--runs-dir", str(tmp_path / "runs")])
    (model,) = (tmp_path / "runs").glob("*/best.pt")  # a model some points of which resist the attacks
    common_flags = ["--data-dir", cifar_dir, "--n-ex", "40", "--bs", "8", "--aa-bs", "8", "--aa", "fast",
                    "--attacks", "fgsm,pgd_sat,cw", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, str(ROOT / "eval_attacks.py"), str(model), *common_flags,
                          "--json", str(tmp_path / "one.json")], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # as the workers
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(ROOT / "eval_attacks.py", model, *common_flags, "--json", tmp_path / "two.json", tmp_path=tmp_path)
    import json
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["env"]["world_size"] == 2 and a["env"]["world_size"] == 1
    for key in ("clean", "per_class"):
        assert a[key] == b[key], key
    for name in ("fgsm", "pgd_sat", "cw", "aa_fast"):
        ra, rb = a["attacks"][name], b["attacks"][name]
        drop = ("seconds",)
        assert {k: v for k, v in ra.items() if k not in drop} == {k: v for k, v in rb.items() if k not in drop}, name
    flags = a["attacks"]["aa_fast"]["robust_flags"]
    assert flags == b["attacks"]["aa_fast"]["robust_flags"] and 0 < sum(flags) < 40  # a real attack on both


def test_main_gives_every_rank_rank_0s_batchnorm_buffers_before_each_step(cifar_dir, teacher_ckpt, tmp_path):
    """rslad.py's main() under torchrun (BatchNorm per rank): at each of the 4 steps every rank holds rank 0's
    buffers, as nn.DataParallel's replicas held device 0's; without the sync in the loop the ranks' statistics
    part after the first step (each rank normalises its own slice)."""
    torchrun(ROOT / "tests" / "ddp_main_worker.py", "rslad", tmp_path / "same.json", "--teacher", teacher_ckpt,
             "--arch", "cnn_small", "--train-subset", "64", "--test-subset", "16", "--batch-size", "32",
             "--attack-steps", "1", "--epochs", "2", "--device", "cpu", "--data-dir", cifar_dir,
             "--runs-dir", tmp_path / "runs", tmp_path=tmp_path)
    assert json.loads((tmp_path / "same.json").read_text()) == [True] * 4
