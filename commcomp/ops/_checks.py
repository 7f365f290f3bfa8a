"""Argument checks for the public op wrappers: one place, same errors for every backend.

Structural checks (types, dtypes, shapes, devices) are free and always run. Value checks
(NaN/Inf, scale <= 0 with non-zero data) need a device-to-host read, so the wrappers run
them only with ``validate=True``; hooks that check values another way turn them off.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT63 = 2**63


def float_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"commcomp: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"commcomp: {name} must be float32, float16 or bfloat16, got {t.dtype}; "
            f"convert it with {name}.float()"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"commcomp: {name} must be contiguous (got shape {tuple(t.shape)} with strides "
            f"{t.stride()}); pass {name}.contiguous()"
        )
    return t


def packed_tensor(t, name: str = "packed") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"commcomp: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"commcomp: {name} must be uint8 (from ternarize_pack), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"commcomp: {name} must be contiguous; pass {name}.contiguous()")
    return t


def integer(v, name: str, low: int = 0, high: int = _INT63) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"commcomp: {name} must be an int, got {type(v).__name__}")
    if not low <= int(v) < high:
        raise ValueError(f"commcomp: {name} must be in [{low}, {high}), got {v}")
    return int(v)


def segments(segs: Optional[Sequence[int]], n: int) -> Optional[List[int]]:
    """Validate segment lengths (None = one segment) against a tensor of n elements."""
    if segs is None:
        return None
    if isinstance(segs, torch.Tensor) or not isinstance(segs, Sequence):
        raise TypeError(
            "commcomp: segments must be a list of ints (one length per segment), got "
            f"{type(segs).__name__}; e.g. segments=[p.numel() for p in params]"
        )
    out = [integer(s, f"segments[{k}]") for k, s in enumerate(segs)]
    if not out:
        raise ValueError("commcomp: segments is empty; pass None for one segment")
    if sum(out) != n:
        raise ValueError(
            f"commcomp: segments sum to {sum(out)} but the tensor has {n} elements; the "
            "lengths must cover it exactly"
        )
    return out


def scales(scale, rows: int, nseg: int, device: torch.device, name: str = "scale"):
    """A float32 tensor of rows * nseg scales on `device`, from a number or a tensor."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = torch.full((rows * nseg,), float(scale), dtype=torch.float32, device=device)
    elif isinstance(scale, (list, tuple)) and all(isinstance(v, numbers.Real) for v in scale):
        scale = torch.tensor([float(v) for v in scale], dtype=torch.float32, device=device)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(
            f"commcomp: {name} must be a float, a list of floats or a tensor, got "
            f"{type(scale).__name__}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"commcomp: {name} must be a floating-point tensor, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(
            f"commcomp: {name} is on {scale.device} but the data is on {device}; move it there"
        )
    if scale.numel() != rows * nseg:
        raise ValueError(
            f"commcomp: {name} has {scale.numel()} element(s) but {rows * nseg} are needed "
            f"({rows} payload(s) x {nseg} segment(s))"
        )
    return scale.reshape(-1).to(torch.float32).contiguous()


def scale_values(s: torch.Tensor, name: str = "scale") -> None:
    """Scales must be finite and >= 0 (one host read)."""
    bad = (~torch.isfinite(s)) | (s < 0)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()[:5]
        vals = s[idx].tolist()
        raise ValueError(
            f"commcomp: {name} must be finite and >= 0; got {vals} at index {idx}. A scale "
            "is the largest |value| a payload can represent (e.g. segment_stats(x)[0])."
        )


def data_values(absmax: torch.Tensor, s: torch.Tensor, name: str = "x") -> None:
    """x must be finite, and a segment with non-zero data needs a scale > 0 (one host read)."""
    nonfinite = ~torch.isfinite(absmax)
    lost = (absmax > 0) & (s == 0)
    flags = torch.stack((nonfinite.any(), lost.any())).tolist()
    if flags[0]:
        seg = nonfinite.nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"commcomp: {name} contains NaN or Inf (segment(s) {seg}); refusing to encode "
            "it, since the result would silently be wrong. Check for overflow upstream."
        )
    if flags[1]:
        seg = lost.nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"commcomp: scale is 0 for segment(s) {seg} whose data is non-zero, so that data "
            "would be lost; use a scale >= max |x| of each segment (segment_stats(x)[0])."
        )
