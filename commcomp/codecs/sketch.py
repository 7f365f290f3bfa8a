"""Linear sketches ``R`` (s x d, s << d) with ``E[R^T R] = I``: compress a gradient to ``R g``,
recover an unbiased estimate ``R^T R g`` (Song et al. 2022, "Sketching for First Order Method:
Efficient Algorithm for Low-Bandwidth Channel and Vulnerability").

Three kinds, one interface (:class:`Sketch`):

* ``"countsketch"`` (Charikar et al. 2002): input ``j`` goes to bucket ``h(j)`` with sign
  ``sigma(j)``; O(d) to sketch and to de-sketch. Native kernels.
* ``"srht"``: subsampled randomized Hadamard transform ``sqrt(n/s) P H D`` (random signs D,
  block-diagonal normalized Walsh-Hadamard H, s rows P sampled uniformly with replacement;
  with ``s = n`` all rows, an orthogonal map); O(d log block). Native kernels.
* ``"gaussian"``: dense ``R_ij ~ N(0, 1/s)``, materialized, so only for small ``d * s``
  (tests, toy models); drawn from a private ``torch.Generator``, never the global RNG.

``R`` is a function of ``(kind, d, s, seed)`` only: ranks that share the seed share ``R``
without sending it, and ``R`` is linear, so the sum of the ranks' sketches is the sketch of
the sum -- sketches can be all-reduced. The countsketch and SRHT matrices are never stored:
each entry is recomputed from a counter-based Philox stream (``csrc/sketch.h``).

Variance of the de-sketch, per coordinate ``j``, over the shared seed for a fixed ``g``
(exact; :meth:`Sketch.coordinate_variance` evaluates it):

* countsketch: ``Var[(R^T R g)_j] = (||g||^2 - g_j^2) / s``;
* Gaussian: ``(||g||^2 + g_j^2) / s``;
* SRHT, with ``n = ceil(d / block) * block`` the padded length and ``g_B(j)`` the part of ``g``
  in ``j``'s block: ``((n / block) * ||g_B(j)||^2 - g_j^2) / s`` (and 0 when ``s == n``).
  Only the rows sampled inside ``j``'s block see ``j``, about ``s * block / n`` of them, so the
  variance follows the energy of ``j``'s block, times the number of blocks ``n / block``. It is
  the countsketch value ``(||g||^2 - g_j^2) / s ~ ||g||^2 / s`` exactly when ``block >= d``
  (one block), and approximately when every block holds its share ``block / n`` of ``||g||^2``
  (energy spread evenly over the coordinates, ``block`` dividing ``d``). A ``g`` concentrated
  in one block has ``n / block`` times ``||g||^2 / s`` there (16x for ``d = 2^16`` at the
  default block 4096) and exactly 0 elsewhere.

In total ``E||R^T R g - g||^2 = (d - 1) ||g||^2 / s`` for countsketch and for SRHT when
``block`` divides ``d``, and ``(d + 1) ||g||^2 / s`` for Gaussian: the SRHT's blocks move
variance to where the energy is without changing the total (with padding the SRHT's total is
``((n / block) sum_B d_B ||g_B||^2 - ||g||^2) / s``, ``d_B`` the unpadded length of block
``B``). So a sketch ratio ``s/d`` trades bytes for a ``d/s``-fold noisier (but unbiased)
gradient.

Example::

    >>> sk = Sketch("countsketch", numel=g.numel(), sketch_size=g.numel() // 100, seed=7)
    >>> y = sk.sketch(g)          # 1% of the floats
    >>> g_hat = sk.transpose(y)   # unbiased estimate of g
"""

from __future__ import annotations

import math

import torch

from commcomp import ops

from .base import check_ratio as _check_fraction

KINDS = ("countsketch", "srht", "gaussian")
GAUSSIAN_MAX_ENTRIES = 1 << 26  # 256 MiB of fp32: beyond this use countsketch or srht


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_ratio(ratio) -> float:
    return _check_fraction(ratio, "sketch_ratio", "sketch size / gradient size", "0.01 sends 1% of the floats")


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"commcomp: sketch must be one of {KINDS}, got {kind!r}")
    return kind


