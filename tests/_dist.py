"""Multi-process test harness: spawn `world` processes on gloo with a file rendezvous in a
temporary folder, run `worker(rank, world, *args)` in each, and re-raise any rank's failure.

Workers must be module-level functions (they are pickled into spawned processes); they assert
for themselves, since each rank sees only its own results.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, worker, world, init_file, args):
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, tmp_path, *args) -> None:
    init_file = os.path.join(str(tmp_path), f"rendezvous-{world}")
    mp.spawn(_entry, args=(worker, world, init_file, args), nprocs=world, join=True)


def rank_tensor(rank: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A reproducible per-rank tensor that any rank can rebuild for any other rank."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return (torch.randn(n, generator=g) * (rank + 1)).to(dtype)
