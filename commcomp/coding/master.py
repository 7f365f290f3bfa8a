"""The master's round rule of sequential gradient coding, shared by the simulator and the live engine.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023,
and their simulator (mamaj/Sequential-Gradient-Coding-2, ``2_find_runtimes/``, final versions at
commit fab1280). One :class:`Master` drives one run of ``n_jobs`` jobs with one scheme
(:mod:`commcomp.coding.sequential`) over ``n_jobs + T`` rounds:

1. :meth:`Master.skip` -- whether round ``r`` is not run at all. SR-SGC only (the authors'
   commit d663187, "dont perform last B rounds if not needed"): in a round ``r >= n_jobs`` (no new
   job starts) whose due job ``r - B`` already decodes from round ``r - B`` alone, nobody works
   and the round takes no time.
2. :meth:`Master.assign` -- what each worker computes (the scheme's
   :class:`~commcomp.coding.schedules.Schedule`).
3. :meth:`Master.fits` -- whether the round's stragglers (the workers slower than
   ``fastest x (1 + mu)``) fit the scheme's straggler model given the recorded history; if not,
   the master waits for everyone.
4. :meth:`Master.end_round` -- records who returned, updates the history, and returns the job
   decoded at the end of the round (raising
   :class:`~commcomp.coding.schedules.DecodingError` when it cannot be).

The history holds the stragglers of the rounds the master did not wait out. For SR-SGC it leaves
out **exempt** rounds (the authors' commit b6ee48f, "exemption for SRSGC"): a round with at most
``s`` stragglers in which every other worker returned that round's own job (no selective repeat)
decodes its job on its own and needs no repetition later, so its stragglers do not count towards
the bursty window.

Switches (``authors=True`` reproduces the authors' final code exactly; the default keeps one
deliberate correction): their GC moves on only with *fewer than* ``s`` stragglers (``sum < s``);
ours with at most ``s``, as gradient coding is designed to, so our GC(s) is their GC(s + 1) at
load (s + 1) / n. ``srsgc_exemption`` and ``srsgc_skip_tail`` (default True, as their final
code) turn the two SR-SGC refinements off, to measure what each brings (with both off this is
not their 538e95e version, which also ended fitting SR-SGC rounds at ``wait`` rather than
``min(wait, slowest)``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .schedules import CODED
from .sequential import PerRoundCondition, make_scheme

__all__ = ["Master"]


class _StrictPerRound(PerRoundCondition):
    """The authors' GC rule: fewer than ``s`` stragglers (``sum < s``)."""

    def fits(self, is_straggler: np.ndarray) -> bool:
        return int(np.count_nonzero(is_straggler)) < self.s


class Master:
    """The round rule of one run: ``scheme`` by name (``uncoded``, ``ignore``, ``gc``, ``srsgc``,
    ``msgc``) with ``params`` on ``n`` workers for ``n_jobs`` jobs.

    ``authors``: GC moves on with fewer than ``s`` stragglers, as the authors' code (default: at
    most ``s``). ``srsgc_exemption``, ``srsgc_skip_tail``: the authors' final SR-SGC refinements
    (module docstring). ``track=False`` skips the job bookkeeping where the round rule does not
    need it (a faster parameter search; no ``DecodingError``). Attributes: ``scheme``, ``plan`` (the schedule; None for uncoded and
    ignore), ``cond`` (the straggler condition; None when the master always waits), ``rounds``
    (``n_jobs + T``), ``num_waits``.
    """

    def __init__(self, scheme: str, n: int, params: Optional[dict] = None, *, n_jobs: int,
                 authors: bool = False, srsgc_exemption: bool = True, srsgc_skip_tail: bool = True,
                 track: bool = True):
        self.scheme = make_scheme(scheme, n, **(params or {}))
        self.n = n
        self.n_jobs = int(n_jobs)
        if self.n_jobs < 1:
            raise ValueError(f"{self.scheme!r}: n_jobs={n_jobs} must be >= 1")
        self.rounds = self.n_jobs + self.scheme.T
        srsgc = self.scheme.name == "srsgc"
        # the job bookkeeping; SR-SGC's round rule needs it, the others only to check decoding
        self.plan = self.scheme.schedule() if (track or srsgc) else None
        self.cond = self.scheme.condition()
        if authors and self.scheme.name == "gc":
            self.cond = _StrictPerRound(self.scheme.s)
        self.exemption = srsgc and srsgc_exemption
        self.skip_tail = srsgc and srsgc_skip_tail
        self.num_waits = 0
        self._none = np.zeros(n, dtype=bool)

    @property
    def waits_always(self) -> bool:
        """True when every round waits for every worker (uncoded)."""
        return self.cond is None and self.scheme.name != "ignore"

    def skip(self, r: int) -> bool:
        """Whether round ``r`` is not run (SR-SGC's tail rounds whose due job already decodes).
        A skipped round is recorded at once (nobody assigned, nobody returned)."""
        if not (self.skip_tail and r >= self.n_jobs):
            return False
        job = r - self.scheme.T
        if job < 0 or not self.plan.decodable_early(job):
            return False
        self.plan.skip(r)
        self.cond.record(self._none)
        return True

    def assign(self, r: int, avoid=()) -> Tuple[np.ndarray, np.ndarray]:
        """``(jobs, kinds)`` for round ``r``, both (n, slots) (see
        :meth:`~commcomp.coding.schedules.Schedule.assign`; ``avoid``: workers known not to
        answer, chosen last for SR-SGC's repeats); uncoded: one task per worker on job r."""
        if self.plan is None:
            return np.full((self.n, 1), r, np.int64), np.full((self.n, 1), CODED, np.int8)
        return self.plan.assign(r, avoid)

    def fits(self, is_straggler: np.ndarray) -> bool:
        """Whether the master may end the round without the workers ``is_straggler`` (bool (n,))."""
        if self.cond is None:
            return self.scheme.name == "ignore"
        return self.cond.fits(np.asarray(is_straggler, dtype=bool))

    def end_round(self, r: int, missing: np.ndarray, waited: bool) -> Optional[int]:
        """Record round ``r``: ``missing`` (bool (n,)) the workers whose results did not count
        (stragglers; after a wait, only workers that are gone), ``waited`` whether the master
        waited for all. Returns the job decoded at the end of the round (None while ``r < T``
        or for schemes without bookkeeping); raises ``DecodingError`` when it cannot be."""
        missing = np.asarray(missing, dtype=bool)
        if waited:
            self.num_waits += 1
        if self.cond is not None:
            hist = missing
            if self.exemption and self._exempt(r, missing):
                hist = self._none
            self.cond.record(hist)
        if self.plan is None:
            return r if (self.scheme.T == 0 and r < self.n_jobs) else None
        return self.plan.record(r, ~missing)

    def _exempt(self, r: int, missing: np.ndarray) -> bool:
        """SR-SGC: at most ``s`` stragglers, and every other worker computed round r's own job."""
        if int(missing.sum()) > self.scheme.s:
            return False
        jobs = self.plan.jobs[r, :, 0]
        return bool((jobs[~missing] == r).all())
