"""Sketched gradients with differential-privacy noise as a DDP communication hook (Song et
al. 2022, "Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel
and Vulnerability"; the Gaussian mechanism of DP-SGD / DP-FedAvg, Abadi et al. 2016,
McMahan et al. 2018).

Per step, on every rank (each rank is a *client*):

1. Clip: the rank's gradient is scaled to L2 norm at most ``clip_norm`` -- the whole model's
   gradient (``clip_scope="model"``, default) or each DDP bucket on its own (``"bucket"``).
2. Noise, **on the worker, before anything leaves it**: N(0, (noise_multiplier *
   clip_norm)^2) on every coordinate of the clipped gradient, before sketching
   (``noise_placement="gradient"``, default), or on every coordinate of the clipped sketch
   (``"sketch"``: the sketch is clipped instead, and the noise has ``s`` instead of ``d``
   dimensions -- ``d/s`` times less noise energy in the message for the same guarantee).
   Noise comes from a per-rank generator seeded from OS entropy, independent of the sketch.
3. Sketch: ``y = R x`` with ``R`` (:mod:`commcomp.codecs.sketch`) drawn from a seed all ranks
   share, fresh per (step, bucket) -- ``s = ceil(sketch_ratio * d)`` floats per bucket.
4. All-reduce the sketches (SUM; ``R`` is linear and shared, so this is the sketch of the
   sum) plus one flag for non-finite gradients; bytes are ``s/d`` of a fp32 all-reduce.
5. De-sketch: the bucket becomes ``R^T (sum y) / world``, an unbiased estimate of the
   average of the noisy, clipped gradients.

**Threat model / what the guarantee covers.** Each message a rank sends is the output of a
Gaussian mechanism on that rank's clipped gradient followed by post-processing (sketching),
so it is ``(epsilon, delta)``-DP with respect to the rank's data -- against the other ranks,
the network and anyone who later sees the messages or the model, *without trusting any
aggregator* (local DP per message; composition over steps through ``dp-accounting``, see
:meth:`SketchDPState.epsilon`). Adjacency: with ``level="client"``, adding or removing one
client's whole data (clipping bounds the sensitivity by ``clip_norm``); with
``level="record"`` (per-sample clipping on Opacus' ``GradSampleModule``, through
:meth:`SketchDPState.reduce_`), one training record, Poisson-sampled at ``sample_rate``.
Not covered: the rank's own process and memory, a malicious rank that skips its noise
(it only hurts its own privacy), and side channels (timing, message sizes).
With ``clip_scope="bucket"`` each bucket is its own mechanism, and the accounting composes
them (``num_buckets`` mechanisms per step).

Sketching alone is no protection: :mod:`commcomp.privacy.attack` reconstructs training
images from noiseless sketched gradients.

Example::

    >>> state = commcomp.register(ddp_model, "sketch_dp", sketch_ratio=0.01,
    ...                           noise_multiplier=1.1, clip_norm=1.0)
    >>> ...train...
    >>> state.epsilon(delta=1e-5), state.metrics["bytes_sent"]
"""

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from commcomp import collectives
from commcomp.codecs import sketch as sketches
from commcomp.collectives.futures import new_future
from commcomp.privacy import accounting
from commcomp.privacy.mechanisms import NoiseSource, clip_coefficient

from ._common import HookStateBase, mix_seed, write_flat_grads_

LEVELS = ("client", "record")
CLIP_SCOPES = ("model", "bucket")
PLACEMENTS = ("gradient", "sketch")


def _positive(v, name: str, allow_none: bool = False) -> Optional[float]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        extra = " or None" if allow_none else ""
        raise ValueError(f"commcomp: {name} must be a finite number > 0{extra}, got {v!r}")
    return float(v)


def _choice(v, name: str, allowed: Sequence[str]) -> str:
    if v not in allowed:
        raise ValueError(f"commcomp: {name} must be one of {tuple(allowed)}, got {v!r}")
    return v


