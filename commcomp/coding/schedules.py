"""Who computes what in each round of a sequential gradient code, and when each job decodes.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023
(the schemes, their parameters and loads are :mod:`commcomp.coding.sequential`). A
:class:`Schedule` is the master's bookkeeping of one scheme over ``n`` workers: before round
``r`` it assigns each worker its tasks (``slots`` per round; the paper's minitasks for M-SGC),
after it records who returned, and at the end of round ``r`` it says whether job ``r - T`` (the
delay ``T``) can be decoded from everything returned so far:

- GC (Tandon et al. 2017): one coded task of job ``r`` per worker; any ``n - s`` decode it.
- SR-SGC: as GC, plus in round ``r`` a selective repetition of job ``r - B``'s missing coded
  tasks (all but ``s`` of them); job ``t`` decodes from ``n - s`` results of rounds ``t`` and
  ``t + B``.
- M-SGC: ``W - 1 + B`` minitasks per worker per round, minitask ``m`` of round ``r`` on job
  ``r - m``: ``W - 1`` uncoded ``D1`` chunks, then ``B`` GC-coded ``D2`` groups, with a worker
  that missed a ``D1`` chunk repeating ``D1`` in their place; a job decodes when every worker
  returned all its ``D1`` chunks and each ``D2`` group has ``n - lambd`` results.
"""

from __future__ import annotations

import abc
from typing import Optional, Tuple

import numpy as np

# Task kinds in the ``kinds`` array of Schedule.assign: what a worker's slot of a round computes.
#   IDLE    nothing (before the first job, or a slot whose job does not exist yet);
#   CODED   the worker's GC-coded partial gradient of the slot's job (GC, SR-SGC);
#   REPEAT  SR-SGC's selective repetition: the coded task of job r - B the worker failed to return;
#   D1      an uncoded chunk of the job's D1 part (M-SGC), repeated until the worker returns it;
#   D2      one of the job's B GC-coded groups of its D2 part (M-SGC).
IDLE, CODED, REPEAT, D1, D2 = 0, 1, 2, 3, 4
KIND_NAMES = {IDLE: "idle", CODED: "coded", REPEAT: "repeat", D1: "d1", D2: "d2"}  # kind -> name, for printing


class DecodingError(RuntimeError):
    """A job due this round cannot be decoded from what the workers returned."""


class Schedule(abc.ABC):
    """Per-round bookkeeping of one scheme: ``assign(r)`` says what each worker computes in round
    r as ``(jobs, kinds)`` arrays of shape (n, slots); ``record(r, returned)`` stores which workers
    returned (bool (n,)) and returns the job decoded at the end of round r (or None), raising
    :class:`DecodingError` if that job cannot be decoded. Call them in round order.

    ``slots`` is the number of tasks (the paper's minitasks) a worker computes per round: 1 for
    GC and SR-SGC, ``W - 1 + B`` for M-SGC. ``T`` is the scheme's delay: job ``r - T`` is due at
    the end of round ``r``. ``jobs``, ``kinds`` and ``got`` keep every round's assignment and
    returns (they grow as rounds go by).
    """

    def __init__(self, n: int, slots: int, T: int, rounds: int = 64):
        self.n, self.slots, self.T = n, slots, T
        self.jobs = np.full((rounds, n, slots), -1, dtype=np.int64)
        self.kinds = np.zeros((rounds, n, slots), dtype=np.int8)
        self.got = np.zeros((rounds, n), dtype=bool)
        self._next = 0
        self._avoid: set = set()

    def _grow(self, r: int) -> None:
        if r >= self.jobs.shape[0]:
            extra = max(r + 1, 2 * self.jobs.shape[0]) - self.jobs.shape[0]
            self.jobs = np.concatenate([self.jobs, np.full((extra, self.n, self.slots), -1, np.int64)])
            self.kinds = np.concatenate([self.kinds, np.zeros((extra, self.n, self.slots), np.int8)])
            self.got = np.concatenate([self.got, np.zeros((extra, self.n), bool)])

    def assign(self, r: int, avoid=()) -> Tuple[np.ndarray, np.ndarray]:
        """What each worker computes in round ``r``: ``(jobs, kinds)``, both (n, slots); slot ``m``
        of worker ``i`` works on job ``jobs[i, m]`` (-1: none) as task kind ``kinds[i, m]``
        (:data:`IDLE`, :data:`CODED`, :data:`REPEAT`, :data:`D1`, :data:`D2`). The plan of round
        ``r`` depends on which workers returned in earlier rounds, so record those first.
        ``avoid``: workers known not to answer this round (dead, or frozen); where a scheme
        chooses among workers (SR-SGC's repeaters) it chooses them last."""
        if r != self._next:
            raise ValueError(f"rounds must be assigned in order: expected round {self._next}, got {r}")
        self._grow(r)
        self._avoid = set(int(w) for w in avoid)
        self._plan(r)
        return self.jobs[r], self.kinds[r]

    def record(self, r: int, returned: np.ndarray) -> Optional[int]:
        """Store which workers returned their round-``r`` tasks (bool (n,)); return the job due
        at the end of round ``r`` (``r - T``; None while ``r < T``), or raise
        :class:`DecodingError` when the returns so far cannot decode it."""
        if r != self._next:
            raise ValueError(f"record round {self._next} next (after assign), got {r}")
        self.got[r] = np.asarray(returned, dtype=bool)
        self._next += 1
        job = r - self.T
        if job < 0:
            return None
        if not self._decodable(job):
            raise DecodingError(f"{type(self).__name__}: job {job} cannot be decoded at round {r}; "
                                "the straggler pattern broke the scheme's model")
        return job

    def skip(self, r: int) -> Optional[int]:
        """Record round ``r`` as not run (nobody assigned, nobody returned); returns the job due,
        as :meth:`record` does (SR-SGC's tail rounds, :meth:`Master.skip
        <commcomp.coding.master.Master.skip>`)."""
        if r != self._next:
            raise ValueError(f"skip round {self._next} next, got {r}")
        self._grow(r)
        return self.record(r, np.zeros(self.n, dtype=bool))

    def decodable_early(self, job: int) -> bool:
        """Whether ``job`` already decodes from the rounds recorded so far (before its due round)."""
        if job < 0:
            return False
        self._grow(job + self.T)
        return self._decodable(job)

    @abc.abstractmethod
    def _plan(self, r: int) -> None:
        """Fill in what each worker computes in round r (each scheme's own layout)."""

    @abc.abstractmethod
    def _decodable(self, job: int) -> bool:
        """Whether the rounds recorded so far let the master decode ``job``."""


