"""Native kernels of commcomp, as ``torch.ops.commcomp.*`` plus checked Python wrappers.

Ternary codec (TernGrad, Wen et al. 2017), bit-exact on every backend:

1. :func:`ternarize_pack` clips each value to ``[-s, s]`` and draws its code, ``sign(x)``
   with probability ``|x| / s`` and ``0`` otherwise, so ``E[s * code] = clip(x, -s, s)``;
   codes are packed four to a byte (16x smaller than fp32).
2. :func:`ternarize_int8` draws the same codes as int8 (for an int8 all-reduce).
3. :func:`unpack` decodes one payload; :func:`unpack_accumulate` decodes the payloads of
   ``W`` ranks, each with its own scale(s), and adds their sum into an existing buffer.
4. :func:`segment_stats` gives the per-segment ``max |x|`` and standard deviation that
   layer-wise scaling and ``c * sigma`` clipping need.

``segments`` (a list of lengths, e.g. ``[p.numel() for p in bucket_params]``) gives one scale
per segment of a flat buffer: TernGrad's layer-wise scalars inside a DDP bucket.
The ops are not differentiable (inputs are detached): they act on gradients.
Randomness is Philox4x32-10 keyed by ``seed``, one counter per 8 elements: element ``i``
(global index ``g = offset + i``) takes a 16-bit draw from counter ``g >> 3``
(:data:`TERNARY_SPEC_VERSION` 2 of the codec's bit-level rules, ``csrc/ternary.h``). The same
``(x, scale, seed, offset)`` gives the same bytes on the reference, the CPU and the CUDA
kernels, and a slice ternarized with ``offset = start`` matches the whole.

Base-3 packing (five codes per byte, 1.6 bits per element; digit ``code + 1`` of weight
``3^j`` for element ``5k + j`` of byte ``k``, the last byte padded with code 0):
:func:`ternarize_base3` draws the codes of :func:`ternarize_pack` and packs them so;
:func:`unpack_base3` decodes them.

Compressed gossip (the CHOCO / CDProxSGT mixing of :mod:`commcomp.decentralized.mixing`) over
flat float32 state, three passes per round: :func:`mix_stats` (per-segment statistics of
``d = v - hat`` from which the contractive scale is formed), :func:`mix_encode` (the codes of
``d``, ``hat += q``, ``acc += W_ii q``, in one pass), :func:`mix_decode` (every neighbour's
codes into ``acc`` and ``v += gamma (acc - hat)``, in one pass); and :func:`track_prep`, the
gradient tracker's ``y += g - g_prev`` behind a finite check.

Sketches (Song et al. 2022, "Sketching for distributed deep learning"): linear maps
``R`` (``s x d``, ``E[R^T R] = I``) drawn from a seed shared by all ranks, never materialized.

5. :func:`countsketch` / :func:`countsketch_transpose`: ``R x`` and ``R^T y`` for CountSketch
   (each input goes to one random bucket with a random sign).
6. :func:`srht` / :func:`srht_transpose`: the block subsampled randomized Hadamard transform
   (random signs, a Walsh-Hadamard transform per block of :func:`default_block` elements,
   ``s`` sampled rows).

Unlike the codec ops they are differentiable (each op's gradient is its twin), so a loss can
backpropagate through a sketch; ``srht`` and ``countsketch_transpose`` give the same bits
on every backend, the two scatter-adds agree up to float summation order.

Example::

    >>> x = torch.randn(10)
    >>> s = commcomp.ops.segment_stats(x)[0]            # max |x|
    >>> payload = commcomp.ops.ternarize_pack(x, s, seed=0)  # 3 bytes
    >>> y = commcomp.ops.unpack(payload, 10, s)          # unbiased estimate of x
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _autograd, _checks, _loader, _meta, reference
from .reference import per_element

__all__ = [
    "TERNARY_SPEC_VERSION",
    "backend",
    "ternarize_pack",
    "ternarize_int8",
    "unpack",
    "unpack_accumulate",
    "segment_stats",
    "ternarize_base3",
    "unpack_base3",
    "mix_stats",
    "mix_encode",
    "mix_decode",
    "track_prep",
    "countsketch",
    "countsketch_transpose",
    "srht",
    "srht_transpose",
    "default_block",
    "per_element",
    "reference",
]

#: Version of the ternary codec's bit-level specification (``csrc/ternary.h``) that every
#: backend follows; the loader refuses a compiled extension of another version.
TERNARY_SPEC_VERSION: int = reference.TERNARY_SPEC_VERSION

_loader.load()
_meta.register()
_autograd.register()


def backend(device="cpu") -> str:
    """``"native"`` if compiled kernels serve tensors on ``device``, ``"reference"`` if none do,
    ``"mixed"`` if a stale compiled extension lacks some ops (their reference twins serve them;
    rebuild it)."""
    dev = torch.device(device)
    kind = _loader.BACKENDS.get(dev.type.upper(), "reference")
    return "mixed" if kind == "native" and _loader.MISSING else kind


def _ternarize(op, x, scale, seed, offset, segments, validate):
    _checks.float_tensor(x, "x")
    n = x.numel()
    segs = _checks.segments(segments, n)
    s = _checks.scales(scale, 1, 1 if segs is None else len(segs), x.device)
    seed = _checks.integer(seed, "seed")
    offset = _checks.integer(offset, "offset", high=2**63 - n)
    x = x.detach()
    if validate:
        _checks.raise_on_values(s, segment_stats(x, segs)[0])
    return op(x.reshape(-1), s, segs, seed, offset)


def ternarize_pack(x: torch.Tensor, scale, seed: int, offset: int = 0, *,
                   segments: Optional[Sequence[int]] = None, validate: bool = True) -> torch.Tensor:
    """Stochastically ternarize ``x`` against ``scale`` and pack 4 codes per byte.

    Args:
        x: contiguous float32/float16/bfloat16 tensor (read as flat).
        scale: a float or a float tensor with one value per segment (``>= 0``); values are
            clipped to ``[-scale, scale]``. Use ``max |x|`` for the unclipped TernGrad codec.
        seed: key of the random stream, ``0 <= seed < 2**63``; give each rank and step its own.
        offset: index of ``x[0]`` in the random stream (a slice at ``offset = start`` draws
            what the whole tensor would).
        segments: lengths of consecutive segments with one scale each (``None``: one).
        validate: check for NaN/Inf and for zero scales over non-zero data (one extra read
            of ``x`` and one host sync; turn off where values are checked another way).

    Returns:
        uint8 tensor of ``ceil(x.numel() / 4)`` bytes.
    """
    return _ternarize(torch.ops.commcomp.ternarize_pack, x, scale, seed, offset, segments, validate)


def ternarize_int8(x: torch.Tensor, scale, seed: int, offset: int = 0, *,
                   segments: Optional[Sequence[int]] = None, validate: bool = True) -> torch.Tensor:
    """The codes of :func:`ternarize_pack` (same randomness) as an int8 tensor of ``x.numel()``."""
    return _ternarize(torch.ops.commcomp.ternarize_int8, x, scale, seed, offset, segments, validate)


def unpack(
    packed: torch.Tensor,
    numel: int,
    scale,
    dtype: torch.dtype = torch.float32,
    *,
    segments: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Decode a payload of :func:`ternarize_pack` into ``scale * code`` of ``dtype``."""
    return _unpack(torch.ops.commcomp.unpack, packed, numel, scale, dtype, segments, validate, 4)


