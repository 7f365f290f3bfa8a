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

Parameters under ``min_compress_numel`` elements are reduce-scattered exactly (fp32 or the
reduce dtype). If any rank's gradient holds NaN/Inf, the module's shard is NaN on every rank.
FSDP2's own accumulation (``set_requires_gradient_sync(False)``), reduce dtype
(``MixedPrecisionPolicy(reduce_dtype=...)``) and divide factors apply unchanged: the
compressed collective replaces only the reduce-scatter call.

**HSDP.** FSDP2's native HSDP (a 2-D mesh) all-reduces the shards over the replicate dimension
in its own ``dist.all_reduce`` before any hook runs (``set_all_reduce_hook`` sees the reduced
result), so that all-reduce cannot be compressed from outside in torch 2.13. Shard on the 1-D
shard mesh instead and pass ``replicate_group=mesh["replicate"].get_group()``: the state then
averages each shard over the replicate group in ``set_all_reduce_hook`` with a ternary
collective (``collective``: ``"two_phase"``, ``"int8"``, ``"allgather"``; ``"auto"`` asks the
performance model). A 2-D mesh is refused with that advice.

**Error feedback** is not offered: the residual is what *this rank* dropped encoding its
*unsharded* gradient, a tensor as large as each module's unsharded gradient kept on every rank
between steps, i.e. the full model's size per rank, which undoes FSDP's memory saving (it
cannot be kept per shard: the shard's owner never sees the other ranks' errors).

Example: ``fully_shard`` each block, then the root; ``state = commcomp.register(model,
"terngrad", clip_factor=2.5)``; ``state.compression_ratio()`` against FSDP2's fp32 bytes.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from commcomp import collectives, perfmodel
from commcomp.collectives.buffers import BufferPool
from commcomp.core import HookState, Option
from commcomp.utils import mix_seed, validate
from commcomp.utils.metrics import ring_allreduce_bytes

from .terngrad import COLLECTIVE_NAMES, _scales, fill_nan_where, row_scales

logger = logging.getLogger(__name__)

FP32_FSDP = "bytes_sent_fp32_fsdp"  # what FSDP2's fp32 reduce-scatter (and HSDP all-reduce) would send
PROBE_BYTES = "bytes_link_probe"

