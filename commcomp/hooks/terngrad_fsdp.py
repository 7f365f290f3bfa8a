"""TernGrad for FSDP2 (``fully_shard``): a compressed reduce-scatter, and under HSDP a
compressed replicate all-reduce.

``commcomp.register(fsdp_model, "terngrad", ...)`` sets a :class:`TernGradReduceScatter` on
every :class:`~torch.distributed.fsdp.FSDPModule` of the tree that owns parameters
(``set_custom_reduce_scatter``). FSDP2 hands it each module's reduce-scatter input: W rows,
row r the concatenation of every parameter's dim-0 chunk r (zero-padded), for rank r. Per call,
on every rank:

1. Layer-wise scales over the *unsharded* gradient: ``min(max |g|, c * sigma)`` per parameter
   (sigma over the parameter's true elements, from per-row sums), plus a non-finite flag; one
   small MAX all-reduce makes them identical on every rank (TernGrad's scalar sharing).
2. Stochastic ternarization of the whole input with the rank's own Philox stream (keyed by
   seed, global rank, the module and its call count), 2 bits per element.
3. One all-to-all: rank r receives every rank's codes of row r, sums them as integers (exact)
   and writes ``sum * s / divide`` into its shard: the average for FSDP2's AVG op, the sum for
   SUM (FSDP2 then divides, e.g. for fp16), ``sum / factor`` for ``set_gradient_divide_factor``.

Parameters under ``min_compress_numel`` elements are reduce-scattered exactly (in fp32). If
any rank's gradient holds NaN/Inf, the module's shard is NaN on every rank. FSDP2's own
accumulation (``set_requires_gradient_sync(False)``), reduce dtype
(``MixedPrecisionPolicy(reduce_dtype=...)``) and divide factors apply unchanged: the
compressed collective replaces only the reduce-scatter call.

**HSDP.** FSDP2's native HSDP (a 2-D mesh) all-reduces the shards over the replicate dimension
in its own ``dist.all_reduce`` before any hook runs (``set_all_reduce_hook`` sees the reduced
result), so that all-reduce cannot be compressed from outside in torch 2.13. Shard on the 1-D
shard mesh instead and pass ``replicate_group=mesh["replicate"].get_group()``: the state then
averages each shard over the replicate group in ``set_all_reduce_hook`` with a ternary
collective (``collective``: ``"two_phase"``, ``"int8"``, ``"allgather"``; ``"auto"`` asks the
performance model); with a gradient divide factor it sums over the replicas, as native HSDP
does. A 2-D mesh is refused with that advice.

**Error feedback** is not offered: the residual is what *this rank* dropped encoding its
*unsharded* gradient, a tensor as large as each module's unsharded gradient kept on every rank
between steps, i.e. the full model's size per rank, which undoes FSDP's memory saving (it
cannot be kept per shard: the shard's owner never sees the other ranks' errors).

Example: ``fully_shard`` each block, then the root; ``state = commcomp.register(model,
"terngrad", clip_factor=2.5)``; ``state.compression_ratio()`` against FSDP2's fp32 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from commcomp import perfmodel
from commcomp.core import HookState, Option
from commcomp.utils import mix_seed, validate

from .terngrad import COLLECTIVE_NAMES
from .terngrad_fsdp_collective import FP32_FSDP, FSDPModule, TernGradReduceScatter

logger = logging.getLogger(__name__)

PROBE_BYTES = "bytes_link_probe"


def fsdp_available() -> bool:
    """Whether this torch has FSDP2 with ``set_custom_reduce_scatter``."""
    return FSDPModule is not None and hasattr(FSDPModule, "set_custom_reduce_scatter")


def is_fsdp_model(model) -> bool:
    return FSDPModule is not None and isinstance(model, FSDPModule)


def _no_error_feedback(value, name):
    value = validate.boolean(value, name)
    if value:
        raise ValueError(
            "commcomp terngrad under FSDP: error_feedback=True is not offered. The residual is what each rank "
            "dropped encoding its unsharded gradient: one tensor the size of every module's unsharded gradient, "
            "kept on every rank (the whole model per rank), which undoes FSDP's memory saving, and it cannot be "
            "kept per shard. Use error_feedback=False (the default), or DDP if the model fits")
    return value


def _param_groups(module) -> list:
    """The FSDP parameter groups a module owns (torch < 2.10 kept at most one, under another name)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        one = getattr(state, "_fsdp_param_group", None)
        groups = [] if one is None else [one]
    return list(groups)


