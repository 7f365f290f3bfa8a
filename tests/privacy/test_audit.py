"""The empirical privacy audit: its statistics are right (Clopper-Pearson, the epsilon formula,
a threshold chosen without looking at the evaluation runs, a bound that holds under the null)
and it separates correct mechanisms from broken ones on synthetic Gaussian mechanisms whose
epsilon the accountant knows: it passes a correctly noised mechanism (while still detecting
it), and fails one whose noise is off and one that samples 10x more often than reported.

Every random draw comes from a seeded numpy or torch generator: the tests are deterministic.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from commcomp.privacy import epsilon
from commcomp.privacy.audit import (AuditResult, clopper_pearson_upper, epsilon_lower_bound,
                                    max_certifiable_epsilon, poisson_gaussian_llr,
                                    projection_score, projections, run_audit)

DELTA = 1e-5
T, D = 100, 8  # steps of the mechanism, message dimension


@pytest.fixture(scope="module")
def directions():
    """Unit canary directions ``u_t``: what the attacker rebuilds from the public sketch seed."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(T, D, generator=g, dtype=torch.float64), dim=1)


def gaussian_trial(u, noise_std, seed):
    """T composed Gaussian mechanisms, no sampling: ``m_t = [IN] u_t + noise_std * N(0, I)``
    (sensitivity 1 along ``u_t``); the attacker scores with the optimal projection sum."""
    def trial(canary_in, index):
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        m = noise_std * torch.randn(T, D, generator=g, dtype=torch.float64)
        if canary_in:
            m = m + u
        return projection_score(m, u)
    return trial


def poisson_trial(u, sigma, q_true, q_attacker, seed):
    """T Poisson-subsampled Gaussian mechanisms: the canary is in step ``t`` with probability
    ``q_true``; the attacker scores with the likelihood ratio at the rate *it* assumes."""
    def trial(canary_in, index):
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        m = sigma * torch.randn(T, D, generator=g, dtype=torch.float64)
        if canary_in:
            sampled = (torch.rand(T, 1, generator=g, dtype=torch.float64) < q_true).double()
            m = m + sampled * u
        return poisson_gaussian_llr(projections(m, u), mu=1.0, sigma=sigma, q=q_attacker)
    return trial


# --- statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 250, 1000])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_clopper_pearson_zero_errors_closed_form(n, alpha):
    assert clopper_pearson_upper(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-12)


