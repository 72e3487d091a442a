"""Throughput of common.DeviceLoader against a torchvision DataLoader with the same augmentation
(RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor), batch 128, 3 epochs.

    python tools/bench_loader.py --data-dir DIR [--device cuda]   # DIR in the cifar-10-batches-py layout
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


class CifarLike(torch.utils.data.Dataset):
    """torchvision CIFAR10.__getitem__ on arrays already read (its md5 check rejects partial copies)."""

    def __init__(self, x, y, transform):
        self.data, self.targets, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def images_per_s(loader, device, epochs=3):
    for _ in loader:  # warm-up epoch
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    x, y = common.load_split("cifar10", args.data_dir, train=True, download=False)
    print(f"DeviceLoader on {device}: {images_per_s(common.DeviceLoader(x, y, 128, train=True, device=device), device):.0f} img/s")
    ds = CifarLike(x, y, T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]))
    for workers in (0, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda")
        print(f"torchvision DataLoader, {workers} workers: {images_per_s(dl, device):.0f} img/s")


if __name__ == "__main__":
    main()
