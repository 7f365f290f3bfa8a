"""TernGrad as a DDP communication hook (Wen et al., NeurIPS 2017, "TernGrad: Ternary
Gradients to Reduce Communication in Distributed Deep Learning").

Per bucket, on every rank:

1. Layer-wise scaling: each parameter's gradient (a segment of the bucket) gets its own
   scalar. With ``clip_factor = c``, a layer is first clipped to ``c * sigma`` (sigma = that
   layer's standard deviation), so the scalar is ``min(max |g|, c * sigma)``.
2. Scalar sharing: one small MAX all-reduce gives every rank the same scalars (plus a flag
   for non-finite gradients), so ternary codes can be summed as integers.
3. Stochastic ternarization, unbiased: ``s * sign(g)`` with probability ``|g| / s``, else 0,
   from a Philox stream keyed by (seed, rank, step): independent across ranks and steps,
   reproducible across runs.
4. A ternary collective (:mod:`commcomp.collectives`) averages the payloads: ``"int8"``
   all-reduce, ``"allgather"`` of 2-bit payloads, ``"two_phase"``, or ``"auto"`` (cost model,
   per bucket size and world size; the choice is logged once per bucket).

Layers smaller than ``min_compress_numel`` travel uncompressed in a fp32 all-reduce. With
``error_feedback``, what ternarization dropped (``g - decode(payload)``) is added to the next
step's gradient. If any rank's gradient holds NaN/Inf, the bucket's result is NaN on every
rank, as with a plain all-reduce, so AMP's GradScaler skips the step; nothing is hidden.

Example::

    >>> state = commcomp.register(ddp_model, "terngrad", clip_factor=2.5)
    >>> state.metrics["bytes_sent"], state.metrics["bytes_sent_fp32_allreduce"]
"""

import dataclasses
import functools
import logging
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from commcomp import collectives, ops, perfmodel
from commcomp.collectives import all_reduce
from commcomp.collectives.buffers import BufferPool, Scratch
from commcomp.core import HookState, Option, bucket_lengths
from commcomp.utils import mix_seed, validate
from commcomp.utils.metrics import ring_allreduce_bytes

logger = logging.getLogger(__name__)

COLLECTIVE_NAMES = ("auto", "int8", "allgather", "two_phase")
PROBE_BYTES = "bytes_link_probe"  # the auto collective's one-time link measurement
PIPELINE_NUMEL = 1 << 21  # elements per piece of a pipelined bucket (8 MB of float32)
PARAM_INDEX_BASE = 1 << 16  # the Python reducer's one-parameter "buckets": indices apart from DDP's