try:  # FSDP2's custom-collective interface (torch >= 2.8)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch
    FSDPModule = None
    _ReduceScatterBase = object


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
    )

    def __init__(self, process_group=None, replicate_group=None, clip_factor: Optional[float] = 2.5,
                 collective: str = "auto", error_feedback: bool = False, min_compress_numel: int = 1024,
                 seed: int = 0, link: Optional[perfmodel.LinkModel] = None):
        self._set_options(clip_factor=clip_factor, collective=collective, error_feedback=error_feedback,
                          min_compress_numel=min_compress_numel, seed=seed)
        super().__init__(process_group, byte_counters=(FP32_FSDP, PROBE_BYTES))
        self.replicate_group = replicate_group
        self.replicate_world = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.global_rank = dist.get_rank()
        self.link = link
        self.comms: List[TernGradReduceScatter] = []
        self.calls: List[int] = []  # reduce-scatters per module (key the random streams)
        self.buffers = BufferPool()
        self._replicate_choice: Dict[int, str] = {}

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
        self.comms = comms
        self.calls = [0] * len(comms)

    def _shared_extra(self) -> dict:
        return {"modules": [[c.fqn, c.numels] for c in self.comms], "replicate_world": self.replicate_world,
                "link": None if self.link is None else [self.link.bandwidth_bytes_per_s, self.link.latency_s]}

    def check_options(self, device) -> None:
        first = not self._options_checked
        super().check_options(device)
        if first and self.replicate_group is not None:  # the replicas too (a collective on that group)
            self.check_across_ranks(self.replicate_group, device, hook=self.name, world_size=self.world_size)
        if first and self.replicate_group is not None and self.collective == "auto" and self.link is None \
                and self.replicate_world > 1:
            self.link, sent = perfmodel.measure_link(self.replicate_group, device)
            self.metrics.add(sent, PROBE_BYTES)

    def install(self) -> None:
        """Set the compressed reduce-scatter (and under HSDP the replicate hook) on every module."""
        for comm in self.comms:
            comm.module.set_custom_reduce_scatter(comm)
            if self.replicate_group is not None:
                comm.module.set_all_reduce_hook(comm.all_reduce_hook)

    def close(self, timeout: float = 10.0) -> bool:
        done = super().close(timeout)
        self.buffers.clear()
        return done

    def replicate_collective(self, numel: int) -> str:
        if numel not in self._replicate_choice:
            name = self.collective
            if name == "auto":
                link = self.link if self.link is not None else perfmodel.LinkModel()
                name = perfmodel.choose(numel, self.replicate_world, link)
            self._replicate_choice[numel] = name
        return self._replicate_choice[numel]

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
        return {"calls": list(self.calls)}

    def _load_extra_state(self, extra: dict) -> None:
        calls = [int(c) for c in extra.get("calls", [])]
        if len(calls) != len(self.comms):
            raise ValueError(f"commcomp terngrad: the checkpoint counts {len(calls)} FSDP modules, this model has "
                             f"{len(self.comms)}; resume with the model the checkpoint was made with")
        self.calls = calls

    def load_state_dict(self, state: dict) -> None:
        calls = state.get("calls", [])
        if len(calls) != len(self.comms):  # refused before anything changes
            raise ValueError(f"commcomp terngrad: the checkpoint counts {len(calls)} FSDP modules, this model has "
                             f"{len(self.comms)}; resume with the model the checkpoint was made with")
        super().load_state_dict(state)


