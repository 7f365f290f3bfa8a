"""Pure-PyTorch twins of every native ``commcomp`` kernel.

Each function has the signature of its operator (see :mod:`commcomp.ops._schemas`) and
produces the **same bytes** as the C++ and CUDA kernels: the rules live in ``csrc/ternary.h``
and are restated here in tensor form. They serve as the specification in tests and as the
backend when the extension is not built. They favour clarity over speed.

Random numbers come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011), counter-based. The ternary codec follows version
:data:`TERNARY_SPEC_VERSION` (2) of ``csrc/ternary.h``: element ``i`` of a call, global index
``g = offset + i``, uses counter ``g >> 3`` under key ``seed``, word ``(g >> 1) & 3`` of it and
the half ``g & 1`` of that word (low half first), a 16-bit draw ``h`` and ``u = h * 2**-16``.
So any slice of a tensor, ternarized with its starting index as ``offset``, draws exactly the
numbers the whole tensor would have drawn.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW_MINUS_16 = 2.0**-16

#: Version of the ternary codec's bit-level specification (``kTernarySpecVersion`` in
#: ``csrc/ternary.h``) that this twin implements; the compiled library must report the same.
#: Version 1 drew a 24-bit uniform from one 32-bit word per element (counter ``g >> 2``).
TERNARY_SPEC_VERSION = 2


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for uint32 values held in int64, without overflow."""
    p_lo = b * (a & 0xFFFF)  # < 2**48
    p_hi = b * (a >> 16)  # < 2**48; a * b = p_hi * 2**16 + p_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(counters: torch.Tensor, seed: int, tag: int = 0) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counters`` (as counter ``(lo32, hi32, tag, 0)``), key ``seed``.

    ``tag`` separates independent streams under one seed (the ternary codec uses 0; the
    sketches use the ``TAG_*`` constants below). Returns an int64 tensor of shape
    ``counters.shape + (4,)`` holding the four uint32 words.
    """
    c0 = counters & _MASK32
    c1 = counters >> 32
    c2 = torch.full_like(counters, tag & _MASK32)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def random_draws16(n: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The 16-bit draw (as int64) of each of ``n`` elements starting at global index
    ``offset``: index ``g`` takes half ``g & 1`` (low half first) of word ``(g >> 1) & 3`` of
    counter ``g >> 3``, i.e. the counters' words in order, split into little-endian halves."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    first, last = offset >> 3, (offset + n - 1) >> 3
    ctr = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10(ctr, seed).reshape(-1)
    draws = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(-1)
    start = offset - 8 * first
    return draws[start : start + n]


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
    u = random_draws16(n, seed, offset, x.device).float() * _TWO_POW_MINUS_16  # exact
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


# ---------------------------------------------------------------------------------------
# Base-3 packing: five ternary codes per byte (3^5 = 243 <= 256), 1.6 bits per element.
# Code c of element 5k + j is the base-3 digit c + 1 of weight 3^j in byte k; the last byte
# is padded with code 0 (digit 1). A byte b >= 243 (never written) decodes as b - 243.

_POW3 = (1, 3, 9, 27, 81)


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} -> uint8, five base-3 digits per byte."""
    n = codes.numel()
    digits = codes.reshape(-1).to(torch.int16) + 1
    pad = (-n) % 5
    if pad:
        digits = torch.cat([digits, digits.new_ones(pad)])
    weights = torch.tensor(_POW3, dtype=torch.int16, device=codes.device)
    return (digits.view(-1, 5) * weights).sum(1).to(torch.uint8)


