"""Sequential gradient coding: GC, SR-SGC and M-SGC as plain classes.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023.
Training runs jobs (one gradient per job: the paper's g(1), ..., g(J)) in rounds; n workers each
compute some tasks per round and a master collects them. A scheme with delay T finishes job t at
the end of round t + T, so J jobs take J + T rounds.

The names of the paper, as used throughout:

- ``n``: workers; ``s``: stragglers tolerated in every round (GC's model).
- the **(B, W, lambd) bursty model** (the paper's (B, W, lambda)): in every window of ``W``
  consecutive rounds at most ``lambd`` distinct workers straggle, and each of them straggles in
  one burst of at most ``B`` consecutive rounds of that window (``1 <= B < W``, ``lambd <= n``).
- ``T``: the delay, rounds between a job's start and its decoding (0 for GC).
- **load**: the fraction of one job's gradient a worker computes per round, normalized so that
  an uncoded worker's share is 1/n (the paper's normalized load; lower is cheaper).
- ``D1``, ``D2``: M-SGC's two parts of a job's gradient, ``D1`` repeated (uncoded) over ``W - 1``
  minitasks and ``D2`` coded with GC over ``B`` minitasks (see :class:`MSGC`).

- :class:`GC` (Tandon et al. 2017): each round, every worker computes a coded partial gradient of
  the round's job; any n - s results decode it. Load (s + 1) / n, delay 0, tolerates any s
  stragglers per round.
- :class:`SRSGC` (GC + selective repetition): GC with s = ceil(B lambd / (W - 1 + B)). Job t is
  computed in round t; in round t + B, v - s of the v workers whose job-t result is missing (the
  lowest-numbered ones) repeat their job-t task instead of job t + B. Job t decodes at the end of
  round t + B from n - s results of rounds t and t + B. Needs B | W - 1. Load (s + 1) / n, delay B.
- :class:`MSGC` (multiplexed): each job's gradient is split into a part D1 spread over W - 1
  minitasks (one uncoded chunk per worker per minitask) and a part D2 coded in B groups with a
  (n, n - lambd) GC. A worker's round holds W - 1 + B minitasks, minitask m of round r belonging
  to job r - m: the first W - 1 are D1 chunks, the next B are D2 groups, but a worker that still
  misses a D1 chunk of that job repeats D1 instead. Load (see :meth:`MSGC.load`) is far below GC's
  for the same straggler budget; delay W - 2 + B.

Straggler conditions (what a round must satisfy for the master to move on without waiting):
:class:`PerRoundCondition` (at most s stragglers; GC) and :class:`BurstyCondition` (the (B, W, lambd)
bursty model; SR-SGC and M-SGC). Only stragglers of rounds the master did *not* wait out count in
the history (a waited-out round has no stragglers). Each scheme's :meth:`schedule` gives a
:class:`~commcomp.coding.schedules.Schedule` (:mod:`commcomp.coding.schedules`): what each worker
computes in each round, and which job completes when.

Example::

    sch = MSGC(n=256, B=2, W=5, lambd=20)
    plan = sch.schedule()
    for r in range(n_jobs + sch.T):
        jobs, kinds = plan.assign(r)        # (n, W - 1 + B) job index and task kind per slot
        returned = run_round_on_workers(jobs, kinds)
        done = plan.record(r, returned)      # job decoded this round, or None
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from .schedules import (  # noqa: F401 - the task kinds and schedules were importable from here
    CODED,
    D1,
    D2,
    IDLE,
    KIND_NAMES,
    REPEAT,
    DecodingError,
    GCSchedule,
    MSGCSchedule,
    Schedule,
    SRSGCSchedule,
)

__all__ = [
    "PerRoundCondition", "BurstyCondition", "Schedule", "DecodingError",
    "Uncoded", "IgnoreStragglers", "GC", "SRSGC", "MSGC", "SCHEMES", "make_scheme",
]

def _int(name: str, v, lo: int, hi: Optional[int], scheme: str) -> int:
    if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"{scheme}: {name}={v!r} must be an integer")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{scheme}: {name}={v} is out of range; allowed {rng}")
    return v


# ----------------------------------------------------------------------------- conditions
class PerRoundCondition:
    """At most ``s`` stragglers in the round (GC's model)."""

    def __init__(self, s: int):
        self.s = s

    def fits(self, is_straggler: np.ndarray) -> bool:
        """Whether a round whose stragglers are ``is_straggler`` (bool (n,)) has at most ``s``."""
        return int(np.count_nonzero(is_straggler)) <= self.s

    def record(self, is_straggler: np.ndarray) -> None:
        """Nothing to remember: GC's model looks at one round at a time."""


class BurstyCondition:
    """The (B, W, lambd) bursty model, checked round by round against the recorded history.

    A round r with straggler set S fits if (1) the distinct stragglers of rounds r-W+1..r
    (recorded history plus S) number at most ``lambd``, and (2) no worker of S straggled in
    rounds r-W+1..r-B (so a worker straggles in at most one burst of <= B rounds per window).
    """

    def __init__(self, n: int, B: int, W: int, lambd: int):
        self.n, self.B, self.W, self.lambd = n, B, W, lambd
        self._hist = np.zeros((max(W - 1, 1), n), dtype=bool)   # ring of the last W-1 rounds
        self._r = 0

    def _rows(self, back_lo: int, back_hi: int) -> np.ndarray:
        """Recorded rows for rounds r-back_hi .. r-back_lo (clipped at round 0)."""
        ks = [k for k in range(back_lo, back_hi + 1) if 1 <= k <= self._r and k <= self.W - 1]
        if not ks:
            return np.zeros(self.n, dtype=bool)
        return self._hist[[(self._r - k) % len(self._hist) for k in ks]].any(axis=0)

    def fits(self, is_straggler: np.ndarray) -> bool:
        """Whether the next round, with stragglers ``is_straggler`` (bool (n,)), keeps the
        recorded history inside the (B, W, lambd) model (conditions (1) and (2) above)."""
        s = np.asarray(is_straggler, dtype=bool)
        if int(np.count_nonzero(self._rows(1, self.W - 1) | s)) > self.lambd:
            return False
        return not bool((self._rows(self.B, self.W - 1) & s).any())

    def record(self, is_straggler: np.ndarray) -> None:
        """Append the round's stragglers to the history (all False for a round the master
        waited out: its stragglers caught up and do not count)."""
        if self.W > 1:
            self._hist[self._r % len(self._hist)] = np.asarray(is_straggler, dtype=bool)
        self._r += 1


# ----------------------------------------------------------------------------- schemes
class _Scheme:
    """What every scheme has: ``name`` (its key in :data:`SCHEMES`), ``n`` workers, the delay
    ``T`` in rounds, its ``params``, its ``load``, the straggler model it tolerates
    (:meth:`condition`) and its task layout (:meth:`schedule`)."""

    name = ""
    T = 0

    def __init__(self, n: int):
        self.n = _int("n", n, 1, None, self.name)

    @property
    def params(self) -> Dict[str, int]:
        """The scheme's parameters by name (``{"s": ...}`` or ``{"B": ..., "W": ..., "lambd": ...}``)."""
        return {}

    def condition(self):
        """A fresh straggler condition (None: the scheme never skips stragglers)."""
        return None

    def schedule(self) -> Optional[Schedule]:
        """A fresh :class:`Schedule` of who computes what per round (None: no coded tasks to track)."""
        return None

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, {', '.join(f'{k}={v}' for k, v in self.params.items())})"


