"""TernGrad as a byte-payload compressor (Wen et al. 2017, "TernGrad: Ternary Gradients to
Reduce Communication in Distributed Deep Learning").

1. Per segment (a layer of a flat buffer; the whole tensor when ``segments`` is None) take a
   scale ``s = max |x|``, or ``min(max |x|, c * sigma)`` with gradient clipping
   (``clip_factor = c``; the paper uses 2.5).
2. Each element becomes ``s * code`` with ``code = sign(x)`` with probability
   ``min(|x|, s) / s`` and ``0`` otherwise (:func:`commcomp.ops.ternarize_pack`: Philox
   keyed by ``seed``, identical bytes on every backend), packed four codes to a byte.

Payload: ``[S float32 scales][ceil(d / 4) packed codes]`` -- 2 bits per element plus 4 bytes
per segment, 16x smaller than float32 (8x than float16/bfloat16); with ``packing="base3"``,
``ceil(d / 5)`` bytes of codes (1.6 bits per element, 20x smaller than float32).

Without clipping ``E[C(x)] = x`` (unbiased), with variance
``E||C(x) - x||^2 = sum_i (s |x_i| - x_i^2)``, which can exceed ``||x||^2`` (so not
contractive). ``contractive=True`` sends each segment's scale divided by
``tau = s * ||x||_1 / ||x||_2^2 = 1 + omega`` (computed exactly on the sender), which gives
``E||C(x) - x||^2 = (1 - 1/tau) ||x||^2``: a contraction, as compressed gossip (CHOCO,
CDProxSGT) needs; without it the neighbours' estimates can diverge. Same bytes.
With clipping ``E[C(x)] = clip(x, -s, s)``: biased, lower variance.

Example::

    >>> comp = Ternary()
    >>> payload, ctx = comp.compress(flat_grad, seed=step, segments=[p.numel() for p in params])
    >>> payload.numel() == 4 * len(params) + (flat_grad.numel() + 3) // 4
    True
    >>> estimate = comp.decompress(payload, ctx)   # E[estimate] = flat_grad
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from commcomp import ops
from commcomp.utils import validate

from .base import Compressor, Ctx, as_bytes, view_as


PACKINGS = ("2bit", "base3")


def _check_clip(clip_factor) -> Optional[float]:
    if clip_factor is None:
        return None
    ok = isinstance(clip_factor, numbers.Real) and not isinstance(clip_factor, bool)
    if not ok or not math.isfinite(clip_factor) or clip_factor <= 0:
        raise ValueError(
            f"commcomp: clip_factor must be None (scale = max |x|) or a finite number > 0 "
            f"(scale = min(max |x|, clip_factor * std); TernGrad uses 2.5), got {clip_factor!r}"
        )
    return float(clip_factor)


class Ternary(Compressor):
    """TernGrad ternary codes with one float32 scale per segment (see the module docstring).

    Args:
        clip_factor: ``None`` (default, unbiased) or ``c > 0``: clip each segment to
            ``c`` standard deviations. A segment whose std is 0 keeps ``max |x|`` (clipping a
            constant segment to 0 would lose it).
        contractive: scale each segment by ``1 / (1 + omega)`` (see the module docstring):
            biased, but ``E||C(x) - x||^2 <= (1 - delta) ||x||^2``. Not with ``clip_factor``.
        packing: ``"2bit"`` (default: four codes per byte, the native kernels' format) or
            ``"base3"``: five codes per byte as base-3 digits (``3^5 = 243 <= 256``), 1.6 bits
            per element, 20% fewer bytes for the same codes (:func:`commcomp.ops.ternarize_base3`).

    :meth:`compress` raises ``ValueError`` on NaN/Inf input (one host sync per call, for the
    check). Input float32/float16/bfloat16; :meth:`decompress` returns ``ctx.dtype``.
    """

    name = "ternary"

    def __init__(self, clip_factor: Optional[float] = None, contractive: bool = False, packing: str = "2bit"):
        self.clip_factor = _check_clip(clip_factor)
        if packing not in PACKINGS:
            raise ValueError(f"commcomp: packing must be one of {PACKINGS}, got {packing!r}")
        self.packing = packing
        if not isinstance(contractive, bool):
            raise TypeError(f"commcomp: contractive must be True or False, got {contractive!r}")
        if contractive and self.clip_factor is not None:
            raise ValueError("commcomp: Ternary(contractive=True) scales the unclipped codec; "
                             f"clip_factor must be None, got {clip_factor!r}")
        self.contractive = contractive
        self.unbiased = self.clip_factor is None and not contractive

    def options(self) -> dict:
        return {"clip_factor": self.clip_factor, "contractive": self.contractive, "packing": self.packing}

    @staticmethod
    def _nseg(ctx: Ctx) -> int:
        return 1 if ctx.segments is None else len(ctx.segments)

    def payload_nbytes(self, ctx: Ctx) -> int:
        per_byte = 5 if self.packing == "base3" else 4
        return 4 * self._nseg(ctx) + (ctx.numel + per_byte - 1) // per_byte

    def scales(self, x: torch.Tensor, segments=None) -> torch.Tensor:
        """float32 ``[S]`` scales of a contiguous ``x``; raises on NaN/Inf (one host sync)."""
        segs = None if segments is None else list(segments)
        absmax, std = ops.segment_stats(x, segs)
        bad = ~torch.isfinite(absmax)
        if bool(bad.any()):
            where = bad.nonzero().flatten().tolist()[:5]
            raise ValueError(
                f"commcomp: ternary compress got NaN or Inf (segment(s) {where} of "
                f"{absmax.numel()}); refusing to encode it, since the result would silently be "
                "wrong. Check for overflow or a diverging step upstream."
            )
        if self.clip_factor is None:
            return absmax
        return torch.where(std > 0, torch.minimum(absmax, self.clip_factor * std), absmax)

    def compress(self, tensor, *, seed: int = 0, segments=None):
        ctx = self.context(tensor, segments=segments)
        seed = validate.seed(seed)
        x = tensor.detach().contiguous()
        segs = None if ctx.segments is None else list(ctx.segments)
        s = self.scales(x, segs)
        # values were checked above; zero scales only occur over all-zero segments
        if self.packing == "base3":
            packed = ops.ternarize_base3(x, s, seed, segments=segs, validate=False)
        else:
            packed = ops.ternarize_pack(x, s, seed, segments=segs, validate=False)
        if self.contractive:
            s = s / self._tau(x, s, segs)
        return torch.cat([as_bytes(s), packed]), ctx

    @staticmethod
    def _tau(x: torch.Tensor, s: torch.Tensor, segs) -> torch.Tensor:
        """Per segment ``1 + omega = s ||x||_1 / ||x||^2`` (1 for an all-zero segment)."""
        flat = x.reshape(-1)
        parts = [flat] if segs is None else torch.split(flat, list(segs))
        l1 = torch.stack([p.abs().sum(dtype=torch.float32) for p in parts])  # a loop over layers only
        l2 = torch.stack([p.float().square().sum() for p in parts])
        return torch.where(l2 > 0, s * l1 / l2.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(s))

    def decompress(self, payload, ctx):
        flat = self._check_payload(payload, ctx)
        nbytes = 4 * self._nseg(ctx)
        s = view_as(flat[:nbytes], torch.float32)
        segs = None if ctx.segments is None else list(ctx.segments)
        # the scales came from compress (finite, >= 0): skip the host sync of validate
        unpack = ops.unpack_base3 if self.packing == "base3" else ops.unpack
        out = unpack(flat[nbytes:], ctx.numel, s, ctx.dtype, segments=segs, validate=False)
        return out.reshape(ctx.shape)
