"""Privacy accounting through Google's maintained ``dp-accounting`` library (no torch
dependency): Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for Poisson subsampling)
and privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), never a
hand-rolled bound.

Every commcomp mechanism is ``steps`` compositions of a Gaussian mechanism with noise
multiplier ``sigma`` (noise std / L2 sensitivity), each optionally Poisson-subsampled at
``sample_rate``; adjacency is add-or-remove one unit (one client, or one record).

>>> sigma = noise_for_epsilon(8.0, 1e-5, steps=300)              # client level, all clients
>>> epsilon(sigma, steps=300, delta=1e-5) <= 8.0
True
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

ACCOUNTANTS = ("rdp", "pld")


def _dp():
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "commcomp.privacy needs the dp-accounting package for (epsilon, delta) accounting: "
            "pip install dp-accounting   (or pip install 'commcomp[dp]')"
        ) from exc
    return dp_accounting


def _real(v, name: str, low: float, high: float, low_open=True, high_open=True) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"commcomp: {name} must be a finite number in {lo}{low}, {high}{hi}, got {v!r}")
    return float(v)


def check_delta(delta) -> float:
    return _real(delta, "delta", 0.0, 1.0)


def check_epsilon(eps) -> float:
    return _real(eps, "epsilon", 0.0, math.inf)


def check_sample_rate(q) -> float:
    return _real(q, "sample_rate", 0.0, 1.0, high_open=False)


def check_noise_multiplier(sigma) -> float:
    if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and sigma == 0:
        return 0.0
    return _real(sigma, "noise_multiplier", 0.0, math.inf)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"commcomp: steps must be an int >= 0, got {steps!r}")
    return int(steps)


def check_accountant(name) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"commcomp: accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return name


def dp_event(noise_multiplier: float, steps: int, sample_rate: float = 1.0):
    """The ``dp_accounting`` event of ``steps`` (subsampled) Gaussian mechanisms."""
    dp = _dp()
    event = dp.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp.PoissonSampledDpEvent(sample_rate, event)
    return dp.SelfComposedDpEvent(event, steps)


def make_accountant(name: str = "rdp"):
    """A fresh ``dp_accounting`` accountant: ``"rdp"`` (fast, slightly loose) or ``"pld"``
    (tight, slower for many steps)."""
    dp = _dp()
    check_accountant(name)
    return dp.rdp.RdpAccountant() if name == "rdp" else dp.pld.PLDAccountant()


def epsilon(noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0,
            accountant: str = "rdp") -> float:
    """The epsilon spent by ``steps`` Gaussian mechanisms at ``delta``; ``inf`` if unnoised."""
    sigma, steps = check_noise_multiplier(noise_multiplier), check_steps(steps)
    delta, q = check_delta(delta), check_sample_rate(sample_rate)
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_event(sigma, steps, q))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(epsilon: float, delta: float, steps: int, sample_rate: float = 1.0,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose ``steps`` (subsampled) Gaussian mechanisms spend at
    most ``epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``, to 1e-4)."""
    eps, delta = check_epsilon(epsilon), check_delta(delta)
    steps, q = check_steps(steps), check_sample_rate(sample_rate)
    if steps == 0:
        raise ValueError("commcomp: steps must be >= 1 to calibrate noise")
    check_accountant(accountant)
    dp = _dp()
    make: Callable[[float], object] = lambda sigma: dp_event(sigma, steps, q)  # noqa: E731
    return float(dp.calibrate_dp_mechanism(
        lambda: make_accountant(accountant), make, eps, delta,
        dp.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))


class PrivacyLedger:
    """Counts the Gaussian mechanisms a hook has released and answers ``epsilon(delta)``.

    Args:
        noise_multiplier: sigma of each release (noise std / sensitivity); 0 = no privacy.
        sample_rate: Poisson sampling rate of each release (1: every unit every step).
        accountant: ``"rdp"`` or ``"pld"``.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float = 1.0, accountant: str = "rdp"):
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.accountant = check_accountant(accountant)
        self.steps = 0

    def record(self, n: int = 1) -> None:
        self.steps += int(n)

    def epsilon(self, delta: float) -> float:
        return epsilon(self.noise_multiplier, self.steps, delta, self.sample_rate, self.accountant)
