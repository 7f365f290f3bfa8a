"""Stateless codecs: ``compress(t) -> (payload, ctx)`` and ``decompress(payload, ctx)``.

* :mod:`commcomp.codecs.sketch`: linear sketches (countsketch, SRHT, Gaussian) whose payloads
  can be summed across ranks.
* :mod:`commcomp.codecs.base`: the byte-payload :class:`Compressor` protocol (a uint8 payload
  of a size fixed by the layout :class:`Ctx`, for point-to-point sends and engine adapters),
  :class:`Identity`; :mod:`commcomp.codecs.registry`: :func:`make_compressor` by name.
* :mod:`commcomp.codecs.ternary`: :class:`Ternary` (TernGrad, 2 bits per element).
* :mod:`commcomp.codecs.sparse`: :class:`TopK` and :class:`RandomK` sparsifiers.
"""

from .base import Compressor, Ctx, Identity
from .registry import make_compressor
from .sketch import KINDS, Sketch, SketchCodec, sketch_size
from .sparse import RandomK, TopK
from .ternary import Ternary

__all__ = [
    "KINDS",
    "Sketch",
    "SketchCodec",
    "sketch_size",
    "Compressor",
    "Ctx",
    "Identity",
    "Ternary",
    "TopK",
    "RandomK",
    "make_compressor",
]
