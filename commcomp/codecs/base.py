"""Byte-payload compressors: one protocol for point-to-point sends and engine adapters.

A :class:`Compressor` turns a tensor into a **payload** -- a 1-D ``torch.uint8`` tensor of a
size fixed by the tensor's layout -- and back (the protocol of ``horovod/torch/compression.py``,
with bytes on the wire instead of a tensor of another dtype):

1. ``ctx = comp.context(tensor_or_shape, dtype, segments)`` describes the layout (:class:`Ctx`:
   shape, dtype, per-layer segment lengths). The receiver builds the same one locally, so
   the layout never travels.
2. ``payload, ctx = comp.compress(x, seed=s)``; ``comp.payload_nbytes(ctx)`` is its exact
   length, known to both sides before anything is sent (pre-allocate the receive buffer:
   ``torch.empty(comp.payload_nbytes(ctx), dtype=torch.uint8)``).
3. ``y = comp.decompress(payload, ctx)``: everything not in ``ctx`` (scales, values, indices,
   seeds) is inside the payload, so ``decompress`` needs no state shared with the sender
   beyond the compressor's :meth:`~Compressor.options`.

Compressors are stateless; error feedback is a separate component (wrap any compressor).
Two flags describe the estimate ``C(x) = decompress(compress(x))`` for analysis:

* ``unbiased``: ``E[C(x)] = x`` (over the seed).
* ``contractive``: ``E||C(x) - x||^2 <= (1 - delta) ||x||^2`` for some ``delta in (0, 1]``
  (Koloskova, Stich & Jaggi 2019, "Decentralized Stochastic Optimization and Gossip
  Algorithms with Compressed Communication"), what CHOCO-style and compressed
  gradient-tracking methods assume.

The compressors: :class:`Identity` (here), :class:`~commcomp.codecs.ternary.Ternary`,
:class:`~commcomp.codecs.sparse.TopK` and :class:`~commcomp.codecs.sparse.RandomK`;
:func:`make_compressor` builds one from a name.

Example::

    >>> comp = make_compressor("topk:0.01")
    >>> payload, ctx = comp.compress(diff, seed=step)
    >>> req = dist.isend(payload, peer)                     # payload.numel() bytes
    >>> buf = torch.empty(comp.payload_nbytes(ctx), dtype=torch.uint8)
    >>> dist.recv(buf, peer)
    >>> neighbour_diff = comp.decompress(buf, ctx)
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import NamedTuple, Optional, Tuple

import torch

from commcomp.ops import _checks as _ops_checks
from commcomp.utils import validate

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Ctx(NamedTuple):
    """The layout of one tensor: what both sides know without sending it."""

    shape: torch.Size
    dtype: torch.dtype
    segments: Optional[Tuple[int, ...]]  # per-layer lengths of the flattened tensor, or None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _check_segments(segments, numel: int) -> Optional[Tuple[int, ...]]:
    """The kernels' segment check (:func:`commcomp.ops._checks.segments`), as a hashable tuple
    (a string is refused too: it is a Sequence)."""
    if isinstance(segments, str):
        raise TypeError("commcomp: segments must be a list of ints (one length per layer) or None, got str")
    segs = _ops_checks.segments(segments, numel)
    return None if segs is None else tuple(segs)


def check_ratio(ratio, name: str = "ratio", meaning: str = "kept elements / all elements",
                example: str = "ratio=0.01 keeps 1%") -> float:
    """A fraction in (0, 1]; the error names the option, what it means and an example."""
    return validate.fraction(ratio, name, hint=f"{meaning}; e.g. {example}")


def check_k(k) -> Optional[int]:
    return validate.integer(k, "k", low=1, allow_none=True, hint="elements kept, or None to use ratio")


def view_as(payload: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a slice of uint8 bytes as ``dtype`` (copying when it is not aligned, e.g.
    a payload that sits at an odd offset inside a larger receive buffer)."""
    try:
        return payload.view(dtype)
    except RuntimeError:
        return payload.clone().view(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class Compressor(ABC):
    """Base class of the byte-payload compressors (see the module docstring).

    Subclasses set ``name``, ``unbiased``, ``contractive`` and ``dtypes`` (input dtypes
    accepted; ``None`` means any) and implement :meth:`payload_nbytes`, :meth:`compress` and
    :meth:`decompress`.
    """

    name: str = ""
    unbiased: bool = False
    contractive: bool = False
    dtypes: Optional[Tuple[torch.dtype, ...]] = FLOAT_DTYPES

    def context(self, like_or_shape, dtype=None, segments=None) -> Ctx:
        """The :class:`Ctx` of a tensor, or of a shape (an int or a sequence of ints) and a
        dtype (``None``: float32). ``segments`` are per-layer lengths of the flattened
        tensor (only :class:`Ternary` uses them; the others carry them along)."""
        if isinstance(like_or_shape, torch.Tensor):
            shape = like_or_shape.shape
            dtype = like_or_shape.dtype if dtype is None else dtype
        else:
            dims = (like_or_shape,) if isinstance(like_or_shape, numbers.Integral) else like_or_shape
            try:
                shape = torch.Size([int(d) for d in dims])
            except (TypeError, ValueError):
                raise TypeError(
                    "commcomp: context() takes a tensor or a shape (int or sequence of ints), got "
                    f"{like_or_shape!r}"
                ) from None
            if any(d < 0 for d in shape):
                raise ValueError(f"commcomp: shape must have sizes >= 0, got {tuple(shape)}")
            dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"commcomp: dtype must be a torch.dtype, got {dtype!r}")
        self._check_dtype(dtype)
        return Ctx(shape, dtype, _check_segments(segments, math.prod(shape)))

    def _check_dtype(self, dtype: torch.dtype) -> None:
        if self.dtypes is not None and dtype not in self.dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise TypeError(
                f"commcomp: the {self.name} compressor takes {allowed} tensors, got {dtype}; "
                "convert the tensor (e.g. t.float()) or use the identity compressor"
            )

    @abstractmethod
    def payload_nbytes(self, ctx: Ctx) -> int:
        """Exact length in bytes of :meth:`compress`'s payload for this layout."""

    @abstractmethod
    def compress(self, tensor: torch.Tensor, *, seed: int = 0, segments=None) -> Tuple[torch.Tensor, Ctx]:
        """``(payload, ctx)``: payload is 1-D contiguous uint8 on ``tensor.device`` of
        exactly ``payload_nbytes(ctx)`` bytes. ``seed`` (``0 <= seed < 2**63``) keys any
        randomness; give each sender, step and message its own."""

    @abstractmethod
    def decompress(self, payload: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """A new tensor of ``ctx.shape`` and ``ctx.dtype`` on ``payload.device``."""

    def options(self) -> dict:
        """JSON-able hyper-parameters: equal options, equal payload format."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    def _check_payload(self, payload, ctx: Ctx) -> torch.Tensor:
        """The payload as a flat uint8 tensor, or a ValueError saying what was expected."""
        if not isinstance(ctx, Ctx):
            raise TypeError(f"commcomp: ctx must be a Ctx (from compress or context), got {type(ctx).__name__}")
        self._check_dtype(ctx.dtype)
        want = self.payload_nbytes(ctx)
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"commcomp: payload must be a torch.Tensor, got {type(payload).__name__}")
        if payload.dtype != torch.uint8:
            raise ValueError(
                f"commcomp: {self.name} payload must be torch.uint8 ({want} bytes), got dtype "
                f"{payload.dtype}; pass the bytes compress() returned"
            )
        if payload.numel() != want:
            raise ValueError(
                f"commcomp: {self.name} payload has {payload.numel()} bytes but {want} were expected "
                f"for shape {tuple(ctx.shape)}, dtype {ctx.dtype}, segments {ctx.segments} with "
                f"options {self.options()}; sender and receiver must agree on the layout and options"
            )
        return payload.reshape(-1)


class Identity(Compressor):
    """No compression: the payload is the tensor's own bytes (``itemsize`` bytes per element:
    4 for float32, 2 for float16/bfloat16). Exact, so unbiased and contractive (delta = 1).

    Any dtype works. The payload shares memory with a contiguous input (no copy): do not
    modify the tensor until the send completes. :meth:`decompress` returns a copy.
    """

    name = "identity"
    unbiased = True
    contractive = True
    dtypes = None

    def payload_nbytes(self, ctx: Ctx) -> int:
        return ctx.numel * ctx.dtype.itemsize

    def compress(self, tensor, *, seed: int = 0, segments=None):
        ctx = self.context(tensor, segments=segments)
        return as_bytes(tensor.detach()), ctx

    def decompress(self, payload, ctx):
        flat = self._check_payload(payload, ctx)
        return flat.clone().view(ctx.dtype).reshape(ctx.shape)
