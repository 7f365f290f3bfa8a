"""The collective :class:`TernGradFSDPState` sets on each FSDP2 module: TernGrad's compressed
reduce-scatter, and under HSDP the compressed replicate all-reduce (``set_all_reduce_hook``).
The algorithm, its options and its limits are described in :mod:`commcomp.hooks.terngrad_fsdp`."""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
import torch.distributed as dist

from commcomp import collectives
from commcomp.utils.metrics import ring_allreduce_bytes

from .terngrad import _scales, _scatter, blocks_of, fill_nan_where, row_scales

logger = logging.getLogger(__name__)

FP32_FSDP = "bytes_sent_fp32_fsdp"  # what FSDP2's fp32 reduce-scatter (and HSDP all-reduce) would send

try:  # FSDP2's custom-collective interface
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch
    FSDPModule = None
    _ReduceScatterBase = object


class TernGradReduceScatter(_ReduceScatterBase):
    """FSDP2's reduce-scatter of one module, as TernGrad 2-bit codes (see the module docs).
    Built by :class:`TernGradFSDPState`; FSDP2 calls it once per backward that syncs."""

    def __init__(self, state, index: int, fqn: str, module, module_group):
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
        stats, segs = row_scales(x, row_lengths, numels, world, state.clip_factor, state.scale_block)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        metrics = state.metrics
        metrics.sent(ring_allreduce_bytes(4 * stats.numel(), world))
        metrics.add((world - 1) * rows * 4, FP32_FSDP)
        metrics.fp32_allreduce(x.numel(), world)
        raw = [k for k, n in enumerate(numels) if 0 < n < state.min_compress_numel]
        if len(raw) < len(numels):
            # no buffers kept between calls: one per module would hold ~0.5 B per parameter of the
            # whole unsharded model on every rank; each call's come from the (caching) allocator
            enc = collectives.Encoding(stats[:-1].contiguous(), segs, state.seed_for(self.index, call))
            launched = collectives.reduce_scatter_packed(x, enc, group, out=output_tensor, divide=divide)
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
        _scatter(out, part, ks, bounds)

    def all_reduce_hook(self, shard: torch.Tensor) -> None:
        """HSDP: reduce this module's shard over the replicate group with a ternary collective,
        in place (FSDP2 calls it after the reduce-scatter, before its post-divide). The average
        over the replicas, as native HSDP's AVG; their sum where the user set a gradient divide
        factor (native HSDP then sums over the replicas and divides by the factor once).

        The scales are the shard's max |x| per parameter (or block), unclipped: the shard is
        already an average of ternary values, and clipping it again would bias it."""
        state = self.state
        state.require_registered()
        group, world = state.replicate_group, state.replicate_world
        if world == 1:
            return
        call = state.replicate_calls[self.index]  # its own count: FSDP2 skips a reduce-scatter over 1 rank
        state.replicate_calls[self.index] = call + 1
        state.step = max(state.step, call + 1)
        rows = shard.numel()
        row_lengths, numels = self._layout(rows)
        bounds = [0]
        for n in row_lengths:
            bounds.append(bounds[-1] + n)
        segs = blocks_of(row_lengths, state.scale_block)[0]
        stats = _scales(shard, segs, None)
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
            enc = collectives.Encoding(stats[:-1].contiguous(), segs, state.seed_for(self.index, call, 1))
            kwargs = {"seed2": state.seed_for(self.index, call, 2)} if name == "two_phase" else {}
            launched = collectives.pipelined(name, shard, enc, group, piece_numel=0, out=shard, **kwargs)
            metrics.sent(launched.bytes_sent)
            launched.future.wait()
            if self.module_group.gradient_divide_factor is not None:
                shard.mul_(world)  # the sum over the replicas
        if raw_x is not None:
            dist.all_reduce(raw_x, group=group)
            metrics.sent(ring_allreduce_bytes(4 * raw_x.numel(), world))
            if self.module_group.gradient_divide_factor is None:
                raw_x.div_(world)
            _scatter(shard, raw_x, raw, bounds)
        fill_nan_where(shard, stats[-1])


__all__ = ["FP32_FSDP", "TernGradReduceScatter"]
