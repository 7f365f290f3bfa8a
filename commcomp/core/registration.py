"""Registration: a process group of the hooks' own per DDP group, and the one place where a
state is attached to a model, its options checked across ranks and its hook installed."""

from __future__ import annotations

import datetime
import threading
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .state import HookState

_GROUPS: Dict[int, Tuple[object, object]] = {}  # id(DDP's group) -> (that group, the hooks' group)
_GROUPS_LOCK = threading.Lock()


def _timeout_of(group) -> Optional[datetime.timedelta]:
    """The timeout ``group`` was created with (None: torch's default), so the hooks' group
    fails as fast as the user's would."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - no such backend on this group, or an older torch
            continue
    return None


def hook_group(group=None):
    """The process group commcomp's hooks use for the DDP group ``group`` (default: the world):
    the same ranks in the same order and the same timeout, created once (at the first
    registration on ``group``; every member rank registers, so every member creates it) and
    reused by every hook on it.

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
    if ranks != sorted(ranks):  # the same answer on every member: all of them raise
        raise ValueError(f"commcomp: the DDP group numbers its ranks {ranks}, not in increasing order; the "
                         "hooks' group would number them differently. Create it with dist.new_group(sorted(ranks))")
    whole = len(ranks) == dist.get_world_size()
    backend = dist.get_backend(base)
    default = dist.distributed_c10d._get_default_group()
    if not whole and "nccl" in str(backend) and getattr(default, "bound_device_id", None) is not None:
        # A bound device makes torch split NCCL communicators, which needs every rank of the
        # world; the non-members never call in (pytorch/pytorch#129965): members would hang.
        raise ValueError("commcomp: DDP on an NCCL subgroup with init_process_group(device_id=...) is not "
                         "supported (the hooks' group would need every rank to join); init without device_id, "
                         "or train DDP on the whole world")
    mine = dist.new_group(ranks=ranks, timeout=_timeout_of(base), backend=backend,
                          use_local_synchronization=not whole)
    with _GROUPS_LOCK:
        _GROUPS[id(base)] = (base, mine)
    return mine


def _agree(ok: bool, group, device) -> list:
    """All ranks learn which ranks failed (one small all-gather): a failure on one rank must
    raise on every rank, not leave the others waiting in the next collective."""
    flags = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, torch.tensor([0 if ok else 1], dtype=torch.int32, device=device), group=group)
    return [r for r, f in enumerate(flags) if int(f.item())]


def _agree_grid(ok: bool, groups, device) -> bool:
    """True on every rank if any rank of the grid spanned by ``groups`` failed: one
    :func:`_agree` round per group, each carrying what the previous rounds learned."""
    for group in groups:
        ok = not _agree(ok, group, device) and ok
    return not ok


def _build(state_cls, group, model, options):
    """``state_cls(process_group=group, **options)`` attached to ``model``, or the error that
    stopped it (raised by the caller once every rank knows; a state built but refused by
    ``attach`` is closed: threads it started must not outlive it)."""
    state = None
    try:
        state = state_cls(process_group=group, **options)
        state.attach(model)
        return state, None
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller, after every rank knows
        if state is not None:
            state.close(timeout=5.0)
        return None, exc


def register(model, state_cls, hook: Callable, **options) -> HookState:
    """Create ``state_cls(**options)`` on the hooks' own group for the model's DDP group,
    attach it to ``model`` (which may refuse the model's DDP mode), check its options across
    ranks, and install ``hook``. A failure on any rank raises on every rank and leaves the
    model without the hook and no state running."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"commcomp.register needs a DistributedDataParallel model or an FSDP2 (fully_shard) model, "
                        f"got {type(model).__name__}")
    group = hook_group(options.pop("process_group", None) or model.process_group)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    state, error = _build(state_cls, group, model, options)
    failed = _agree(error is None, group, device)
    try:
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"commcomp: registering the {getattr(state_cls, 'name', state_cls.__name__)!r} hook "
                               f"failed on rank(s) {failed} of its group (their error says why); no rank "
                               "registered it")
        state.check_options(device)
        model.register_comm_hook(state, hook)
    except BaseException:
        if state is not None:
            state.close(timeout=5.0)  # threads the state started (e.g. a coordinator's) must not outlive it
        raise
    state.registered = True
    return state


def register_fsdp(model, state_cls, **options) -> HookState:
    """FSDP2's counterpart of :func:`register`: ``state_cls(process_group=<the model's shard
    group, from state_cls.process_group_of(model)>, **options)`` finds the model's FSDP
    modules (``attach``), every rank agrees, the options are checked across ranks, then
    ``state.install()`` sets the custom collectives. A failure on any rank raises on every
    rank (of the shard group; under HSDP, ``replicate_group=...``, of the grid of shard and
    replicate groups) and leaves every module with the collectives it had."""
    shard = state_cls.process_group_of(model)  # raises if the model has no sharded parameters
    if "process_group" in options:
        raise TypeError("commcomp: under FSDP the process group is the FSDP mesh's shard group; do not pass "
                        "process_group (HSDP: pass replicate_group)")
    device = state_cls.device_of(model)
    state, error = _build(state_cls, shard, model, options)
    # Under HSDP the ranks form a grid of shard and replicate groups: each agreement takes one
    # round over the shard group and one over the replicate group, which reaches every rank of
    # the grid, so a failure anywhere raises everywhere and no rank waits in a collective the
    # others skipped. (Not over the whole world: it may hold other meshes, e.g. pipeline stages.)
    groups = [shard] + ([options["replicate_group"]] if options.get("replicate_group") is not None else [])
    failed = _agree_grid(error is None, groups, device)
    for check in ("check_options", "check_replicas"):
        if error is not None or failed:
            break
        try:
            getattr(state, check, lambda device: None)(device)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
            error = exc
        failed = _agree_grid(error is None, groups, device)
    if error is not None:
        if state is not None:
            state.close(timeout=5.0)
        raise error
    if failed:
        if state is not None:
            state.close(timeout=5.0)
        raise RuntimeError(f"commcomp: registering the {getattr(state_cls, 'name', state_cls.__name__)!r} hook on the "
                           "FSDP model failed on another rank (its error says why); no rank registered it")
    state.install()
    state.registered = True
    return state


__all__ = ["hook_group", "register", "register_fsdp"]
