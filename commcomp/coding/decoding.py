"""Decoding a gradient code: the vector ``a`` that recovers the full gradient from the
survivors (Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in
Distributed Learning", ICML 2017).

With ``B`` the code's ``n x n`` encoding matrix (row ``i``: worker ``i``'s coefficients) and
``S`` the workers that answered (at least ``n - s``), :func:`decode_vector` finds ``a``, zero
outside ``S``, with ``a^T B = 1^T`` (the paper's ``a^T B_S = 1^T``): then
``sum_{i in S} a_i g~_i = sum_j g_j``, the full gradient. :func:`decoding_residual` measures how
well a given ``a`` does that and how large its terms are (the float rounding decoding
magnifies); :func:`survivor_key` validates a survivor set. The codes themselves are in
:mod:`commcomp.coding.codes`.
"""

from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

RESIDUAL_TOLERANCE = 1e-9  # relative to the size of the terms summed, see decode_vector


def as_int(value, what: str) -> int:
    """``value`` as an int (numpy ints too; not bools or floats), else a ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def _show(ranks, limit: int = 16) -> str:
    ranks = list(ranks)
    return str(ranks) if len(ranks) <= limit else f"{ranks[:limit]} ... ({len(ranks)} ranks)"


def survivor_key(survivors: Iterable[int], n: int, s: int) -> Tuple[int, ...]:
    """Validated, sorted survivor tuple (the cache key)."""
    if isinstance(survivors, torch.Tensor):
        survivors = survivors.flatten().tolist()
    try:
        given = [as_int(r, "each survivor") for r in survivors]
    except TypeError:
        raise ValueError(f"survivors must be an iterable of worker ranks, got {survivors!r}") from None
    key = tuple(sorted(set(given)))
    if len(key) != len(given):
        dups = sorted({r for r in given if given.count(r) > 1})
        raise ValueError(f"survivors must be distinct ranks; {dups} appear more than once in {given}")
    out = [r for r in key if not 0 <= r < n]
    if out:
        raise ValueError(f"survivors must be ranks in 0..{n - 1} (n={n} workers); got out-of-range {out}")
    if len(key) < n - s:
        raise ValueError(
            f"decoding needs at least n-s={n - s} survivors (n={n} workers, s={s} stragglers "
            f"tolerated), got {len(key)}: {_show(key)}; wait for more workers"
        )
    return key


def _exact_cover(B: np.ndarray, survivors: Tuple[int, ...]) -> Optional[np.ndarray]:
    """0/1 decoding when some survivors' rows are all-ones on disjoint supports that cover
    every partition (fractional repetition and identity codes): one survivor per group."""
    rows = B[list(survivors)]
    nonzero = rows != 0
    ones = ((rows == 1) | ~nonzero).all(axis=1)  # rows whose non-zeros are all 1
    if not ones.any():
        return None
    covered = np.zeros(B.shape[0], dtype=bool)
    a = np.zeros(B.shape[0])
    for k in np.flatnonzero(ones):
        if not (covered & nonzero[k]).any():
            covered |= nonzero[k]
            a[survivors[k]] = 1.0
    return a if covered.all() else None


def decoding_residual(B: np.ndarray, a: np.ndarray) -> Tuple[float, float]:
    """``(residual, scale)`` of a decoding vector ``a``: how far ``a^T B`` is from ``1^T``
    (``max_j |(a^T B)_j - 1|``) and how large the decoded sum's terms are next to its result
    (``max(1, max_j sum_i |a_i B[i, j]|)``: the factor by which decoding magnifies rounding)."""
    terms = a[:, None] * B
    return float(np.abs(terms.sum(axis=0) - 1).max()), max(1.0, float(np.abs(terms).sum(axis=0).max()))


def _least_squares(B: np.ndarray, rows: List[int]) -> np.ndarray:
    """Minimum-norm a_S with B_S^T a_S ~= 1, refined once if the residual is above tolerance."""
    n = B.shape[0]
    A = B[rows].T  # n x |S|
    ones = np.ones(n)
    sol = np.linalg.lstsq(A, ones, rcond=None)[0]
    a = np.zeros(n)
    a[rows] = sol
    residual, scale = decoding_residual(B, a)
    if residual > RESIDUAL_TOLERANCE * scale:
        # Iterative refinement: solve again for the float64 residual, which recovers digits
        # lost to an ill-conditioned survivor set.
        a[rows] = sol + np.linalg.lstsq(A, ones - A @ sol, rcond=None)[0]
    return a


def decode_vector(B: torch.Tensor, survivors: Iterable[int], s: Optional[int] = None) -> torch.Tensor:
    """A float64 vector ``a`` of length ``n``, zero outside ``survivors``, with
    ``sum_{i in survivors} a_i B[i, :] = 1^T``.

    1. If some survivors' rows are 0/1 with disjoint supports covering all partitions (as in
       fractional repetition codes: the first survivor of each group), ``a`` is their 0/1
       indicator -- exact, no arithmetic.
    2. Otherwise ``a_S`` is the minimum-norm least-squares solution of ``B_S^T a_S = 1``
       (float64, SVD-based, all survivors used: extra survivors only improve conditioning),
       refined once if its residual is too large.
    3. The residual ``max_j |(a^T B)_j - 1|`` must be at most ``1e-9 * scale``, with
       ``scale = max(1, max_j sum_i |a_i B[i, j]|)`` (the size of the terms summed);
       otherwise ``ValueError`` -- the survivors' rows do not span ``1^T`` for this ``B``.

    Args:
        B: the ``n x n`` code matrix.
        survivors: any iterable of distinct ranks in ``0..n-1``.
        s: stragglers tolerated; at least ``n - s`` survivors are required. ``None`` reads it
           off ``B`` (largest row support minus one).
    """
    B = torch.as_tensor(B, dtype=torch.float64, device="cpu").detach()
    if B.dim() != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"B must be a square n x n matrix, got shape {tuple(B.shape)}")
    n = B.shape[0]
    if s is None:
        s = int((B != 0).sum(dim=1).max()) - 1
    key = survivor_key(survivors, n, s)
    # NumPy for the arithmetic: these arrays are tiny, and torch's intra-op thread pool costs
    # more than the work on a busy host.
    Bn = B.numpy()
    a = _exact_cover(Bn, key)
    if a is None:
        a = _least_squares(Bn, list(key))
    residual, scale = decoding_residual(Bn, a)
    if not residual <= RESIDUAL_TOLERANCE * scale:
        raise ValueError(
            f"survivors {_show(key)} cannot decode this code: the best combination of their rows "
            f"misses 1^T by {residual:.3g} (allowed {RESIDUAL_TOLERANCE:g} * {scale:.3g}); the code "
            "is not an s-straggler gradient code for this set (or is numerically ill-conditioned)"
        )
    return torch.from_numpy(a)


__all__ = ["RESIDUAL_TOLERANCE", "as_int", "decode_vector", "decoding_residual", "survivor_key"]
