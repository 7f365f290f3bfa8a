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
:meth:`SketchDPState.epsilon`). Adjacency (``adjacency=``): at ``level="client"`` the default
is ``"replace"`` -- any two datasets of the client (sensitivity ``2 clip_norm``), because
every rank sends every step; ``"add_remove"`` only hides whether the client has data at all.
At ``level="record"`` (per-sample clipping on Opacus' ``GradSampleModule`` through
:meth:`SketchDPState.clip_per_sample_` and :meth:`SketchDPState.reduce_`) it is one training
record added or removed, Poisson-sampled at ``sample_rate`` by an unpredictable sampler
(:func:`commcomp.privacy.dp_data_loader`). Client-level ``sample_rate < 1`` is carried out
with a private coin per step; a rank that sits a step out sends noise of the same shape.
The noise comes from ChaCha20 keyed with 256 bits from the OS (:mod:`commcomp.privacy.csprng`).
Not covered: the rank's own process and memory, a malicious rank that skips its noise
(it only hurts its own privacy), side channels (timing), DDP's buffer broadcast and
unused-parameter map (refused at registration), and a user-set ``noise_seed``.
With ``clip_scope="bucket"`` the buckets of one step are one mechanism with sensitivity
``sqrt(num_buckets) clip_norm`` and one participation coin.

Sketching alone is no protection: :mod:`commcomp.privacy.attack` reconstructs training
images from noiseless sketched gradients.

Example::

    >>> state = commcomp.register(ddp_model, "sketch_dp", sketch_ratio=0.01,
    ...                           noise_multiplier=1.1, clip_norm=1.0)
    >>> ...train...
    >>> state.epsilon(delta=1e-5), state.metrics["bytes_sent"]
