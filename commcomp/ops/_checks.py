"""Argument checks for the public op wrappers: one place, same errors for every backend.

Structural checks (types, dtypes, shapes, devices) are free and always run. Value checks
(NaN/Inf, scale <= 0 with non-zero data) need a device-to-host read, so the wrappers run
them only with ``validate=True``; hooks that check values another way turn them off.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import torch

from commcomp.utils import validate

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
    return validate.integer(v, name, low=low, high=high)


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


_FLOAT32_MAX = torch.finfo(torch.float32).max


def scales(scale, rows: int, nseg: int, device: torch.device, name: str = "scale"):
    """A float32 tensor of rows * nseg scales on `device`, from a number, a list or a tensor.
    A 2-D tensor must be [rows, nseg]; otherwise only the count must match."""
    numbers_given = None
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        numbers_given = [float(scale)] * (rows * nseg)
    elif isinstance(scale, (list, tuple)) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scale
    ):
        numbers_given = [float(v) for v in scale]
    if numbers_given is not None:
        big = [v for v in numbers_given if abs(v) > _FLOAT32_MAX and v == v and abs(v) != float("inf")]
        if big:
            raise ValueError(f"commcomp: {name} = {big[0]} does not fit in float32 (max {_FLOAT32_MAX:.4g})")
        scale = torch.tensor(numbers_given, dtype=torch.float32, device=device)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(
            f"commcomp: {name} must be a float, a list of floats or a tensor, got "
            f"{type(scale).__name__}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"commcomp: {name} must be a floating-point tensor, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(
            f"commcomp: {name} is on {scale.device} but the data is on {device}; "
            f"pass {name}.to({str(device)!r})"
        )
    if scale.dim() == 2 and tuple(scale.shape) != (rows, nseg):
        raise ValueError(
            f"commcomp: {name} has shape {tuple(scale.shape)} but [payloads, segments] = "
            f"[{rows}, {nseg}] is needed"
        )
    if scale.numel() != rows * nseg:
        raise ValueError(
            f"commcomp: {name} has {scale.numel()} element(s) but {rows * nseg} are needed "
            f"({rows} payload(s) x {nseg} segment(s))"
        )
    return scale.detach().reshape(-1).to(torch.float32).contiguous()


def scale_flags(s: torch.Tensor) -> torch.Tensor:
    """Per scale: True where it is not finite or negative."""
    return (~torch.isfinite(s)) | (s < 0)


def data_flags(absmax: torch.Tensor, s: torch.Tensor):
    """Per segment: non-finite data, and non-zero data under a zero scale."""
    return ~torch.isfinite(absmax), (absmax > 0) & (s == 0)


def raise_on_values(s: torch.Tensor, absmax: Optional[torch.Tensor] = None, name: str = "scale",
                    data: str = "x") -> None:
    """Check scales (finite, >= 0) and, given the data's per-segment max |x|, that the data is
    finite and no non-zero segment has a zero scale. One host read for all of it."""
    flags = [scale_flags(s)]
    if absmax is not None:
        flags.extend(data_flags(absmax, s))
    if not bool(torch.stack([f.any() for f in flags]).any()):  # the one sync
        return
    bad_scale = flags[0].nonzero().flatten().tolist()[:5]
    if bad_scale:
        raise ValueError(
            f"commcomp: {name} must be finite and >= 0; got {s[bad_scale].tolist()} at index "
            f"{bad_scale}. A scale is the largest |value| a payload can represent "
            "(e.g. segment_stats(x)[0])."
        )
    nonfinite, lost = (f.nonzero().flatten().tolist()[:5] for f in flags[1:])
    if nonfinite:
        raise ValueError(
            f"commcomp: {data} contains NaN or Inf (segment(s) {nonfinite}); refusing to encode "
            "it, since the result would silently be wrong. Check for overflow upstream."
        )
    raise ValueError(
        f"commcomp: scale is 0 for segment(s) {lost} whose data is non-zero, so that data "
        "would be lost; use a scale >= max |x| of each segment (segment_stats(x)[0])."
    )


_TWO31 = 2**31
_MAX_BLOCK = 2**24


# The sketch ops: the messages match csrc/checks.h word for word.
def sketch_size(s, name: str = "sketch_size") -> int:
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
        raise TypeError(f"commcomp: {name} must be an int, got {type(s).__name__}")
    if not 1 <= int(s) < _TWO31:
        raise ValueError(
            f"commcomp: {name} = {s} is out of range; allowed 1 <= sketch_size < 2^31; pass a "
            "positive sketch size below 2^31"
        )
    return int(s)


def sketch_numel(numel) -> int:
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral):
        raise TypeError(f"commcomp: numel must be an int, got {type(numel).__name__}")
    if numel < 0:
        raise ValueError(f"commcomp: numel must be >= 0, got {numel}")
    return int(numel)


def srht_shape(numel: int, s: int, block) -> int:
    """Check block and the padded length n = ceil(numel / block) * block; return n."""
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):
        raise TypeError(f"commcomp: block must be an int, got {type(block).__name__}")
    if not (1 <= block <= _MAX_BLOCK and block & (block - 1) == 0):
        raise ValueError(
            f"commcomp: block = {block} is not allowed; allowed a power of two in [1, 2^24]; "
            "pass e.g. commcomp.ops.default_block(numel)"
        )
    nblocks = -(-numel // block)
    if nblocks > (_TWO31 - 1) // block:
        raise ValueError(
            f"commcomp: numel = {numel} padded to whole blocks of {block} is {nblocks} blocks, "
            "but the padded length must be < 2^31; sketch a smaller tensor (split it)"
        )
    n = nblocks * block
    if n != 0 and s > n:
        raise ValueError(
            f"commcomp: sketch_size = {s} exceeds the padded length n = {n} (numel {numel}, "
            f"block {block}); allowed 1 <= sketch_size <= n; pass a smaller sketch_size"
        )
    return n


# Structural checks of raw torch.ops.commcomp calls, for the reference backend (the native
# kernels run the same checks in C++, csrc/checks.h).
def _raw_ternarize(x, scales_, segs, seed, offset):
    float_tensor(x, "x")
    nseg = len(segments(segs, x.numel()) or [0])
    scales(scales_, 1, nseg, x.device, "scales")
    integer(seed, "seed")
    integer(offset, "offset")


def _raw_unpack(packed, numel, scales_, segs, dtype):
    packed_tensor(packed)
    integer(numel, "numel")
    if packed.numel() != (numel + 3) // 4:
        raise ValueError(f"commcomp: packed has {packed.numel()} bytes but numel={numel} needs {(numel + 3) // 4}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"commcomp: dtype must be float32, float16 or bfloat16, got {dtype}")
    scales(scales_, 1, len(segments(segs, numel) or [0]), packed.device, "scales")


def _raw_unpack_accumulate(packed, scales_, segs, out):
    packed_tensor(packed)
    float_tensor(out, "out")
    if packed.dim() != 2 or packed.shape[1] != (out.numel() + 3) // 4:
        raise ValueError(
            f"commcomp: packed must be [world, {(out.numel() + 3) // 4}], got {tuple(packed.shape)}"
        )
    scales(scales_, packed.shape[0], len(segments(segs, out.numel()) or [0]), out.device, "scales")


def base3_nbytes(n: int) -> int:
    return (n + 4) // 5


def _raw_unpack_base3(packed, numel, scales_, segs, dtype):
    packed_tensor(packed)
    integer(numel, "numel")
    if packed.numel() != base3_nbytes(numel):
        raise ValueError(f"commcomp: packed has {packed.numel()} bytes but numel={numel} needs "
                         f"{base3_nbytes(numel)} (ceil(numel / 5))")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"commcomp: dtype must be float32, float16 or bfloat16, got {dtype}")
    scales(scales_, 1, len(segments(segs, numel) or [0]), packed.device, "scales")


def state_tensors(v, named) -> None:
    """The flat float32 state of a mixing op: contiguous, as many elements as ``v``, same device."""
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"commcomp: {name} must be a float32 tensor, got {got}")
        if not t.is_contiguous():
            raise ValueError(f"commcomp: {name} must be contiguous; pass {name}.contiguous()")
        if t.numel() != v.numel() or t.device != v.device:
            raise ValueError(f"commcomp: {name} has {t.numel()} elements on {t.device} but v has "
                             f"{v.numel()} on {v.device}; the mixing state must match v")


def _raw_mix_stats(v, hat, segs):
    state_tensors(v, [("v", v), ("hat", hat)])
    segments(segs, v.numel())


def _raw_mix_encode(v, hat, acc, scales_, hat_scales, acc_scales, segs, seed, offset, base3):
    state_tensors(v, [("v", v), ("hat", hat), ("acc", acc)])
    nseg = len(segments(segs, v.numel()) or [0])
    for name, t in (("scales", scales_), ("hat_scales", hat_scales), ("acc_scales", acc_scales)):
        scales(t, 1, nseg, v.device, name)
    integer(seed, "seed")
    integer(offset, "offset")


def _raw_mix_decode(v, hat, acc, packed, scales_, segs, gamma, base3):
    state_tensors(v, [("v", v), ("hat", hat), ("acc", acc)])
    n = v.numel()
    nbytes = base3_nbytes(n) if base3 else (n + 3) // 4
    for k, p in enumerate(packed):
        packed_tensor(p, f"packed[{k}]")
        if p.numel() != nbytes or p.device != v.device:
            raise ValueError(f"commcomp: packed[{k}] has {p.numel()} bytes on {p.device}; {n} elements "
                             f"need {nbytes} on {v.device}")
    scales(scales_, len(packed), len(segments(segs, n) or [0]), v.device, "scales")


def _raw_track_prep(y, g, g_prev):
    state_tensors(y, [("y", y), ("g", g), ("g_prev", g_prev)])


def _raw_segment_stats(x, segs):
    float_tensor(x, "x")
    segments(segs, x.numel())


def _raw_countsketch(x, s, seed):
    float_tensor(x, "x")
    sketch_size(s)
    integer(seed, "seed")


def _raw_countsketch_transpose(y, numel, seed):
    float_tensor(y, "y")
    sketch_size(y.numel(), "y.numel()")
    sketch_numel(numel)
    integer(seed, "seed")


def _raw_srht(x, s, block, seed):
    _raw_countsketch(x, s, seed)
    srht_shape(x.numel(), s, block)


def _raw_srht_transpose(y, numel, block, seed):
    _raw_countsketch_transpose(y, numel, seed)
    srht_shape(numel, y.numel(), block)


RAW_CHECKS = {
    "ternarize_pack": _raw_ternarize,
    "ternarize_int8": _raw_ternarize,
    "unpack": _raw_unpack,
    "unpack_accumulate": _raw_unpack_accumulate,
    "segment_stats": _raw_segment_stats,
    "ternarize_base3": _raw_ternarize,
    "unpack_base3": _raw_unpack_base3,
    "mix_stats": _raw_mix_stats,
    "mix_encode": _raw_mix_encode,
    "mix_decode": _raw_mix_decode,
    "track_prep": _raw_track_prep,
    "countsketch": _raw_countsketch,
    "countsketch_transpose": _raw_countsketch_transpose,
    "srht": _raw_srht,
    "srht_transpose": _raw_srht_transpose,
}
