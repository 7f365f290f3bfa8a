"""Empirical privacy auditing: a statistical *lower* bound on the epsilon a mechanism spends.

:func:`commcomp.privacy.epsilon` reports an *upper* bound: what the accountant proves the
mechanism spends, if the code does what the accountant assumes. An audit runs the code and
measures how well an attacker tells two neighbouring inputs apart. If the attacker does
better than the reported epsilon allows, the implementation (or its accounting) is wrong --
noise not added, noise too small, a sampling rate under-reported, a clip not applied. A
correct mechanism always passes (up to the audit's confidence level ``alpha``); a passing
audit does not prove the mechanism correct, it only fails to catch a bug.

The method: repeated-trial membership inference
-----------------------------------------------
This is the audit of Jagielski, Ullman, Oprea 2020 ("Auditing Differentially Private
Machine Learning", NeurIPS) with the strongest adversary of Nasr, Song, Thakurta, Papernot,
Carlini 2021 ("Adversary Instantiation: Lower Bounds for Differentially Private Machine
Learning", IEEE S&P):

1. Run the mechanism end to end ``trials`` times, alternately on the input with the canary
   (``D``, "IN") and on its neighbour without it (``D'``, "OUT"), with fresh noise each time.
2. After each run the attacker reduces everything it observed to one score (larger means
   "I guess IN"); see :func:`projection_score` and :func:`poisson_gaussian_llr`.
3. A threshold ``t`` turns scores into guesses. The attacker's false positive rate is
   ``FPR = P(score_OUT >= t)`` and its false negative rate ``FNR = P(score_IN < t)``.
4. (epsilon, delta)-DP applied to the event ``{score >= t}`` and to its complement forces
   (Kairouz, Oh, Viswanath 2015, the hypothesis-testing view of DP)::

       1 - FNR <= e^eps * FPR + delta      and      1 - FPR <= e^eps * FNR + delta

   so every (epsilon, delta)-DP mechanism has::

       eps >= max( log((1 - delta - FNR) / FPR),  log((1 - delta - FPR) / FNR) ).

   This is the bound of Nasr et al. 2021 (Sec. 3). Published code computes the same thing:
   ``jagielski/auditing-dpsgd``, ``code/bkd_parser.py`` (``delta = 0``; the ratio
   ``TPR_lo / FPR_hi`` or ``TNR_lo / FNR_hi``, with the threshold searched on the first
   ``search_ct`` runs and the bound evaluated on the rest), and
   ``microsoft/responsible-ai-toolbox-privacy``, ``privacy_estimates/privacy_region.py``
   (``eps_from_fnr_fpr``: ``log((1 - delta - max(FPR, FNR)) / min(FPR, FNR))``, which equals
   the maximum of the two logs above whenever ``FPR + FNR <= 1 - delta``).
5. FPR and FNR are only estimated, so they are replaced by one-sided Clopper-Pearson upper
   bounds (:func:`clopper_pearson_upper`), each at level ``alpha / 2`` (Bonferroni): with
   probability at least ``1 - alpha`` both bounds hold together, and then the number
   returned is below the true epsilon. Using the upper bound of *both* rates makes both
   logs in 4 smaller, so one pair of bounds serves both directions.

Choosing the threshold without peeking
--------------------------------------
Step 5 is only valid for a threshold fixed *before* the evaluation scores are seen: taking
the best of many thresholds on the same data is multiple testing and inflates the bound.
:func:`epsilon_lower_bound` therefore splits each score list in two halves (in the order the
trials were run), searches the threshold that maximizes the Clopper-Pearson bound on the
first half only, and computes the reported bound on the second half -- as Jagielski et al.'s
``search_ct`` split does. The price: half the trials pay for the search.

How many trials
---------------
With ``n`` evaluation trials per world and no errors at all, the upper bound on FPR is still
``1 - (alpha/2)^(1/n) ~ log(2/alpha) / n``, so no audit can certify more than about
``log(n / log(2/alpha))`` (:func:`max_certifiable_epsilon`): with ``alpha = 0.05``,
``2 * 2 * n = 4000`` trials certify at most 5.6. An audit can only catch a reported epsilon
below that, and it needs an attacker strong enough to get close to it.

Not implemented: one-run auditing
---------------------------------
Steinke, Nasr, Jagielski 2023 ("Privacy Auditing with One (1) Training Run", NeurIPS) insert
``m`` canaries, each independently with probability 1/2, into a *single* run and test the
number of correct guesses against the randomized-response bound. It is the tool when one
run is expensive (training a model). Here a "run" is the message encoder on synthetic
inputs -- milliseconds -- so the repeated-trial audit, which gives tighter bounds for the
same confidence, is the one implemented.

Example::

    >>> def trial(canary_in, index):
    ...     g = torch.Generator().manual_seed(index)
    ...     msgs = (1.0 if canary_in else 0.0) * u + sigma * torch.randn(T, d, generator=g)
    ...     return projection_score(msgs, u)                # u: (T, d) unit rows
    >>> res = run_audit(trial, trials=4000, delta=1e-5, reported_epsilon=eps)
    >>> res.passed, str(res)

The attacker's scores and the audit of the ``sketch_dp`` hook's encoder are in
:mod:`commcomp.privacy.audit.attacks`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _stats():
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "commcomp.privacy.audit needs scipy (installed with dp-accounting): "
            "pip install scipy   (or pip install 'commcomp[dp]')") from exc
    return stats


def _check_prob(v, name: str, closed_low: bool) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (0.0 <= v if closed_low else 0.0 < v) and v < 1.0
    if not ok:
        raise ValueError(f"commcomp: {name} must be a number in {'[' if closed_low else '('}0, 1), "
                         f"got {v!r}")
    return float(v)


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """float64 numpy view of a tensor (any device), an array, or a sequence of either."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return torch.stack([t.detach().to("cpu", torch.float64) for t in x]).numpy()
    return np.asarray(x, dtype=np.float64)