"""

import math
import threading
import warnings
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from commcomp.codecs import sketch as sketches
from commcomp.collectives import new_future
from commcomp.core import HookState, Option
from commcomp.privacy import accounting
from commcomp.privacy.mechanisms import NoiseSource
from commcomp.utils import validate

from .sketch_dp_release import SketchDPRelease

LEVELS = ("client", "record")
CLIP_SCOPES = ("model", "bucket")
PLACEMENTS = ("gradient", "sketch")
DEFAULT_ADJACENCY = {"client": "replace", "record": "add_remove"}
_RECORD_NOT_A_HOOK = (
    "commcomp sketch_dp: level='record' clips each sample's gradient, which a DDP hook never "
    "sees; use SketchDPState(level='record', ...) without registering it: run backward (under "
    "ddp_model.no_sync(), or without DDP), then state.clip_per_sample_(params) and "
    "state.reduce_(params, batch_size=...)")


def _checker(fn):
    """An accounting check ``fn(value)`` as an option check ``(value, name)``."""
    return lambda v, name: fn(v)


class SketchDPState(SketchDPRelease, HookState):
    """Options, privacy ledger and buffers of :func:`sketch_dp_hook`.

    Args:
        process_group: the group to average over (default: the whole world).
        sketch_ratio: sketch size / bucket size, in ``(0, 1]`` (default 0.01: 100x fewer
            bytes, a ~100x noisier but unbiased gradient; see :mod:`commcomp.codecs.sketch`).
        sketch: ``"countsketch"`` (default, O(d)), ``"srht"`` (O(d log block); at ratio 1 an
            orthogonal map, exact), or ``"gaussian"`` (dense, small models only).
        noise_multiplier: noise std / ``clip_norm`` (DP-SGD's sigma), > 0. None: no noise
            (and no privacy: ``epsilon`` is inf). Give this or ``target_epsilon``.
        clip_norm: L2 bound of each rank's contribution (``level="client"``) or of each
            sample's gradient (``"record"``); required when there is noise. None: no clipping.
        target_epsilon, target_delta, steps: calibrate ``noise_multiplier`` so that ``steps``
            steps spend ``target_epsilon`` at ``target_delta`` (``dp-accounting``); the hook then
            refuses to release a message beyond ``steps`` rather than overspend.
        level: ``"client"`` (default; DDP hook) or ``"record"`` (per-sample clipping with
            :meth:`clip_per_sample_`, then :meth:`reduce_`).
        adjacency: which neighbouring datasets are indistinguishable. ``"replace"`` (default at
            client level): any two datasets of the unit -- every rank sends every step, so this
            is what the other ranks must not learn; the sensitivity is ``2 clip_norm``.
            ``"add_remove"`` (default at record level, as in DP-SGD): the unit present or
            absent -- at client level that only hides whether the client has any data.
        clip_scope: ``"model"`` (default; one norm over all buckets: the exchange starts
            when the last bucket is ready) or ``"bucket"`` (each bucket clipped to
            ``clip_norm``, exchanged as soon as ready; a step is one mechanism with
            sensitivity ``sqrt(buckets) clip_norm``).
        noise_placement: ``"gradient"`` (default) or ``"sketch"`` (see above).
        sample_rate: probability that a unit takes part in a step. At client level it is
            **carried out**: each step the rank tosses a private coin (secure generator) and,
            when it does not take part, sends pure noise of the same shape, so participation
            does not show on the wire; the average is divided by ``sample_rate * world``
            (unbiased). At record level the data loader samples
            (:func:`commcomp.privacy.dp_data_loader`) and this is its rate.
        num_records: this rank's number of records (record level, required): ``target_delta``
            must be below ``1 / num_records``.
        accountant: ``"rdp"`` (default) or ``"pld"`` (tighter; required for
            ``adjacency="replace"`` with ``sample_rate < 1``).
        sketch_seed: the shared seed of the sketches; must be equal on all ranks (checked).
        noise_seed: None (default: a fresh 256-bit key from the OS for a ChaCha20 noise
            generator). An int makes the noise repeatable for experiments and is **insecure**:
            whoever knows it regenerates the noise and subtracts it (a warning says so).
        block: SRHT block length (power of two; default ``min(4096, next_pow2(d))``).
    """

    name = "sketch_dp"
    OPTIONS = (
        Option("sketch_ratio", _checker(sketches.check_ratio)),
        Option("sketch", _checker(sketches.check_kind)),
        Option("block", partial(validate.power_of_two, allow_none=True)),
        Option("noise_multiplier"),  # checked (or calibrated) in __init__
        Option("clip_norm", partial(validate.positive, allow_none=True)),
        Option("level", partial(validate.choice, allowed=LEVELS)),
        Option("clip_scope", partial(validate.choice, allowed=CLIP_SCOPES)),
        Option("noise_placement", partial(validate.choice, allowed=PLACEMENTS)),
        Option("sample_rate", _checker(accounting.check_sample_rate)),
        Option("accountant", _checker(accounting.check_accountant)),
        Option("sketch_seed", validate.seed),
        Option("adjacency", _checker(accounting.check_adjacency)),
        Option("num_records", partial(validate.integer, low=1, allow_none=True,
                                      hint="this rank's number of records; level='record' needs it to "
                                           "check target_delta < 1/num_records"), per_rank=True),
    )

    def __init__(self, process_group=None, sketch_ratio: float = 0.01, sketch: str = "countsketch",
                 noise_multiplier: Optional[float] = None, clip_norm: Optional[float] = None,
                 target_epsilon: Optional[float] = None, target_delta: float = 1e-5,
                 steps: Optional[int] = None, level: str = "client", clip_scope: str = "model",
                 noise_placement: str = "gradient", sample_rate: float = 1.0,
                 accountant: str = "rdp", sketch_seed: int = 0, noise_seed: Optional[int] = None,
                 block: Optional[int] = None, adjacency: Optional[str] = None,
                 num_records: Optional[int] = None):
        self._set_options(
            sketch_ratio=sketch_ratio, sketch=sketch, block=block, clip_norm=clip_norm, level=level,
            clip_scope=clip_scope, noise_placement=noise_placement, sample_rate=sample_rate,
            accountant=accountant, sketch_seed=sketch_seed, num_records=num_records,
            adjacency=DEFAULT_ADJACENCY.get(level, "replace") if adjacency is None else adjacency)
        self.target_delta = accounting.check_delta(target_delta)
        validate.integer(noise_seed, "noise_seed", allow_none=True, hint="None (the default) is secure")
        if self.level == "record" and self.noise_placement != "gradient":
            raise ValueError("commcomp: level='record' needs noise_placement='gradient' (the noise "
                             "goes on the sum of per-sample clipped gradients)")
        if self.level == "record" and self.clip_norm is None:
            raise ValueError("commcomp: level='record' needs clip_norm (the per-sample bound)")
        if self.level == "record" and self.num_records is None:
            raise ValueError("commcomp: level='record' needs num_records (this rank's number of records) "
                             "to check target_delta < 1/num_records")
        if self.num_records is not None and self.target_delta >= 1.0 / self.num_records:
            raise ValueError(
                f"commcomp: target_delta={self.target_delta} is not below 1/num_records = "
                f"1/{self.num_records}: a mechanism that publishes one record in the clear "
                f"with probability delta would satisfy it; use delta << 1/{self.num_records}")
        validate.positive(noise_multiplier, "noise_multiplier", allow_none=True,
                          hint="None is no noise (no privacy); or give target_epsilon to calibrate it")
        self.noise_multiplier = self._calibrate(noise_multiplier, target_epsilon, steps)
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError(
                f"commcomp: noise_multiplier={self.noise_multiplier} needs clip_norm: without "
                "clipping the sensitivity is unbounded and the noise protects nothing")
        # Refuses (adjacency, sample_rate, accountant) combinations it cannot account for.
        ledger = accounting.PrivacyLedger(self.noise_multiplier, self.sample_rate, self.accountant,
                                          self.adjacency)
        super().__init__(process_group)
        self.ledger = ledger
        if noise_seed is not None:
            warnings.warn(
                "commcomp sketch_dp: noise_seed is set, so the DP noise is repeatable -- and "
                "INSECURE: anyone who knows the seed can regenerate the noise and subtract it. "
                "Use it for experiments only; leave noise_seed=None in deployment.", UserWarning,
                stacklevel=2)
            self.noise = NoiseSource(noise_seed, self.rank)
        else:
            self.noise = NoiseSource()
        self.nonfinite_steps = 0  # steps whose local gradient was non-finite (sent as noise)
        self._coin: Tuple[int, bool] = (-1, True)  # (step, takes part) of the current step
        self._open_parts = 0  # bucket scope: buckets of the current step released so far
        self._clipped: Dict[int, Tuple[torch.Tensor, int]] = {}  # record level: id(p) -> (grad, version)
        self._lock = threading.Lock()
        self._pending: List[tuple] = []  # model scope: (index, x, buf, future) until the last bucket

    def _calibrate(self, noise_multiplier, target_epsilon, steps) -> float:
        """The noise multiplier: as given, or calibrated so that ``steps`` released messages
        spend ``target_epsilon`` (then the budget is enforced: ``planned_steps``)."""
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
                self.accountant, self.adjacency)
        return accounting.check_noise_multiplier(noise_multiplier or 0.0)

    # -- registration, checkpoints, accounting
    def attach(self, model) -> None:
        """At registration: refuse DDP modes that send data-dependent values in the clear
        (``commcomp.register`` then checks the options across ranks)."""
        if self.level == "record":
            raise ValueError(_RECORD_NOT_A_HOOK)
        if self.noise_multiplier > 0:
            if getattr(model, "find_unused_parameters", False):
                raise ValueError(
                    "commcomp sketch_dp: DDP(find_unused_parameters=True) all-reduces a bitmap of "
                    "the parameters this rank's data did not use, un-noised, which the privacy "
                    "guarantee does not cover; construct DDP with find_unused_parameters=False "
                    "(and give unused parameters requires_grad=False, or a zero loss term)")
            if getattr(model, "broadcast_buffers", False) and any(True for _ in model.module.buffers()):
                names = [n for n, _ in model.module.named_buffers()][:3]
                raise ValueError(
                    f"commcomp sketch_dp: DDP(broadcast_buffers=True) sends rank 0's buffers "
                    f"({names}, e.g. BatchNorm running statistics of its data) in the clear every "
                    "step, outside the privacy guarantee. Replace BatchNorm with GroupNorm "
                    "(opacus.validators.ModuleValidator.fix does that). broadcast_buffers=False "
                    "only keeps them off the wire: data-dependent, un-noised statistics then stay "
                    "in each rank's model, so do it only if that model is never shared")
        super().attach(model)

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint (checked before anything changes). A ledger with fewer released
        messages than this state has sent is refused: it would forget messages that are out.
        After a crash, messages sent since the checkpoint are not in it: keep checkpoints
        frequent, or account them yourself (the gap is documented in docs/privacy.md)."""
        saved = sum(int(n) for n in state.get("ledger", {}).get("parts", {}).values())
        if saved < self.ledger.steps:
            raise ValueError(
                f"commcomp sketch_dp: the checkpoint's ledger has {saved} released messages, this "
                f"state has already sent {self.ledger.steps}; loading it would forget messages "
                "that are out and let the budget be overspent. Load it into a fresh state.")
        super().load_state_dict(state)

    def _extra_state(self) -> dict:
        # The noise key is deliberately not saved: a restart draws a fresh one.
        return {"ledger": self.ledger.state_dict(), "planned_steps": self.planned_steps,
                "nonfinite_steps": self.nonfinite_steps}

    def _load_extra_state(self, extra: dict) -> None:
        # (Checkpoints from before the per-step ledger lack the adjacency option and are refused
        # by the options check: their epsilon was computed under other assumptions.)
        self.ledger.load_state_dict(extra["ledger"])
        self.nonfinite_steps = int(extra.get("nonfinite_steps", 0))

    def epsilon(self, delta: Optional[float] = None) -> float:
        """The epsilon this rank's messages have spent so far at ``delta`` (default
        ``target_delta``); ``inf`` without noise or clipping."""
        if self.clip_norm is None:
            return math.inf if self.ledger.steps else 0.0
        return self.ledger.epsilon(self.target_delta if delta is None else delta)

    def _check_budget(self) -> None:
        """Refuse a message beyond the calibrated budget: counts *released messages* (every
        message the rank sent, whatever happened to its step afterwards)."""
        if self.planned_steps is not None and self.ledger.steps >= self.planned_steps:
            raise RuntimeError(
                f"commcomp: the privacy budget (epsilon={self.target_epsilon}, "
                f"delta={self.target_delta}) was calibrated for {self.planned_steps} released "
                f"messages and {self.ledger.steps} have been sent; another would overspend it. "
                "Stop training, or create a new state with a larger steps/target_epsilon.")


def sketch_dp_hook(state: SketchDPState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` in this file: DDP checks these annotations)
    """DDP communication hook: average the bucket as clipped, noised, sketched gradients.

    With ``clip_scope="model"`` the buckets wait for the last one (one norm over the model),
    then all are released in one all-reduce on the executor thread.
    """
    if state.level == "record":
        raise RuntimeError(_RECORD_NOT_A_HOOK)
    state.require_registered(bucket)
    buf = bucket.buffer()
    x = buf.detach().to(torch.float32, copy=True)
    index, step, last = bucket.index(), state.step, bucket.is_last()
    if index == 0:
        state._check_budget()
    if last:
        state.step += 1
    if state.clip_scope == "bucket":
        return state.submit(lambda: _finish(state, [(index, x, buf, None)], step, last), buf)
    state._pending.append((index, x, buf, new_future(buf) if not last else None))
    if not last:
        return state._pending[-1][3]
    parts, state._pending = state._pending, []
    return state.submit(lambda: _finish(state, parts, step), buf)


def _finish(state: SketchDPState, parts: list, step: int, last: bool = True) -> torch.Tensor:
    """Release ``parts`` (on the executor thread), complete their futures, return the
    last bucket's result. On failure every future gets the error and the step is undone."""
    try:
        avgs = state.release([(index, x) for index, x, _, _ in parts], step, last=last)
    except BaseException as exc:
        state.step = step
        state._coin = (-1, True)  # a retried step tosses a fresh coin (the ledger counted this one)
        for *_, fut in parts:
            if fut is not None:
                fut.set_exception(exc)
        raise
    for (_, _, buf, fut), avg in zip(parts, avgs):
        buf.copy_(avg)
        if fut is not None:
            fut.set_result(buf)
    return parts[-1][2]
