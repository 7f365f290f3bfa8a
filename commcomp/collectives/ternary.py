"""Collectives for ternary payloads that share per-segment scales (TernGrad's scalar sharing).

Every rank holds its flat tensor ``x`` and the *same* scales (one per segment, agreed with a
MAX all-reduce beforehand). Each collective encodes ``x`` stochastically with the rank's own
``seed`` and returns a :class:`Launched` whose future yields the float32 **average over
ranks** of the decoded payloads. It is identical on every rank (replicas stay in sync) and an
unbiased estimate of ``mean_r clip(x_r, -s, s)``.

* :func:`int8_allreduce`: codes as int8 through any all-reduce (int32 past 127 ranks, since
  sums of W codes need ceil(log2(2W + 1)) bits); 4x fewer bytes than fp32.
* :func:`allgather_packed`: 2-bit payloads all-gathered, summed by one ``unpack_accumulate``;
  16x smaller messages, but each rank receives W - 1 of them: best for small W.
* :func:`two_phase`: all-to-all of packed chunks (reduce-scatter shape), an integer sum of
  the owned chunk, then an all-gather of that sum re-encoded compactly: re-ternarized with the
  shared scales (``requantize=True``: 2 bits, adds variance) or as int8 sums (exact, equal to
  the other two). Bytes per rank stay about constant as W grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from commcomp import ops
from commcomp.utils.metrics import ring_allreduce_bytes

from .executor import Deferred, all_gather, all_reduce, all_to_all

INT8_MAX_WORLD = 127  # |sum of W ternary codes| <= W fits int8 up to here


@dataclass
class Encoding:
    """How a rank encodes its tensor: shared scales per segment and its own random stream."""

    scales: torch.Tensor  # float32 [S], identical on every rank
    lengths: List[int]  # segment lengths, summing to x.numel()
    seed: int  # this rank's stream (independent across ranks and steps)
    offset: int = 0


@dataclass
class Launched:
    future: Deferred  # float32 average over ranks, same on every rank
    bytes_sent: int  # by this rank, for the payload collective(s)
    own: Optional[torch.Tensor] = None  # this rank's decoded payload (for error feedback)


def _decode_sums(sums: torch.Tensor, enc: Encoding, world: int) -> torch.Tensor:
    """Average of W payloads from the integer sum of their codes: sum * s / W, segment by
    segment in place on one float32 copy (no per-element expansion of the scales; the same
    float32 arithmetic per element as ``sum * s_expanded / W``)."""
    out = sums.to(torch.float32, copy=True)
    lengths = [out.numel()] if enc.lengths is None else [int(n) for n in enc.lengths]
    for part, scale in zip(torch.split(out, lengths), enc.scales.reshape(-1)):
        part.mul_(scale).div_(world)
    return out


def int8_allreduce(x, enc: Encoding, group=None, want_own: bool = False) -> Launched:
    world = dist.get_world_size(group)
    codes = ops.ternarize_int8(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = _decode_sums(codes, enc, 1) if want_own else None
    wire = codes if world <= INT8_MAX_WORLD else codes.to(torch.int32)
    fut = all_reduce(wire, group=group).then(lambda f: _decode_sums(f.value(), enc, world))
    return Launched(fut, ring_allreduce_bytes(wire.numel() * wire.element_size(), world), own)


def _rows(scales: torch.Tensor, world: int) -> torch.Tensor:
    return scales.reshape(1, -1).expand(world, -1).contiguous()


def allgather_packed(x, enc: Encoding, group=None, want_own: bool = False) -> Launched:
    world, n = dist.get_world_size(group), x.numel()
    packed = ops.ternarize_pack(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = ops.unpack(packed, n, enc.scales, segments=enc.lengths, validate=False) if want_own else None

    def decode(f: Deferred) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float32, device=x.device)
        ops.unpack_accumulate(f.value(), _rows(enc.scales, world), total, segments=enc.lengths,
                              validate=False)
        return total / world

    fut = all_gather(packed, group).then(decode)
    return Launched(fut, (world - 1) * packed.numel(), own)


def slice_segments(lengths: Sequence[int], start: int, end: int) -> Tuple[List[int], List[int]]:
    """The segments met by elements [start, end): their clipped lengths and their indices."""
    out_len, out_idx, pos = [], [], 0
    for k, length in enumerate(lengths):
        a, b = max(pos, start), min(pos + length, end)
        if a < b:
            out_len.append(b - a)
            out_idx.append(k)
        pos += length
    return out_len, out_idx


def two_phase(x, enc: Encoding, group=None, want_own: bool = False, requantize: bool = True,
              seed2: int = 0) -> Launched:
    """Reduce-scatter shaped exchange of 2-bit chunks, then an all-gather of the chunk sums.

    Rank r owns elements [4 r c, 4 (r + 1) c) with c = ceil(ceil(n / 4) / W) bytes. With
    ``requantize``, r re-ternarizes its chunk's average with stream ``seed2`` (its own).
    """
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), x.numel()
    nbytes = (n + 3) // 4
    chunk = max(1, math.ceil(nbytes / world))
    packed = ops.ternarize_pack(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = ops.unpack(packed, n, enc.scales, segments=enc.lengths, validate=False) if want_own else None
    send = torch.zeros(world * chunk, dtype=torch.uint8, device=x.device)
    send[:nbytes] = packed
    e0, e1 = min(4 * chunk * rank, n), min(4 * chunk * (rank + 1), n)
    seg_len, seg_idx = slice_segments(enc.lengths, e0, e1)
    if not requantize and world > INT8_MAX_WORLD:
        raise ValueError(f"two_phase(requantize=False) sends int8 sums: world size {world} > {INT8_MAX_WORLD}")

    def reduce_chunk(f: Deferred) -> Deferred:
        recv, m = f.value(), e1 - e0  # recv[w] = rank w's bytes of my chunk
        sums = torch.zeros(m, dtype=torch.float32, device=x.device)
        if m > 0:  # integer sums of the codes: exact in float32
            ones = torch.ones(world, len(seg_len), device=x.device)
            ops.unpack_accumulate(recv[:, : (m + 3) // 4].contiguous(), ones, sums,
                                  segments=seg_len, validate=False)
        if requantize:
            out = torch.zeros(chunk, dtype=torch.uint8, device=x.device)
            if m > 0:
                sub = Encoding(enc.scales[seg_idx], seg_len, seed2, enc.offset + e0)
                avg = _decode_sums(sums, sub, world)  # |avg| <= s: no clipping, unbiased
                out[: (m + 3) // 4] = ops.ternarize_pack(avg, sub.scales, seed2, sub.offset,
                                                         segments=seg_len, validate=False)
            return all_gather(out, group).then(
                lambda g: ops.unpack(g.value().reshape(-1)[:nbytes], n, enc.scales,
                                     segments=enc.lengths, validate=False))
        out = torch.zeros(4 * chunk, dtype=torch.int8, device=x.device)
        out[:m] = sums.to(torch.int8)
        return all_gather(out, group).then(
            lambda g: _decode_sums(g.value().reshape(-1)[:n], enc, world))

    fut = all_to_all(send.view(world, chunk), group).then(reduce_chunk)
    phase2 = chunk if requantize else 4 * chunk
    return Launched(fut, (world - 1) * chunk + (world - 1) * phase2, own)


COLLECTIVES = {"int8": int8_allreduce, "allgather": allgather_packed, "two_phase": two_phase}
