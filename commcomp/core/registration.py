"""Registration: a process group of the hooks' own per DDP group, and the one place where a
state is attached to a model, its options checked across ranks and its hook installed."""

from __future__ import annotations

import threading
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist

from .state import HookState

_GROUPS: Dict[int, Tuple[object, object]] = {}  # id(DDP's group) -> (that group, the hooks' group)
_GROUPS_LOCK = threading.Lock()


def hook_group(group=None):
    """The process group commcomp's hooks use for the DDP group ``group`` (default: the world):
    the same ranks in the same order, created once (at the first registration on ``group``;
    every member rank registers, so every member creates it) and reused by every hook on it.

    DDP issues its own collectives on ``group`` from the autograd thread (the unused-parameter
    map of ``find_unused_parameters``, buffer broadcasts, bucket rebuilds) while the hooks'
    exchanges run on an executor thread; on one group the two streams of collectives would
    interleave in a different order on each rank. On a group of their own they cannot.
    """
    base = group if group is not None else dist.group.WORLD
    with _GROUPS_LOCK:
        cached = _GROUPS.get(id(base))
        if cached is not None and cached[0] is base:
            return cached[1]
        ranks = dist.get_process_group_ranks(base)
        mine = dist.new_group(ranks=ranks, backend=dist.get_backend(base), use_local_synchronization=True)
        if dist.get_rank(mine) != dist.get_rank(base):
            raise RuntimeError("commcomp: the hooks' process group numbers ranks differently from the DDP group "
                               f"(ranks {ranks}); create the DDP group with dist.new_group(ranks=sorted(ranks))")
        _GROUPS[id(base)] = (base, mine)
        return mine


def register(model, state_cls, hook: Callable, **options) -> HookState:
    """Create ``state_cls(**options)`` on the hooks' own group for the model's DDP group,
    attach it to ``model`` (which may refuse the model's DDP mode), check its options across
    ranks, and install ``hook``. Any failure leaves the model without the hook; a mismatch of
    options raises on every rank."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"commcomp.register needs a DistributedDataParallel model, got {type(model).__name__}")
    base = options.pop("process_group", None) or model.process_group
    state = state_cls(process_group=hook_group(base), **options)
    try:
        state.attach(model)
        param = next(iter(model.parameters()), None)
        state.check_options(param.device if param is not None else torch.device("cpu"))
    except BaseException:
        state.close(timeout=5.0)  # threads the state started (e.g. a coordinator's) must not outlive it
        raise
    state.registered = True
    model.register_comm_hook(state, hook)
    return state


__all__ = ["hook_group", "register"]