def unpack_base3_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: ``numel`` int8 codes."""
    b = packed.reshape(-1).to(torch.int16) % 243
    digits = torch.stack([(b // p) % 3 for p in _POW3], dim=1).reshape(-1)[:numel]
    return (digits - 1).to(torch.int8)


def ternarize_base3(x, scales, segments, seed, offset) -> torch.Tensor:
    """The codes of :func:`ternarize_pack` (same draws), packed five to a byte."""
    return pack_base3(ternary_codes(x, scales, segments, seed, offset))


def unpack_base3(packed, numel, scales, segments, dtype) -> torch.Tensor:
    s = per_element(scales.float(), segments, numel)
    return (unpack_base3_codes(packed, numel).float() * s).to(dtype)


# ---------------------------------------------------------------------------------------
# Compressed gossip (CHOCO / CDProxSGT mixing, commcomp.decentralized.mixing) in three passes
# over flat float32 state: statistics of d = v - hat, encode (codes of d, hat += q,
# acc += W_ii q), decode (acc += sum_j W_ij q_j, v += gamma (acc - hat)). Every product of a
# code and a scale is exact, so the results do not depend on fused multiply-adds; the one
# product that is not, gamma * (acc - hat), is rounded before it is added.

def _diff(v, hat):
    d = v.float() - hat
    finite = torch.isfinite(d)
    return torch.where(finite, d, torch.zeros_like(d)), finite


def mix_stats(v, hat, segments) -> torch.Tensor:
    """float32 ``[S, 4]`` per segment of ``d = v - hat`` over its finite entries: ``max |d|``,
    ``sum |d|``, ``sum d^2`` (both summed in float64) and the count of non-finite entries."""
    d, finite = _diff(v, hat)
    rows = []
    lengths = segment_lengths(segments, d.numel())
    for part, ok in zip(torch.split(d, lengths), torch.split(finite, lengths)):
        a = part.abs()
        rows.append(torch.stack([
            a.amax() if part.numel() else a.new_zeros(()),
            a.double().sum().float(),
            part.double().square().sum().float(),
            (~ok).sum().float(),
        ]))
    if not rows:
        return d.new_zeros((0, 4))
    return torch.stack(rows)


def mix_encode(v, hat, acc, scales, hat_scales, acc_scales, segments, seed, offset, base3) -> torch.Tensor:
    """Codes of ``d = v - hat`` (those of :func:`ternarize_int8` with ``scales``; 0 where ``d``
    is not finite, and there ``v`` takes ``hat``'s value); then ``hat += code * hat_scales``,
    ``acc += code * acc_scales`` (per segment), in place. Returns the packed codes (2-bit or
    base-3)."""
    n = v.numel()
    d, finite = _diff(v, hat)
    codes = ternary_codes(d, scales, segments, seed, offset)
    vf = v.view(-1)
    vf.copy_(torch.where(finite, vf, hat.to(v.dtype)))
    c = codes.float()
    hat.view(-1).add_(c * per_element(hat_scales.float(), segments, n))
    acc.view(-1).add_(c * per_element(acc_scales.float(), segments, n))
    return pack_base3(codes) if base3 else pack_codes(codes)


def mix_decode(v, hat, acc, packed, scales, segments, gamma, base3) -> None:
    """``acc += sum_w code_w * scales[w]`` (the sum over payloads in float32, in order, then
    added), then ``v += gamma * (acc - hat)`` (rounded as ``v + round(gamma * round(acc - hat))``)."""
    n = v.numel()
    t = torch.zeros(n, dtype=torch.float32, device=v.device)
    if packed:
        scales = scales.reshape(len(packed), -1)  # [W, S], or flat as the native kernels take it
    for w, payload in enumerate(packed):
        codes = unpack_base3_codes(payload, n) if base3 else unpack_codes(payload, n)
        t = t + codes.float() * per_element(scales[w].float(), segments, n)
    a = acc.view(-1)
    a.add_(t)
    m = (a - hat.view(-1)) * torch.tensor(gamma, dtype=torch.float32)
    vf = v.view(-1)
    vf.copy_((vf.float() + m).to(v.dtype))


def track_prep(y, g, g_prev) -> torch.Tensor:
    """The tracker's ``y += g - g_prev`` (as ``(y + g) - g_prev``) and ``g_prev = g`` if every
    ``g`` is finite; otherwise nothing changes. Returns a bool scalar: ``g`` was finite."""
    ok = torch.isfinite(g).all()
    if bool(ok):
        gf = g.view(-1).float()
        y.view(-1).copy_((y.view(-1) + gf) - g_prev.view(-1))
        g_prev.view(-1).copy_(gf)
    return ok


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


# ---------------------------------------------------------------------------------------
# Sketches (Song et al. 2022): linear maps R (s x d) with E[R^T R] = I, never materialized.
# The rules live in csrc/sketch.h; every draw is Philox4x32-10 keyed by the shared seed,
# counter (lo32(j), hi32(j), TAG, 0), so element j's hash does not depend on the tensor's
# length or on the backend.

TAG_COUNTSKETCH = 0x43534B31  # "CSK1": bucket (words 0, 1) and sign (word 2) of input j
TAG_SRHT_SIGN = 0x53524431  # "SRD1": random sign of input j (word 0, bit 0)
TAG_SRHT_ROW = 0x53525231  # "SRR1": sampled row of output k (words 0, 1)


def uniform_index(w0: torch.Tensor, w1: torch.Tensor, n: int) -> torch.Tensor:
    """floor(u * n / 2^64) for u = w1 * 2^32 + w0: an index in [0, n), n < 2^31, unbiased to
    n / 2^64. Computed as (w1 * n + ((w0 * n) >> 32)) >> 32, exact in int64."""
    return (w1 * n + ((w0 * n) >> 32)) >> 32


def countsketch_hash(numel: int, sketch_size: int, seed: int, device=None):
    """(bucket, sign) of each input index: bucket in [0, sketch_size), sign in {+1, -1}."""
    j = torch.arange(numel, dtype=torch.int64, device=device)
    w = philox4x32_10(j, seed, TAG_COUNTSKETCH)
    bucket = uniform_index(w[:, 0], w[:, 1], sketch_size)
    sign = 1.0 - 2.0 * (w[:, 2] & 1).float()
    return bucket, sign


def countsketch(x, sketch_size, seed) -> torch.Tensor:
    """y[h(j)] += sign(j) * x[j], in float32 (Charikar et al. 2002)."""
    flat = x.reshape(-1).float()
    bucket, sign = countsketch_hash(flat.numel(), sketch_size, seed, flat.device)
    y = torch.zeros(sketch_size, dtype=torch.float32, device=flat.device)
    return y.index_add_(0, bucket, flat * sign)


def countsketch_transpose(y, numel, seed) -> torch.Tensor:
    """out[j] = sign(j) * y[h(j)]: R^T y, exact (one product per element)."""
    bucket, sign = countsketch_hash(numel, y.numel(), seed, y.device)
    return y.reshape(-1).float()[bucket] * sign


def srht_padded(numel: int, block: int) -> int:
    """Inputs are zero-padded to whole blocks: n = ceil(numel / block) * block."""
    return -(-numel // block) * block


def srht_scale(numel: int, sketch_size: int, block: int) -> float:
    """sqrt(n / s) / sqrt(block), rounded once to float32 (the same constant everywhere)."""
    n = srht_padded(numel, block)
    return float(torch.tensor((n / sketch_size) ** 0.5 / block**0.5, dtype=torch.float32))


def srht_rows(numel: int, sketch_size: int, block: int, seed: int, device=None) -> torch.Tensor:
    """The sampled rows: all n rows in order when s == n (R orthogonal), else s rows drawn
    uniformly with replacement (so E[P^T P] = s / n * I exactly)."""
    n = srht_padded(numel, block)
    k = torch.arange(sketch_size, dtype=torch.int64, device=device)
    if sketch_size == n:
        return k
    w = philox4x32_10(k, seed, TAG_SRHT_ROW)
    return uniform_index(w[:, 0], w[:, 1], n)


def srht_signs(numel: int, seed: int, device=None) -> torch.Tensor:
    j = torch.arange(numel, dtype=torch.int64, device=device)
    return 1.0 - 2.0 * (philox4x32_10(j, seed, TAG_SRHT_SIGN)[:, 0] & 1).float()


def fwht_(v: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each block of ``v`` (float32, in place),
    stages h = 1, 2, 4, ... in that order: (a, b) -> (a + b, a - b). Any implementation
    that keeps this stage order rounds identically."""
    rows = v.view(-1, block)
    h = 1
    while h < block:
        pairs = rows.view(rows.shape[0], block // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :].clone(), pairs[:, :, 1, :].clone()
        pairs[:, :, 0, :] = a + b
        pairs[:, :, 1, :] = a - b
        h *= 2
    return v


def srht(x, sketch_size, block, seed) -> torch.Tensor:
    """y = sqrt(n/s) * P (blockdiag H_block / sqrt(block)) D pad(x) (Ailon & Chazelle 2006;
    block-diagonal so each transform stays in cache)."""
    flat = x.reshape(-1).float()
    numel = flat.numel()
    if numel == 0:  # nothing to sample from: the sketch of an empty vector is zero
        return torch.zeros(sketch_size, dtype=torch.float32, device=flat.device)
    v = torch.zeros(srht_padded(numel, block), dtype=torch.float32, device=flat.device)
    v[:numel] = flat * srht_signs(numel, seed, flat.device)
    fwht_(v, block)
    rows = srht_rows(numel, sketch_size, block, seed, flat.device)
    return v[rows] * srht_scale(numel, sketch_size, block)


def srht_transpose(y, numel, block, seed) -> torch.Tensor:
    """R^T y: scatter-add the scaled rows (duplicates add in index order), transform, sign."""
    sketch_size = y.numel()
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=y.device)
    rows = srht_rows(numel, sketch_size, block, seed, y.device)
    v = torch.zeros(srht_padded(numel, block), dtype=torch.float32, device=y.device)
    v.index_add_(0, rows, y.reshape(-1).float() * srht_scale(numel, sketch_size, block))
    fwht_(v, block)
    return v[:numel] * srht_signs(numel, seed, y.device)