class TernGradState(HookState):
    """Options and buffers of :func:`terngrad_hook`.

    Args:
        process_group: the group to average over (default: the DDP model's).
        clip_factor: clip each layer to ``clip_factor * sigma`` before ternarizing (paper:
            2.5). ``None`` turns clipping off (the scalar is then max |g|).
        collective: ``"auto"`` (default), ``"int8"``, ``"allgather"`` or ``"two_phase"``.
        error_feedback: keep the ternarization residual and add it to the next gradient.
        min_compress_numel: layers with fewer elements are sent uncompressed (fp32).
        seed: base of every rank's random stream; must be the same on all ranks.
        link: a :class:`commcomp.perfmodel.LinkModel` for ``"auto"``; None (default): measured
            on the hook's process group when the first bucket is exchanged
            (:func:`commcomp.perfmodel.measure_link`, the slowest rank's times, so every rank
            chooses alike).
        pipeline_numel: exchange a bucket in pieces of about this many elements, encoding piece
            k + 1 while piece k is on the wire (0: the whole bucket at once). int8 and
            allgather give the same values either way; two_phase's chunk owners change.
    """

    name = "terngrad"
    OPTIONS = (
        Option("clip_factor", partial(validate.positive, allow_none=True)),
        Option("collective", partial(validate.choice, allowed=COLLECTIVE_NAMES)),
        Option("error_feedback", validate.boolean),
        Option("min_compress_numel", partial(validate.integer, low=0)),
        Option("seed", validate.seed),
        Option("pipeline_numel", partial(validate.integer, low=0), resume_checked=False),
    )

    def __init__(self, process_group=None, clip_factor: Optional[float] = 2.5,
                 collective: str = "auto", error_feedback: bool = False,
                 min_compress_numel: int = 1024, seed: int = 0,
                 link: Optional[perfmodel.LinkModel] = None, pipeline_numel: int = PIPELINE_NUMEL):
        self._set_options(clip_factor=clip_factor, collective=collective, error_feedback=error_feedback,
                          min_compress_numel=min_compress_numel, seed=seed, pipeline_numel=pipeline_numel)
        super().__init__(process_group, byte_counters=(PROBE_BYTES,))
        if 0 < pipeline_numel < 4096:
            logger.warning("terngrad: pipeline_numel=%d cuts a bucket into pieces of %d elements: one set of "
                           "collectives per piece; use 0 (no pipelining) or >= 65536 unless you are testing",
                           pipeline_numel, max(4, pipeline_numel - pipeline_numel % 4))
        self.link = link
        # "auto" asks the performance model with this host's calibration, read once here. Each
        # rank reads its own host's file, so the options check covers it: different
        # calibrations could pick different collectives for one bucket.
        self._calibration = perfmodel.load_calibration() if collective == "auto" else None
        self.residuals: Dict[object, torch.Tensor] = {}  # parameter name (or object) -> residual
        self.param_steps: Dict[object, int] = {}  # DDP's Python reducer: reductions per parameter
        self.choices: Dict[tuple, str] = {}  # (bucket index, numel) -> collective
        # Work buffers per bucket, kept across steps (not saved): about 1.2x the bucket for
        # two_phase, (W/4 + 1)x for allgather, plus 4 B per element for the float32 working copy
        # (error feedback or 16-bit gradients) and the float32 result (16-bit gradients).
        self.buffers = BufferPool()

    def close(self, timeout: float = 10.0) -> bool:
        done = super().close(timeout)
        if done:  # no job is left to use them
            self.buffers.clear()
        return done

    def _shared_extra(self) -> dict:
        if self._calibration is None:
            return {}  # the link and the calibration matter only to "auto"
        cal = [self._calibration.get(k) for k in ("seconds_per_pass_element", "fixed_s", "ranks_per_host", "cores")]
        return {"auto_collective_calibration": f"{cal} ({self._calibration.get('source', '?')}; give every host "
                                               "the same file with $COMMCOMP_CALIBRATION, or pass "
                                               "collective='two_phase' (or int8, allgather))",
                "auto_collective_link": "measured" if self.link is None else dataclasses.asdict(self.link)}

    def _extra_state(self) -> dict:
        if any(not isinstance(k, str) for k in self.residuals):
            raise RuntimeError(
                "commcomp: error-feedback residuals are kept per parameter and saved by name, "
                "but this state does not know the names: create it with commcomp.register(...) "
                "or call state.attach(ddp_model) before training"
            )
        return {"residuals": {k: v.detach().cpu() for k, v in self.residuals.items()},
                "param_steps": {str(k): v for k, v in self.param_steps.items()},
                "link": None if self.link is None else dataclasses.asdict(self.link),
                "choices": [[index, numel, name] for (index, numel), name in sorted(self.choices.items())]}

    def _load_extra_state(self, extra: dict) -> None:
        self.residuals = {str(k): v.clone() for k, v in extra.get("residuals", {}).items()}
        self.param_steps = {str(k): int(v) for k, v in extra.get("param_steps", {}).items()}
        if extra.get("link") is not None:  # the run goes on with the link and choices it had
            self.link = perfmodel.LinkModel(**extra["link"])
        if "choices" in extra:
            self.choices = {(int(i), int(n)): str(c) for i, n, c in extra["choices"]}

    def check_options(self, device) -> None:
        """At registration (every rank): the options check, then for ``"auto"`` without a
        ``link`` the link's measurement on the hook's group (its bytes counted apart, in
        ``bytes_link_probe``, not in ``bytes_sent``)."""
        first = not self._options_checked
        super().check_options(device)
        if first and self.collective == "auto" and self.link is None and self.world_size > 1:
            self.link, sent = perfmodel.measure_link(self.process_group, device)
            self.metrics.add(sent, PROBE_BYTES)
            logger.info("terngrad: measured link %.3g MB/s, %.3g ms per message",
                        self.link.bandwidth_bytes_per_s / 1e6, 1e3 * self.link.latency_s)

    def collective_for(self, bucket_index: int, numel: int) -> str:
        """The bucket's collective: the option, or under ``"auto"`` the model's choice for the
        link (measured at registration; the default LinkModel if none), kept for the run and
        saved in checkpoints."""
        if (bucket_index, numel) not in self.choices:
            name = self.collective
            if name == "auto":
                link = self.link if self.link is not None else perfmodel.LinkModel()
                name = perfmodel.choose(numel, self.world_size, link, calibration=self._calibration)
            if name == "int8" and self.world_size > collectives.INT8_MAX_WORLD:
                logger.info("terngrad: %d ranks: int8 sums widen to int32", self.world_size)
            self.choices[(bucket_index, numel)] = name
            logger.info("terngrad: bucket %d (%d elements, %d ranks) uses the %s collective",
                        bucket_index, numel, self.world_size, name)
        return self.choices[(bucket_index, numel)]


