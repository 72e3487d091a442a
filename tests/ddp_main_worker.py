"""torchrun worker: a training script's main() as a user runs it, its train_step wrapped to record, at every
step, whether every rank holds rank 0's BatchNorm buffers (what main() syncs first in its loop).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_main_worker.py SCRIPT OUT.json [FLAGS...]
"""

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main(script, out, *argv):
    module = importlib.import_module(script)
    train_step, same = module.train_step, []

    def checked(student, *args, **kwargs):
        flat = torch.cat([b.double().flatten() for b in common.unwrap(student).buffers()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        same.append(all(torch.equal(gathered[0], g) for g in gathered))
        return train_step(student, *args, **kwargs)
    module.train_step = checked
    module.main(list(argv))
    if common.is_main():
        Path(out).write_text(json.dumps(same))


if __name__ == "__main__":
    main(*sys.argv[1:])
