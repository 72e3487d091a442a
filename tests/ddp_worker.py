"""Started by tests/test_distributed.py under `torchrun --standalone --nproc_per_node 2`, on CPU with gloo:
two RSLAD steps through common.prepare_student (DDP, BatchNorm per rank unless --sync-bn), every rank's
parameters gathered after each step, each rank's slices of the loader's global batches, and the
monitor of a fixed model. Rank 0 writes everything to the file named by the first argument."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import rslad  # noqa: E402


def gathered(t):
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def main(out_path, data_dir, teacher_path, *flags):
    args, _ = rslad.parse_args(["--teacher", teacher_path, "--arch", "cnn_small", "--attack-steps", "2",
                                "--rand-start", "none", "--device", "cpu", "--data-dir", data_dir,
                                "--train-subset", "64", "--test-subset", "48", "--test-batch-size", "16", *flags])
    device = common.setup_device(args)
    rank, world_size = common.world()
    common.seed_everything(args.seed)
    train_data, test_data = common.train_loader(args, 32, device=device), common.test_loader(args, device=device)
    teacher, _ = common.load_teacher(args, device, "cnn_small")
    torch.manual_seed(0)  # the same initial weights on every rank
    student = common.prepare_student(common.build_model("cnn_small"), args, device)
    result = {"world_size": world_size, "monitor": common.monitor(student, test_data, rslad.MONITORS["pgd20-monitor"])}
    result["batches"] = [[gathered(x), gathered(y)] for x, y in train_data.epoch(1)]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    result["params"], result["buffers"] = [], []
    for x_nat, y in train_data.epoch(1):
        rslad.train_step(student, teacher, optimizer, x_nat, y, args)
        flat = torch.cat([p.detach().flatten() for p in student.parameters()])
        result["params"].append(gathered(flat))
        result["buffers"].append(gathered(torch.cat([b.float().flatten() for b in common.unwrap(student, keep_compiled=True).buffers()])))
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()  # no rank leaves while rank 0 writes


if __name__ == "__main__":
    main(*sys.argv[1:])
