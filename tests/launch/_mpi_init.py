"""Run under ``mpiexec -n 2`` with no MASTER_ADDR / MASTER_PORT: init_from_env finds the ranks
in the MPI launcher's environment, rank 0's address through mpi4py, then one all-reduce."""

import os
import sys

import torch
import torch.distributed as dist

from commcomp.launch import detect, init_from_env


def main() -> int:
    assert "MASTER_ADDR" not in os.environ, "this test exercises the mpi4py rendezvous"
    info = detect()
    rank, world, local_rank, device = init_from_env(backend="gloo", timeout=60)
    assert (rank, world, local_rank) == (info.rank, info.world_size, info.local_rank)
    assert world == 2 and local_rank == rank and device == torch.device("cpu"), (rank, world, local_rank, device)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == 3.0, t
    dist.barrier()
    print(f"rank {rank}: ok ({info.launcher}, {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