def test_clopper_pearson_edges_vector_and_coverage():
    assert clopper_pearson_upper(7, 7, 0.05) == 1.0
    k = np.array([0, 3, 10])
    up = clopper_pearson_upper(k, 10, 0.05)
    assert up.shape == (3,) and up[2] == 1.0
    assert up[1] == pytest.approx(stats.beta.ppf(0.95, 4, 7))
    assert np.all(np.diff(up) > 0)
    # coverage: P(p <= upper) >= 1 - alpha, for a p in the middle and one near 0
    rng = np.random.default_rng(1)
    for p in (0.3, 0.02):
        draws = rng.binomial(50, p, size=20_000)
        covered = np.mean(p <= clopper_pearson_upper(draws, 50, 0.05))
        assert covered >= 0.95
    with pytest.raises(ValueError):
        clopper_pearson_upper(11, 10, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson_upper(1, 10, 1.5)


def _manual_bound(fp, n_out, fn, n_in, delta, alpha):
    fpr_hi = stats.beta.ppf(1 - alpha / 2, fp + 1, n_out - fp) if fp < n_out else 1.0
    fnr_hi = stats.beta.ppf(1 - alpha / 2, fn + 1, n_in - fn) if fn < n_in else 1.0
    cands = [0.0]
    if 1 - delta - fnr_hi > 0:
        cands.append(math.log((1 - delta - fnr_hi) / fpr_hi))
    if 1 - delta - fpr_hi > 0:
        cands.append(math.log((1 - delta - fpr_hi) / fnr_hi))
    return max(cands)


@pytest.mark.parametrize("fp,fn", [(0, 0), (3, 1), (1, 30), (60, 2), (100, 100)])
def test_epsilon_formula_at_a_given_threshold(fp, fn):
    """Scores built so that threshold 0.5 makes exactly ``fp`` false positives (out >= t)
    and ``fn`` false negatives (in < t); the bound is the formula, both directions."""
    n = 100
    s_in = np.r_[np.zeros(fn), np.ones(n - fn)]
    s_out = np.r_[np.ones(fp), np.zeros(n - fp)]
    eps, info = epsilon_lower_bound(s_in, s_out, delta=1e-3, alpha=0.1, threshold=0.5)
    assert (info["fpr"], info["fnr"]) == (fp / n, fn / n)
    assert info["n_select"] == 0 and info["n_in"] == info["n_out"] == n
    assert eps == pytest.approx(_manual_bound(fp, n, fn, n, 1e-3, 0.1), abs=1e-12)
    # a threshold exactly at a score counts that score as "guess IN"
    assert epsilon_lower_bound([1.0], [1.0], 0.0, threshold=1.0)[1]["fpr"] == 1.0


def test_complement_direction_counts():
    """An attacker whose errors are mostly false positives is bounded through
    log((1 - delta - FPR_hi) / FNR_hi): nearly all IN runs score high, half the OUT runs too."""
    n = 400
    s_in = np.ones(n)
    s_out = np.r_[np.ones(n // 2), np.zeros(n // 2)]
    eps, info = epsilon_lower_bound(s_in, s_out, 0.0, threshold=0.5)
    fpr_hi, fnr_hi = info["fpr_hi"], info["fnr_hi"]
    assert eps == pytest.approx(math.log((1 - fpr_hi) / fnr_hi)) and eps > 1.0


def test_threshold_chosen_on_first_half_only():
    """By construction: the first half separates at 10 (in >= 10 > out), the second half at 100
    -- choosing on the evaluation half would pick 100 and certify more."""
    sel_in, sel_out = np.full(50, 10.0), np.full(50, 0.0)
    ev_in = np.r_[np.full(45, 100.0), np.full(5, 5.0)]     # 5 IN runs fall below 10
    ev_out = np.r_[np.full(45, 0.0), np.full(5, 50.0)]      # 5 OUT runs land between 10 and 100
    eps, info = epsilon_lower_bound(np.r_[sel_in, ev_in], np.r_[sel_out, ev_out], DELTA)
    assert info["threshold"] == 10.0 and info["n_select"] == 50 and info["n_in"] == 50
    assert (info["fpr"], info["fnr"]) == (0.1, 0.1)
    assert eps == pytest.approx(epsilon_lower_bound(ev_in, ev_out, DELTA, threshold=10.0)[0])
    peeked = epsilon_lower_bound(ev_in, ev_out, DELTA, threshold=100.0)[0]
    assert peeked > eps
    # whatever the evaluation half holds, the threshold does not move ...
    rng = np.random.default_rng(2)
    other = epsilon_lower_bound(np.r_[sel_in, rng.normal(size=50)],
                                np.r_[sel_out, rng.normal(size=50)], DELTA)[1]
    assert other["threshold"] == 10.0
    # ... and it follows the selection half
    moved = epsilon_lower_bound(np.r_[np.full(50, 3.0), ev_in], np.r_[sel_out, ev_out], DELTA)[1]
    assert moved["threshold"] == 3.0


def test_bound_holds_under_the_null():
    """A mechanism whose output ignores the canary is (0, 0)-DP: the bound may exceed 0 in at
    most alpha of audits. With alpha = 0.4 the split audit does (measured ~5%); searching the
    threshold on the evaluation data instead exceeds 0 in ~59% of them, over alpha."""
    rng = np.random.default_rng(3)
    alpha, reps = 0.4, 300
    positive = sum(epsilon_lower_bound(rng.normal(size=200), rng.normal(size=200), 0.0,
                                       alpha=alpha)[0] > 0 for _ in range(reps))
    assert positive / reps <= alpha


def test_max_certifiable_epsilon():
    # 4000 trials: 1000 evaluation runs a world; no errors: FPR_hi = FNR_hi = 1 - 0.025^(1/1000)
    hi = 1 - 0.025 ** (1 / 1000)
    assert max_certifiable_epsilon(4000, DELTA) == pytest.approx(math.log((1 - DELTA - hi) / hi))
    assert max_certifiable_epsilon(400, DELTA) < max_certifiable_epsilon(4000, DELTA)


def test_argument_checks():
    with pytest.raises(ValueError):
        epsilon_lower_bound([1.0], [0.0], DELTA)            # cannot split one score
    with pytest.raises(ValueError):
        epsilon_lower_bound([1.0, float("nan")], [0.0, 1.0], DELTA)
    with pytest.raises(ValueError):
        epsilon_lower_bound([1.0, 2.0], [0.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        run_audit(lambda c, i: 0.0, 5, DELTA, 1.0)        # odd
    with pytest.raises(ValueError):
        run_audit(lambda c, i: float("nan"), 4, DELTA, 1.0)
    with pytest.raises(ValueError):
        poisson_gaussian_llr([0.0], 1.0, 1.0, 0.0)


# --- scores ------------------------------------------------------------------------------------


def test_projection_score_numpy_torch_and_broadcast():
    rng = np.random.default_rng(4)
    m, u = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    expected = float(np.sum(m * u))
    assert projection_score(m, u) == pytest.approx(expected)
    assert projection_score(torch.from_numpy(m).float(), torch.from_numpy(u)) == pytest.approx(
        expected, rel=1e-6)
    assert projection_score(list(torch.from_numpy(m)), u) == pytest.approx(expected)
    assert projection_score(m, u[0]) == pytest.approx(float(np.sum(m @ u[0])))
    assert projections(m, u).shape == (5,)
    with pytest.raises(ValueError):
        projections(m, u[:, :2])


def test_poisson_llr_matches_naive_and_is_stable():
    x, mu, sigma, q = np.array([-1.0, 0.2, 1.5, 3.0]), 1.0, 0.8, 0.1
    naive = np.sum(np.log(1 - q + q * np.exp((x * mu - mu ** 2 / 2) / sigma ** 2)))
    assert poisson_gaussian_llr(x, mu, sigma, q) == pytest.approx(naive, rel=1e-12)
    # q = 1: the plain Gaussian log-likelihood ratio, linear in the projections
    assert poisson_gaussian_llr(x, mu, sigma, 1.0) == pytest.approx(
        np.sum((x * mu - mu ** 2 / 2) / sigma ** 2))
    # tiny sigma: exp overflows naively; the stable form stays finite and ordered
    with np.errstate(over="raise"):
        hi = poisson_gaussian_llr([1.0, 0.0], 1.0, 1e-6, 0.01)
        lo = poisson_gaussian_llr([0.0, 0.0], 1.0, 1e-6, 0.01)
    assert math.isfinite(hi) and hi > 1e11 and lo == pytest.approx(2 * math.log(0.99))


def test_run_audit_interleaves_and_reports():
    calls = []

    def trial(canary_in, index):
        calls.append((canary_in, index))
        return float(canary_in)                     # a perfect attacker

    res = run_audit(trial, 40, DELTA, reported_epsilon=0.5)   # 10 evaluation runs a world: <= 0.81
    assert calls == [(i % 2 == 0, i) for i in range(40)]
    assert isinstance(res, AuditResult) and res.trials == 40 and (res.fpr, res.fnr) == (0.0, 0.0)
    assert res.epsilon_lower_bound == pytest.approx(max_certifiable_epsilon(40, DELTA))
    assert res.epsilon_lower_bound > 0.5 and not res.passed and "FAILED" in str(res)
    ok = dataclasses.replace(res, reported_epsilon=math.inf)
    assert ok.passed and "PASSED" in str(ok) and "reported epsilon" in str(ok)


# --- correct vs broken mechanisms ------------------------------------------------------------

SIGMA = 12.0  # T = 100 unsampled steps: epsilon(12, 100, 1e-5) = 3.84 (RDP)


def test_gaussian_mechanism_passes_and_is_detected(directions):
    """Correct noise: the bound is positive (the attack sees the canary) and below the reported
    epsilon (3.84 RDP; 3.55 PLD). Measured over 30 seeds: 0.51 .. 1.81, median 0.97."""
    reported = epsilon(SIGMA, T, DELTA)
    res = run_audit(gaussian_trial(directions, SIGMA, seed=0), 4000, DELTA, reported)
    assert 0.3 < res.epsilon_lower_bound <= reported and res.passed, str(res)


def test_gaussian_mechanism_with_noise_off_fails(directions):
    """The noise is dropped while the ledger still accounts for sigma = 12: the attacker never
    errs and the audit certifies its maximum, 5.60 with 4000 trials, above 3.84."""
    reported = epsilon(SIGMA, T, DELTA)
    res = run_audit(gaussian_trial(directions, 0.0, seed=0), 4000, DELTA, reported)
    assert res.epsilon_lower_bound > reported and not res.passed, str(res)
    assert res.epsilon_lower_bound == pytest.approx(max_certifiable_epsilon(4000, DELTA))


Q_REPORTED, Q_TRUE, SIGMA_Q = 0.01, 0.1, 1.0


def test_poisson_rate_underreported_fails(directions):
    """The mechanism samples the canary at q = 0.1 but the accountant is told 0.01:
    epsilon(1, 100, 1e-5, 0.01) = 1.21 while the audit certifies more (the attacker uses the
    *reported* rate in its likelihood ratio: it does not know the bug). Over 30 seeds with
    8000 trials: 1.50 .. 2.75, median 2.03. Reported at the true rate, 7.90, it passes."""
    reported = epsilon(SIGMA_Q, T, DELTA, Q_REPORTED)
    trial = poisson_trial(directions, SIGMA_Q, Q_TRUE, Q_REPORTED, seed=0)
    res = run_audit(trial, 8000, DELTA, reported)
    assert res.epsilon_lower_bound > reported and not res.passed, str(res)
    honest = dataclasses.replace(res, reported_epsilon=epsilon(SIGMA_Q, T, DELTA, Q_TRUE))
    assert honest.passed


def test_poisson_rate_correctly_reported_passes(directions):
    """The same attack against a mechanism that samples at the reported q = 0.01 stays below
    1.21 (measured: 0.00 .. 0.07 over 30 seeds)."""
    reported = epsilon(SIGMA_Q, T, DELTA, Q_REPORTED)
    trial = poisson_trial(directions, SIGMA_Q, Q_REPORTED, Q_REPORTED, seed=0)
    res = run_audit(trial, 8000, DELTA, reported)
    assert res.epsilon_lower_bound <= reported and res.passed, str(res)
