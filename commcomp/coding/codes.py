"""Gradient codes: tolerate ``s`` stragglers among ``n`` workers without losing any data
(Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
Learning", ICML 2017).

The data of a step is cut into ``n`` partitions; ``g_j`` is the gradient of partition ``j``.
A code is an ``n x n`` matrix ``B``; worker ``i``:

1. holds the ``s + 1`` partitions in the support of row ``i`` (:meth:`GradientCode.partitions`),
2. computes their gradients and sends ONE vector, ``g~_i = sum_j B[i, j] g_j`` -- the same
   size as an uncoded gradient (:mod:`commcomp.coding.data` gets it from one backward pass),
3. the receiver waits for the first ``n - s`` workers ``S`` only, and decodes with a vector
   ``a`` (:meth:`GradientCode.decode`) that is zero outside ``S`` and satisfies
   ``a^T B = 1^T``: ``sum_{i in S} a_i g~_i = sum_j g_j``, the full gradient sum, exactly.

Two constructions from the paper:

* :func:`fractional_repetition_code` -- ``(s + 1) | n``; the workers form ``n / (s + 1)``
  groups of ``s + 1``; everyone in a group holds the group's ``s + 1`` partitions with
  coefficient 1. Decoding adds one survivor per group (coefficients stay 0/1: exact).
* :func:`cyclic_repetition_code` -- any ``0 <= s < n``; worker ``i`` holds partitions
  ``i, i+1, ..., i+s (mod n)`` with real coefficients from a random matrix that every rank
  draws from the same seed (the paper's Algorithm 2). Decoding solves a small least-squares
  system in float64 and checks its residual.

``s = 0`` gives the identity code: no redundancy, no straggler tolerance (the uncoded baseline).

**Precision.** Cyclic codes have real coefficients, and some survivor sets need large decoding
coefficients that cancel: :meth:`GradientCode.amplification` measures it (often 1e2..1e5 for
n in the tens). Decode cyclic codes in float64; fractional repetition codes decode exactly.

Each worker computes ``s + 1`` times the gradients of an uncoded worker; what it saves is the
wait for the slowest ``s`` workers. Codes are deterministic functions of ``(name, n, s,
seed)``; :meth:`GradientCode.to_dict` describes one so ranks can compare and checkpoints can
restore it.

Example::

    >>> code = make_code("cyclic", n=4, s=1, seed=0)
    >>> code.partitions(3)
    [0, 3]
    >>> a = code.decode([0, 2, 3])          # worker 1 straggles
    >>> full = sum(a[i] * coded[i] for i in (0, 2, 3))   # == sum of the 4 partition gradients
"""

from __future__ import annotations

import hashlib
import operator
import threading
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from .decoding import RESIDUAL_TOLERANCE, decode_vector, decoding_residual, survivor_key  # noqa: F401
from .decoding import as_int as _as_int  # the name coding.data imports from here

__all__ = ["GradientCode", "CODES", "cyclic_repetition_code", "fractional_repetition_code",
           "decode_vector", "make_code"]

DECODE_CACHE_SIZE = 4096


def _check_n_s(n, s) -> Tuple[int, int]:
    n, s = _as_int(n, "n (number of workers)"), _as_int(s, "s (stragglers tolerated)")
    if n < 1:
        raise ValueError(f"a gradient code needs n >= 1 workers, got n={n}")
    if not 0 <= s < n:
        raise ValueError(
            f"a gradient code over n={n} workers tolerates s in 0..{n - 1} stragglers "
            f"(each worker holds s+1 <= n partitions), got s={s}"
        )
    return n, s