def _scores(x: ArrayLike, name: str, min_len: int) -> np.ndarray:
    a = _as_numpy(x).ravel()
    if a.size < min_len:
        raise ValueError(f"commcomp: {name} needs at least {min_len} scores, got {a.size}")
    if np.isnan(a).any():
        raise ValueError(f"commcomp: {name} contains NaN")
    return a


# --- statistics ------------------------------------------------------------------------------


def clopper_pearson_upper(errors, n: int, alpha: float):
    """One-sided Clopper-Pearson upper confidence bound on a binomial rate.

    If ``errors ~ Binomial(n, p)``, then ``p <= clopper_pearson_upper(errors, n, alpha)`` with
    probability at least ``1 - alpha``. It is the ``1 - alpha`` quantile of
    ``Beta(errors + 1, n - errors)``, and exactly 1 when ``errors == n``. With no errors it has
    the closed form ``1 - alpha ** (1 / n)`` (solve ``(1 - p) ** n = alpha``): the "rule of
    three" ``~ 3 / n`` at ``alpha = 0.05``. ``errors`` may be an array.
    """
    k = np.asarray(errors, dtype=np.float64)
    n = int(n)
    if n < 1 or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"commcomp: need 0 <= errors <= n and n >= 1, got {errors!r} of {n}")
    _check_prob(alpha, "alpha", closed_low=False)
    stats = _stats()
    full = k >= n
    upper = stats.beta.ppf(1.0 - alpha, np.where(full, 1.0, k + 1.0), np.where(full, 1.0, n - k))
    out = np.where(full, 1.0, upper)
    return float(out) if out.ndim == 0 else out


def _error_counts(scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray):
    """(false positives, false negatives) at each threshold: #out >= t and #in < t."""
    s_in, s_out = np.sort(scores_in), np.sort(scores_out)
    fp = s_out.size - np.searchsorted(s_out, thresholds, side="left")
    fn = np.searchsorted(s_in, thresholds, side="left")
    return fp, fn


def _eps_from_bounds(fpr_hi, fnr_hi, delta: float):
    """max(0, log((1-delta-FNR_hi)/FPR_hi), log((1-delta-FPR_hi)/FNR_hi)), elementwise."""
    fpr_hi, fnr_hi = np.asarray(fpr_hi, np.float64), np.asarray(fnr_hi, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fnr_hi, 0.0) / fpr_hi)   # guess IN when score >= t
        b = np.log(np.maximum(1.0 - delta - fpr_hi, 0.0) / fnr_hi)   # the complementary event
    return np.maximum(0.0, np.maximum(np.nan_to_num(a, nan=-np.inf), np.nan_to_num(b, nan=-np.inf)))