def _unpack(op, packed, numel, scale, dtype, segments, validate, per_byte):
    _checks.packed_tensor(packed)
    numel = _checks.integer(numel, "numel")
    need = (numel + per_byte - 1) // per_byte
    if packed.numel() != need:
        raise ValueError(
            f"commcomp: packed has {packed.numel()} bytes but numel={numel} needs "
            f"{need} (ceil(numel / {per_byte})); pass the numel that was packed"
        )
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"commcomp: dtype must be float32, float16 or bfloat16, got {dtype}")
    segs = _checks.segments(segments, numel)
    s = _checks.scales(scale, 1, 1 if segs is None else len(segs), packed.device)
    if validate:
        _checks.raise_on_values(s)
    return op(packed.reshape(-1), numel, s, segs, dtype)


def unpack_accumulate(
    packed: torch.Tensor,
    scales,
    out: torch.Tensor,
    *,
    segments: Optional[Sequence[int]] = None,
    validate: bool = True,
) -> torch.Tensor:
    """``out += sum_w scales[w] * decode(packed[w])`` in one pass over ``out``.

    Args:
        packed: uint8 ``[W, ceil(n / 4)]``, one payload per rank (1-D means ``W = 1``).
        scales: ``[W]`` (one segment) or ``[W, S]`` float scales of each payload.
        out: contiguous float32/float16/bfloat16 buffer of ``n`` elements, updated in place.
            The sum over ranks is taken in float32, in rank order, then added to ``out``.
        segments: segment lengths shared by all payloads (``None``: one segment).
        validate: check that the scales are finite and ``>= 0`` (one host sync).

    Returns:
        ``out``.
    """
    _checks.packed_tensor(packed)
    _checks.float_tensor(out, "out")
    numel = out.numel()
    rows = packed.reshape(1, -1) if packed.dim() == 1 else packed
    if rows.dim() != 2 or rows.shape[1] != (numel + 3) // 4:
        raise ValueError(
            f"commcomp: packed must be [world, ceil(n / 4)] = [W, {(numel + 3) // 4}] for an "
            f"out of {numel} elements, got shape {tuple(packed.shape)}"
        )
    if packed.device != out.device:
        raise ValueError(
            f"commcomp: packed is on {packed.device} but out is on {out.device}; "
            f"pass packed.to({str(out.device)!r})"
        )
    segs = _checks.segments(segments, numel)
    s = _checks.scales(scales, rows.shape[0], 1 if segs is None else len(segs), out.device, "scales")
    if validate:
        _checks.raise_on_values(s, name="scales")
    torch.ops.commcomp.unpack_accumulate(rows.detach(), s, segs, out)
    return out