def sketch_size(kind: str, numel: int, ratio: float, block: int | None = None) -> int:
    """The sketch size for a ``numel``-element tensor at ``ratio``: ``ceil(ratio * numel)``
    (at least 1). For SRHT at ratio 1 it is the padded length (all rows: orthogonal)."""
    check_kind(kind)
    ratio = check_ratio(ratio)
    if kind == "srht":
        blk = ops.default_block(numel) if block is None else block
        padded = -(-max(numel, 1) // blk) * blk
        return padded if ratio == 1.0 else min(padded, max(1, math.ceil(ratio * numel)))
    return max(1, math.ceil(ratio * numel))


class Sketch:
    """The sketch ``R`` (``sketch_size x numel``) of one kind under one seed.

    Args:
        kind: ``"countsketch"``, ``"srht"`` or ``"gaussian"``.
        numel: input length ``d``.
        sketch_size: output length ``s`` (see :func:`sketch_size`).
        seed: the shared seed (``0 <= seed < 2**63``); same seed, same ``R`` on every rank.
        block: SRHT block length (a power of two; default ``commcomp.ops.default_block``).
    """

    def __init__(self, kind: str, numel: int, sketch_size: int, seed: int, block: int | None = None):
        self.kind = check_kind(kind)
        self.numel, self.sketch_size, self.seed = int(numel), int(sketch_size), int(seed)
        if self.sketch_size < 1:
            raise ValueError(f"commcomp: sketch_size must be >= 1, got {sketch_size}")
        self.block = (ops.default_block(self.numel) if block is None else int(block)) if kind == "srht" else None
        self._dense = {}
        if kind == "gaussian" and self.numel * self.sketch_size > GAUSSIAN_MAX_ENTRIES:
            raise ValueError(
                f"commcomp: a dense Gaussian sketch of {self.sketch_size} x {self.numel} has "
                f"{self.numel * self.sketch_size} entries (limit {GAUSSIAN_MAX_ENTRIES}); use "
                "sketch='countsketch' or 'srht', which are never materialized"
            )

    def matrix(self, device=None) -> torch.Tensor:
        """The dense ``R`` (Gaussian only; the others are never materialized)."""
        if self.kind != "gaussian":
            raise ValueError(f"commcomp: the {self.kind} sketch is never materialized")
        dev = torch.device(device or "cpu")
        if dev not in self._dense:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)  # private, not global
            r = torch.randn(self.sketch_size, self.numel, generator=gen) / math.sqrt(self.sketch_size)
            self._dense[dev] = r.to(dev)
        return self._dense[dev]

    def _check(self, t: torch.Tensor, n: int, what: str) -> torch.Tensor:
        if t.numel() != n:
            raise ValueError(f"commcomp: {what} has {t.numel()} elements but this sketch expects {n}")
        return t.reshape(-1)

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` as float32 ``[sketch_size]`` (differentiable)."""
        x = self._check(x, self.numel, "the input")
        if self.kind == "countsketch":
            return ops.countsketch(x.contiguous(), self.sketch_size, self.seed)
        if self.kind == "srht":
            return ops.srht(x.contiguous(), self.sketch_size, self.seed, block=self.block)
        return self.matrix(x.device) @ x.float()

    def coordinate_variance(self, g: torch.Tensor) -> torch.Tensor:
        """The exact ``Var[(R^T R g)_j]`` over seeds for a fixed ``g``, float64 ``[numel]``.

        ``R^T R g - g`` is a sum of uncorrelated zero-mean terms, whose variances add up:

        * countsketch: ``(||g||^2 - g_j^2) / s``: every other ``g_i`` joins ``j``'s bucket with
          probability ``1/s``, with a random sign;
        * gaussian: ``(||g||^2 + g_j^2) / s``: row ``k`` adds ``R_kj (R_k . g)``, of mean
          ``g_j / s`` and second moment ``(||g||^2 + 2 g_j^2) / s^2``;
        * srht (rows drawn with replacement; ``n`` the padded length, ``B(j)`` j's block):
          ``((n / block) ||g_B(j)||^2 - g_j^2) / s``, and 0 when ``s == n`` (all rows).
          Given the signs ``D``, the estimate is the mean of ``s`` i.i.d. terms
          ``n D_j H_rj (H D g)_r`` with ``r`` uniform in ``[0, n)``; ``H_rj = +-1/sqrt(block)``
          in ``j``'s block and 0 outside it, so a term has mean ``g_j`` and second moment
          ``(n / block) ||(H D g)_B(j)||^2 = (n / block) ||g_B(j)||^2`` (``H`` is orthogonal),
          whatever ``D`` is.

        Exact up to float32 rounding in the kernels and the ``n / 2^64`` bias of the index draws.
        """
        g = self._check(g, self.numel, "g").detach().double()
        sq = g * g
        total = sq.sum()
        s = self.sketch_size
        if self.kind == "countsketch":
            return (total - sq) / s
        if self.kind == "gaussian":
            return (total + sq) / s
        block = self.block
        n = -(-self.numel // block) * block
        if s == n or self.numel == 0:
            return torch.zeros_like(sq)  # all rows in order: R is orthogonal, R^T R g = g
        energy = torch.nn.functional.pad(sq, (0, n - self.numel)).view(-1, block).sum(1)
        per_coord = energy.repeat_interleave(block)[: self.numel]
        return ((n / block) * per_coord - sq).clamp_min(0) / s

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` as float32 ``[numel]`` (differentiable)."""
        y = self._check(y, self.sketch_size, "the sketch")
        if self.kind == "countsketch":
            return ops.countsketch_transpose(y.contiguous(), self.numel, self.seed)
        if self.kind == "srht":
            return ops.srht_transpose(y.contiguous(), self.numel, self.seed, block=self.block)
        return self.matrix(y.device).t() @ y.float()


class SketchCodec:
    """Stateless compressor (``compress(t) -> (payload, ctx)``, ``decompress(payload, ctx)``)
    around :class:`Sketch`, with a fresh shared seed per call given by the caller.

    Args:
        kind: sketch kind; ratio: ``s / d`` in ``(0, 1]``; block: SRHT block length.
    """

    def __init__(self, kind: str = "countsketch", ratio: float = 0.01, block: int | None = None):
        self.kind, self.ratio, self.block = check_kind(kind), check_ratio(ratio), block

    def make(self, numel: int, seed: int) -> Sketch:
        return Sketch(self.kind, numel, sketch_size(self.kind, numel, self.ratio, self.block), seed, self.block)

    def compress(self, tensor: torch.Tensor, seed: int):
        sk = self.make(tensor.numel(), seed)
        return sk.sketch(tensor.reshape(-1)), (sk, tensor.shape, tensor.dtype)

    def decompress(self, payload: torch.Tensor, ctx) -> torch.Tensor:
        sk, shape, dtype = ctx
        return sk.transpose(payload).to(dtype).reshape(shape)
