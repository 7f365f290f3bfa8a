"""What every hook state shares: the group, the step counter, byte metrics, checkpoints,
and a first-step check that all ranks run with the same options."""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List

import torch
import torch.distributed as dist

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer over each part): streams for
    different (seed, rank, step, purpose) are independent, and runs reproduce."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h = (z ^ (z >> 31)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    return h & _MASK63


def bucket_lengths(bucket: dist.GradBucket) -> List[int]:
    """Per-parameter segment lengths of a DDP bucket's flat buffer (one segment if the
    layout cannot be read off the bucket)."""
    lengths = [g.numel() for g in bucket.gradients()]
    if sum(lengths) != bucket.buffer().numel():
        return [bucket.buffer().numel()]
    return lengths


def write_flat_grads_(params, flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` into each ``p.grad`` (the inverse of concatenating
    the flattened gradients in the same order): the step functions' unflatten."""
    pos = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[pos:pos + n].view_as(p.grad))
        pos += n


def _fingerprint(value) -> int:
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def check_same_options(options: dict, world: int, group, device) -> None:
    """All-gathers a fingerprint of each option; raises on every rank, naming the options
    that differ, if any rank's differ from rank 0's."""
    keys = sorted(options)
    mine = torch.tensor([_fingerprint(keys)] + [_fingerprint(options[k]) for k in keys],
                        dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()  # once, at the first step
    odd = [r for r in range(world) if not torch.equal(table[r], table[0])]
    if odd:
        differ = [k for i, k in enumerate(keys) if bool((table[:, i + 1] != table[0, i + 1]).any())]
        raise RuntimeError(
            f"commcomp: ranks disagree on the hook's options {differ or '(option names)'}: "
            f"rank(s) {odd} differ from rank 0; this rank (rank {dist.get_rank(group)}) has "
            f"{ {k: options[k] for k in differ} or options}. Every rank must register the hook "
            "with the same options and seeds, or their payloads cannot be combined."
        )


class HookStateBase:
    """Base of every hook state: group, rank, world size, step, metrics, checkpointing.

    ``metrics["bytes_sent"]`` counts what this rank sent (payloads and side channels);
    ``metrics["bytes_sent_fp32_allreduce"]`` what a ring fp32 all-reduce of the same buckets
    would have sent. ``state_dict()`` leaves the process group out.
    """

    name = "base"
    # Options that are each rank's own (saved in checkpoints, left out of the cross-rank check).
    per_rank_options: tuple = ()

    def __init__(self, process_group=None):
        if not dist.is_initialized():
            raise RuntimeError("commcomp: initialize torch.distributed before creating a hook state")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.step = 0
        self.metrics: Dict[str, int] = {"bytes_sent": 0, "bytes_sent_fp32_allreduce": 0}
        self._checked = False
        self._param_names: Dict[torch.Tensor, str] = {}

    def attach(self, model) -> None:
        """Learn the model's parameter names, so per-parameter buffers survive DDP's bucket
        rebuilds and can be checkpointed by name (``commcomp.register`` calls this)."""
        self._param_names = {p: name for name, p in model.named_parameters()}

    def param_key(self, param: torch.Tensor):
        return self._param_names.get(param, param)

    # -- subclass interface
    def options(self) -> dict:
        return {}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # -- shared behaviour
    def check_first_step(self, device) -> None:
        """Once: all ranks must run this hook with the same options (one small all-gather)."""
        if not self._checked:
            opts = {k: v for k, v in self.options().items() if k not in self.per_rank_options}
            opts = dict(opts, hook=self.name, world_size=self.world_size)
            check_same_options(opts, self.world_size, self.process_group, device)
            self._checked = True

    def add_bytes(self, n: int) -> None:
        self.metrics["bytes_sent"] += int(n)

    def add_fp32_bytes(self, n: int) -> None:
        self.metrics["bytes_sent_fp32_allreduce"] += int(n)

    def compression_ratio(self) -> float:
        sent = self.metrics["bytes_sent"]
        return self.metrics["bytes_sent_fp32_allreduce"] / sent if sent else float("nan")

    def state_dict(self) -> dict:
        return {"hook": self.name, "options": self.options(), "step": self.step,
                "metrics": dict(self.metrics), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("hook") != self.name:
            raise ValueError(f"commcomp: checkpoint is for hook {state.get('hook')!r}, not {self.name!r}")
        saved, mine = state.get("options", {}), self.options()
        diff = {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)}
        if diff:
            raise ValueError(
                f"commcomp: checkpoint options differ from this state's (saved, current): {diff}; "
                "create the state with the saved options to resume"
            )
        self.step = int(state["step"])
        self.metrics = {k: int(v) for k, v in state["metrics"].items()}
        self._load_extra_state(state)
