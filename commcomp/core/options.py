"""Options declared once: each hook state (and :class:`~commcomp.decentralized.GradientTracking`)
lists its options as :class:`Option` entries; validation, ``options()`` (what checkpoints
save), the cross-rank fingerprint and the checkpoint diff all come from that list."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Option:
    """One option of a state.

    Args:
        name: the constructor argument, and the attribute that holds the checked value.
        check: ``check(value, name) -> value``: normalizes or raises an error that says what
            was given and what is allowed (:mod:`commcomp.utils.validate`). None: taken as is.
        record: ``record(value) -> JSON-able``: how ``options()`` writes it (default: as is).
        per_rank: each rank's own (e.g. its data size): saved, but left out of the cross-rank check.
        attr: record another attribute under this name (e.g. ``"compressor_options"`` from
            ``compressor``); such an entry is derived, not set by :meth:`Configurable._set_options`.
        resume_checked: a checkpoint made with another value is refused (default). False for
            options that change how fast, not what is computed in law (e.g. a pipeline's piece
            size): saved, checked across ranks, but free to differ on resume, and absent from
            checkpoints made before the option existed.
    """

    name: str
    check: Optional[Callable[[Any, str], Any]] = None
    record: Optional[Callable[[Any], Any]] = None
    per_rank: bool = False
    attr: Optional[str] = None
    resume_checked: bool = True


def fingerprint(value) -> int:
    """A 56-bit digest of a JSON-able value (sorted keys; other objects by ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def check_same_options(options: dict, group, device) -> None:
    """All-gathers a fingerprint of each option; raises on every rank, naming the options
    that differ, if any rank's differ from rank 0's (one small all-gather)."""
    world = dist.get_world_size(group)
    keys = sorted(options)
    mine = torch.tensor([fingerprint(keys)] + [fingerprint(options[k]) for k in keys],
                        dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()
    odd = [r for r in range(world) if not torch.equal(table[r], table[0])]
    if odd:
        differ = [k for i, k in enumerate(keys) if bool((table[:, i + 1] != table[0, i + 1]).any())]
        raise RuntimeError(
            f"commcomp: ranks disagree on the options {differ or '(option names)'}: rank(s) {odd} "
            f"differ from rank 0; this rank (rank {dist.get_rank(group)}) has "
            f"{ {k: options[k] for k in differ} or options}. Every rank must use the same options "
            "and seeds, or their payloads cannot be combined.")


class Configurable:
    """The options half of the contract.

    A subclass lists ``OPTIONS`` and calls :meth:`_set_options` in ``__init__`` (every value is
    checked before any is assigned, so bad input leaves nothing half-built). Cross-field rules
    stay in ``__init__``. ``what`` names the object in errors.
    """

    OPTIONS: Tuple[Option, ...] = ()
    what = "state"

    def _set_options(self, **values) -> None:
        declared = {o.name: o for o in self.OPTIONS if o.attr is None}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise TypeError(f"commcomp: {self.what} has no option(s) {unknown}; options: {sorted(declared)}")
        checked = {k: (declared[k].check(v, k) if declared[k].check else v) for k, v in values.items()}
        for k, v in checked.items():
            setattr(self, k, v)

    def options(self) -> Dict[str, Any]:
        """Every declared option as checkpoints save it (JSON-able)."""
        return {o.name: (o.record or _same)(getattr(self, o.attr or o.name)) for o in self.OPTIONS}

    def shared_options(self) -> Dict[str, Any]:
        """The options every rank must agree on (all but the per-rank ones), plus what
        :meth:`_shared_extra` adds."""
        per_rank = {o.name for o in self.OPTIONS if o.per_rank}
        opts = {k: v for k, v in self.options().items() if k not in per_rank}
        opts.update(self._shared_extra())
        return opts

    def check_across_ranks(self, group, device, **extra) -> None:
        """All ranks of ``group`` must hold the same :meth:`shared_options` (plus ``extra``):
        one small all-gather, so every rank calls it at the same point; raises on every rank,
        naming the options that differ."""
        check_same_options(dict(self.shared_options(), **extra), group, device)

    def _shared_extra(self) -> Dict[str, Any]:
        """Further values every rank must agree on (e.g. a calibration file's digest)."""
        return {}

    def _check_saved_options(self, saved: dict) -> None:
        """Refuse a checkpoint made with other options (nothing changes before this passes)."""
        free = {o.name for o in self.OPTIONS if not o.resume_checked}
        mine = {k: v for k, v in self.options().items() if k not in free}
        saved = {k: v for k, v in saved.items() if k not in free}
        diff = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
        if diff:
            raise ValueError(f"commcomp: checkpoint options differ from this {self.what}'s (saved, current): "
                             f"{diff}; create it with the saved options to resume")


def _same(v):
    return v


__all__ = ["Configurable", "Option", "check_same_options", "fingerprint"]
