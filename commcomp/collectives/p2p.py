"""Point-to-point messages of device tensors on any backend, written once for every hook that
sends to one peer (the decentralized neighbour exchange, the gradient-coding coordinator).

gloo's collectives accept CUDA tensors, but its send and recv do not: they hand the device
pointer to the socket (``writev ...: Bad address``, found on an H100). When a tensor lives on
an accelerator and the group's backend is gloo, the message is staged through host memory:
a send copies the tensor to the host first, and a receive lands on the host and is copied to
its device buffer when it is waited on. NCCL (and CPU tensors on gloo) send in place.

Backends send and receive contiguous memory only. A non-contiguous tensor is sent as a
contiguous copy, and a receive into one lands in a contiguous buffer that ``wait()`` copies
into it, so callers may pass views (a slice of a column, a transposed block) on any backend.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def stages_through_host(device: torch.device, group=None) -> bool:
    """Whether P2P messages of tensors on `device` must be staged through host memory on `group`."""
    return torch.device(device).type != "cpu" and dist.get_backend(group) == "gloo"


class StagedWork:
    """A send or receive request; ``wait()`` also copies a staged receive into its buffer."""

    def __init__(self, work, host: Optional[torch.Tensor] = None, dst: Optional[torch.Tensor] = None):
        self._work, self._host, self._dst = work, host, dst

    def wait(self):
        self._work.wait()
        if self._dst is not None:
            self._dst.copy_(self._host)
        self._work = self._host = self._dst = None
        return True


def _send_buffer(tensor: torch.Tensor, staged: bool) -> torch.Tensor:
    """What goes on the wire for `tensor`: itself, or a contiguous (host) copy."""
    if staged:
        return tensor.to("cpu", memory_format=torch.contiguous_format)
    return tensor.contiguous()


def _recv_buffer(tensor: torch.Tensor, staged: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(buffer the message lands in, tensor ``wait()`` must copy it into, or None)."""
    if staged:
        return torch.empty(tensor.shape, dtype=tensor.dtype), tensor
    if not tensor.is_contiguous():
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device), tensor
    return tensor, None


def isend(tensor: torch.Tensor, dst: int, group=None, tag: int = 0) -> StagedWork:
    """``dist.isend`` that stages `tensor` through the host where the backend needs it (the
    returned request keeps the host or contiguous copy alive until it is waited on)."""
    buf = _send_buffer(tensor, stages_through_host(tensor.device, group))
    return StagedWork(dist.isend(buf, dst=dst, group=group, tag=tag), buf)


def irecv(tensor: torch.Tensor, src: int, group=None, tag: int = 0) -> StagedWork:
    """``dist.irecv`` into `tensor`; a staged (or non-contiguous) receive lands in a buffer
    that ``wait()`` copies into `tensor`."""
    buf, dst = _recv_buffer(tensor, stages_through_host(tensor.device, group))
    return StagedWork(dist.irecv(buf, src=src, group=group, tag=tag), buf, dst)


def batch_isend_irecv(sends: List[Tuple[torch.Tensor, int]], recvs: List[Tuple[torch.Tensor, int]],
                      group=None) -> List[StagedWork]:
    """:func:`torch.distributed.batch_isend_irecv` of (tensor, global peer) sends and receives,
    staged through the host where the backend needs it. Returns one request per message."""
    tensors = [t for t, _ in sends] + [t for t, _ in recvs]
    if not tensors:
        return []
    staged = stages_through_host(tensors[0].device, group)
    send_bufs = [_send_buffer(t, staged) for t, _ in sends]
    recv_bufs = [_recv_buffer(t, staged) for t, _ in recvs]
    ops = [dist.P2POp(dist.isend, b, peer, group) for b, (_, peer) in zip(send_bufs, sends)]
    ops += [dist.P2POp(dist.irecv, b, peer, group) for (b, _), (_, peer) in zip(recv_bufs, recvs)]
    works = dist.batch_isend_irecv(ops)
    out = [StagedWork(w, b) for w, b in zip(works[:len(sends)], send_bufs)]
    out += [StagedWork(w, b, dst) for w, (b, dst) in zip(works[len(sends):], recv_bufs)]
    return out


__all__ = ["StagedWork", "batch_isend_irecv", "irecv", "isend", "stages_through_host"]