class Uncoded(_Scheme):
    """No coding: each worker computes 1/n of the gradient; the master waits for all."""
    name = "uncoded"

    @property
    def load(self) -> float:
        """1/n: each worker computes its own partition once."""
        return 1.0 / self.n


class _PerRound(_Scheme):
    """A scheme with one parameter: s stragglers per round (0 <= s < n)."""

    def __init__(self, n: int, s: int):
        super().__init__(n)
        self.s = _int("s", s, 0, self.n - 1, self.name)

    @property
    def params(self):
        """``{"s": s}``."""
        return {"s": self.s}


class IgnoreStragglers(_PerRound):
    """No coding, and the master moves on after the fastest n - s workers (their gradients are
    dropped: the update is biased). Load 1/n, delay 0."""
    name = "ignore"

    @property
    def load(self) -> float:
        """1/n, as uncoded: nothing is computed twice."""
        return 1.0 / self.n


class GC(_PerRound):
    """Gradient coding (Tandon et al. 2017) tolerating any ``s`` stragglers per round
    (0 <= s < n): each worker computes a coded combination of ``s + 1`` partitions of the
    round's job, and any ``n - s`` returns decode it at once. Delay ``T = 0``."""
    name = "gc"

    @property
    def load(self) -> float:
        """(s + 1) / n: each worker computes s + 1 of the n partitions."""
        return (self.s + 1) / self.n

    def condition(self):
        """At most ``s`` stragglers per round (:class:`PerRoundCondition`)."""
        return PerRoundCondition(self.s)

    def schedule(self):
        """One coded task per worker per round, on the round's own job."""
        return GCSchedule(self.n, self.s)


class _BWL(_Scheme):
    """A scheme for the (B, W, lambd) bursty model: 1 <= B < W, 0 <= lambd <= n."""

    def __init__(self, n: int, B: int, W: int, lambd: int):
        super().__init__(n)
        self.B = _int("B", B, 1, None, self.name)
        self.W = _int("W", W, self.B + 1, None, self.name)
        self.lambd = _int("lambd", lambd, 0, self.n, self.name)

    @property
    def params(self):
        """``{"B": ..., "W": ..., "lambd": ...}``."""
        return {"B": self.B, "W": self.W, "lambd": self.lambd}

    def condition(self):
        """The (B, W, lambd) bursty model (:class:`BurstyCondition`)."""
        return BurstyCondition(self.n, self.B, self.W, self.lambd)


