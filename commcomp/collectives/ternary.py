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

:func:`reduce_scatter_packed` is two_phase's first half on its own, for FSDP: each rank keeps
the average of its own rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from commcomp import ops
from commcomp.utils.metrics import ring_allreduce_bytes

from .buffers import FRESH, Scratch
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


def _decode_sums(sums: torch.Tensor, enc: Encoding, world: float,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Average of W payloads from the integer sum of their codes: sum * s / W, segment by
    segment (no per-element expansion of the scales; the same float32 arithmetic per element
    as ``sum * s_expanded / W``), into ``out`` (float32) or a new tensor."""
    if out is None:
        out = sums.to(torch.float32, copy=True)
    elif out is not sums:
        out.copy_(sums)  # exact (|sums| <= W); a plain cast is ~5x faster than a mixed-dtype mul
    lengths = [out.numel()] if enc.lengths is None else [int(n) for n in enc.lengths]
    for part, scale in zip(torch.split(out, lengths), enc.scales.reshape(-1)):
        part.mul_(scale).div_(world)
    return out


def _accumulate_into(out: Optional[torch.Tensor], numel: int, device, rows: torch.Tensor, scales: torch.Tensor,
                     lengths, world_div: int) -> torch.Tensor:
    """sum_w scales[w] * codes_w over the packed rows, divided by ``world_div``: written over
    ``out`` (any float dtype) or a new float32 tensor."""
    total = torch.zeros(numel, dtype=torch.float32, device=device) if out is None else out.zero_()
    ops.unpack_accumulate(rows, scales, total, segments=lengths, validate=False)
    return total.div_(world_div) if world_div != 1 else total


def int8_allreduce(x, enc: Encoding, group=None, want_own: bool = False, out: Optional[torch.Tensor] = None,
                   scratch: Scratch = FRESH) -> Launched:
    world = dist.get_world_size(group)
    codes = ops.ternarize_int8(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = _decode_sums(codes, enc, 1) if want_own else None
    wire = codes if world <= INT8_MAX_WORLD else codes.to(torch.int32)
    fut = all_reduce(wire, group=group).then(lambda f: _decode_sums(f.value(), enc, world, out))
    return Launched(fut, ring_allreduce_bytes(wire.numel() * wire.element_size(), world), own)


def _rows(scales: torch.Tensor, world: int) -> torch.Tensor:
    return scales.reshape(1, -1).expand(world, -1).contiguous()


def allgather_packed(x, enc: Encoding, group=None, want_own: bool = False, out: Optional[torch.Tensor] = None,
                     scratch: Scratch = FRESH) -> Launched:
    world, n = dist.get_world_size(group), x.numel()
    packed = ops.ternarize_pack(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = ops.unpack(packed, n, enc.scales, segments=enc.lengths, validate=False) if want_own else None
    gathered = scratch.get("gathered", world * packed.numel(), torch.uint8, x.device)
    fut = all_gather(packed, group, out=gathered).then(
        lambda f: _accumulate_into(out, n, x.device, f.value(), _rows(enc.scales, world), enc.lengths, world))
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
              seed2: int = 0, out: Optional[torch.Tensor] = None, scratch: Scratch = FRESH) -> Launched:
    """Reduce-scatter shaped exchange of 2-bit chunks, then an all-gather of the chunk sums.

    Rank r owns elements [4 r c, 4 (r + 1) c) with c = ceil(ceil(n / 4) / W) bytes. With
    ``requantize``, r re-ternarizes its chunk's average with stream ``seed2`` (its own).
    """
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), x.numel()
    nbytes = (n + 3) // 4
    chunk = max(1, math.ceil(nbytes / world))
    if not requantize and world > INT8_MAX_WORLD:
        raise ValueError(f"two_phase(requantize=False) sends int8 sums: world size {world} > {INT8_MAX_WORLD}")
    packed = ops.ternarize_pack(x, enc.scales, enc.seed, enc.offset, segments=enc.lengths, validate=False)
    own = ops.unpack(packed, n, enc.scales, segments=enc.lengths, validate=False) if want_own else None
    send = scratch.get("send", world * chunk, torch.uint8, x.device)
    send[:nbytes] = packed
    send[nbytes:].zero_()
    e0, e1 = min(4 * chunk * rank, n), min(4 * chunk * (rank + 1), n)
    seg_len, seg_idx = slice_segments(enc.lengths, e0, e1)
    recv = scratch.get("recv", world * chunk, torch.uint8, x.device).view(world, chunk)

    def reduce_chunk(f: Deferred) -> Deferred:
        m = e1 - e0  # f.value()[w] = rank w's bytes of my chunk
        sums = scratch.get("sums", m, torch.float32, x.device)
        if m > 0:  # integer sums of the codes: exact in float32
            mine = f.value() if (m + 3) // 4 == chunk else f.value()[:, : (m + 3) // 4].contiguous()
            _accumulate_into(sums, m, x.device, mine, torch.ones(world, len(seg_len), device=x.device), seg_len, 1)
        if requantize:
            part = scratch.get("part", chunk, torch.uint8, x.device, zero=True)
            if m > 0:
                sub = Encoding(enc.scales[seg_idx], seg_len, seed2, enc.offset + e0)
                avg = _decode_sums(sums, sub, world, out=sums)  # |avg| <= s: no clipping, unbiased
                part[: (m + 3) // 4] = ops.ternarize_pack(avg, sub.scales, seed2, sub.offset,
                                                          segments=seg_len, validate=False)
            gathered = scratch.get("gathered", world * chunk, torch.uint8, x.device)
            return all_gather(part, group, out=gathered).then(lambda g: _unpack_into(g.value(), n, enc, out))
        part = scratch.get("part8", 4 * chunk, torch.int8, x.device, zero=True)
        part[:m] = sums.to(torch.int8)
        gathered = scratch.get("gathered8", 4 * world * chunk, torch.int8, x.device)
        return all_gather(part, group, out=gathered).then(
            lambda g: _decode_sums(g.value().reshape(-1)[:n], enc, world, out))

    fut = all_to_all(send.view(world, chunk), group, out=recv).then(reduce_chunk)
    phase2 = chunk if requantize else 4 * chunk
    return Launched(fut, (world - 1) * chunk + (world - 1) * phase2, own)


def _unpack_into(gathered: torch.Tensor, n: int, enc: Encoding, out: Optional[torch.Tensor]) -> torch.Tensor:
    packed = gathered.reshape(-1)[: (n + 3) // 4]
    if out is None:
        return ops.unpack(packed, n, enc.scales, segments=enc.lengths, validate=False)
    # 0 + s * code: the values of unpack (up to the sign of a zero), written in place
    return _accumulate_into(out, n, out.device, packed.view(1, -1), enc.scales.reshape(1, -1), enc.lengths, 1)


def reduce_scatter_packed(x: torch.Tensor, enc: Encoding, group=None, *, out: torch.Tensor, divide: float,
                          scratch: Scratch = FRESH) -> Launched:
    """Compressed reduce-scatter of ``x`` laid out as W rows of R elements, row r for rank r
    (FSDP's reduce-scatter input), every row cut into the same segments ``enc.lengths`` (summing
    to R) with the shared scales ``enc.scales``: ``[S]`` for every row alike, or ``[W, S]``
    (row-major) with each row's own.

    Each rank ternarizes its whole ``x`` with its own stream (element i drawn at
    ``enc.offset + i``, as one call over ``x`` would), sends row r's 2-bit codes to rank r (one
    all-to-all), sums the integer codes it receives for its own row (exact in float32) and writes
    ``sum_w code_w * s / divide`` into ``out`` (R elements, any float dtype): ``divide = W``
    gives the average, 1 the sum. Sends ``(W - 1) * ceil(R / 4)`` bytes.
    """
    world = dist.get_world_size(group)
    n = x.numel()
    if n % world:
        raise ValueError(f"commcomp: reduce_scatter_packed needs {world} equal rows, got {n} elements")
    rows = n // world
    lengths = [int(k) for k in enc.lengths]
    if sum(lengths) != rows or out.numel() != rows:
        raise ValueError(f"commcomp: segments sum to {sum(lengths)} and out has {out.numel()} elements; "
                         f"each of the {world} rows has {rows}")
    nbytes = (rows + 3) // 4
    scales = enc.scales.reshape(-1)
    if scales.numel() == len(lengths):
        scales = scales.repeat(world)
    if scales.numel() != world * len(lengths):
        raise ValueError(f"commcomp: {scales.numel()} scales for {len(lengths)} segments per row and {world} rows")
    per_row = scales.view(world, -1)
    if rows % 4 == 0:  # rows start on byte boundaries: one call packs every row
        send = ops.ternarize_pack(x, scales, enc.seed, enc.offset, segments=lengths * world,
                                  validate=False).view(world, nbytes)
    else:  # each row on its own bytes, with the draws one call would make
        send = scratch.get("send", world * nbytes, torch.uint8, x.device).view(world, nbytes)
        for r in range(world):
            send[r] = ops.ternarize_pack(x[r * rows:(r + 1) * rows], per_row[r], enc.seed, enc.offset + r * rows,
                                         segments=lengths, validate=False)
    mine = per_row[dist.get_rank(group)]
    recv = scratch.get("recv", world * nbytes, torch.uint8, x.device).view(world, nbytes)
    ones = scratch.get("ones", world * len(lengths), torch.float32, x.device)
    ones.fill_(1.0)

    def decode(f: Deferred) -> torch.Tensor:
        sums = out if out.dtype == torch.float32 else scratch.get("sums", rows, torch.float32, x.device)
        _accumulate_into(sums, rows, x.device, f.value(), ones.view(world, -1), lengths, 1)  # integer sums
        if len(lengths) > 64:  # many blocks: one expanded multiply, not two kernels per block
            counts = torch.tensor(lengths, device=x.device)
            sums.mul_(torch.repeat_interleave(mine, counts, output_size=rows)).div_(divide)
        else:
            _decode_sums(sums, Encoding(mine, lengths, enc.seed), divide, out=sums)
        if sums is not out:
            out.copy_(sums)
        return out

    return Launched(all_to_all(send, group, out=recv).then(decode), (world - 1) * nbytes)


COLLECTIVES = {"int8": int8_allreduce, "allgather": allgather_packed, "two_phase": two_phase}


def pipelined(name: str, x, enc: Encoding, group=None, *, piece_numel: int, want_own: bool = False,
              out: Optional[torch.Tensor] = None, scratch: Scratch = FRESH, **kwargs) -> Launched:
    """Collective ``name`` over pieces of about ``piece_numel`` elements, pipelined: piece k + 1
    is encoded while piece k is on the wire.

    Pieces start at multiples of 4 elements and cut across segments; each keeps its elements'
    global indices (``enc.offset + start``), so its codes are the ones the whole tensor would
    get (int8 and allgather return the same values as one call; two_phase's owners change with
    the pieces). Every rank cuts the same pieces and issues the collectives in one order: each
    piece's first stage while encoding, then the pieces' later stages in piece order, then the
    decodes. ``piece_numel <= 0`` or a tensor no larger runs the collective once.
    """
    fn, n = COLLECTIVES[name], x.numel()
    if piece_numel <= 0 or n <= piece_numel:
        return fn(x, enc, group, want_own=want_own, out=out, scratch=scratch, **kwargs)
    size = max(4, piece_numel - piece_numel % 4)
    lengths = [n] if enc.lengths is None else list(enc.lengths)
    parts = []
    for k, a in enumerate(range(0, n, size)):
        b = min(n, a + size)
        seg_len, seg_idx = slice_segments(lengths, a, b)
        sub = Encoding(enc.scales.reshape(-1)[seg_idx].contiguous(), seg_len, enc.seed, enc.offset + a)
        parts.append(fn(x[a:b], sub, group, want_own=want_own, out=None if out is None else out[a:b],
                        scratch=scratch.child(k), **kwargs))

    def finish():
        for part in parts:  # later stages (two_phase's all-gathers) in piece order
            part.future.progress()
        values = [part.future.wait() for part in parts]
        return out if out is not None else torch.cat(values)

    own = torch.cat([part.own for part in parts]) if want_own else None
    return Launched(Deferred(finish), sum(part.bytes_sent for part in parts), own)
