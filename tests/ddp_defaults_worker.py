"""Started by tests/test_gpu_path.py under `torchrun --standalone --nproc_per_node 2`, on CPU with gloo: every
training script's main() for two steps at its default architectures, as a user types it under torchrun.
The WRN-34-10 is scaled down to a WRN-10-2 in the registry (same class, same unused `sub_block1`); the other
defaults (ResNet-18, PreActResNet-18, ResNet-56) run at full size. Arguments: the data folder, the runs
folder, and a JSON list of [name, script, flags]; "{arch}" in a flag is the path of a random suite
checkpoint of that architecture."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

common._REGISTRY["wrn34_10"] = (common.WideResNet, {"depth": 10, "widen_factor": 2, "sub_block1": True})
# two global batches of 8 (4 images per rank), no student monitor (the teachers are measured once)
SMALL = ["--train-subset", "16", "--batch-size", "8", "--epochs", "1", "--test-subset", "4", "--test-batch-size", "4",
         "--eval-every", "1000", "--no-eval-last", "--device", "cpu"]
TEACHERS = ("wrn34_10", "resnet18", "resnet56", "preact_resnet18")


def main(data_dir, runs_dir, runs):
    common.setup_device(argparse.Namespace(device="cpu", no_tf32=False, deterministic=False))  # joins the process group once
    folder = Path(runs_dir) / "teachers"
    paths = {arch: str(folder / f"{arch}.pt") for arch in TEACHERS}
    if common.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        for arch in TEACHERS:
            torch.manual_seed(0)
            common.save_checkpoint(paths[arch], common.checkpoint_dict(common.build_model(arch), kind="best", epoch=1,
                                                                       dataset="cifar10", args={}))
    torch.distributed.barrier()
    for name, script, flags in json.loads(runs):
        module = importlib.import_module(script)
        module.main([f.format(**paths) for f in flags] + SMALL
                    + ["--data-dir", data_dir, "--runs-dir", str(Path(runs_dir) / name)])


if __name__ == "__main__":
    main(*sys.argv[1:])
