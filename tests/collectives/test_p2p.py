"""commcomp.collectives.p2p on gloo: contiguous and non-contiguous tensors, each entry point, on
the CPU (sent in place) and, with a GPU, on CUDA (staged through the host)."""

import pytest
import torch
import torch.distributed as dist

from commcomp.collectives import p2p
from tests._dist import spawn


def _sent(rank: int, how: str, device: str) -> torch.Tensor:
    """What `rank` sends: a (4, 6) block, or its transpose (a view with strides (1, 6))."""
    m = torch.arange(24, dtype=torch.float32, device=device).reshape(4, 6) + 100 * rank
    return m if how == "contiguous" else m.t()


def _buffer(how: str, device: str) -> torch.Tensor:
    """Where a message lands: contiguous, or a transposed (non-contiguous) view of a buffer."""
    box = torch.full((6, 4), -1.0, device=device)
    return box.t() if how == "strided_recv" else box


def _exchange(rank, world, how, device):
    peer = 1 - rank
    assert p2p.stages_through_host(torch.device(device)) == (device == "cuda")
    want = _sent(peer, how, device).reshape(-1)  # the sender's values in its logical (row-major) order
    recv = _buffer(how, device)
    pair = [p2p.isend(_sent(rank, how, device), peer), p2p.irecv(recv, peer)]
    for w in pair if rank == 0 else pair[::-1]:
        w.wait()
    torch.testing.assert_close(recv.reshape(-1), want, rtol=0, atol=0)

    recv = _buffer(how, device)
    for w in p2p.batch_isend_irecv([(_sent(rank, how, device), peer)], [(recv, peer)]):
        w.wait()
    torch.testing.assert_close(recv.reshape(-1), want, rtol=0, atol=0)
    dist.barrier()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["contiguous", "strided_send", "strided_recv"])
def test_send_and_receive_views_on_gloo(tmp_path, how, device):
    spawn(_exchange, 2, tmp_path, how, device)
