"""Ternary codes packed ``m`` to a float32 so that an all-reduce **Sum** of the packed values is
exact: what lets Horovod, whose torch binding all-reduces no int8, carry TernGrad codes.

``n`` ranks each hold codes ``k_j`` in ``{-1, 0, 1}``; a group of ``m`` of them is sent as the
balanced base-``B`` number ``sum_j k_j B^j`` with ``B = 2 n + 1``. Packing is linear over the
integers and each digit of the sum over ranks lies in ``[-n, n]``, so the sum of the packed
values is the packed digit-wise sum, and :func:`unpack_sums` reads the per-element code sums
back. The float32 sum is exact while it stays below ``2^20`` (room for an Average's ``1/n``
and back): ``m`` is the largest with ``B^m <= 2^21`` (:data:`PACK_LIMIT`) -- 9 codes per
float32 for 2 ranks, 6 for 4, 5 for 8, 2 up to 723 ranks (:data:`MAX_TERNARY_RANKS`), 1 past
that (no saving over sending each code as a float32).

Example::

    >>> packed = [pack_codes(k_r, world=4) for k_r in codes_of_each_rank]
    >>> unpack_sums(sum(packed), numel, world=4)      # == sum of the ranks' codes, int64
"""

from __future__ import annotations

import torch

PACK_LIMIT = 1 << 21  # B^m <= 2^21: packed sums stay below 2^20, exact in float32 even after 1/n and back
MAX_TERNARY_RANKS = 723  # the most ranks with 2 codes per float32 ((2 * 723 + 1)^2 <= 2^21)


def codes_per_float(world: int) -> int:
    """How many ternary codes of ``world`` ranks one float32 carries (1 past 723 ranks)."""
    base, m = 2 * world + 1, 0
    while base ** (m + 1) <= PACK_LIMIT:
        m += 1
    return m


def pack_codes(codes: torch.Tensor, world: int) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} -> float32 ``sum_j codes[j] * B^j`` per group of ``m`` codes
    (the last group padded with zeros)."""
    m, base = codes_per_float(world), 2 * world + 1
    c = codes.reshape(-1).to(torch.int64)
    c = torch.cat([c, c.new_zeros((-c.numel()) % m)]).view(-1, m)
    powers = base ** torch.arange(m, dtype=torch.int64, device=c.device)
    return (c * powers).sum(1).to(torch.float32)


def unpack_sums(packed: torch.Tensor, numel: int, world: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes` for a sum of packed values (integer-valued floats):
    the per-element code sums in ``[-world, world]``, int64 ``[numel]``."""
    m, base = codes_per_float(world), 2 * world + 1
    p = packed.reshape(-1).to(torch.float64).round().to(torch.int64)
    digits = torch.empty(p.numel(), m, dtype=torch.int64, device=p.device)
    for j in range(m):  # balanced digits: d = ((p + n) mod B) - n, then p = (p - d) / B exactly
        d = torch.remainder(p + world, base) - world
        digits[:, j] = d
        p = torch.div(p - d, base, rounding_mode="floor")
    return digits.reshape(-1)[:numel]


__all__ = ["MAX_TERNARY_RANKS", "PACK_LIMIT", "codes_per_float", "pack_codes", "unpack_sums"]
