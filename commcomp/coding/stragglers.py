"""Straggler models: who is slow in which round, as a duration matrix ``durations[round, worker]``
(seconds) or a boolean straggler pattern ``pattern[round, worker]``.

Synthetic models (every one takes a seeded ``numpy.random.Generator``; the global RNG is never used):

- :func:`no_stragglers`: every worker takes ``base`` seconds, every round.
- :func:`bernoulli`: each worker straggles independently with probability ``p`` each round.
- :func:`shifted_exponential`: ``shift + Exp(rate)`` seconds, i.i.d. (the classic model of
  Lee et al. 2017 used in gradient-coding papers).
- :func:`bursty`: a pattern that satisfies the (B, W, lambda) bursty model of Krishnan et al.
  (ICLR 2023): in any window of W consecutive rounds at most ``lambd`` distinct workers straggle,
  each in one burst of at most B consecutive rounds.
- :func:`gilbert_elliott`: a two-state (good/bad) Markov chain per worker, bursts of random length.

Real traces: :func:`load_trace` reads the 256-worker AWS Lambda delay profiles published with the
paper (``.npz`` with ``durations``, ``load``, ``batch``, ``region``); :func:`extend_trace` makes a
long horizon out of a short trace by resampling rounds (see its docstring for the method).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from .sequential import BurstyCondition

__all__ = [
    "Trace", "load_trace", "trace_dirs", "find_traces", "extend_trace", "no_stragglers", "bernoulli",
    "shifted_exponential", "bursty", "gilbert_elliott", "pattern_to_durations", "follows_bursty_model",
]

#: Small copy of the traces shipped with the package (3 files, see data/README.md).
SHIPPED_DIR = Path(__file__).resolve().parent / "traces"
#: The full set (45 files), next to the project in a development checkout; may be absent.
FULL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "lambda-traces"


@dataclass(frozen=True)
class Trace:
    """A measured delay profile: ``durations[round, worker]`` seconds at normalized ``load``."""

    durations: np.ndarray
    load: float
    batch: int
    region: str
    name: str

    @property
    def rounds(self) -> int:
        return self.durations.shape[0]

    @property
    def workers(self) -> int:
        return self.durations.shape[1]


def trace_dirs() -> List[Path]:
    """Where traces are looked up, in order: ``$COMMCOMP_TRACES``, the shipped copy, the full set."""
    env = os.environ.get("COMMCOMP_TRACES")
    dirs = [Path(env)] if env else []
    return dirs + [SHIPPED_DIR, FULL_DIR]


def find_traces(pattern: str = "*.npz") -> List[Path]:
    """Every trace file matching ``pattern`` in :func:`trace_dirs` (first directory wins per name)."""
    seen, out = set(), []
    for d in trace_dirs():
        if d.is_dir():
            for p in sorted(d.glob(pattern)):
                if p.name not in seen:
                    seen.add(p.name)
                    out.append(p)
    return out


def load_trace(path) -> Trace:
    """Reads a trace ``.npz``. ``path`` may be a file, or a bare file name looked up in
    :func:`trace_dirs` (so ``load_trace("Canada-w256-r20-load0_250-b2048-desktop.npz")`` works
    from an installed package)."""
    p = Path(path)
    if not p.is_file():
        hits = [d / p.name for d in trace_dirs() if (d / p.name).is_file()]
        if not hits:
            raise FileNotFoundError(
                f"trace {str(path)!r} not found: not a file, and not in {[str(d) for d in trace_dirs()]}. "
                "Give a path to an .npz with a 'durations' (rounds, workers) array, or set COMMCOMP_TRACES.")
        p = hits[0]
    with np.load(p) as z:
        if "durations" not in z:
            raise ValueError(f"{p}: no 'durations' array (found {sorted(z.files)}); expected (rounds, workers) seconds")
        d = np.asarray(z["durations"], dtype=np.float64)
        load = float(z["load"]) if "load" in z else 0.0
        batch = int(z["batch"]) if "batch" in z else 0
        region = str(z["region"]) if "region" in z else ""
    if d.ndim != 2 or not np.isfinite(d).all() or (d <= 0).any():
        raise ValueError(f"{p}: 'durations' must be a finite, positive (rounds, workers) array; got shape {d.shape}")
    return Trace(d, load, batch, region, p.name)


def extend_trace(durations: np.ndarray, rounds: int, rng: np.random.Generator, block: int = 1) -> np.ndarray:
    """Extends a short trace to ``rounds`` rounds by resampling whole rounds (a block bootstrap).

    Method: the output is a concatenation of blocks of ``block`` consecutive rounds of the trace,
    each block's start drawn uniformly (with replacement) from the trace's ``rounds - block + 1``
    possible starts; the last block is cut to length. Whole rows are kept, so the cross-worker
    structure of a round (how many straggle, by how much, the load-dependent shift) is real;
    ``block > 1`` also keeps the round-to-round persistence of a worker's slowness inside a block,
    ``block = 1`` (the default) treats rounds as i.i.d. Worker identity is kept within a block only:
    a burst cannot outlast its block, so bursts longer than ``block`` rounds are under-represented.
    """
    d = np.asarray(durations, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"durations must be (rounds, workers); got shape {d.shape}")
    if not 1 <= block <= d.shape[0]:
        raise ValueError(f"block={block} must be in 1..{d.shape[0]} (the trace's rounds)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    n_blocks = -(-rounds // block)
    starts = rng.integers(0, d.shape[0] - block + 1, size=n_blocks)
    idx = (starts[:, None] + np.arange(block)[None, :]).reshape(-1)[:rounds]
    return d[idx]


def _check(rounds: int, n: int) -> None:
    if rounds < 1 or n < 1:
        raise ValueError(f"need rounds >= 1 and n >= 1 workers; got rounds={rounds}, n={n}")


def pattern_to_durations(pattern: np.ndarray, rng: np.random.Generator, base: float = 1.0,
                         slow: float = 5.0, jitter: float = 0.05) -> np.ndarray:
    """Durations from a straggler pattern: a non-straggler takes ``base * U(1, 1 + jitter)``, a
    straggler ``base * slow * U(1, 1 + jitter)``. With ``slow > (1 + jitter) * (1 + mu)`` the
    simulator's wait rule (fastest x (1 + mu)) recovers the pattern exactly."""
    if slow <= 1.0 or base <= 0 or jitter < 0:
        raise ValueError(f"need base > 0, slow > 1, jitter >= 0; got base={base}, slow={slow}, jitter={jitter}")
    pattern = np.asarray(pattern, dtype=bool)
    noise = 1.0 + jitter * rng.random(pattern.shape)
    return base * noise * np.where(pattern, slow, 1.0)