class TernGradFSDPState(HookState):
    """Options, counters and checkpoints of TernGrad under FSDP2 (:func:`commcomp.register`
    on a ``fully_shard`` model builds it).

    Args:
        process_group: the shard group (set by registration: the FSDP mesh's group).
        replicate_group: HSDP's replicate group (1-D ``fully_shard`` on the shard mesh plus this
            group); None: plain FSDP.
        clip_factor: clip each parameter to ``clip_factor * sigma`` before ternarizing (paper:
            2.5); ``None``: no clipping (the scale is max |g|).
        collective: the ternary collective of the HSDP replicate all-reduce (``"auto"``,
            ``"int8"``, ``"allgather"``, ``"two_phase"``); the reduce-scatter is always the
            all-to-all of 2-bit codes.
        error_feedback: must be False under FSDP (see the module's docs).
        min_compress_numel: parameters with fewer elements are reduced exactly.
        seed: base of every rank's random stream; must be the same on all ranks.
        scale_block: 0 (default): one scale per parameter, as in the paper. ``B > 0``: one scale
            per block of B elements of each parameter's row (max |g| over the block, still
            clipped at ``c * sigma`` of the whole parameter), as QSGD's buckets and CGX's
            ``bucket_size``: lower variance, for a ring all-reduce of W * R / B scales (about
            8 / B bytes per unsharded element per rank). Under HSDP the replicate collective
            uses the same blocks.
        link: a :class:`commcomp.perfmodel.LinkModel` for ``collective="auto"`` under HSDP
            (None: measured on the replicate group at registration).
    """

    name = "terngrad_fsdp"
    OPTIONS = (
        Option("clip_factor", partial(validate.positive, allow_none=True)),
        Option("collective", partial(validate.choice, allowed=COLLECTIVE_NAMES)),
        Option("error_feedback", _no_error_feedback),
        Option("min_compress_numel", partial(validate.integer, low=0)),
        Option("seed", validate.seed),
        Option("scale_block", partial(validate.integer, low=0)),
    )

    def __init__(self, process_group=None, replicate_group=None, clip_factor: Optional[float] = 2.5,
                 collective: str = "auto", error_feedback: bool = False, min_compress_numel: int = 1024,
                 seed: int = 0, scale_block: int = 0, link: Optional[perfmodel.LinkModel] = None):
        self._set_options(clip_factor=clip_factor, collective=collective, error_feedback=error_feedback,
                          min_compress_numel=min_compress_numel, seed=seed, scale_block=scale_block)
        super().__init__(process_group, byte_counters=(FP32_FSDP, PROBE_BYTES))
        self.replicate_group = replicate_group
        self.replicate_world = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.global_rank = dist.get_rank()
        self.link = link
        self.comms: List[TernGradReduceScatter] = []
        self.calls: List[int] = []  # reduce-scatters per module (key the random streams)
        self.replicate_calls: List[int] = []  # HSDP replicate all-reduces per module (their own streams)
        # "auto" under HSDP asks the performance model with this host's calibration, read once
        # here and checked across the replicas (different files could pick different collectives)
        self._calibration = (perfmodel.load_calibration()
                             if collective == "auto" and replicate_group is not None else None)
        self.choices: Dict[int, str] = {}  # shard numel -> the replicate collective (saved)

    # -- registration
    @staticmethod
    def process_group_of(model):
        """The shard group of the model's first FSDP module that owns parameters."""
        for module in model.modules():
            if is_fsdp_model(module):
                groups = _param_groups(module)
                if groups:
                    return groups[0].mesh_info.shard_process_group
        raise ValueError("commcomp terngrad: the model has no FSDP module that owns parameters; "
                         "call fully_shard on it (and its blocks) first")

    def attach(self, model) -> None:
        """Find every FSDP module that owns parameters and check it can take the compressed
        reduce-scatter (one parameter group, a 1-D mesh, the same shard group as the root)."""
        super().attach(model)
        comms = []
        for fqn, module in model.named_modules():
            if not is_fsdp_model(module):
                continue
            groups = _param_groups(module)
            if not groups:
                continue
            if len(groups) > 1:
                raise ValueError(f"commcomp terngrad: FSDP module {fqn or '<root>'!r} has {len(groups)} parameter "
                                 "groups (per-parameter meshes); FSDP2's set_custom_reduce_scatter takes one. Shard "
                                 "it without shard_placement_fn meshes")
            group = groups[0]
            if group._is_hsdp:
                raise ValueError(
                    f"commcomp terngrad: FSDP module {fqn or '<root>'!r} is sharded on a 2-D mesh (native HSDP), whose "
                    "replicate all-reduce FSDP2 runs in full precision before any hook: it cannot be compressed. "
                    "Shard on the 1-D shard mesh, fully_shard(m, mesh=mesh['shard']), and pass "
                    "commcomp.register(model, 'terngrad', replicate_group=mesh['replicate'].get_group())")
            shard = group.mesh_info.shard_process_group
            if dist.get_process_group_ranks(shard) != dist.get_process_group_ranks(self.process_group):
                raise ValueError(f"commcomp terngrad: FSDP module {fqn or '<root>'!r} shards over ranks "
                                 f"{dist.get_process_group_ranks(shard)}, the root over "
                                 f"{dist.get_process_group_ranks(self.process_group)}; shard every module on one mesh")
            if isinstance(group._reduce_scatter_comm, TernGradReduceScatter):
                raise ValueError(f"commcomp terngrad: FSDP module {fqn or '<root>'!r} already has commcomp's "
                                 "reduce-scatter (registered twice); keep the first state")
            comms.append(TernGradReduceScatter(self, len(comms), fqn, module, group))
        if not comms:
            raise ValueError("commcomp terngrad: the model has no FSDP module that owns parameters; "
                             "call fully_shard on it (and its blocks) first")
        if self.replicate_group is not None:
            mine = set(dist.get_process_group_ranks(self.replicate_group))
            shard = set(dist.get_process_group_ranks(self.process_group))
            if mine & shard != {dist.get_rank()}:
                raise ValueError(
                    f"commcomp terngrad: replicate_group {sorted(mine)} and the shard group {sorted(shard)} share ranks "
                    f"{sorted(mine & shard)}; they must meet in this rank only (the two dimensions of one mesh: "
                    "mesh['replicate'].get_group() with fully_shard(..., mesh=mesh['shard']))")
        self.comms = comms
        self.calls = [0] * len(comms)
        self.replicate_calls = [0] * len(comms)

    @staticmethod
    def device_of(model) -> torch.device:
        """Where the FSDP group's collectives run (not the parameters' device: CPU offload)."""
        for module in model.modules():
            if is_fsdp_model(module):
                groups = _param_groups(module)
                if groups:
                    return groups[0].device
        return torch.device("cpu")

    def _shared_extra(self) -> dict:
        extra = {"modules": [[c.fqn, c.numels] for c in self.comms], "replicate_world": self.replicate_world,
                 "link": None if self.link is None else [self.link.bandwidth_bytes_per_s, self.link.latency_s]}
        if self._calibration is not None:
            extra["auto_collective_calibration"] = [self._calibration.get(k) for k in (
                "seconds_per_pass_element", "fixed_s", "ranks_per_host", "cores")]
        return extra

    def check_replicas(self, device) -> None:
        """HSDP, after :meth:`check_options` (the shard group's check), on every rank: the
        options agree across the replicate group too, every member of it holds the same shard
        position (else different chunks would be averaged), and ``"auto"`` measures its link."""
        if self.replicate_group is None:
            return
        self.check_across_ranks(self.replicate_group, device, hook=self.name, world_size=self.world_size)
        position = torch.tensor([dist.get_rank(self.process_group)], dtype=torch.int64, device=device)
        every = [torch.zeros_like(position) for _ in range(self.replicate_world)]
        dist.all_gather(every, position, group=self.replicate_group)
        positions = [int(t.item()) for t in every]
        if len(set(positions)) != 1:
            raise ValueError(
                f"commcomp terngrad: the replicate group's members hold shard positions {positions} of their shard "
                "groups; they must all hold the same one (the replicate dimension of one mesh: "
                "mesh['replicate'].get_group() with fully_shard(..., mesh=mesh['shard'])), else different chunks "
                "would be averaged")
        if self.collective == "auto" and self.link is None and self.replicate_world > 1:
            self.link, sent = perfmodel.measure_link(self.replicate_group, device)
            self.metrics.add(sent, PROBE_BYTES)

    def install(self) -> None:
        """Set the compressed reduce-scatter (and under HSDP the replicate hook) on every module."""
        for comm in self.comms:
            comm.previous = (comm.module_group._reduce_scatter_comm, getattr(comm.module_group, "_all_reduce_hook", None))
            comm.module.set_custom_reduce_scatter(comm)
            if self.replicate_group is not None:
                comm.module.set_all_reduce_hook(comm.all_reduce_hook)

    def close(self, timeout: float = 10.0) -> bool:
        """Give every module the reduce-scatter and all-reduce hook it had before (FSDP2's own,
        unless the user had set others): the model trains on uncompressed, and may be registered
        again. Every rank must close, between steps (a backward in flight would raise)."""
        done = super().close(timeout)
        for comm in self.comms:
            previous_comm, previous_hook = getattr(comm, "previous", (None, None))
            if comm.module_group._reduce_scatter_comm is comm and previous_comm is not None:
                comm.module_group._reduce_scatter_comm = previous_comm  # as set_custom_reduce_scatter does
            if getattr(comm.module_group, "_all_reduce_hook", None) == comm.all_reduce_hook:
                comm.module_group._all_reduce_hook = previous_hook  # FSDP2 has no public way to unset it
        return done

    def replicate_collective(self, numel: int) -> str:
        """The HSDP replicate collective for a shard of ``numel`` elements: the option, or under
        ``"auto"`` the performance model's choice (kept for the run, saved in checkpoints)."""
        if numel not in self.choices:
            name = self.collective
            if name == "auto":
                link = self.link if self.link is not None else perfmodel.LinkModel()
                name = perfmodel.choose(numel, self.replicate_world, link, calibration=self._calibration)
            self.choices[numel] = name
        return self.choices[numel]

    # -- metrics
    def compression_ratio(self) -> float:
        """FSDP2's fp32 bytes for the same reductions over the bytes sent."""
        sent = self.metrics["bytes_sent"]
        return self.metrics[FP32_FSDP] / sent if sent else float("nan")

    def seed_for(self, module_index: int, call: int, purpose: int = 0) -> int:
        """The random stream of one reduce-scatter (purpose 0) or replicate all-reduce (1)."""
        return mix_seed(self.seed, self.global_rank, call, module_index, purpose)

    # -- checkpoints (also a DCP ``Stateful``: dcp.save({"commcomp": state, ...}))
    def _extra_state(self) -> dict:
        # The HSDP link and choices vary in shape: one JSON string, a single leaf for DCP (which
        # loads only the keys the destination state dict already has)
        hsdp = {"link": None if self.link is None else dataclasses.asdict(self.link),
                "choices": [[numel, name] for numel, name in sorted(self.choices.items())]}
        return {"calls": list(self.calls), "replicate_calls": list(self.replicate_calls), "hsdp": json.dumps(hsdp)}

    def _load_extra_state(self, extra: dict) -> None:
        self.calls = [int(c) for c in extra["calls"]]
        self.replicate_calls = [int(c) for c in extra.get("replicate_calls", self.calls)]
        hsdp = json.loads(extra.get("hsdp", "{}"))
        if hsdp.get("link") is not None:  # the run goes on with the link and choices it had
            self.link = perfmodel.LinkModel(**hsdp["link"])
        self.choices = {int(n): str(c) for n, c in hsdp.get("choices", [])}

    def load_state_dict(self, state: dict) -> None:
        calls = state.get("calls", [])
        if len(calls) != len(self.comms):  # refused before anything changes
            raise ValueError(f"commcomp terngrad: the checkpoint counts {len(calls)} FSDP modules, this model has "
                             f"{len(self.comms)}; resume with the model the checkpoint was made with")
        super().load_state_dict(state)


__all__ = ["FP32_FSDP", "TernGradFSDPState", "TernGradReduceScatter", "fsdp_available", "is_fsdp_model"]
