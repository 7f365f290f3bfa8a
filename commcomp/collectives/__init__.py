"""How payloads cross ranks, written once and reused by every hook: deferred collectives and
the ordered executors that run each hook group's exchanges (:mod:`.executor`), ternary
collectives (:mod:`.ternary`), and point-to-point messages that work on every backend
(:mod:`.p2p`). Which ternary collective a bucket uses is the performance model's choice
(:func:`commcomp.perfmodel.choose`)."""

from . import p2p
from .executor import (
    Deferred,
    ExecutorClosed,
    OrderedExecutor,
    all_gather,
    all_reduce,
    all_to_all,
    new_future,
    release_executor,
    shared_executor,
)
from .buffers import BufferPool
from .ternary import (COLLECTIVES, INT8_MAX_WORLD, Encoding, Launched, allgather_packed, int8_allreduce, pipelined,
                      reduce_scatter_packed, two_phase)

__all__ = [
    "BufferPool", "COLLECTIVES", "Deferred", "Encoding", "ExecutorClosed", "INT8_MAX_WORLD", "Launched", "OrderedExecutor",
    "all_gather", "all_reduce", "all_to_all", "allgather_packed", "int8_allreduce", "new_future", "p2p", "pipelined",
    "reduce_scatter_packed", "release_executor", "shared_executor", "two_phase",
]