def _scales(g: torch.Tensor, lengths: List[int], clip_factor: Optional[float]) -> torch.Tensor:
    """Per layer: min(max |g|, c * sigma), or max |g| where unclipped or sigma = 0; plus a last
    element that is 1 where the data is not finite (max-reduced across ranks with the rest)."""
    absmax, std = ops.segment_stats(g, lengths)
    scales = absmax
    if clip_factor is not None:
        scales = torch.where(std > 0, torch.minimum(absmax, clip_factor * std), absmax)
    bad = (~torch.isfinite(absmax)).any().to(torch.float32).reshape(1)
    return torch.cat([torch.where(torch.isfinite(scales), scales, torch.zeros_like(scales)), bad])


def blocks_of(row_lengths: Sequence[int], block: int) -> Tuple[List[int], List[int]]:
    """Each parameter's row segment cut into blocks of at most ``block`` elements (0: whole):
    the block lengths and, per block, its parameter."""
    lengths, owner = [], []
    for k, n in enumerate(row_lengths):
        cuts = [n] if block <= 0 or n <= block else [block] * (n // block) + ([n % block] if n % block else [])
        lengths += cuts
        owner += [k] * len(cuts)
    return lengths, owner


@functools.lru_cache(maxsize=256)
def _row_constants(row_lengths: Tuple[int, ...], numels: Tuple[int, ...], world: int, block: int, device: str):
    """One layout's segments, made once per layout and device (small tensors made anew would
    be a blocking host-to-device copy per module per backward on a GPU).

    Returns one row's blocks, then the statistics' segments: every (row, block) cut in two, its
    true elements and its padding (parameter k's chunk r holds ``numel_k - r * row_k`` true
    elements, clamped to [0, row_k], then zeros), their true counts, the parameter of each
    block (repeated per row) and the parameters' sizes."""
    segs_row, owner = blocks_of(row_lengths, block)
    starts, pos, last = [], 0, -1
    for k, n in zip(owner, segs_row):
        pos = 0 if k != last else pos
        starts.append(pos)
        pos, last = pos + n, k
    stats_segs, true = [], []
    for r in range(world):
        for k, o, n in zip(owner, starts, segs_row):
            real = min(max(numels[k] - r * row_lengths[k], 0), row_lengths[k])
            t = min(max(real - o, 0), n)
            stats_segs += [t, n - t]
            true.append(t)
    dev = torch.device(device)
    return (segs_row, stats_segs, torch.tensor(stats_segs, device=dev),
            torch.tensor(true, dtype=torch.float64, device=dev), torch.tensor(owner * world, device=dev),
            torch.tensor(owner, device=dev), torch.tensor(numels, dtype=torch.float64, device=dev))


def row_scales(x: torch.Tensor, row_lengths: Sequence[int], numels: Sequence[int], world: int,
               clip_factor: Optional[float], block: int = 0) -> Tuple[torch.Tensor, List[int]]:
    """Scales for a reduce-scatter input (W rows, each the parameters' chunks in order), and
    the segments of one row they apply to.

    ``block = 0``: one scale per parameter, ``min(max |g|, c * sigma)`` over the whole
    unsharded parameter (sigma: population std over its true elements, padding excluded), the
    same for every row: float32 ``[L + 1]``. ``block > 0``: each parameter's row segment is cut
    into blocks of ``block`` elements with one scale per (row, block), ``min(max |g| over the
    block, c * sigma of the parameter)``: float32 ``[W * B + 1]``, row-major. The last element
    is 1 where any element is not finite. One read of ``x`` (two with clipping); sigma combines
    the true parts' spreads (from ``segment_stats``) and means in float64 (Chan et al.'s
    pairwise formula), padding excluded. The parts' sums are float32 (``segment_reduce``): where
    |mean| is many orders above sigma over long rows, sigma comes out too large (less clipping;
    e.g. +117 % at mean 1e5 sigma over 4 M elements)."""
    segs_row, stats_segs, lengths, true, owner_all, owner, n = _row_constants(
        tuple(int(k) for k in row_lengths), tuple(int(k) for k in numels), world, block, str(x.device))
    absmax, std = ops.segment_stats(x, stats_segs)
    absmax = absmax.view(world, -1, 2).amax(-1)  # per (row, block); NaN propagates
    if block <= 0:
        absmax = absmax.amax(0, keepdim=True)
    scales = absmax
    if clip_factor is not None:
        xs = x if x.dtype == torch.float32 else x.float()
        sums = torch.segment_reduce(xs, "sum", lengths=lengths).double().view(-1, 2)[:, 0]  # true parts
        part_mean = sums / true.clamp_min(1)
        part_m2 = true * std.double().view(-1, 2)[:, 0] ** 2
        mean = torch.zeros_like(n).index_add_(0, owner_all, sums) / n
        m2 = torch.zeros_like(n).index_add_(0, owner_all, part_m2 + true * (part_mean - mean[owner_all]) ** 2)
        sigma = (m2 / n).clamp_min(0).sqrt().float()[owner]
        scales = torch.where(sigma > 0, torch.minimum(absmax, clip_factor * sigma), absmax)
    bad = (~torch.isfinite(absmax)).any().to(torch.float32).reshape(1)
    scales = torch.where(torch.isfinite(scales), scales, torch.zeros_like(scales)).reshape(-1)
    return torch.cat([scales, bad]), list(segs_row)  # a copy: the cached layout stays intact


def fill_nan_where(out: torch.Tensor, flag: torch.Tensor) -> None:
    """NaN over ``out`` where ``flag > 0``: a host test on CPU, no sync on a GPU."""
    if out.is_cuda:
        out.masked_fill_(flag > 0, float("nan"))
    elif bool(flag > 0):
        out.fill_(float("nan"))


def terngrad_hook(state: TernGradState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` here: DDP checks these annotations at runtime)
    """DDP communication hook: average the bucket's gradients as TernGrad ternary payloads.

    The bucket's exchange runs on the ordered executor of the state's process group (one order
    of collectives on every rank); the backward pass goes on meanwhile.
    """
    if isinstance(bucket, tuple):  # DDP's Python reducer (compiled autograd): one parameter, in place
        _reduce_parameter(state, *bucket)
        return None
    state.require_registered()
    buf = bucket.buffer()
    index, step, lengths = bucket.index(), state.step, bucket_lengths(bucket)
    # fp32 without error feedback: encode the bucket in place (no staging copy; DDP leaves the
    # buffer alone until the future completes). Otherwise a float32 working copy.
    # The working copy is a buffer kept across steps: this bucket's job of the previous step
    # has finished, since DDP completes every future of a step before the next backward.
    if buf.dtype == torch.float32 and not state.error_feedback:
        x = buf.detach()
    else:
        x = state.buffers.scope(bucket.index()).get("x", buf.numel(), torch.float32, buf.device)
        x.copy_(buf.detach())
    keys = [state.param_key(p) for p in bucket.parameters()] if state.error_feedback else []
    if keys and len(keys) == len(lengths):  # residuals are per parameter: DDP may rebuild buckets
        pos = 0
        for key, n in zip(keys, lengths):
            if key in state.residuals:
                x[pos:pos + n] += state.residuals[key].to(x.device)
            pos += n
    if bucket.is_last():
        state.step += 1
    last = bucket.is_last()
    job = lambda: _reduce_bucket(state, index, step, x, lengths, buf, keys, last)  # noqa: E731
    return state.submit(job, buf)


def _reduce_parameter(state: TernGradState, grad: torch.Tensor, param: torch.Tensor) -> None:
    """DDP's Python reducer (``optimize_ddp="python_reducer"``, which compiled autograd needs)
    calls the hook with one ``(grad, param)`` at a time and ignores its result: average that
    parameter's gradient now, in place, as a bucket of one (its own stream: the parameter's
    position and its own count of reductions). One blocking exchange per parameter, no overlap
    with backward; every rank must reduce the same parameters in the same order (DDP's Python
    reducer skips parameters without a gradient, so one unused on a single rank would hang the
    others, as it would in that reducer's own all-reduce)."""
    state.require_registered()
    key = state.param_key(param)
    index = PARAM_INDEX_BASE + state.param_index(param)
    step = state.param_steps.get(key, 0)
    state.param_steps[key] = step + 1
    state.step = max(state.step, step + 1)
    flat = grad.detach().reshape(-1)  # a copy already when grad is not contiguous
    buf = flat
    if buf.dtype == torch.float32 and not state.error_feedback:
        x = buf
    else:
        x = state.buffers.scope(index).get("x", buf.numel(), torch.float32, buf.device)
        x.copy_(buf)
    keys = [key] if state.error_feedback else []
    if keys and key in state.residuals:
        x += state.residuals[key].to(x.device)
    state.submit(lambda: _reduce_bucket(state, index, step, x, [x.numel()], buf, keys), buf).wait()
    if not (grad.is_contiguous() and buf.data_ptr() == grad.data_ptr()):
        grad.copy_(buf.view_as(grad))


def _reduce_bucket(state: TernGradState, index: int, step: int, x: torch.Tensor,
                   lengths: List[int], buf: torch.Tensor, keys: list, last: bool = False) -> torch.Tensor:
    """The whole exchange of one bucket (on the executor thread: waits are fine)."""
    world = state.world_size
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    comp = [k for k, n in enumerate(lengths) if n > 0 and n >= state.min_compress_numel]
    raw = [k for k, n in enumerate(lengths) if n > 0 and n < state.min_compress_numel]
    state.metrics.fp32_allreduce(x.numel(), world)
    scratch = state.buffers.scope(index)
    # Decode straight into the bucket when it is float32; else into a float32 buffer, cast once.
    dest = buf if buf.dtype == torch.float32 else scratch.get("out", buf.numel(), torch.float32, buf.device)
    raw_fut = None
    if raw:  # small layers: exact fp32 all-reduce, overlapping the ternary exchange
        raw_x = torch.cat([x[bounds[k]:bounds[k + 1]] for k in raw])
        raw_fut = all_reduce(raw_x, group=state.process_group)
        state.metrics.sent(ring_allreduce_bytes(4 * raw_x.numel(), world))
    if comp:
        # The whole bucket is encoded, small layers too (their few codes are overwritten by
        # the exact values below): no gather or scatter passes over the large layers.
        own, bad = _ternary_average(state, index, step, x, lengths, dest, scratch)
        # What ternarization dropped, for the next step; not from a non-finite step (a NaN
        # residual would poison every later step: AMP skips the step and goes on).
        if state.error_feedback and len(keys) == len(lengths) and not bad:
            for k in comp:
                state.residuals[keys[k]] = (x[bounds[k]:bounds[k + 1]] - own[bounds[k]:bounds[k + 1]]).clone()
    else:
        bad = False
    if raw_fut is not None:
        _scatter(dest, raw_fut.wait() / world, raw, bounds)
    if bad:  # some rank's data was not finite: the whole bucket is NaN on every rank
        dest.fill_(float("nan"))
    if dest is not buf:
        buf.copy_(dest)
    if last:  # drop the buffers of buckets or pieces this step did not use (after a rebuild)
        state.buffers.sweep()
    return buf


def _scatter(out: torch.Tensor, packed: torch.Tensor, ks: List[int], bounds: List[int]) -> None:
    """Write the concatenated segments `ks` of `packed` back to their places in `out`."""
    pos = 0
    for k in ks:
        n = bounds[k + 1] - bounds[k]
        out[bounds[k]:bounds[k + 1]] = packed[pos:pos + n]
        pos += n


def _ternary_average(state: TernGradState, index: int, step: int, x: torch.Tensor,
                     lengths: List[int], dest: torch.Tensor, scratch: Scratch) -> Tuple[Optional[torch.Tensor], bool]:
    """Share the scales (MAX all-reduce), then average the ternary payloads into ``dest``
    (float32). Returns this rank's own decode (for error feedback, else None) and whether any
    rank's data was not finite (the caller fills the bucket with NaN)."""
    stats = _scales(x, lengths, state.clip_factor)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=state.process_group)
    state.metrics.sent(ring_allreduce_bytes(4 * stats.numel(), state.world_size))
    name = state.collective_for(index, x.numel())
    enc = collectives.Encoding(stats[:-1].contiguous(), lengths,
                               mix_seed(state.seed, state.rank, step, 0), index << 40)
    kwargs = {"seed2": mix_seed(state.seed, state.rank, step, 1)} if name == "two_phase" else {}
    launched = collectives.pipelined(name, x, enc, state.process_group, piece_numel=state.pipeline_numel,
                                     want_own=state.error_feedback, out=dest, scratch=scratch, **kwargs)
    state.metrics.sent(launched.bytes_sent)
    launched.future.wait()
    return launched.own, bool(stats[-1] > 0)  # a scalar test, not a pass over the data
