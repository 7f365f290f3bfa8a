"""Compressors by name: ``make_compressor("topk:0.01")``."""

from __future__ import annotations

import math

from .base import Compressor, Identity
from .sparse import RandomK, TopK
from .ternary import Ternary

REGISTRY = {"identity": Identity, "ternary": Ternary, "topk": TopK, "randomk": RandomK}
NAMES = ("identity", "none", "ternary", "topk", "randomk")
_ALLOWED = ("allowed: None, 'identity', 'none', 'ternary', 'topk', 'randomk', 'topk:<ratio>', "
            "'randomk:<ratio>' (ratio in (0, 1]) or a Compressor instance")


def make_compressor(spec) -> Compressor:
    """A compressor from a spec: ``None``, ``"identity"`` or ``"none"`` (no compression);
    ``"ternary"``, ``"topk"``, ``"randomk"`` with default options; ``"topk:0.01"`` /
    ``"randomk:0.05"`` with that ratio; a :class:`Compressor` is returned as is."""
    if spec is None or isinstance(spec, Compressor):
        return Identity() if spec is None else spec
    if not isinstance(spec, str):
        raise ValueError(f"commcomp: unknown compressor spec {spec!r} ({type(spec).__name__}); {_ALLOWED}")
    name, sep, arg = spec.strip().lower().partition(":")
    name = "identity" if name == "none" else name
    if name not in REGISTRY or (sep and name not in ("topk", "randomk")):
        raise ValueError(f"commcomp: unknown compressor spec {spec!r}; {_ALLOWED}")
    if not sep:
        return REGISTRY[name]()
    try:
        ratio = float(arg)
    except ValueError:
        raise ValueError(f"commcomp: compressor spec {spec!r} has ratio {arg!r}, not a number; {_ALLOWED}") from None
    if not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"commcomp: compressor spec {spec!r} has ratio {ratio}, outside (0, 1]; {_ALLOWED}")
    return REGISTRY[name](ratio=ratio)


__all__ = ["NAMES", "REGISTRY", "make_compressor"]