def no_stragglers(rounds: int, n: int, base: float = 1.0) -> np.ndarray:
    """Every worker takes exactly ``base`` seconds in every round."""
    _check(rounds, n)
    return np.full((rounds, n), float(base))


def bernoulli(rounds: int, n: int, p: float, rng: np.random.Generator, base: float = 1.0,
              slow: float = 5.0, jitter: float = 0.05) -> np.ndarray:
    """Each worker straggles (``slow`` times slower) independently with probability ``p`` per round."""
    _check(rounds, n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p} must be a probability in [0, 1]")
    return pattern_to_durations(rng.random((rounds, n)) < p, rng, base, slow, jitter)


def shifted_exponential(rounds: int, n: int, shift: float, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``shift + Exp(rate)`` seconds, i.i.d. over rounds and workers (mean ``shift + 1/rate``)."""
    _check(rounds, n)
    if shift <= 0 or rate <= 0:
        raise ValueError(f"need shift > 0 and rate > 0 (seconds, 1/seconds); got shift={shift}, rate={rate}")
    return shift + rng.exponential(1.0 / rate, size=(rounds, n))


def bursty(rounds: int, n: int, B: int, W: int, lambd: int, rng: np.random.Generator,
           p_start: float = 0.05) -> np.ndarray:
    """A straggler pattern (bool, (rounds, n)) that satisfies the (B, W, lambd) bursty model.

    Round by round: a worker in a burst keeps straggling until its burst (length drawn uniformly
    in 1..B when it starts) ends; each other worker starts a burst with probability ``p_start``
    if the pattern stays inside the model (no straggling in the W rounds before, at most
    ``lambd`` distinct stragglers in every window of W rounds). Feed it to
    :func:`pattern_to_durations` for durations.
    """
    _check(rounds, n)
    if not (1 <= B <= W and 0 <= lambd <= n):
        raise ValueError(f"need 1 <= B <= W and 0 <= lambd <= n={n}; got B={B}, W={W}, lambd={lambd}")
    pat = np.zeros((rounds, n), dtype=bool)
    left = np.zeros(n, dtype=np.int64)        # rounds left in the current burst
    for r in range(rounds):
        cur = left > 0
        lo = max(0, r - W + 1)
        recent = pat[lo:r].any(axis=0)           # straggled in the last W-1 rounds
        allowed = lambd - int((recent | cur).sum())
        cand = np.flatnonzero(~recent & ~cur & (rng.random(n) < p_start))
        for w in cand[:max(allowed, 0)]:
            # a new burst must not put more than lambd stragglers in any later window that
            # contains it; starting only when the whole past window is clear is enough for
            # the past, and the burst's own length <= B keeps it one burst per window.
            left[w] = rng.integers(1, B + 1)
            cur[w] = True
        pat[r] = cur
        left = np.maximum(left - 1, 0)
    return pat


def gilbert_elliott(rounds: int, n: int, p_gb: float, p_bg: float, rng: np.random.Generator,
                    base: float = 1.0, slow: float = 5.0, jitter: float = 0.05) -> np.ndarray:
    """Durations from a Gilbert-Elliott channel per worker: a good state (``base`` seconds) and a
    bad state (``slow`` times slower); good -> bad with probability ``p_gb`` per round, bad ->
    good with ``p_bg``. Bursts last ``1 / p_bg`` rounds on average; the stationary fraction of
    stragglers is ``p_gb / (p_gb + p_bg)`` (the chain starts from it)."""
    _check(rounds, n)
    for name, v in (("p_gb", p_gb), ("p_bg", p_bg)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v} must be a probability in [0, 1]")
    pi_bad = p_gb / (p_gb + p_bg) if p_gb + p_bg > 0 else 0.0
    bad = rng.random(n) < pi_bad
    pat = np.zeros((rounds, n), dtype=bool)
    for r in range(rounds):
        pat[r] = bad
        u = rng.random(n)
        bad = np.where(bad, u >= p_bg, u < p_gb)
    return pattern_to_durations(pat, rng, base, slow, jitter)


def follows_bursty_model(pattern: np.ndarray, B: int, W: int, lambd: int,
                         first_bad: Optional[list] = None) -> bool:
    """Whether a whole straggler pattern (bool, (rounds, n)) fits the (B, W, lambd) bursty model,
    checked round by round exactly as the simulator does (:class:`~commcomp.coding.sequential.BurstyCondition`).
    If ``first_bad`` is a list, the index of the first offending round is appended to it."""
    pattern = np.asarray(pattern, dtype=bool)
    cond = BurstyCondition(pattern.shape[1], B, W, lambd)
    for r, row in enumerate(pattern):
        if not cond.fits(row):
            if first_bad is not None:
                first_bad.append(r)
            return False
        cond.record(row)
    return True
