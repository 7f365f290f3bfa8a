"""Stateless codecs: ``compress(t) -> (payload, ctx)`` and ``decompress(payload, ctx)``.

* :mod:`commcomp.codecs.sketch`: linear sketches (countsketch, SRHT, Gaussian) whose payloads
  can be summed across ranks.
"""

from .sketch import KINDS, Sketch, SketchCodec, sketch_size

__all__ = ["KINDS", "Sketch", "SketchCodec", "sketch_size"]
