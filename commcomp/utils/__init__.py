"""The bottom layer: argument validation, byte counting and seed mixing, with no commcomp
imports, so that every other package can use them (ops and up)."""

from .metrics import ByteCounter, ring_allreduce_bytes
from .seeds import mix_seed

__all__ = ["ByteCounter", "mix_seed", "ring_allreduce_bytes"]