def segment_stats(
    x: torch.Tensor, segments: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per segment: ``max |x|`` and the population standard deviation, as float32 ``[S]``.

    A segment holding NaN reports NaN as its max (Inf gives Inf), so non-finite data can be
    detected from the result without another pass. Empty segments report 0 and 0.
    """
    _checks.float_tensor(x, "x")
    segs = _checks.segments(segments, x.numel())
    return torch.ops.commcomp.segment_stats(x.detach().reshape(-1), segs)


def ternarize_base3(x: torch.Tensor, scale, seed: int, offset: int = 0, *,
                    segments: Optional[Sequence[int]] = None, validate: bool = True) -> torch.Tensor:
    """The codes of :func:`ternarize_pack` (same arguments, same draws) packed five to a byte:
    a uint8 tensor of ``ceil(x.numel() / 5)`` bytes (1.6 bits per element)."""
    return _ternarize(torch.ops.commcomp.ternarize_base3, x, scale, seed, offset, segments, validate)


def unpack_base3(packed: torch.Tensor, numel: int, scale, dtype: torch.dtype = torch.float32, *,
                 segments: Optional[Sequence[int]] = None, validate: bool = True) -> torch.Tensor:
    """Decode a payload of :func:`ternarize_base3` into ``scale * code`` of ``dtype``."""
    return _unpack(torch.ops.commcomp.unpack_base3, packed, numel, scale, dtype, segments, validate, 5)


def mix_stats(v: torch.Tensor, hat: torch.Tensor, *, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Per segment of ``d = v - hat`` (flat float32 tensors of one length), over its finite
    entries: ``max |d|``, ``sum |d|``, ``sum d^2`` (summed in float64) and how many entries are
    not finite, as float32 ``[S, 4]``. One read of ``v`` and ``hat``."""
    _checks.state_tensors(v, [("v", v), ("hat", hat)])
    segs = _checks.segments(segments, v.numel())
    return torch.ops.commcomp.mix_stats(v.detach().reshape(-1), hat.reshape(-1), segs)


def mix_encode(v: torch.Tensor, hat: torch.Tensor, acc: torch.Tensor, scales, hat_scales, acc_scales,
               seed: int, offset: int = 0, *, segments: Optional[Sequence[int]] = None,
               base3: bool = False) -> torch.Tensor:
    """One pass of compressed mixing's send side, in place on flat float32 ``v``, ``hat``, ``acc``.

    ``code`` = the ternary codes of ``d = v - hat`` against ``scales`` (those
    :func:`ternarize_int8` draws for ``d`` with this ``seed`` and ``offset``); where ``d`` is
    not finite the code is 0 and ``v`` takes ``hat``'s value (a non-finite model entry falls
    back to the estimate its neighbours hold). Then per segment ``hat += code * hat_scales``
    and ``acc += code * acc_scales`` (``acc_scales = W_ii * hat_scales``, rounded by the
    caller: every product with a code is exact). Returns the codes packed four
    (``base3=False``) or five (``base3=True``) to a byte. Scales are not checked for values.
    """
    _checks.state_tensors(v, [("v", v), ("hat", hat), ("acc", acc)])
    segs = _checks.segments(segments, v.numel())
    nseg = 1 if segs is None else len(segs)
    s, hs, as_ = (_checks.scales(t, 1, nseg, v.device, name) for t, name in
                  ((scales, "scales"), (hat_scales, "hat_scales"), (acc_scales, "acc_scales")))
    seed = _checks.integer(seed, "seed")
    offset = _checks.integer(offset, "offset", high=2**63 - v.numel())
    return torch.ops.commcomp.mix_encode(v.detach().reshape(-1), hat.reshape(-1), acc.reshape(-1), s, hs, as_,
                                         segs, seed, offset, bool(base3))


def mix_decode(v: torch.Tensor, hat: torch.Tensor, acc: torch.Tensor, packed: Sequence[torch.Tensor], scales,
               gamma: float, *, segments: Optional[Sequence[int]] = None, base3: bool = False) -> torch.Tensor:
    """One pass of compressed mixing's receive side, in place: ``acc += sum_w code_w * scales[w]``
    (the neighbours' codes, ``packed[w]``, each with its per-segment ``scales[w]`` already
    multiplied by its weight ``W_ij``; summed in float32 in order, then added), then
    ``v += gamma * (acc - hat)``. Returns ``v``."""
    _checks.state_tensors(v, [("v", v), ("hat", hat), ("acc", acc)])
    segs = _checks.segments(segments, v.numel())
    packed = [p.reshape(-1) for p in packed]
    _checks._raw_mix_decode(v, hat, acc, packed, scales, segs, gamma, base3)
    nseg = 1 if segs is None else len(segs)
    s = _checks.scales(scales, len(packed), nseg, v.device, "scales")
    gamma = float(gamma)
    # [W, S] spelled out: with no payloads (W = 0) a -1 would be ambiguous
    torch.ops.commcomp.mix_decode(v.detach().reshape(-1), hat.reshape(-1), acc.reshape(-1), packed,
                                  s.reshape(len(packed), nseg), segs, gamma, bool(base3))
    return v


def track_prep(y: torch.Tensor, g: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
    """The gradient tracker's first half, in place on flat float32 tensors: if every entry of
    ``g`` is finite, ``y = (y + g) - g_prev`` and ``g_prev = g``; otherwise nothing changes.
    Returns a bool scalar tensor, True when ``g`` was finite (no host sync)."""
    _checks.state_tensors(y, [("y", y), ("g", g), ("g_prev", g_prev)])
    return torch.ops.commcomp.track_prep(y.reshape(-1), g.detach().reshape(-1), g_prev.reshape(-1))


def countsketch(x: torch.Tensor, sketch_size: int, seed: int) -> torch.Tensor:
    """CountSketch ``R x`` (Charikar et al. 2002): ``y[h(j)] += sign(j) * x[j]``.

    Args:
        x: contiguous float32/float16/bfloat16 tensor (read as flat, ``d`` elements).
        sketch_size: ``s``, the number of buckets, ``1 <= s < 2**31``.
        seed: key of the hash, ``0 <= seed < 2**63``; every rank must use the same one.

    Returns:
        float32 ``[s]``. ``countsketch_transpose(y, d, seed)`` is an unbiased estimate of
        ``x`` (each coordinate's variance is about ``(||x||^2 - x_j^2) / s``).
        Differentiable; the gradient is ``countsketch_transpose`` of the output gradient.
        On CUDA the native kernel adds colliding entries with atomics, so two calls can differ
        in the last bits; under ``torch.use_deterministic_algorithms(True)`` CUDA inputs take
        the reference twin instead (sorted, deterministic, slower).

    Example::

        >>> y = commcomp.ops.countsketch(grad, grad.numel() // 100, seed=step)
        >>> est = commcomp.ops.countsketch_transpose(y, grad.numel(), seed=step)
    """
    _checks.float_tensor(x, "x")
    s = _checks.sketch_size(sketch_size)
    seed = _checks.integer(seed, "seed")
    if x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return reference.countsketch(x, s, seed)
    return torch.ops.commcomp.countsketch(x.reshape(-1), s, seed)


def countsketch_transpose(y: torch.Tensor, numel: int, seed: int) -> torch.Tensor:
    """``R^T y`` for the CountSketch of :func:`countsketch`: ``out[j] = sign(j) * y[h(j)]``,
    float32 ``[numel]``; ``y.numel()`` is the sketch size. Bit-exact on every backend."""
    _checks.float_tensor(y, "y")
    _checks.sketch_size(y.numel(), "y.numel()")
    numel = _checks.sketch_numel(numel)
    seed = _checks.integer(seed, "seed")
    return torch.ops.commcomp.countsketch_transpose(y.reshape(-1), numel, seed)


def default_block(numel: int) -> int:
    """The SRHT block used when none is given: the smallest power of two >= ``numel``, at
    most 4096 (a 16 KiB transform that stays in L1 or in a CUDA block's shared memory)."""
    numel = _checks.sketch_numel(numel)
    # A loop rather than int.bit_length(): torch.compile before 2.5 cannot trace bit_length
    # (srht's default block is computed inside compiled steps).
    block = 1
    while block < min(numel, 4096):
        block <<= 1
    return block


def srht(x: torch.Tensor, sketch_size: int, seed: int, block: Optional[int] = None) -> torch.Tensor:
    """Block subsampled randomized Hadamard transform ``R x`` (Ailon & Chazelle 2006).

    1. pad ``x`` with zeros to ``n = ceil(d / block) * block`` and flip random signs;
    2. apply the Walsh-Hadamard transform ``H_block / sqrt(block)`` to each block;
    3. keep ``s`` rows drawn uniformly with replacement (all ``n`` in order when ``s == n``,
       which makes ``R`` orthogonal), scaled by ``sqrt(n / s)``.

    Args:
        x: contiguous float32/float16/bfloat16 tensor (read as flat, ``d`` elements).
        sketch_size: ``s``, ``1 <= s <= n``.
        seed: key of the signs and rows, ``0 <= seed < 2**63``; shared by all ranks.
        block: a power of two in ``[1, 2**24]``; ``None`` means :func:`default_block` ``(d)``.
            Larger blocks mix more coordinates (better for spiky ``x``) but cost
            ``log2(block)`` passes; the default keeps the transform in cache.

    Returns:
        float32 ``[s]``, the same bits on every backend. Differentiable.
    """
    _checks.float_tensor(x, "x")
    s = _checks.sketch_size(sketch_size)
    seed = _checks.integer(seed, "seed")
    block = default_block(x.numel()) if block is None else block
    _checks.srht_shape(x.numel(), s, block)
    return torch.ops.commcomp.srht(x.reshape(-1), s, block, seed)


def srht_transpose(
    y: torch.Tensor, numel: int, seed: int, block: Optional[int] = None
) -> torch.Tensor:
    """``R^T y`` for the SRHT of :func:`srht` with the same ``numel``, ``seed`` and ``block``
    (``None``: :func:`default_block` ``(numel)``); float32 ``[numel]``. Rows sampled twice add
    up, so backends agree up to float summation order; each backend is run-to-run
    deterministic (every rank de-sketching the same sketch gets the same bytes)."""
    _checks.float_tensor(y, "y")
    s = _checks.sketch_size(y.numel(), "y.numel()")
    numel = _checks.sketch_numel(numel)
    seed = _checks.integer(seed, "seed")
    block = default_block(numel) if block is None else block
    _checks.srht_shape(numel, s, block)
    return torch.ops.commcomp.srht_transpose(y.reshape(-1), numel, block, seed)
