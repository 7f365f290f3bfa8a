"""Seeds for independent, reproducible random streams."""

from __future__ import annotations

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer over each part): streams for
    different (seed, rank, step, purpose) are independent, and runs reproduce."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = (z ^ (z >> 31)) + 0x9E3779B97F4A7C15 & _MASK64
    return h & _MASK63