class GradientCode:
    """An ``n x n`` gradient code tolerating ``s`` stragglers; read-only once built.

    Build one with :func:`make_code`, :func:`cyclic_repetition_code` or
    :func:`fractional_repetition_code`; the constructor takes any ``B`` whose rows each have
    exactly ``s + 1`` non-zeros (a custom code must also have every ``n - s`` rows spanning
    ``1^T``; :meth:`decode` checks that per survivor set).

    Args:
        B: the ``n x n`` coefficient matrix (copied to float64 on the CPU).
        s: stragglers tolerated; every row of ``B`` must have ``s + 1`` non-zeros.
        name: the construction, recorded by :meth:`to_dict` ("custom" for hand-made codes).
        seed: the seed that built ``B`` (recorded only).
        cache_size: how many survivor sets :meth:`decode` remembers (least recently used go
            first). Decoding is a small float64 solve; with up to ``C(n, s)`` possible sets,
            the default 4096 covers most of what a run meets.
    """

    def __init__(self, B: torch.Tensor, s: int, name: str = "custom", seed: int = 0,
                 cache_size: int = DECODE_CACHE_SIZE):
        B = torch.as_tensor(B, dtype=torch.float64, device="cpu").detach().clone()
        if B.dim() != 2 or B.shape[0] != B.shape[1] or B.shape[0] < 1:
            raise ValueError(f"B must be a square n x n matrix with n >= 1, got shape {tuple(B.shape)}")
        n, s = _check_n_s(B.shape[0], s)
        if not bool(torch.isfinite(B).all()):
            raise ValueError("B has non-finite entries")
        nnz = (B != 0).sum(dim=1)
        bad = [i for i in range(n) if int(nnz[i]) != s + 1]
        if bad:
            raise ValueError(
                f"every row of B must have exactly s+1={s + 1} non-zeros (the partitions a worker "
                f"holds); rows {bad[:8]} have {[int(nnz[i]) for i in bad[:8]]}"
            )
        cache_size = _as_int(cache_size, "cache_size")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        support = [torch.nonzero(B[i]).flatten().tolist() for i in range(n)]
        fields = dict(_n=n, _s=s, _name=str(name), _seed=_as_int(seed, "seed"), _B=B, _support=support,
                      _cache=OrderedDict(), _cache_size=cache_size, _lock=threading.Lock())
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError(f"GradientCode is read-only (tried to set {key!r}); build a new code instead")

    # -- description (read-only views of what the constructor stored)
    n = property(operator.attrgetter("_n"), doc="Number of workers, and of data partitions per step.")
    s = property(operator.attrgetter("_s"), doc="Stragglers tolerated: any ``n - s`` workers decode.")
    name = property(operator.attrgetter("_name"), doc="The construction: cyclic, fractional or custom.")
    seed = property(operator.attrgetter("_seed"), doc="The seed that drew ``B`` (recorded only).")
    B = property(operator.attrgetter("_B"),
                 doc="The float64 ``n x n`` encoding matrix (row ``i``: worker ``i``). Do not modify it.")

    def partitions(self, worker: int) -> List[int]:
        """The ``s + 1`` partitions ``worker`` holds, sorted (support of row ``worker``)."""
        return list(self._support[self._check_index(worker, "worker")])

    def weights(self, worker: int) -> torch.Tensor:
        """``worker``'s non-zero coefficients, in the order of :meth:`partitions` (float64)."""
        worker = self._check_index(worker, "worker")
        return self._B[worker, self._support[worker]].clone()

    def holders(self, partition: int) -> List[int]:
        """The workers that hold ``partition``, sorted."""
        partition = self._check_index(partition, "partition")
        return torch.nonzero(self._B[:, partition]).flatten().tolist()

    def digest(self) -> str:
        """A short hash of ``B``'s bytes: equal codes on two ranks have equal digests."""
        return hashlib.sha256(self._B.numpy().tobytes()).hexdigest()[:16]

    def _check_index(self, value, what: str) -> int:
        value = _as_int(value, what)
        if not 0 <= value < self._n:
            raise ValueError(f"{what} must be in 0..{self._n - 1} for a code over n={self._n} workers, got {value}")
        return value

    # -- decoding
    def decode(self, survivors: Iterable[int]) -> torch.Tensor:
        """The decoding vector ``a`` for the workers that answered (see :func:`decode_vector`).

        ``survivors``: any iterable of at least ``n - s`` distinct ranks in ``0..n-1``, in any
        order. Results are cached per survivor set (the same tensor comes back on a hit; do
        not modify it in place).
        """
        key = survivor_key(survivors, self._n, self._s)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        a = decode_vector(self._B, key, s=self._s)
        if self._cache_size:
            with self._lock:
                self._cache[key] = a
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return a

    def amplification(self, survivors: Iterable[int]) -> float:
        """``max_j sum_i |a_i B[i, j]|`` for this survivor set (at least 1): how much larger
        the terms of the decoded sum are than the result. Decoding ``dtype`` gradients loses
        about ``amplification * eps(dtype)`` relative accuracy -- 1 for fractional repetition
        codes, often 1e2..1e5 for random cyclic codes with n in the tens, so decode cyclic
        codes in float64."""
        a = self.decode(survivors).numpy()
        return decoding_residual(self._B.numpy(), a)[1]

    def cache_len(self) -> int:
        """How many survivor sets are cached now."""
        return len(self._cache)

    # -- (de)serialization
    def to_dict(self) -> dict:
        """``{"name", "n", "s", "seed", "digest"}``: enough to rebuild the code with
        :meth:`from_dict` and to check, on another rank or after a restart, that it is the
        same ``B``."""
        return {"name": self._name, "n": self._n, "s": self._s, "seed": self._seed, "digest": self.digest()}

    @classmethod
    def from_dict(cls, description: dict, strict: bool = True) -> "GradientCode":
        """Rebuilds a code from :meth:`to_dict`'s output through :func:`make_code`.

        With ``strict`` (default), a saved ``digest`` must match the rebuilt ``B``; it can
        differ if a different torch version draws the cyclic code's random matrix
        differently, and then this rank would decode with another ``B`` than its peers.
        """
        missing = {"name", "n", "s"} - set(description)
        if missing:
            raise ValueError(f"code description lacks {sorted(missing)}; expected the output of GradientCode.to_dict()")
        code = make_code(description["name"], description["n"], description["s"], seed=description.get("seed", 0))
        saved = description.get("digest")
        if strict and saved is not None and saved != code.digest():
            raise ValueError(
                f"rebuilt code {code!r} has digest {code.digest()} but the description says {saved}: "
                "B was built differently (another torch version?); rebuild it on every rank with the "
                "same software, or pass strict=False to accept the new B"
            )
        return code

    def __repr__(self) -> str:
        return f"GradientCode(name={self._name!r}, n={self._n}, s={self._s}, seed={self._seed})"


