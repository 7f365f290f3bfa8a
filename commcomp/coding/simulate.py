"""Round-by-round runtime of a straggler-mitigation scheme on a duration matrix.

The round model is the one of Krishnan et al.'s simulator (repository
mamaj/Sequential-Gradient-Coding-2, ``2_find_runtimes/``), so runtimes can be compared with the
paper's:

1. A scheme of normalized load L replays ``durations + (L - trace_load) * base_comp``: the trace
   was measured at ``trace_load``, and every extra unit of load costs ``base_comp`` seconds.
2. J = ``n_jobs`` jobs with delay T take J + T rounds (rounds 0 .. J + T - 1 of the trace).
3. In each round the master waits ``fastest x (1 + mu)``; workers slower than that are the round's
   stragglers. If the straggler pattern fits the scheme's model (at most s for GC; the (B, W,
   lambd) bursty model, against the history of skipped stragglers, for SR-SGC and M-SGC) the
   round lasts ``min(wait, slowest)``; otherwise the master waits for all (``slowest``), records
   no straggler for that round, and counts a wait.
4. The runtime is the sum of the J + T round durations.

``uncoded`` always waits for the slowest worker; ``ignore`` (ignore stragglers) waits for the
(n - s)-th fastest worker and never waits for all.

The round rule (:class:`~commcomp.coding.master.Master`) follows the authors' *final* files
(commit fab1280), including SR-SGC's exemption of rounds with at most s stragglers and no
repetition (b6ee48f) and its skipping of tail rounds whose job already decodes (d663187). One
deliberate correction, switchable with ``authors=True``: their GC moves on only with *fewer than*
s stragglers (``sum < s``); ours tolerates up to s, as GC is designed to (so our GC(s) is their
GC(s + 1) at load (s + 1) / n). Their "no wait" baseline ends every round at ``wait``; our
``ignore`` waits for the fastest n - s (a different baseline, not a correction).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np

from commcomp.coding.master import Master
from commcomp.coding.sequential import SCHEMES

__all__ = ["Result", "simulate", "search", "param_grid", "default_n_jobs"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """One simulated run. ``runtime`` = sum of ``round_durations`` (seconds) over n_jobs + T rounds."""

    scheme: str
    params: Dict[str, int]
    runtime: float
    load: float
    T: int
    num_waits: int
    n_jobs: int
    round_durations: np.ndarray = field(repr=False)
    completions: List[tuple] = field(default_factory=list, repr=False)   # (round, job)
    stragglers: Optional[np.ndarray] = field(default=None, repr=False)   # (rounds, n): results that did not count
    skipped: List[int] = field(default_factory=list, repr=False)         # rounds not run (SR-SGC's tail)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "runtime": self.runtime, "load": self.load, "T": self.T,
                "num_waits": self.num_waits, "params": dict(self.params), "n_jobs": self.n_jobs,
                "round_durations": [float(x) for x in self.round_durations], "skipped": list(self.skipped)}


def default_n_jobs(rounds: int) -> int:
    """Half the trace's rounds: the other half is left for the schemes' delay T."""
    return max(1, rounds // 2)


def _prepare(durations, mu, base_comp, trace_load):
    d = np.asarray(durations, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"durations must be a (rounds, workers) array; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("durations contain NaN or Inf")
    if mu < 0 or base_comp < 0:
        raise ValueError(f"need mu >= 0 and base_comp >= 0 (seconds per unit load); got mu={mu}, base_comp={base_comp}")
    return d


def simulate(durations, scheme: str, params: Optional[dict] = None, *, n_jobs: Optional[int] = None,
             mu: float = 1.0, base_comp: float = 0.0, trace_load: float = 0.0, check: bool = True,
             authors: bool = False, srsgc_exemption: bool = True, srsgc_skip_tail: bool = True) -> Result:
    """Runtime of ``scheme`` (``uncoded``, ``ignore``, ``gc``, ``srsgc``, ``msgc``) with ``params``
    (``{"s": s}`` or ``{"B": B, "W": W, "lambd": lambd}``) on ``durations[round, worker]``.

    ``n_jobs``: jobs to finish (default: half the rounds); the trace needs ``n_jobs + T`` rounds.
    ``mu``: the master waits ``fastest x (1 + mu)`` each round. ``base_comp``: seconds one unit of
    normalized load costs a worker; ``trace_load``: the load the durations were measured at.
    ``check``: also run the scheme's job bookkeeping and raise
    :class:`~commcomp.coding.sequential.DecodingError` if a job could not be decoded (SR-SGC
    always runs it: its round rule depends on it).
    ``authors``, ``srsgc_exemption``, ``srsgc_skip_tail``: the round rule's switches
    (:class:`~commcomp.coding.master.Master`): ``authors=True`` gives the authors' final code
    exactly (their GC moves on with fewer than s stragglers).

    Example: ``simulate(load_trace(f).durations, "msgc", {"B": 1, "W": 3, "lambd": 20}, n_jobs=10,
    mu=1.0, base_comp=2.2, trace_load=0.25).runtime``
    """
    d = _prepare(durations, mu, base_comp, trace_load)
    rounds, n = d.shape
    n_jobs = default_n_jobs(rounds) if n_jobs is None else int(n_jobs)
    master = Master(scheme, n, params, n_jobs=max(n_jobs, 1), authors=authors, srsgc_exemption=srsgc_exemption,
                    srsgc_skip_tail=srsgc_skip_tail, track=check)
    sch = master.scheme
    total = n_jobs + sch.T
    if n_jobs < 1 or total > rounds:
        raise ValueError(f"{sch!r}: n_jobs={n_jobs} jobs with delay T={sch.T} need {total} rounds, the durations "
                         f"have {rounds}; lower n_jobs (at most {rounds - sch.T}) or extend the trace "
                         "(commcomp.coding.stragglers.extend_trace)")
    d = d[:total] + (sch.load - trace_load) * base_comp
    if (d <= 0).any():
        raise ValueError(f"{sch!r}: durations + (load {sch.load:.4f} - trace_load {trace_load}) x base_comp "
                         f"{base_comp} has non-positive entries; use a trace measured at a lower load "
                         "or a smaller base_comp")
    out, completions, missing, skipped, waits = _run_rounds(master, d, mu)
    if not completions:  # uncoded, ignore, or no bookkeeping: job r - T completes in round r
        completions = [(r, r - sch.T) for r in range(sch.T, total)]
    return Result(sch.name, sch.params, float(out.sum()), sch.load, sch.T, waits, n_jobs, out, completions,
                  missing, skipped)


def _run_rounds(master: Master, d: np.ndarray, mu: float):
    """The round loop: ``(durations, completions, missing, skipped, waits)``."""
    sch = master.scheme
    total, n = d.shape
    out = np.empty(total)
    completions = []
    none = np.zeros(n, dtype=bool)
    missing = np.zeros((total, n), dtype=bool)
    skipped = []
    if sch.name == "ignore":
        out[:] = np.sort(d, axis=1)[:, n - sch.s - 1]
        waits = 0
    elif master.waits_always:
        out[:] = d.max(axis=1)
        waits = 0
    else:
        for r in range(total):
            if master.skip(r):
                out[r] = 0.0
                skipped.append(r)
                continue
            master.assign(r)
            row = d[r]
            slowest = row.max()
            wait = row.min() * (1.0 + mu)
            strag = row > wait
            waited = not master.fits(strag)
            out[r] = slowest if waited else min(wait, slowest)
            missing[r] = none if waited else strag
            job = master.end_round(r, missing[r], waited)
            if job is not None:
                completions.append((r, job))
        waits = master.num_waits
    return out, completions, missing, skipped, waits


def param_grid(scheme: str, n: int, n_jobs: int, max_delay: int, lambds: Optional[Iterable[int]] = None,
               s_values: Optional[Iterable[int]] = None) -> List[dict]:
    """The parameters :func:`search` tries, as in the authors' final ``param_combinations``
    (fab1280): ``gc`` and ``ignore``: s in 0..n-1; ``srsgc``: B in 1..max_delay,
    W = B+1, 2B+1, ... <= n_jobs (since their d663187); ``msgc``: 2 <= W < n_jobs, 1 <= B < W with W - 1 + B <= max_delay (T + 1 <= max_delay, their bound);
    lambd in 1..n (``lambds`` narrows it, ``s_values`` narrows s)."""
    lam = list(range(1, n + 1)) if lambds is None else [int(x) for x in lambds]
    ss = list(range(0, n)) if s_values is None else [int(x) for x in s_values]
    if scheme == "uncoded":
        return [{}]
    if scheme in ("gc", "ignore"):
        return [{"s": s} for s in ss if 0 <= s < n]
    if scheme == "srsgc":
        return [{"B": B, "W": W, "lambd": la} for B in range(1, max_delay + 1)
                for W in range(B + 1, n_jobs + 1, B) for la in lam
                if -(-B * la // (W - 1 + B)) < n]
    if scheme == "msgc":
        return [{"B": B, "W": W, "lambd": la} for W in range(2, n_jobs) for B in range(1, W)
                if W - 1 + B <= max_delay for la in lam if la <= n]
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")


def search(durations, schemes: Iterable[str] = ("uncoded", "ignore", "gc", "srsgc", "msgc"), *,
           n_jobs: Optional[int] = None, mu: float = 1.0, base_comp: float = 0.0, trace_load: float = 0.0,
           lambds: Optional[Iterable[int]] = None, s_values: Optional[Iterable[int]] = None,
           ignore_s: Optional[Iterable[int]] = (0,), progress: bool = True) -> Dict[str, Result]:
    """Best (lowest-runtime) parameters of each scheme over :func:`param_grid`.

    ``ignore`` is searched over ``ignore_s`` only (default s = 0: it drops gradients, so a larger
    s is always faster and not comparable); pass ``None`` to search all s. ``lambds`` and
    ``s_values`` shrink the grids (the full grid at n = 256 is a few thousand runs per scheme).
    Ties go to the lower load. Shows a tqdm bar when ``progress``.
    """
    d = _prepare(durations, mu, base_comp, trace_load)
    rounds, n = d.shape
    n_jobs = default_n_jobs(rounds) if n_jobs is None else int(n_jobs)
    max_delay = rounds - n_jobs
    grids = {}
    for sc in schemes:
        if sc == "ignore":
            grids[sc] = param_grid(sc, n, n_jobs, max_delay, s_values=ignore_s)
        else:
            grids[sc] = param_grid(sc, n, n_jobs, max_delay, lambds, s_values)
    jobs = [(sc, p) for sc, ps in grids.items() for p in ps]
    it = jobs
    if progress:
        from tqdm import tqdm
        it = tqdm(jobs, desc="search", unit="run", leave=False)
    best: Dict[str, Result] = {}
    for sc, p in it:
        try:
            r = simulate(d, sc, p, n_jobs=n_jobs, mu=mu, base_comp=base_comp, trace_load=trace_load, check=False)
        except ValueError as e:   # e.g. a load that makes a duration non-positive
            log.debug("skip %s %s: %s", sc, p, e)
            continue
        cur = best.get(sc)
        if cur is None or (r.runtime, r.load) < (cur.runtime, cur.load):
            best[sc] = r
    return best