class SketchDPState(HookStateBase):
    """Options, privacy ledger and buffers of :func:`sketch_dp_hook`.

    Args:
        process_group: the group to average over (default: the whole world).
        sketch_ratio: sketch size / bucket size, in ``(0, 1]`` (default 0.01: 100x fewer
            bytes, a ~100x noisier but unbiased gradient; see :mod:`commcomp.codecs.sketch`).
        sketch: ``"countsketch"`` (default, O(d)), ``"srht"`` (O(d log block); at ratio 1 an
            orthogonal map, exact), or ``"gaussian"`` (dense, small models only).
        noise_multiplier: noise std / ``clip_norm`` (DP-SGD's sigma). 0 or None: no noise
            (and no privacy: ``epsilon`` is inf). Give this or ``target_epsilon``.
        clip_norm: L2 bound of each rank's contribution (``level="client"``) or of each
            sample's gradient (``"record"``); required when there is noise. None: no clipping.
        target_epsilon, target_delta, steps: calibrate ``noise_multiplier`` so that ``steps``
            steps spend ``target_epsilon`` at ``target_delta`` (``dp-accounting``); the hook then
            refuses to run a step beyond ``steps`` rather than overspend.
        level: ``"client"`` (default; DDP hook) or ``"record"`` (per-sample clipping with
            :func:`commcomp.privacy.clip_per_sample_`, then :meth:`reduce_`).
        clip_scope: ``"model"`` (default; one norm over all buckets: the exchange starts
            when the last bucket is ready) or ``"bucket"`` (each bucket clipped to
            ``clip_norm``, exchanged as soon as ready; accounted as one mechanism per bucket).
        noise_placement: ``"gradient"`` (default) or ``"sketch"`` (see above).
        sample_rate: probability that a unit (client or record) takes part in a step, for the
            accounting (1.0: every client every step; record level: batch / local data size).
        accountant: ``"rdp"`` (default) or ``"pld"``.
        sketch_seed: the shared seed of the sketches; must be equal on all ranks (checked).
        noise_seed: None (default: OS entropy) or an int for repeatable experiments only.
        block: SRHT block length (power of two; default ``min(4096, next_pow2(d))``).
    """

    name = "sketch_dp"

    def __init__(self, process_group=None, sketch_ratio: float = 0.01, sketch: str = "countsketch",
                 noise_multiplier: Optional[float] = None, clip_norm: Optional[float] = None,
                 target_epsilon: Optional[float] = None, target_delta: float = 1e-5,
                 steps: Optional[int] = None, level: str = "client", clip_scope: str = "model",
                 noise_placement: str = "gradient", sample_rate: float = 1.0,
                 accountant: str = "rdp", sketch_seed: int = 0, noise_seed: Optional[int] = None,
                 block: Optional[int] = None):
        self.sketch_ratio = sketches.check_ratio(sketch_ratio)
        self.sketch = sketches.check_kind(sketch)
        self.clip_norm = _positive(clip_norm, "clip_norm", allow_none=True)
        self.level = _choice(level, "level", LEVELS)
        self.clip_scope = _choice(clip_scope, "clip_scope", CLIP_SCOPES)
        self.noise_placement = _choice(noise_placement, "noise_placement", PLACEMENTS)
        self.sample_rate = accounting.check_sample_rate(sample_rate)
        self.accountant = accounting.check_accountant(accountant)
        self.target_delta = accounting.check_delta(target_delta)
        if block is not None and (not isinstance(block, int) or block < 1 or block & (block - 1)):
            raise ValueError(f"commcomp: block must be a power of two or None, got {block!r}")
        if not isinstance(sketch_seed, int) or isinstance(sketch_seed, bool) or not 0 <= sketch_seed < 2**63:
            raise ValueError(f"commcomp: sketch_seed must be an int in [0, 2**63), got {sketch_seed!r}")
        if self.level == "record" and self.noise_placement != "gradient":
            raise ValueError("commcomp: level='record' needs noise_placement='gradient' (the noise "
                             "goes on the sum of per-sample clipped gradients)")
        if self.level == "record" and self.clip_norm is None:
            raise ValueError("commcomp: level='record' needs clip_norm (the per-sample bound)")
        self.target_epsilon, self.planned_steps = None, None
        if target_epsilon is not None:
            if noise_multiplier is not None:
                raise ValueError("commcomp: give noise_multiplier or target_epsilon, not both")
            if self.clip_scope != "model":
                raise ValueError("commcomp: target_epsilon needs clip_scope='model' (with 'bucket' "
                                 "the number of mechanisms per step is known only at the first "
                                 "step); give noise_multiplier instead")
            if steps is None:
                raise ValueError("commcomp: target_epsilon needs steps (how many steps to train)")
            self.target_epsilon = accounting.check_epsilon(target_epsilon)
            self.planned_steps = accounting.check_steps(steps)
            noise_multiplier = accounting.noise_for_epsilon(
                self.target_epsilon, self.target_delta, self.planned_steps, self.sample_rate,
                self.accountant)
        self.noise_multiplier = accounting.check_noise_multiplier(noise_multiplier or 0.0)
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError(
                f"commcomp: noise_multiplier={self.noise_multiplier} needs clip_norm: without "
                "clipping the sensitivity is unbounded and the noise protects nothing")
        super().__init__(process_group)
        self.sketch_seed, self.block = sketch_seed, block
        self.noise = NoiseSource(None if noise_seed is None else mix_seed(noise_seed, self.rank))
        self.ledger = accounting.PrivacyLedger(self.noise_multiplier, self.sample_rate, self.accountant)
        self._pending: List[tuple] = []  # model scope: (index, x, buf, future) until the last bucket

    # -- options, checkpoints, accounting
    def options(self) -> dict:
        return {"sketch_ratio": self.sketch_ratio, "sketch": self.sketch, "block": self.block,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "level": self.level, "clip_scope": self.clip_scope,
                "noise_placement": self.noise_placement, "sample_rate": self.sample_rate,
                "accountant": self.accountant, "sketch_seed": self.sketch_seed}

    def _extra_state(self) -> dict:
        # The noise generator is deliberately not saved: fresh entropy after a restart.
        return {"ledger_steps": self.ledger.steps, "planned_steps": self.planned_steps}

    def _load_extra_state(self, extra: dict) -> None:
        self.ledger.steps = int(extra.get("ledger_steps", 0))

    def epsilon(self, delta: Optional[float] = None) -> float:
        """The epsilon this rank's messages have spent so far at ``delta`` (default
        ``target_delta``); ``inf`` without noise or clipping."""
        if self.clip_norm is None:
            return math.inf if self.ledger.steps else 0.0
        return self.ledger.epsilon(self.target_delta if delta is None else delta)

    def _check_budget(self) -> None:
        if self.planned_steps is not None and self.step >= self.planned_steps:
            raise RuntimeError(
                f"commcomp: the privacy budget (epsilon={self.target_epsilon}, "
                f"delta={self.target_delta}) was calibrated for {self.planned_steps} steps and "
                "all of them have run; another step would overspend it. Stop training, or "
                "create a new state with a larger steps/target_epsilon.")

    # -- one release: clip, noise, sketch, all-reduce, de-sketch
    def _sketch_for(self, numel: int, step: int, index: int) -> sketches.Sketch:
        s = sketches.sketch_size(self.sketch, numel, self.sketch_ratio, self.block)
        return sketches.Sketch(self.sketch, numel, s, mix_seed(self.sketch_seed, step, index), self.block)

    def release(self, parts: Sequence[Tuple[int, torch.Tensor]], step: int, clip: bool = True) -> List[torch.Tensor]:
        """Privatize and average flat float32 vectors ``[(index, x), ...]`` (one mechanism):
        returns the de-sketched averages. Blocking; runs on the communication thread."""
        world, C, sigma = self.world_size, self.clip_norm, self.noise_multiplier
        sks = [self._sketch_for(x.numel(), step, index) for index, x in parts]
        bad = torch.stack([(~torch.isfinite(x)).any() for _, x in parts]).any()
        xs = [torch.where(bad, torch.zeros_like(x), x) for _, x in parts]
        if self.noise_placement == "gradient":
            if clip and C is not None:
                coef = clip_coefficient(torch.stack([x.norm() for x in xs]).norm(), C)
                xs = [x * coef for x in xs]
            if sigma > 0:
                xs = [x + self.noise.gaussian(x.numel(), sigma * C, x.device) for x in xs]
            ys = [sk.sketch(x) for sk, x in zip(sks, xs)]
        else:
            ys = [sk.sketch(x) for sk, x in zip(sks, xs)]
            if C is not None:
                coef = clip_coefficient(torch.stack([y.norm() for y in ys]).norm(), C)
                ys = [y * coef for y in ys]
            if sigma > 0:
                ys = [y + self.noise.gaussian(y.numel(), sigma * C, y.device) for y in ys]
        msg = torch.cat([y.detach().reshape(-1) for y in ys] + [bad.float().reshape(1)])
        dist.all_reduce(msg, group=self.process_group)
        self.add_bytes(collectives.ring_allreduce_bytes(4 * msg.numel(), world))
        self.add_fp32_bytes(sum(collectives.ring_allreduce_bytes(4 * x.numel(), world) for _, x in parts))
        if not bool(bad):
            self.ledger.record()  # this rank's noised gradient left it
        flagged = int(msg[-1].item())
        if flagged:
            raise FloatingPointError(
                f"commcomp sketch_dp: {flagged} of {world} rank(s) had NaN/Inf gradients in "
                f"bucket(s) {[i for i, _ in parts]} at step {step} (this rank: "
                f"{'yes' if bool(bad) else 'no'}); no rank applied this step. Lower the learning "
                "rate or use a GradScaler, and check the loss for overflow.")
        out, pos = [], 0
        for sk in sks:
            out.append(sk.transpose(msg[pos:pos + sk.sketch_size]).div_(world))
            pos += sk.sketch_size
        return out

    # -- the plain step function (record level, or loops without DDP)
    def reduce_(self, params, batch_size: Optional[float] = None,
                chunk_numel: int = 1 << 22) -> None:
        """Privatize and average ``p.grad`` of ``params`` across ranks in place, without DDP.

        With ``level="record"``, call it after :func:`commcomp.privacy.clip_per_sample_`
        (``p.grad`` = sum of clipped per-sample gradients); the noise goes on that sum and the
        result is divided by ``batch_size`` (the expected per-rank batch). With
        ``level="client"``, ``p.grad`` is the rank's gradient and is clipped as a whole.
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            raise ValueError("commcomp: no parameter has a .grad; run backward first")
        if self.level == "record" and batch_size is None:
            raise ValueError("commcomp: level='record' needs batch_size (expected per-rank batch)")
        self._check_budget()
        grads = [p.grad.detach().reshape(-1).float() for p in params]
        flat = torch.cat(grads)
        parts = list(enumerate(torch.split(flat, chunk_numel)))
        self.check_first_step(flat.device)
        avg = torch.cat(self.release(parts, self.step, clip=self.level == "client"))
        if batch_size is not None:
            avg /= float(batch_size)
        write_flat_grads_(params, avg)
        self.step += 1


def sketch_dp_hook(state: SketchDPState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` in this file: DDP checks these annotations)
    """DDP communication hook: average the bucket as clipped, noised, sketched gradients.

    With ``clip_scope="model"`` the buckets wait for the last one (one norm over the model),
    then all are released in one all-reduce on the communication thread.
    """
    if state.level == "record":
        raise RuntimeError(
            "commcomp sketch_dp: level='record' clips each sample's gradient, which a DDP hook "
            "never sees; run backward under ddp_model.no_sync() (or without DDP), then "
            "commcomp.privacy.clip_per_sample_(...) and state.reduce_(...)")
    buf = bucket.buffer()
    x = buf.detach().to(torch.float32, copy=True)
    index, step, last = bucket.index(), state.step, bucket.is_last()
    if index == 0:
        state._check_budget()
    if last:
        state.step += 1
    thread = collectives.comm_thread()
    if state.clip_scope == "bucket":
        return thread.submit(lambda: _finish(state, [(index, x, buf, None)], step), buf)
    state._pending.append((index, x, buf, new_future(buf) if not last else None))
    if not last:
        return state._pending[-1][3]
    parts, state._pending = state._pending, []
    return thread.submit(lambda: _finish(state, parts, step), buf)


def _finish(state: SketchDPState, parts: list, step: int) -> torch.Tensor:
    """Release ``parts`` (on the communication thread), complete their futures, return the
    last bucket's result. On failure every future gets the error and the step is undone."""
    try:
        state.check_first_step(parts[-1][2].device)
        avgs = state.release([(index, x) for index, x, _, _ in parts], step)
    except BaseException as exc:
        state.step = step
        for *_, fut in parts:
            if fut is not None:
                fut.set_exception(exc)
        raise
    for (_, _, buf, fut), avg in zip(parts, avgs):
        buf.copy_(avg)
        if fut is not None:
            fut.set_result(buf)
    return parts[-1][2]
