"""How payloads cross ranks, written once and reused by every hook: non-blocking future
chaining (:mod:`.futures`), ternary collectives (:mod:`.ternary`), point-to-point messages that
work on every backend (:mod:`.p2p`) and a cost model (:mod:`.cost`) that picks between
collectives."""

from .cost import LinkModel, choose, estimate
from . import p2p
from .futures import CommThread, Pending, all_gather, all_reduce, all_to_all, comm_thread, then
from .ternary import (
    COLLECTIVES,
    Encoding,
    Launched,
    allgather_packed,
    int8_allreduce,
    ring_allreduce_bytes,
    two_phase,
)

__all__ = [
    "COLLECTIVES", "CommThread", "Encoding", "Launched", "LinkModel", "Pending", "all_gather", "all_reduce",
    "all_to_all", "allgather_packed", "comm_thread", "choose", "estimate", "int8_allreduce",
    "p2p", "ring_allreduce_bytes", "then", "two_phase",
]
