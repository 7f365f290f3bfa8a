"""(epsilon, delta) of Gaussian mechanisms from closed forms: oracles for the accounting tests
that do not call dp-accounting (the library commcomp.privacy.accounting calls), so a wrong event,
adjacency factor, composition or conversion in the code cannot be repeated by its test.

The noise multiplier ``sigma`` is noise std / L2 sensitivity throughout; ``q`` a Poisson
sampling rate; adjacency add/remove one unit (replace is ``sigma / 2`` without sampling).

- Gaussian mechanism, Renyi DP of order alpha: ``alpha / (2 sigma^2)`` per step, additive over
  steps (Mironov 2017, "Renyi Differential Privacy", Table II and Proposition 1).
- Poisson-subsampled Gaussian, add/remove: RDP ``log(A_alpha) / (alpha - 1)`` with
  ``A_alpha = E_{x ~ N(0, sigma^2)} [(1 - q + q exp((2x - 1) / (2 sigma^2)))^alpha]``; at integer
  alpha ``A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))``
  (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism",
  Sec. 3.3); at fractional alpha the same expectation by quadrature.
- RDP to (epsilon, delta): ``min_alpha RDP(alpha) + log(1 - 1/alpha) - log(delta alpha) / (alpha - 1)``
  (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy", Prop. 12;
  Asoodeh et al. 2020, Eq. 20): the conversion dp-accounting's RdpAccountant applies, minimised
  over the orders it uses by default (``RDP_ORDERS``).
- The exact (epsilon, delta) of a Gaussian mechanism whose means are ``mu`` noise stds apart
  (``steps`` compositions of multiplier ``sigma`` are ``mu = sqrt(steps) / sigma``):
  ``delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)`` (Balle & Wang 2018, "Improving
  the Gaussian Mechanism for Differential Privacy", Theorem 8; Dong, Roth, Su 2022, "Gaussian
  Differential Privacy", Corollaries 2.13 and 3.3). A privacy loss distribution accountant
  must come back to it.
- One Poisson-subsampled Gaussian step, add/remove: the hockey-stick divergences between
  ``q N(1, sigma^2) + (1 - q) N(0, sigma^2)`` and ``N(0, sigma^2)``, both ways; the likelihood
  ratio is monotone in x, so each is a difference of normal tails at one threshold.
- Lower bound for composed sampled steps: any event S gives ``delta(eps) >= P(S) - e^eps Q(S)``;
  with S = {the largest of the ``steps`` outputs exceeds t} both probabilities are closed forms.

Only ``math`` (and scipy's quadrature at fractional orders; scipy comes with dp-accounting).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

# dp_accounting.rdp.RdpAccountant's default orders (rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
RDP_ORDERS: Sequence[float] = ([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                               + [128, 256, 512, 1024])


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


# ---------------------------------------------------------------------------------------------- RDP

def gaussian_rdp(alpha: float, sigma: float) -> float:
    """RDP of order ``alpha`` of one Gaussian mechanism with multiplier ``sigma``."""
    return alpha / (2.0 * sigma ** 2)


def _log_a_integer(alpha: int, sigma: float, q: float) -> float:
    total = -math.inf
    for k in range(alpha + 1):
        log_comb = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = log_comb + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma ** 2)
        total = _log_add(total, term)
    return total


def _log_a_quadrature(alpha: float, sigma: float, q: float) -> float:
    from scipy import integrate

    def log_integrand(x):  # alpha * log(1 - q + q e^z) + log N(x; 0, sigma^2)
        z = (2 * x - 1) / (2 * sigma ** 2)
        return (alpha * _log_add(math.log1p(-q), math.log(q) + z) - x * x / (2 * sigma ** 2)
                - math.log(sigma * math.sqrt(2 * math.pi)))

    shift = max(log_integrand(0.0), log_integrand(alpha))  # the two bumps: x near 0 and near alpha
    value, _ = integrate.quad(lambda x: math.exp(log_integrand(x) - shift), -15 * sigma, alpha + 15 * sigma,
                              points=[0.0, alpha], limit=500, epsabs=0.0, epsrel=1e-12)
    return math.log(value) + shift


def sampled_gaussian_rdp(alpha: float, sigma: float, q: float) -> float:
    """RDP of order ``alpha`` of one Poisson-subsampled Gaussian step (add/remove)."""
    if q >= 1.0:
        return gaussian_rdp(alpha, sigma)
    if float(alpha).is_integer():
        return _log_a_integer(int(alpha), sigma, q) / (alpha - 1)
    return _log_a_quadrature(alpha, sigma, q) / (alpha - 1)


def rdp_epsilon(rdp: Callable[[float], float], delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """epsilon at ``delta`` of a mechanism whose RDP of order alpha is ``rdp(alpha)``."""
    return min(rdp(a) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1) for a in orders)


def gaussian_rdp_epsilon(sigma: float, steps: int, delta: float) -> float:
    """``steps`` Gaussian mechanisms of multiplier ``sigma``, through RDP."""
    return rdp_epsilon(lambda a: steps * gaussian_rdp(a, sigma), delta)


# ---------------------------------------------------------------------------------------- exact

def epsilon_for_delta(delta_of: Callable[[float], float], delta: float) -> float:
    """The smallest epsilon >= 0 with ``delta_of(epsilon) <= delta`` (``delta_of`` decreasing)."""
    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a Gaussian mechanism whose neighbouring means are ``mu`` stds apart."""
    tail = normal_cdf(-mu / 2 - eps / mu)
    return normal_cdf(mu / 2 - eps / mu) - (math.exp(eps) * tail if tail > 0 else 0.0)