class SRSGC(_BWL):
    """Selective-repeat SGC (the paper's SR-SGC) for the (B, W, lambd) bursty model; needs B to
    divide W - 1.

    GC with ``s = ceil(B lambd / (W - 1 + B))`` stragglers per round: job t is computed in
    round t; in round t + B, all but ``s`` of the workers whose job-t result is missing repeat
    their job-t task instead of job t + B, so job t decodes at the end of round t + B from
    ``n - s`` results of rounds t and t + B. Load ``(s + 1) / n`` -- below GC's for the same
    bursty model, which GC covers only with ``s = lambd`` -- at delay ``T = B``.
    """
    name = "srsgc"

    def __init__(self, n: int, B: int, W: int, lambd: int):
        super().__init__(n, B, W, lambd)
        if (self.W - 1) % self.B:
            raise ValueError(f"srsgc: B={self.B} must divide W - 1 = {self.W - 1}; use W = x * B + 1 "
                             f"(e.g. W={self.B + 1} or W={2 * self.B + 1})")
        self.s = math.ceil(self.B * self.lambd / (self.W - 1 + self.B))
        if self.s >= self.n:
            raise ValueError(f"srsgc: s = ceil(B lambd / (W - 1 + B)) = {self.s} must be < n={self.n}; lower lambd")
        self.T = self.B

    @property
    def load(self) -> float:
        """(s + 1) / n with the ``s`` derived from (B, W, lambd)."""
        return (self.s + 1) / self.n

    def schedule(self):
        """One task per worker per round: the round's coded task, or a repeat of job r - B's."""
        return SRSGCSchedule(self.n, self.s, self.B)


class MSGC(_BWL):
    """Multiplexed SGC (the paper's M-SGC, its main scheme) for the (B, W, lambd) bursty model.

    Each job's gradient is split in two parts. ``D1`` is spread over ``W - 1`` minitasks, one
    uncoded chunk per worker per minitask; ``D2`` is cut into ``B`` groups, each coded with an
    ``(n, n - lambd)`` GC (any ``n - lambd`` returns decode a group). A round holds
    ``W - 1 + B`` minitasks per worker, minitask ``m`` of round ``r`` belonging to job ``r - m``:
    the first ``W - 1`` are ``D1`` chunks, the next ``B`` are ``D2`` groups, except that a
    worker that straggled through some of the job's ``D1`` minitasks repeats ``D1`` there
    instead (a burst lasts at most ``B`` rounds, so it catches up); the at most ``lambd`` such
    workers are what the ``D2`` code tolerates. Delay ``T = W - 2 + B``; load (:attr:`load`)
    far below GC's for the same model.
    """
    name = "msgc"

    def __init__(self, n: int, B: int, W: int, lambd: int):
        super().__init__(n, B, W, lambd)
        self.T = self.W - 2 + self.B

    @property
    def load(self) -> float:
        """``(lambd + 1)(W - 1 + B) / (n (B + (W - 1)(lambd + 1)))``, or ``(W - 1 + B) / (n (W - 1))``
        when ``lambd = n`` (every worker may straggle: D2 is empty and all is repetition)."""
        n, B, W, lam = self.n, self.B, self.W, self.lambd
        if lam == n:
            return (W - 1 + B) / (n * (W - 1))
        return (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))

    def schedule(self):
        """``W - 1 + B`` minitasks per worker per round, D1 or D2, adapted to past stragglers."""
        return MSGCSchedule(self.n, self.B, self.W, self.lambd)


# every scheme by its name (what `commcomp stragglers simulate --scheme` and make_scheme take)
SCHEMES = {c.name: c for c in (Uncoded, IgnoreStragglers, GC, SRSGC, MSGC)}


def make_scheme(name: str, n: int, **params) -> _Scheme:
    """A scheme by name (``uncoded``, ``ignore``, ``gc``, ``srsgc``, ``msgc``) with its parameters:
    ``ignore``/``gc``: ``s``; ``srsgc``/``msgc``: ``B``, ``W``, ``lambd``."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; choose one of {sorted(SCHEMES)}")
    need = {"uncoded": set(), "ignore": {"s"}, "gc": {"s"}, "srsgc": {"B", "W", "lambd"},
            "msgc": {"B", "W", "lambd"}}[name]
    given = {k for k, v in params.items() if v is not None}
    if given != need:
        raise ValueError(f"scheme {name!r} takes parameters {sorted(need) or 'none'}; got {sorted(given) or 'none'}"
                         + (f" (missing {sorted(need - given)})" if need - given else ""))
    return SCHEMES[name](n, **{k: params[k] for k in need})