class TernGradReduceScatter(_ReduceScatterBase):
    """FSDP2's reduce-scatter of one module, as TernGrad 2-bit codes (see the module docs).
    Built by :class:`TernGradFSDPState`; FSDP2 calls it once per backward that syncs."""

    def __init__(self, state: TernGradFSDPState, index: int, fqn: str, module, module_group):
        self.state, self.index, self.fqn = state, index, fqn
        self.module, self.module_group = module, module_group
        params = module_group.fsdp_params
        self.row_lengths = [int(p.padded_sharded_param_size.numel()) for p in params]
        self.numels = [int(p._orig_size.numel()) for p in params]
        self._warned = False

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _layout(self, rows: int) -> Tuple[List[int], List[int]]:
        """Per-parameter row lengths and true sizes; one segment if the input holds only some
        parameters (those without a gradient this backward are left out by FSDP2)."""
        if sum(self.row_lengths) == rows:
            return self.row_lengths, self.numels
        if not self._warned:
            logger.info("commcomp terngrad: FSDP module %r reduce-scatters a subset of its parameters; "
                        "one scale for the module's whole gradient", self.fqn)
            self._warned = True
        return [rows], [rows * self.state.world_size]

    def _divide(self, op, world: int) -> float:
        if op == dist.ReduceOp.AVG:
            return float(world)
        if op == dist.ReduceOp.SUM:
            return 1.0
        factor = self.module_group.gradient_divide_factor  # a PREMUL_SUM(1 / factor)
        if factor is None:
            raise ValueError(f"commcomp terngrad: FSDP2 asked for a reduce op {op!r} this reduce-scatter does not know")
        return float(factor)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False):
        state = self.state
        state.require_registered()
        world = dist.get_world_size(group)
        rows = input_tensor.numel() // world
        row_lengths, numels = self._layout(rows)
        divide = self._divide(op, world)
        call = state.calls[self.index]
        x = input_tensor.reshape(-1)
        stats = row_scales(x, row_lengths, numels, world, state.clip_factor)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        metrics = state.metrics
        metrics.sent(ring_allreduce_bytes(4 * stats.numel(), world))
        metrics.add((world - 1) * rows * 4, FP32_FSDP)
        metrics.fp32_allreduce(x.numel(), world)
        raw = [k for k, n in enumerate(numels) if 0 < n < state.min_compress_numel]
        if len(raw) < len(numels):
            scratch = state.buffers.scope(("rs", self.index))
            enc = collectives.Encoding(stats[:-1].contiguous(), row_lengths, state.seed_for(self.index, call))
            launched = collectives.reduce_scatter_packed(x, enc, group, out=output_tensor, divide=divide,
                                                         scratch=scratch)
            metrics.sent(launched.bytes_sent)
            launched.future.wait()
        if raw:
            self._exact(x, output_tensor, row_lengths, raw, world, divide, group)
        fill_nan_where(output_tensor, stats[-1])
        state.calls[self.index] = call + 1
        state.step = max(state.step, call + 1)
        return None

    def _exact(self, x, out, row_lengths, ks, world, divide, group) -> None:
        """Reduce-scatter the small parameters' columns exactly (fp32 sums)."""
        bounds = [0]
        for n in row_lengths:
            bounds.append(bounds[-1] + n)
        rows = bounds[-1]
        grid = x.view(world, rows)
        cols = torch.cat([grid[:, bounds[k]:bounds[k + 1]] for k in ks], dim=1).float().contiguous()
        part = torch.empty(cols.shape[1], dtype=torch.float32, device=x.device)
        dist.reduce_scatter_tensor(part, cols.view(-1), op=dist.ReduceOp.SUM, group=group)
        self.state.metrics.sent((world - 1) * part.numel() * 4)
        if divide != 1:
            part.div_(divide)
        pos = 0
        for k in ks:
            n = row_lengths[k]
            out[bounds[k]:bounds[k + 1]] = part[pos:pos + n]
            pos += n

    def all_reduce_hook(self, shard: torch.Tensor) -> None:
        """HSDP: average this module's shard over the replicate group with a ternary collective,
        in place (FSDP2 calls it after the reduce-scatter, before its post-divide)."""
        state = self.state
        group, world = state.replicate_group, state.replicate_world
        if world == 1:
            return
        call = state.calls[self.index] - 1  # the reduce-scatter of this backward counted it
        rows = shard.numel()
        row_lengths, numels = self._layout(rows)
        bounds = [0]
        for n in row_lengths:
            bounds.append(bounds[-1] + n)
        stats = _scales(shard, row_lengths, state.clip_factor)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        metrics = state.metrics
        metrics.sent(ring_allreduce_bytes(4 * stats.numel(), world))
        metrics.add(ring_allreduce_bytes(4 * rows, world), FP32_FSDP)
        raw = [k for k, n in enumerate(numels) if 0 < n < state.min_compress_numel]
        raw_x = None
        if raw:  # read before the ternary decode writes over the shard
            raw_x = torch.cat([shard[bounds[k]:bounds[k + 1]] for k in raw]).float()
        if len(raw) < len(numels):
            name = state.replicate_collective(rows)
            enc = collectives.Encoding(stats[:-1].contiguous(), row_lengths, state.seed_for(self.index, call, 1))
            kwargs = {"seed2": state.seed_for(self.index, call, 2)} if name == "two_phase" else {}
            launched = collectives.pipelined(name, shard, enc, group, piece_numel=0, out=shard,
                                             scratch=state.buffers.scope(("ar", self.index)), **kwargs)
            metrics.sent(launched.bytes_sent)
            launched.future.wait()
        if raw_x is not None:
            dist.all_reduce(raw_x, group=group)
            metrics.sent(ring_allreduce_bytes(4 * raw_x.numel(), world))
            raw_x.div_(world)
            pos = 0
            for k in raw:
                n = row_lengths[k]
                shard[bounds[k]:bounds[k + 1]] = raw_x[pos:pos + n]
                pos += n
        fill_nan_where(shard, stats[-1])


__all__ = ["FP32_FSDP", "TernGradFSDPState", "TernGradReduceScatter", "fsdp_available", "is_fsdp_model"]
