"""The sketch-DP mechanism (Song et al. 2022 with the Gaussian mechanism): one release is
clip, noise, sketch, all-reduce, de-sketch (:meth:`SketchDPRelease.release`); and the step
function without DDP (:meth:`SketchDPRelease.reduce_`), with record-level per-sample clipping
(:meth:`SketchDPRelease.clip_per_sample_`). Mixed into :class:`commcomp.hooks.SketchDPState`,
which holds the options, the privacy ledger and the DDP hook (see its module docstring)."""

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from commcomp.codecs import sketch as sketches
from commcomp.core import write_flat_grads_
from commcomp.privacy.mechanisms import clip_coefficient, clip_per_sample_
from commcomp.utils import mix_seed
from commcomp.utils.metrics import FP32, ring_allreduce_bytes


class SketchDPRelease:
    """The release mechanism and step function of :class:`~commcomp.hooks.SketchDPState`
    (they use its options, ``ledger``, ``noise``, ``metrics``, ``step`` and ``_check_budget``)."""

    _clipped: dict  # record level: id(p) -> (grad, version) of the gradients clip_per_sample_ wrote

    # -- one release: clip, noise, sketch, all-reduce, de-sketch
    def _sketch_for(self, numel: int, step: int, index: int) -> sketches.Sketch:
        s = sketches.sketch_size(self.sketch, numel, self.sketch_ratio, self.block)
        return sketches.Sketch(self.sketch, numel, s, mix_seed(self.sketch_seed, step, index), self.block)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def takes_part(self, step: int) -> bool:
        """This rank's private participation coin for ``step`` (client level; one per step,
        shared by its buckets): True with probability ``sample_rate``."""
        if self.level != "client" or self.sample_rate >= 1.0:
            return True
        with self._lock:
            if self._coin[0] != step:
                self._coin = (step, self.noise.bernoulli(self.sample_rate))
            return self._coin[1]

    def encode(self, parts: Sequence[Tuple[int, torch.Tensor]], step: int,
               clip: bool = True) -> Tuple[torch.Tensor, List[sketches.Sketch], torch.Tensor]:
        """The message this rank sends for flat float32 vectors ``[(index, x), ...]`` at
        ``step``: ``(message, sketches, non-finite flag)``. No collective and no accounting:
        :meth:`release` sends it; :mod:`commcomp.privacy.audit` inspects it.

        A rank that does not take part this step, or whose gradient is not finite, sends
        noise alone (a private state keeps the non-finite flag on the rank; only without
        noise does the flag travel, so every rank can raise)."""
        C, sigma = self.clip_norm, self.noise_multiplier
        sks = [self._sketch_for(x.numel(), step, index) for index, x in parts]
        bad = torch.stack([(~torch.isfinite(x)).any() for _, x in parts]).any()
        keep = torch.logical_and(~bad, torch.tensor(self.takes_part(step), device=bad.device))
        xs = [torch.where(keep, x, torch.zeros_like(x)) for _, x in parts]
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
        flag = [] if self.private else [bad.float().reshape(1)]
        msg = torch.cat([y.detach().reshape(-1) for y in ys] + flag)
        return msg, sks, bad

    def release(self, parts: Sequence[Tuple[int, torch.Tensor]], step: int, clip: bool = True,
                last: bool = True) -> List[torch.Tensor]:
        """Privatize and average flat float32 vectors ``[(index, x), ...]``: returns the
        de-sketched averages. ``last``: the step's last release (bucket scope: its buckets
        are one mechanism, accounted when the last is sent). Blocking; runs on the
        executor thread."""
        world = self.world_size
        self._check_budget()
        msg, sks, bad = self.encode(parts, step, clip)
        self._open_parts += len(parts) if self.clip_scope == "bucket" else 1
        if last:  # every message counts, sent before the collective can fail
            self.ledger.record(parts=self._open_parts)
            self._open_parts = 0
        dist.all_reduce(msg, group=self.process_group)
        self.metrics.sent(ring_allreduce_bytes(4 * msg.numel(), world))
        self.metrics.add(sum(ring_allreduce_bytes(4 * x.numel(), world) for _, x in parts), FP32)
        # Only now: a warning turned into an error must not keep this rank from sending.
        if self.private and bool(bad):
            self.nonfinite_steps += 1
            warnings.warn(
                f"commcomp sketch_dp: this rank's gradient had NaN/Inf in bucket(s) "
                f"{[i for i, _ in parts]} at step {step}; it sent noise alone for them (the "
                "non-finite flag stays on this rank, so the others cannot learn it). Lower the "
                "learning rate or use a GradScaler, and check the loss for overflow.",
                RuntimeWarning, stacklevel=2)
        if not self.private:
            flagged = int(msg[-1].item())
            if flagged:
                raise FloatingPointError(
                    f"commcomp sketch_dp: {flagged} of {world} rank(s) had NaN/Inf gradients in "
                    f"bucket(s) {[i for i, _ in parts]} at step {step} (this rank: "
                    f"{'yes' if bool(bad) else 'no'}); no rank applied this step. Lower the "
                    "learning rate or use a GradScaler, and check the loss for overflow.")
        scale = world * (self.sample_rate if self.level == "client" else 1.0)
        out, pos = [], 0
        for sk in sks:
            out.append(sk.transpose(msg[pos:pos + sk.sketch_size]).div_(scale))
            pos += sk.sketch_size
        return out

    # -- the plain step function (record level, or loops without DDP)
    def clip_per_sample_(self, params) -> torch.Tensor:
        """Record level: clip each sample's gradient (Opacus' ``p.grad_sample``) to this
        state's ``clip_norm``, store the sum in ``p.grad`` and mark it as clipped by this state
        (:meth:`reduce_` releases nothing else). Every parameter that requires grad must have
        a per-sample gradient: a plain ``.grad`` would be released with unbounded sensitivity.
        Returns the per-sample norms before clipping."""
        if self.level != "record":
            raise RuntimeError("commcomp sketch_dp: clip_per_sample_ is for level='record'")
        params = [p for p in params if p.requires_grad]
        missing = [i for i, p in enumerate(params) if getattr(p, "grad_sample", None) is None]
        if missing and len(missing) < len(params):
            raise ValueError(
                f"commcomp sketch_dp: parameter(s) {missing} (positions among those that require "
                "grad) have no grad_sample; their plain .grad would be released unclipped. Make "
                "Opacus compute their per-sample gradients (GradSampleModule supports the layer), "
                "or freeze them (requires_grad=False)")
        norms = clip_per_sample_(params, self.clip_norm)
        self._clipped = {id(p): (p.grad, p.grad._version) for p in params}
        return norms

    def _check_clipped(self, params) -> None:
        """Record level: every gradient to release must be the one :meth:`clip_per_sample_`
        wrote, unchanged since."""
        for i, p in enumerate(params):
            mark = self._clipped.get(id(p))
            if mark is None or mark[0] is not p.grad or mark[1] != p.grad._version:
                raise RuntimeError(
                    f"commcomp sketch_dp: level='record' releases only gradients clipped by "
                    f"state.clip_per_sample_ (at clip_norm={self.clip_norm}); parameter {i}'s .grad "
                    f"{'was not clipped by this state' if mark is None else 'changed since it was'}. "
                    "Call state.clip_per_sample_(params) after backward (an empty batch: give "
                    "p.grad_sample = torch.zeros(0, *p.shape)), then state.reduce_(params, ...)")

    def reduce_(self, params, batch_size: Optional[float] = None,
                chunk_numel: int = 1 << 22) -> None:
        """Privatize and average ``p.grad`` of ``params`` across ranks in place, without DDP.

        With ``level="record"``, call it after :meth:`clip_per_sample_` (``p.grad`` = sum of
        clipped per-sample gradients); the noise goes on that sum and the result is divided by
        ``batch_size`` (the expected per-rank batch). With ``level="client"``, ``p.grad`` is
        the rank's gradient and is clipped as a whole.
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            raise ValueError("commcomp: no parameter has a .grad; run backward first")
        if self.level == "record" and batch_size is None:
            raise ValueError("commcomp: level='record' needs batch_size (expected per-rank batch)")
        if self.level == "record":
            self._check_clipped(params)
        self._check_budget()
        grads = [p.grad.detach().reshape(-1).float() for p in params]
        flat = torch.cat(grads)
        parts = list(enumerate(torch.split(flat, chunk_numel)))
        self.check_options(flat.device)
        avg = torch.cat(self.release(parts, self.step, clip=self.level == "client"))
        if batch_size is not None:
            avg /= float(batch_size)
        write_flat_grads_(params, avg)
        self._clipped = {}
        self.step += 1


__all__ = ["SketchDPRelease"]