class GCSchedule(Schedule):
    """GC: every worker computes its coded task of job r in round r; any n - s decode it."""

    def __init__(self, n: int, s: int):
        super().__init__(n, 1, 0)
        self.s = s

    def _plan(self, r):
        self.jobs[r, :, 0], self.kinds[r, :, 0] = r, CODED

    def _decodable(self, job):
        return int(self.got[job].sum()) >= self.n - self.s


class SRSGCSchedule(Schedule):
    """SR-SGC: GC on job r in round r, plus selective repetition of job r - B's missing tasks."""

    def __init__(self, n: int, s: int, B: int):
        super().__init__(n, 1, B)
        self.s, self.B = s, B

    def _plan(self, r):
        self.jobs[r, :, 0], self.kinds[r, :, 0] = r, CODED
        old = r - self.B
        if old >= 0:
            missing = np.flatnonzero(~self._contributed(old, old))
            if missing.size > self.s:
                # the lowest-numbered repeat (the authors' rule); workers that cannot answer go last
                missing = np.array(sorted(missing.tolist(), key=lambda w: (w in self._avoid, w)), dtype=np.int64)
                rep = missing[: missing.size - self.s]
                self.jobs[r, rep, 0], self.kinds[r, rep, 0] = old, REPEAT

    def _contributed(self, r, job):
        return self.got[r] & (self.jobs[r, :, 0] == job)

    def _decodable(self, job):
        n_res = self._contributed(job, job).sum() + self._contributed(job + self.B, job).sum()
        return int(n_res) >= self.n - self.s


class MSGCSchedule(Schedule):
    """M-SGC: W - 1 + B minitasks per round, minitask m of round r on job r - m (D1, then D2)."""

    def __init__(self, n: int, B: int, W: int, lambd: int):
        super().__init__(n, W - 1 + B, W - 2 + B)
        self.B, self.W, self.lambd, self.D1 = B, W, lambd, W - 1

    def _diag(self, job, upto):
        """(n, slots) kinds returned for ``job`` (minitask m in round job + m), rounds < upto."""
        out = np.zeros((self.n, self.slots), dtype=np.int8)
        for m in range(self.slots):
            r = job + m
            if r < upto:
                out[:, m] = np.where(self.got[r], self.kinds[r, :, m], IDLE)
        return out

    def _plan(self, r):
        for m in range(self.slots):
            job = r - m
            if job < 0:
                break
            self.jobs[r, :, m] = job
            if m < self.D1:
                self.kinds[r, :, m] = D1
            else:
                have_d1 = (self._diag(job, r) == D1).sum(axis=1)
                self.kinds[r, :, m] = np.where(have_d1 >= self.D1, D2, D1)

    def _decodable(self, job):
        d = self._diag(job, job + self.slots)
        if ((d == D1).sum(axis=1) < self.D1).any():
            return False
        # D2 group g lives in slot D1 + g; a worker's D2 result for group g only counts there
        for g in range(self.B):
            if int((d[:, self.D1 + g] == D2).sum()) < self.n - self.lambd:
                return False
        return True


__all__ = ["CODED", "D1", "D2", "IDLE", "KIND_NAMES", "REPEAT", "DecodingError", "GCSchedule", "MSGCSchedule",
           "SRSGCSchedule", "Schedule"]
