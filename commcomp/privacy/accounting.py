"""Privacy accounting through Google's maintained ``dp-accounting`` library (no torch
dependency): Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019 for Poisson subsampling)
and privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), never a
hand-rolled bound.

Every commcomp mechanism is ``steps`` compositions of a Gaussian mechanism with noise
multiplier ``sigma`` (noise std / L2 sensitivity), each optionally Poisson-subsampled at
``sample_rate``; adjacency is add-or-remove one unit (one client, or one record) or replace
one unit by another (sensitivity twice as large), see :func:`check_adjacency`.

>>> sigma = noise_for_epsilon(8.0, 1e-5, steps=300)              # client level, all clients
>>> epsilon(sigma, steps=300, delta=1e-5) <= 8.0
True
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict

ACCOUNTANTS = ("rdp", "pld")
ADJACENCIES = ("replace", "add_remove")


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


def check_adjacency(adjacency) -> str:
    if adjacency not in ADJACENCIES:
        raise ValueError(
            f"commcomp: adjacency must be one of {ADJACENCIES}, got {adjacency!r}: 'replace' (two "
            "datasets of the same unit: sensitivity 2C) or 'add_remove' (a unit vs no unit)")
    return adjacency


def _relation(adjacency: str, sample_rate: float, accountant: str):
    """How ``dp_accounting`` must see ``adjacency``: ``(noise multiplier factor, relation)``.

    A unit's clipped contribution has L2 norm <= C and the noise std is sigma * C. Under
    add/remove the two neighbouring outputs are N(u, .) and N(0, .): distance C. Under replace
    they are N(u, .) and N(v, .): distance up to 2C. Without sampling that is exactly a
    Gaussian mechanism with multiplier sigma / 2 under add/remove (both accountants agree).
    With Poisson sampling the outputs are the mixtures q N(u) + (1-q) N(0) and
    q N(v) + (1-q) N(0); ``dp_accounting``'s PLD accountant models exactly these under
    ``REPLACE_ONE`` (``privacy_loss_mechanism.GaussianPrivacyLoss``, adjacency ``REPLACE``),
    its RDP accountant does not support them.
    """
    dp = _dp()
    relation = dp.NeighboringRelation
    if adjacency == "add_remove" or sample_rate >= 1.0:
        return (0.5 if adjacency == "replace" else 1.0), relation.ADD_OR_REMOVE_ONE
    if accountant != "pld":
        raise ValueError(
            f"commcomp: adjacency='replace' with sample_rate={sample_rate} < 1 needs "
            "accountant='pld' (dp-accounting's RDP accountant cannot compose Poisson-sampled "
            "Gaussians under replace-one); pass accountant='pld', or adjacency='add_remove' if "
            "distinguishing a unit from an absent one is the guarantee you want")
    return 1.0, relation.REPLACE_ONE


def dp_event(noise_multiplier: float, steps: int, sample_rate: float = 1.0):
    """The ``dp_accounting`` event of ``steps`` (subsampled) Gaussian mechanisms."""
    dp = _dp()
    event = dp.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp.PoissonSampledDpEvent(sample_rate, event)
    return dp.SelfComposedDpEvent(event, steps)


def make_accountant(name: str = "rdp", relation=None):
    """A fresh ``dp_accounting`` accountant: ``"rdp"`` (fast, slightly loose) or ``"pld"``
    (tight, slower for many steps); ``relation`` is a ``dp_accounting.NeighboringRelation``
    (default add/remove one)."""
    dp = _dp()
    check_accountant(name)
    relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE if relation is None else relation
    if name == "rdp":
        return dp.rdp.RdpAccountant(neighboring_relation=relation)
    return dp.pld.PLDAccountant(neighboring_relation=relation)


def _epsilon_of(events, delta: float, sample_rate: float, accountant: str, adjacency: str) -> float:
    """epsilon of ``[(noise_multiplier, steps), ...]``, each step sampled at ``sample_rate``."""
    events = [(s, n) for s, n in events if n > 0]
    if not events:
        return 0.0
    if any(s == 0 for s, _ in events):
        return math.inf
    factor, relation = _relation(adjacency, sample_rate, accountant)
    acc = make_accountant(accountant, relation)
    for sigma, n in events:
        acc.compose(dp_event(sigma * factor, n, sample_rate))
    return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier: float, steps: int, delta: float, sample_rate: float = 1.0,
            accountant: str = "rdp", adjacency: str = "add_remove") -> float:
    """The epsilon spent by ``steps`` Gaussian mechanisms at ``delta``; ``inf`` if unnoised.

    ``noise_multiplier`` is noise std / C, where C bounds the L2 norm of one unit's
    contribution; ``adjacency`` says which neighbouring datasets are protected
    (:func:`check_adjacency`: ``"replace"`` doubles the distance between them).
    """
    sigma, steps = check_noise_multiplier(noise_multiplier), check_steps(steps)
    delta, q = check_delta(delta), check_sample_rate(sample_rate)
    check_accountant(accountant)
    check_adjacency(adjacency)
    return _epsilon_of([(sigma, steps)], delta, q, accountant, adjacency)


def noise_for_epsilon(epsilon: float, delta: float, steps: int, sample_rate: float = 1.0,
                      accountant: str = "rdp", adjacency: str = "add_remove") -> float:
    """The smallest noise multiplier whose ``steps`` (subsampled) Gaussian mechanisms spend at
    most ``epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``, to 1e-4).

    The search is bracketed: an upper end whose epsilon is within budget (from the RDP answer
    where RDP applies, it bounds PLD's from above) and a lower end that overspends, found by
    doubling and halving. Starting PLD at a tiny sigma would build an enormous privacy loss
    distribution (it ran out of memory at 1e-3).
    """
    eps, delta = check_epsilon(epsilon), check_delta(delta)
    steps, q = check_steps(steps), check_sample_rate(sample_rate)
    if steps == 0:
        raise ValueError("commcomp: steps must be >= 1 to calibrate noise")
    check_accountant(accountant)
    check_adjacency(adjacency)
    dp = _dp()
    factor, relation = _relation(adjacency, q, accountant)

    def eps_at(sigma: float) -> float:
        return _epsilon_of([(sigma, steps)], delta, q, accountant, adjacency)

    if accountant == "pld" and relation == dp.NeighboringRelation.ADD_OR_REMOVE_ONE:
        upper = noise_for_epsilon(eps, delta, steps, q, "rdp", adjacency)  # RDP >= PLD's epsilon
    else:
        upper = 1.0
    while eps_at(upper) > eps:
        upper *= 2.0
        if upper > 1e6:
            raise ValueError(f"commcomp: no noise multiplier up to 1e6 reaches epsilon={eps} at "
                             f"delta={delta} over {steps} steps; raise epsilon or delta")
    lower = upper / 2.0
    while eps_at(lower) <= eps:
        upper, lower = lower, lower / 2.0
        if lower < 1e-3:
            return upper
    make: Callable[[float], object] = lambda sigma: dp_event(sigma * factor, steps, q)  # noqa: E731
    return float(dp.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, relation), make, eps, delta,
        dp.ExplicitBracketInterval(lower, upper), tol=1e-4))


class PrivacyLedger:
    """Counts the Gaussian mechanisms a hook has released and answers ``epsilon(delta)``.

    One entry per released *step*: a step whose contribution is split over ``parts``
    separately clipped pieces (``clip_scope="bucket"``: each of B buckets clipped to C and
    noised with sigma C) is one Gaussian mechanism with sensitivity ``sqrt(B) C``, i.e.
    multiplier ``sigma / sqrt(B)``, and one participation coin (never B independent ones).

    Args:
        noise_multiplier: sigma of each release (noise std / sensitivity); 0 = no privacy.
        sample_rate: Poisson sampling rate of each step (1: every unit every step).
        accountant: ``"rdp"`` or ``"pld"``.
        adjacency: ``"add_remove"`` or ``"replace"`` (see :func:`epsilon`).
    """

    def __init__(self, noise_multiplier: float, sample_rate: float = 1.0, accountant: str = "rdp",
                 adjacency: str = "add_remove"):
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        self.accountant = check_accountant(accountant)
        self.adjacency = check_adjacency(adjacency)
        _relation(self.adjacency, self.sample_rate, self.accountant)  # refuse unsupported now
        self.parts: Dict[int, int] = {}  # pieces per step -> number of such steps

    @property
    def steps(self) -> int:
        """Steps released so far (every message counts, pure noise ones too)."""
        return sum(self.parts.values())

    def record(self, n: int = 1, parts: int = 1) -> None:
        if int(parts) < 1:
            raise ValueError(f"commcomp: parts must be >= 1, got {parts!r}")
        self.parts[int(parts)] = self.parts.get(int(parts), 0) + int(n)

    def epsilon(self, delta: float) -> float:
        delta = check_delta(delta)
        events = [(self.noise_multiplier / math.sqrt(b), n) for b, n in sorted(self.parts.items())]
        return _epsilon_of(events, delta, self.sample_rate, self.accountant, self.adjacency)

    def state_dict(self) -> dict:
        return {"parts": {str(b): n for b, n in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.parts = {int(b): int(n) for b, n in state["parts"].items()}