def cyclic_repetition_code(n: int, s: int, seed: int = 0) -> GradientCode:
    """Tandon et al.'s cyclic repetition code (their Algorithm 2), for any ``0 <= s < n``.

    1. Draw ``H`` (``s x n``) with i.i.d. N(0, 1) entries from ``torch.Generator`` seeded with
       ``seed`` (every rank draws the same ``H``; the global RNG is untouched), then set its
       last column to minus the sum of the others, so ``H 1 = 0``.
    2. Row ``i`` of ``B`` has support ``{i, i+1, ..., i+s} mod n``; its first coefficient is 1
       and the other ``s`` solve ``H[:, rest] x = -H[:, i]``, so every row of ``B`` lies in the
       null space of ``H`` -- an ``(n - s)``-dimensional space that contains ``1``.
    3. With probability 1 any ``n - s`` rows of ``B`` are independent, hence span that null
       space and ``1^T``: any ``n - s`` survivors decode.

    ``s = 0`` gives the identity. ``seed`` changes only the coefficients, not the supports.
    """
    n, s = _check_n_s(n, s)
    seed = _as_int(seed, "seed")
    if s == 0:
        return GradientCode(torch.eye(n, dtype=torch.float64), 0, name="cyclic", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    H = torch.randn(s, n, generator=gen, dtype=torch.float64)
    H[:, n - 1] = -H[:, : n - 1].sum(dim=1)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        cols = [(i + k) % n for k in range(s + 1)]
        B[i, cols[0]] = 1.0
        B[i, cols[1:]] = torch.linalg.solve(H[:, cols[1:]], -H[:, cols[0]])
    return GradientCode(B, s, name="cyclic", seed=seed)


def fractional_repetition_code(n: int, s: int) -> GradientCode:
    """Tandon et al.'s fractional repetition code; needs ``(s + 1) | n``.

    1. Split the ``n`` workers into ``n / (s + 1)`` groups of ``s + 1`` consecutive ranks, and
       the ``n`` partitions likewise.
    2. Every worker of group ``g`` holds the ``s + 1`` partitions of group ``g``, coefficient 1:
       it sends the plain sum of their gradients.
    3. ``s`` stragglers cannot silence a whole group of ``s + 1``: adding one survivor per group
       gives the full sum (0/1 decoding, exact in any precision).
    """
    n, s = _check_n_s(n, s)
    if n % (s + 1):
        valid = [d - 1 for d in range(1, n + 1) if n % d == 0]
        raise ValueError(
            f"a fractional repetition code needs (s+1) to divide n, got n={n}, s={s}; valid s "
            f"for n={n}: {valid} (or use the cyclic code, valid for any s < n)"
        )
    group = torch.arange(n) // (s + 1)
    B = (group[:, None] == group[None, :]).to(torch.float64)
    return GradientCode(B, s, name="fractional", seed=0)


# name -> builder(n, s, seed); the fractional code is deterministic and ignores the seed.
CODES: Dict[str, Callable[[int, int, int], GradientCode]] = {
    "cyclic": cyclic_repetition_code,
    "fractional": lambda n, s, seed=0: fractional_repetition_code(n, s),
}


def make_code(name: str, n: int, s: int, seed: int = 0) -> GradientCode:
    """The gradient code ``name`` (one of :data:`CODES`: "cyclic", "fractional") over ``n``
    workers tolerating ``s`` stragglers; ``seed`` draws the cyclic code's coefficients."""
    if name not in CODES:
        raise ValueError(f"unknown gradient code {name!r}; choose one of {sorted(CODES)}")
    return CODES[name](n, s, seed)
