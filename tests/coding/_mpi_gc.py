"""Run under ``mpiexec -n 3``: the coordinator protocol over mpi4py decodes the exact average
of the partition gradients, with a different straggler in every round."""

import sys
import time

import torch

from commcomp.coding import CodedAggregator, make_code


def main() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    code = make_code("cyclic", n, 1, seed=3)
    agg = CodedAggregator(code, transport="mpi", timeout=60)
    for step in range(6):
        parts = [torch.randn(1000, generator=torch.Generator().manual_seed(100 * step + j), dtype=torch.float64)
                 for j in range(n)]
        coded = sum(float(code.B[rank, j]) * parts[j] for j in code.partitions(rank))
        if step % n == rank and step > 0:
            time.sleep(0.5)  # this round's straggler
        out = agg.finish(agg.start((step, 0), coded))
        want = torch.stack(parts).mean(0)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
    assert agg.close(timeout=30)
    if rank == 0:
        assert agg.metrics["rounds"] == 6 and min(agg.survivor_counts) == n - 1, agg.survivor_counts
    comm.Barrier()
    print(f"rank {rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