def gaussian_exact_epsilon(sigma: float, steps: int, delta: float) -> float:
    """The exact epsilon of ``steps`` Gaussian mechanisms of multiplier ``sigma`` (mu-GDP)."""
    mu = math.sqrt(steps) / sigma
    return epsilon_for_delta(lambda e: gaussian_delta(e, mu), delta)


def sampled_gaussian_delta(eps: float, sigma: float, q: float) -> float:
    """delta(eps) of one Poisson-subsampled Gaussian step, add/remove (the larger direction)."""
    s2 = sigma ** 2
    # P = q N(1) + (1-q) N(0) against Q = N(0): P/Q = 1 - q + q exp((2x - 1) / (2 s2)) > e^eps iff x > t
    t = s2 * math.log((math.exp(eps) - (1 - q)) / q) + 0.5
    tail0 = normal_cdf(-t / sigma)
    remove = q * normal_cdf((1 - t) / sigma) + (1 - q) * tail0 - math.exp(eps) * tail0
    add = 0.0
    if math.exp(-eps) > 1 - q:  # Q/P > e^eps iff x < t2 (otherwise Q/P <= 1/(1-q) <= e^eps everywhere)
        t2 = s2 * math.log((math.exp(-eps) - (1 - q)) / q) + 0.5
        head0 = normal_cdf(t2 / sigma)
        add = head0 - math.exp(eps) * (q * normal_cdf((t2 - 1) / sigma) + (1 - q) * head0)
    return max(remove, add, 0.0)


def sampled_gaussian_exact_epsilon(sigma: float, q: float, delta: float) -> float:
    """The exact epsilon of one Poisson-subsampled Gaussian step (add/remove)."""
    return epsilon_for_delta(lambda e: sampled_gaussian_delta(e, sigma, q), delta)


def sampled_gaussian_epsilon_lower_bound(sigma: float, q: float, steps: int, delta: float) -> float:
    """A lower bound on the true epsilon of ``steps`` Poisson-subsampled Gaussian steps: the
    test "the largest output exceeds t" (t on a grid) between P^steps and Q^steps."""
    thresholds = [i * (1 + 8 * sigma) / 400 for i in range(401)]

    def delta_lower(eps: float) -> float:
        best = 0.0
        for t in thresholds:
            p_one = q * normal_cdf((1 - t) / sigma) + (1 - q) * normal_cdf(-t / sigma)
            q_all = 1 - normal_cdf(t / sigma) ** steps
            p_all = 1 - (1 - p_one) ** steps
            best = max(best, p_all - math.exp(eps) * q_all)
        return best

    return epsilon_for_delta(delta_lower, delta)
