"""One rank of the sharding test: iterate a TapeDataset through a 2-worker DataLoader on gloo.

Launched by test_sharding.py with ``python -m torch.distributed.run --nproc-per-node 2``; writes
the sequence ids this rank saw, with the DataLoader worker that produced each, to a JSON file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import torch
import torch.distributed as dist

from trainer_bridge import TapeDataset


def main(tape: str, out_dir: str, epoch: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = TapeDataset(tape, token_budget=400, seed=13)
    ds.set_epoch(epoch)
    seen = []
    for batch in ds.loader(num_workers=2):
        seen.append({"shard": list(batch.shard), "batch_index": batch.batch_index, "sequence_ids": batch.sequence_ids})
    # Every rank gets here: the barrier proves no rank hung or died mid-epoch.
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_bytes(orjson.dumps({"rank": rank, "world": world, "batches": seen,
                                                                 "state": ds.state_dict()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