def _bound_at(scores_in, scores_out, thresholds, delta, alpha):
    """Per-threshold Clopper-Pearson epsilon bounds, with the counts that made them."""
    fp, fn = _error_counts(scores_in, scores_out, thresholds)
    fpr_hi = clopper_pearson_upper(fp, scores_out.size, alpha / 2)   # Bonferroni: two rates
    fnr_hi = clopper_pearson_upper(fn, scores_in.size, alpha / 2)
    return _eps_from_bounds(fpr_hi, fnr_hi, delta), fp, fn, fpr_hi, fnr_hi


def epsilon_lower_bound(scores_in: ArrayLike, scores_out: ArrayLike, delta: float,
                        alpha: float = 0.05, threshold: Optional[float] = None
                        ) -> Tuple[float, Dict[str, float]]:
    """A lower bound on epsilon, valid with probability ``1 - alpha``, from attack scores.

    Args:
        scores_in: the attacker's scores on runs with the canary (world ``D``).
        scores_out: its scores on runs without it (the neighbour ``D'``). Larger = "IN".
        delta: the delta at which epsilon is bounded (the one the accountant reports at).
        alpha: the probability that the bound is wrong for a correct mechanism; split evenly
            (Bonferroni) between the Clopper-Pearson bounds on FPR and on FNR.
        threshold: guess IN when ``score >= threshold``. ``None``: split each list into its
            first and second half (keep the trial order: the halves must be independent),
            choose the threshold that maximizes the bound on the first half, and evaluate it
            on the second half only, which keeps the bound valid at level ``alpha``. A given
            threshold must not have been chosen with these scores; all of them are used.

    Returns:
        ``(eps_lb, info)``: ``eps_lb >= 0``; ``info`` holds ``threshold``, the empirical
        ``fpr`` and ``fnr`` and their upper bounds ``fpr_hi`` and ``fnr_hi`` on the evaluation
        scores, the evaluation sizes ``n_in`` and ``n_out``, and ``n_select`` (scores per
        world spent choosing the threshold; 0 when it was given).
    """
    delta = _check_prob(delta, "delta", closed_low=True)
    alpha = _check_prob(alpha, "alpha", closed_low=False)
    min_len = 1 if threshold is not None else 2
    s_in = _scores(scores_in, "scores_in", min_len)
    s_out = _scores(scores_out, "scores_out", min_len)
    if threshold is None:
        h_in, h_out = s_in.size // 2, s_out.size // 2
        sel_in, sel_out = s_in[:h_in], s_out[:h_out]
        s_in, s_out = s_in[h_in:], s_out[h_out:]
        candidates = np.unique(np.concatenate([sel_in, sel_out]))
        eps_sel = _bound_at(sel_in, sel_out, candidates, delta, alpha)[0]
        t = float(candidates[int(np.argmax(eps_sel))])
        n_select = min(h_in, h_out)
    else:
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("commcomp: threshold is NaN")
        n_select = 0
    eps, fp, fn, fpr_hi, fnr_hi = _bound_at(s_in, s_out, np.array([t]), delta, alpha)
    info = {"threshold": t, "fpr": float(fp[0]) / s_out.size, "fnr": float(fn[0]) / s_in.size,
            "fpr_hi": float(fpr_hi[0]), "fnr_hi": float(fnr_hi[0]),
            "n_in": int(s_in.size), "n_out": int(s_out.size), "n_select": int(n_select)}
    return float(eps[0]), info


