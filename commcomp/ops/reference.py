"""Pure-PyTorch twins of every native ``commcomp`` kernel.

Each function has the signature of its operator (see :mod:`commcomp.ops._schemas`) and
produces the **same bytes** as the C++ and CUDA kernels: the rules live in ``csrc/ternary.h``
and are restated here in tensor form. They serve as the specification in tests and as the
backend when the extension is not built. They favour clarity over speed.

Random numbers come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011), counter-based: element ``i`` of a call uses counter ``(offset + i) >> 2``
and word ``(offset + i) & 3`` under key ``seed``. So any slice of a tensor, ternarized with its
starting index as ``offset``, draws exactly the numbers the whole tensor would have drawn.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW_MINUS_24 = 2.0**-24


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for uint32 values held in int64, without overflow."""
    p_lo = b * (a & 0xFFFF)  # < 2**48
    p_hi = b * (a >> 16)  # < 2**48; a * b = p_hi * 2**16 + p_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counters`` (as counter ``(lo32, hi32, 0, 0)``), key ``seed``.

    Returns an int64 tensor of shape ``counters.shape + (4,)`` holding the four uint32 words.
    """
    c0 = counters & _MASK32
    c1 = counters >> 32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def random_words(n: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The uint32 random word (as int64) of each of ``n`` elements starting at ``offset``."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first, last = offset >> 2, (offset + n - 1) >> 2
    ctr = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10(ctr, seed).reshape(-1)
    start = offset - 4 * first
    return words[start : start + n]


def segment_lengths(segments: Optional[Sequence[int]], n: int) -> list:
    return [n] if segments is None else [int(s) for s in segments]


def per_element(values: torch.Tensor, segments: Optional[Sequence[int]], n: int) -> torch.Tensor:
    """Expand one value per segment to one value per element."""
    lengths = torch.tensor(segment_lengths(segments, n), dtype=torch.int64, device=values.device)
    return torch.repeat_interleave(values.reshape(-1), lengths, output_size=n)


def ternary_codes(x, scales, segments, seed, offset) -> torch.Tensor:
    """int8 codes in {-1, 0, +1}: sign(x) with probability min(|x|, s) / s, else 0."""
    n = x.numel()
    xf = x.reshape(-1).float()
    s = per_element(scales.float(), segments, n)
    u = (random_words(n, seed, offset, x.device) >> 8).float() * _TWO_POW_MINUS_24
    a = torch.minimum(xf.abs(), s)  # NaN propagates and then never compares true
    nonzero = (u * s) < a
    sign = torch.where(xf > 0, 1, -1)
    return torch.where(nonzero, sign, 0).to(torch.int8)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes four to a byte: 0 -> 0b00, +1 -> 0b01, -1 -> 0b10, element k of a
    byte in bits 2k..2k+1, trailing fields zero."""
    n = codes.numel()
    enc = (codes > 0).to(torch.uint8) | ((codes < 0).to(torch.uint8) << 1)
    enc = torch.nn.functional.pad(enc, (0, (-n) % 4)).reshape(-1, 4)
    return enc[:, 0] | (enc[:, 1] << 2) | (enc[:, 2] << 4) | (enc[:, 3] << 6)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (0b11 decodes to 0); returns int8 codes."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    fields = (packed.reshape(-1, 1) >> shifts) & 3
    codes = (fields & 1).to(torch.int8) - (fields >> 1).to(torch.int8)
    return codes.reshape(-1)[:numel]


def ternarize_pack(x, scales, segments, seed, offset) -> torch.Tensor:
    return pack_codes(ternary_codes(x, scales, segments, seed, offset))


def ternarize_int8(x, scales, segments, seed, offset) -> torch.Tensor:
    return ternary_codes(x, scales, segments, seed, offset)


def unpack(packed, numel, scales, segments, dtype) -> torch.Tensor:
    s = per_element(scales.float(), segments, numel)
    return (unpack_codes(packed, numel).float() * s).to(dtype)


def unpack_accumulate(packed, scales, segments, out) -> None:
    """out += sum over rows w (in order) of scales[w, segment] * codes_w, summed in fp32."""
    numel, rows = out.numel(), packed.shape[0]
    if numel == 0 or rows == 0:
        return  # like the native kernels: out is not touched
    packed = packed.reshape(rows, (numel + 3) // 4)
    scales = scales.reshape(rows, -1)
    acc = torch.zeros(numel, dtype=torch.float32, device=out.device)
    for w in range(rows):
        s = per_element(scales[w].float(), segments, numel)
        acc = acc + unpack_codes(packed[w], numel).float() * s
    flat = out.view(-1)
    flat.copy_((flat.float() + acc).to(out.dtype))


def segment_stats(x, segments) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per segment: max |x| (NaN if the segment has one) and population std (0 if empty)."""
    flat = x.reshape(-1).float()
    absmax, std = [], []
    for part in torch.split(flat, segment_lengths(segments, flat.numel())):
        if part.numel() == 0:
            absmax.append(part.new_zeros(()))
            std.append(part.new_zeros(()))
            continue
        absmax.append(part.abs().amax())
        std.append(part.double().std(correction=0).float())
    return torch.stack(absmax), torch.stack(std)
