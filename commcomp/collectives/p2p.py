"""Point-to-point messages of device tensors on any backend, written once for every hook that
sends to one peer (the decentralized neighbour exchange, the gradient-coding coordinator).

gloo's collectives accept CUDA tensors, but its send and recv do not: they hand the device
pointer to the socket (``writev ...: Bad address``, found on an H100). When a tensor lives on
an accelerator and the group's backend is gloo, the message is staged through host memory:
a send copies the tensor to the host first, and a receive lands on the host and is copied to
its device buffer when it is waited on. NCCL (and CPU tensors on gloo) send in place.
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


def isend(tensor: torch.Tensor, dst: int, group=None, tag: int = 0) -> StagedWork:
    """``dist.isend`` that stages `tensor` through the host where the backend needs it (the
    returned request keeps the host copy alive until it is waited on)."""
    if stages_through_host(tensor.device, group):
        host = tensor.to("cpu")
        return StagedWork(dist.isend(host, dst=dst, group=group, tag=tag), host)
    return StagedWork(dist.isend(tensor, dst=dst, group=group, tag=tag), tensor)


def irecv(tensor: torch.Tensor, src: int, group=None, tag: int = 0) -> StagedWork:
    """``dist.irecv`` into `tensor`; a staged receive lands on the host and ``wait()`` copies it."""
    if stages_through_host(tensor.device, group):
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        return StagedWork(dist.irecv(host, src=src, group=group, tag=tag), host, tensor)
    return StagedWork(dist.irecv(tensor, src=src, group=group, tag=tag))


def batch_isend_irecv(sends: List[Tuple[torch.Tensor, int]], recvs: List[Tuple[torch.Tensor, int]],
                      group=None) -> List[StagedWork]:
    """:func:`torch.distributed.batch_isend_irecv` of (tensor, global peer) sends and receives,
    staged through the host where the backend needs it. Returns one request per message."""
    tensors = [t for t, _ in sends] + [t for t, _ in recvs]
    if not tensors:
        return []
    staged = stages_through_host(tensors[0].device, group)
    send_bufs = [t.to("cpu") if staged else t for t, _ in sends]
    recv_bufs = [torch.empty(t.shape, dtype=t.dtype) if staged else t for t, _ in recvs]
    ops = [dist.P2POp(dist.isend, b, peer, group) for b, (_, peer) in zip(send_bufs, sends)]
    ops += [dist.P2POp(dist.irecv, b, peer, group) for b, (_, peer) in zip(recv_bufs, recvs)]
    works = dist.batch_isend_irecv(ops)
    out = [StagedWork(w, b) for w, b in zip(works[:len(sends)], send_bufs)]
    out += [StagedWork(w, b, t if staged else None)
            for w, b, (t, _) in zip(works[len(sends):], recv_bufs, recvs)]
    return out


__all__ = ["StagedWork", "batch_isend_irecv", "irecv", "isend", "stages_through_host"]