def max_certifiable_epsilon(trials: int, delta: float, alpha: float = 0.05) -> float:
    """The largest bound :func:`run_audit` can return from ``trials`` runs: a perfect attacker
    (no errors) on the ``trials / 4`` evaluation runs per world. Size audits with it: a bug
    can only be caught if this exceeds the reported epsilon."""
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 4:
        raise ValueError(f"commcomp: trials must be an int >= 4, got {trials!r}")
    n = (int(trials) // 2) - (int(trials) // 2) // 2
    hi = clopper_pearson_upper(0, n, _check_prob(alpha, "alpha", False) / 2)
    return float(_eps_from_bounds(hi, hi, _check_prob(delta, "delta", True)))


# --- the audit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """What an audit measured.

    Attributes:
        epsilon_lower_bound: epsilon the mechanism provably spends (with probability
            ``1 - alpha`` over the audit's randomness).
        reported_epsilon: what the accountant claims; the audit fails if the bound exceeds it.
        trials: runs of the mechanism, both worlds together.
        threshold: the score above which the attacker guesses IN.
        fpr, fnr: the attacker's empirical error rates on the evaluation half.
        alpha, delta: the confidence parameter and the delta of both epsilons.
    """

    epsilon_lower_bound: float
    reported_epsilon: float
    trials: int
    threshold: float
    fpr: float
    fnr: float
    alpha: float
    delta: float

    @property
    def passed(self) -> bool:
        """True when the measured lower bound does not exceed the reported epsilon."""
        return self.epsilon_lower_bound <= self.reported_epsilon

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED: the mechanism leaks more than reported"
        return (f"privacy audit {verdict}\n"
                f"  empirical epsilon >= {self.epsilon_lower_bound:.3f} "
                f"(confidence {1 - self.alpha:.0%}, delta={self.delta:g})\n"
                f"  reported epsilon   = {self.reported_epsilon:.3f}\n"
                f"  attacker: guess IN when score >= {self.threshold:.4g}; "
                f"FPR={self.fpr:.4f}, FNR={self.fnr:.4f} on {self.trials // 2} evaluation runs "
                f"of {self.trials}")


def run_audit(trial: Callable[[bool, int], float], trials: int, delta: float,
              reported_epsilon: float, alpha: float = 0.05) -> AuditResult:
    """Run the mechanism ``trials`` times and bound its epsilon from below.

    Args:
        trial: ``trial(canary_in, index) -> score``: one end-to-end run of the mechanism on
            the input with (``canary_in=True``) or without the canary, with fresh noise, then
            the attacker's score of what it observed (larger = "IN"). ``index`` (0 ..
            ``trials - 1``) is unique per call: derive the run's noise seed from it for a
            reproducible audit. The score must not depend on earlier runs.
        trials: number of runs, both worlds together; even and >= 4. Runs alternate IN, OUT,
            IN, ... so that drift (warm-up, caches, a changing machine) hits both worlds alike.
        delta: the delta at which ``reported_epsilon`` was computed.
        reported_epsilon: the accountant's epsilon for the configuration being run.
        alpha: the audit's error probability (see :func:`epsilon_lower_bound`).

    The threshold is chosen on the first half of each world's runs and the bound computed
    on the second half (:func:`epsilon_lower_bound`).
    """
    if isinstance(trials, bool) or not isinstance(trials, numbers.Integral) or trials < 4 \
            or trials % 2:
        raise ValueError(f"commcomp: trials must be an even int >= 4, got {trials!r}")
    if not isinstance(reported_epsilon, numbers.Real) or math.isnan(reported_epsilon) \
            or reported_epsilon < 0:
        raise ValueError(f"commcomp: reported_epsilon must be >= 0 (inf allowed), "
                         f"got {reported_epsilon!r}")
    delta = _check_prob(delta, "delta", closed_low=True)
    alpha = _check_prob(alpha, "alpha", closed_low=False)
    scores_in, scores_out = [], []
    for i in range(int(trials)):
        canary_in = i % 2 == 0
        s = float(trial(canary_in, i))
        if math.isnan(s):
            raise ValueError(f"commcomp: trial {i} (canary_in={canary_in}) returned NaN")
        (scores_in if canary_in else scores_out).append(s)
    eps_lb, info = epsilon_lower_bound(np.array(scores_in), np.array(scores_out), delta, alpha)
    return AuditResult(epsilon_lower_bound=eps_lb, reported_epsilon=float(reported_epsilon),
                       trials=int(trials), threshold=info["threshold"], fpr=info["fpr"],
                       fnr=info["fnr"], alpha=alpha, delta=delta)


__all__ = ["ArrayLike", "AuditResult", "clopper_pearson_upper", "epsilon_lower_bound", "max_certifiable_epsilon",
           "run_audit"]
