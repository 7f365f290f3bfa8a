"""Neighbour exchange over torch.distributed point-to-point: one message per neighbour.

Each call sends one flat ``uint8`` payload to every out-neighbour of this rank and receives one
payload of a known size from every in-neighbour, with :func:`torch.distributed.batch_isend_irecv`
(coalesced on NCCL, independent send/recv pairs on gloo). Nothing global happens: no barrier,
no all-reduce, no pickling; a rank waits only on its own neighbours. Payload sizes are fixed by
the compressor and the layout (``Compressor.payload_nbytes``), so the receiver allocates its
buffers before the message arrives. CUDA payloads on gloo are staged through host memory
(:mod:`commcomp.collectives.p2p`).

A dead neighbour surfaces as an error when the receive is waited on, after the process
group's timeout (``init_process_group(timeout=...)``); lower it for fast failure detection.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from ..collectives import p2p
from .topology import Topology


class Inflight:
    """Messages of one exchange that were launched but not yet waited for."""

    def __init__(self, requests, received: Dict[int, torch.Tensor], weights: List[Tuple[int, float]], keep):
        self._requests = requests
        self.received = received  # in-neighbour rank -> its payload
        self.weights = weights  # (in-neighbour rank, W[rank, j])
        self._keep = keep  # the sent payload must outlive its send

    def wait(self) -> "Inflight":
        for req in self._requests:
            req.wait()
        self._requests, self._keep = [], None
        return self


class NeighbourExchange:
    """Sends this rank's payload to its out-neighbours and receives its in-neighbours'.

    Args:
        topology: a :class:`Topology` whose ``n`` equals the group's size; node ``i`` is group
            rank ``i``.
        process_group: the group (default: the world).
    """

    def __init__(self, topology: Topology, process_group=None):
        if not dist.is_initialized():
            raise RuntimeError("commcomp: initialize torch.distributed before creating a neighbour exchange")
        world = dist.get_world_size(process_group)
        topology.validate(world_size=world)
        self.topology = topology
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self._global = [r if process_group is None else dist.get_global_rank(process_group, r)
                        for r in range(world)]

    def fan_out(self, step: int) -> int:
        """How many messages this rank sends per exchange at `step`."""
        return len(self.topology.out_neighbours(self.rank, step))

    def start(self, payload: torch.Tensor, recv_nbytes: int, step: int) -> Inflight:
        """Launch the sends of `payload` and the receives of `recv_nbytes` bytes per in-neighbour."""
        if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
            raise TypeError(f"commcomp: exchange payloads are 1-D contiguous uint8, got {payload.dtype} "
                            f"{tuple(payload.shape)}")
        ins = self.topology.in_neighbours(self.rank, step)
        outs = self.topology.out_neighbours(self.rank, step)
        received = {j: torch.empty(recv_nbytes, dtype=torch.uint8, device=payload.device) for j, _ in ins}
        requests = p2p.batch_isend_irecv([(payload, self._global[j]) for j in outs],
                                         [(received[j], self._global[j]) for j, _ in ins], self.process_group)
        return Inflight(requests, received, ins, payload)


__all__ = ["Inflight", "NeighbourExchange"]
