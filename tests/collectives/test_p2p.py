"""commcomp.collectives.p2p on gloo: contiguous and non-contiguous tensors, each entry point.
(The CUDA staging path runs in tests/test_cuda_hooks.py on a GPU.)"""

import pytest
import torch
import torch.distributed as dist

from commcomp.collectives import p2p
from tests._dist import spawn


def _sent(rank: int, how: str) -> torch.Tensor:
    """What `rank` sends: a (4, 6) block, or its transpose (a view with strides (1, 6))."""
    m = torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100 * rank
    return m if how == "contiguous" else m.t()


def _buffer(how: str) -> torch.Tensor:
    """Where a message lands: contiguous, or a transposed (non-contiguous) view of a buffer."""
    return torch.full((6, 4), -1.0).t() if how == "strided_recv" else torch.full((6, 4), -1.0)


def _exchange(rank, world, how):
    peer = 1 - rank
    want = _sent(peer, how).reshape(-1)  # the sender's values in its logical (row-major) order
    recv = _buffer(how)
    pair = [p2p.isend(_sent(rank, how), peer), p2p.irecv(recv, peer)]
    for w in pair if rank == 0 else pair[::-1]:
        w.wait()
    torch.testing.assert_close(recv.reshape(-1), want, rtol=0, atol=0)

    recv = _buffer(how)
    for w in p2p.batch_isend_irecv([(_sent(rank, how), peer)], [(recv, peer)]):
        w.wait()
    torch.testing.assert_close(recv.reshape(-1), want, rtol=0, atol=0)
    dist.barrier()


@pytest.mark.parametrize("how", ["contiguous", "strided_send", "strided_recv"])
def test_send_and_receive_views_on_gloo(tmp_path, how):
    spawn(_exchange, 2, tmp_path, how)
