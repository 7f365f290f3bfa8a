"""The attacker of an empirical privacy audit (:mod:`commcomp.privacy.audit.bounds`): its
optimal scores against Gaussian-mechanism messages, and the audit of the ``sketch_dp`` hook's
message encoder that uses them.

Threat model (the audit of the ``sketch_dp`` message encoder)
--------------------------------------------------------------
The audited mechanism is the client-side encoder of :class:`commcomp.hooks.SketchDPState`:
what one client sends over the wire at each step, not the trained model. The attacker is
the strongest one the DP definition covers (Nasr et al.'s "gradient canary"):

* It **sees every message** the client sends, ``y_t = R_t (clip(g_t) + noise_t)`` (or
  ``clip(R_t g_t) + noise_t`` with noise placed after the sketch), for ``t = 1..T``.
* It **knows the public sketch seed**, hence every sketch matrix ``R_t``, and the
  mechanism's parameters: clip norm ``C``, noise multiplier ``sigma``, sampling rate ``q``.
  It does not know the noise (drawn from a secret key) nor, under Poisson sampling, whether
  the client took part in a given step.
* It **chooses the canary**: in world IN the client's contribution at step ``t`` is a
  gradient ``g_t`` of norm exactly ``C`` (the clip norm, the sensitivity), in a direction
  the attacker knows; in world OUT (the add/remove neighbour) the client contributes
  nothing. Everything else in the message (other records, other clients) is fixed and
  known, i.e. subtracted -- the worst case that the DP guarantee has to cover.

Given that, the optimal score is a likelihood ratio (Neyman-Pearson): without sampling the
messages are Gaussian with mean ``R_t g_t`` or ``0`` and :func:`projection_score` onto the
whitened direction is optimal; with Poisson sampling each step is a mixture and
:func:`poisson_gaussian_llr` of the per-step projections is. :func:`audit_sketch_dp` builds
the messages with the hook's real encoder (``SketchDPState.encode``) and returns one of these
scores. Under ``adjacency="replace"`` (the client-level default) world OUT is the canary's
opposite, ``-g_t``: the two worlds are ``2C`` apart.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from .bounds import ArrayLike, AuditResult, _as_numpy, run_audit

# --- attack scores for Gaussian-mechanism messages --------------------------------------------


def projections(messages: ArrayLike, direction: ArrayLike) -> np.ndarray:
    """Per-step projections ``x_t = <m_t, u_t>`` of the messages on the canary direction.

    Args:
        messages: ``(T, d)`` (or ``(d,)`` for one step): what the attacker observed, with
            everything it knows that is not the canary (other contributions) subtracted.
        direction: ``(T, d)``, or ``(d,)`` for the same direction at every step: ``u_t``, the
            canary's contribution to message ``t`` as the attacker computes it from the public
            sketch seed, e.g. ``R_t g_t``. If the noise in message space is not isotropic
            (noise added before the sketch: covariance ``sigma^2 C^2 R_t R_t^T``), whiten:
            use ``(R_t R_t^T)^{-1} R_t g_t`` as the direction.

    With unit directions and a canary of norm ``mu`` along them, ``x_t ~ N(mu, s^2)`` in world
    IN and ``N(0, s^2)`` in world OUT, ``s`` being the noise std: the inputs
    :func:`poisson_gaussian_llr` expects.
    """
    m, u = _as_numpy(messages), _as_numpy(direction)
    if m.ndim == 1:
        m = m[None, :]
    if u.ndim == 1:
        u = np.broadcast_to(u, m.shape)
    if m.ndim != 2 or u.shape != m.shape:
        raise ValueError(f"commcomp: messages {m.shape} and direction {u.shape} must be (T, d) "
                         "(direction may be (d,))")
    return np.einsum("td,td->t", m, u)


def projection_score(messages: ArrayLike, direction: ArrayLike) -> float:
    """``sum_t <m_t, u_t>``: the optimal score against composed Gaussian mechanisms.

    Without sampling, the log-likelihood ratio of world IN (``m_t ~ N(u_t, s^2 I)``) against
    world OUT (``m_t ~ N(0, s^2 I)``) is ``(sum_t <m_t, u_t> - sum_t |u_t|^2 / 2) / s^2``: an
    increasing function of this sum, so thresholding the sum is the Neyman-Pearson optimal
    test at every false positive rate. The score is ``N(sum |u_t|^2, s^2 sum |u_t|^2)`` in
    world IN and centred in world OUT, i.e. exactly the ``mu``-GDP trade-off with
    ``mu = sqrt(sum |u_t|^2) / s`` that the accountant composes. See :func:`projections` for
    the arguments.
    """
    return float(projections(messages, direction).sum())


def poisson_gaussian_llr(projections: ArrayLike, mu: float, sigma: float, q: float) -> float:
    """Log-likelihood ratio of a Poisson-subsampled Gaussian, summed over steps.

    Under Poisson sampling at rate ``q`` the canary is in step ``t``'s message with probability
    ``q``, independently, and the attacker does not see whether it was; a projection is
    ``x_t ~ (1 - q) N(0, sigma^2) + q N(mu, sigma^2)`` in world IN and ``N(0, sigma^2)`` in world
    OUT. The per-step likelihood ratio is ``1 - q + q exp((x_t mu - mu^2 / 2) / sigma^2)``, and

        LLR = sum_t log(1 - q + q exp((x_t mu - mu^2 / 2) / sigma^2))

    is the Neyman-Pearson optimal score for an attacker who knows ``q`` (it rewards the few
    steps where the canary stands out, where the plain sum drowns them in the noise of the
    steps it missed). Computed as ``logaddexp(log(1 - q), log(q) + z)``: no overflow for large
    ``z`` (tiny ``sigma``). With ``q = 1`` it is the projection score, rescaled.

    Args:
        projections: per-step ``x_t`` (:func:`projections`), shape ``(T,)``.
        mu: the canary's projection when present (its norm, with unit directions).
        sigma: the std of the noise along the direction.
        q: the sampling rate the attacker assumes, in (0, 1].
    """
    x = _as_numpy(projections).ravel()
    if not (isinstance(sigma, numbers.Real) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"commcomp: sigma must be a finite number > 0, got {sigma!r}")
    if not (isinstance(q, numbers.Real) and 0 < q <= 1):
        raise ValueError(f"commcomp: q must be in (0, 1], got {q!r}")
    if not (isinstance(mu, numbers.Real) and math.isfinite(mu)):
        raise ValueError(f"commcomp: mu must be a finite number, got {mu!r}")
    z = (x * mu - mu * mu / 2.0) / (sigma * sigma)
    log_keep = math.log1p(-q) if q < 1 else -math.inf
    return float(np.logaddexp(log_keep, math.log(q) + z).sum())


# --- the sketch_dp hook's own encoder ---------------------------------------------------------


def audit_sketch_dp(state, trials: int = 4000, steps: int = 1, dim: int = 8,
                    alpha: float = 0.05, delta: Optional[float] = None) -> AuditResult:
    """Audit the messages a :class:`commcomp.hooks.SketchDPState` (client level) sends.

    Each trial runs ``steps`` steps of ``state.encode`` -- clipping, the participation coin,
    the secure noise, the sketch: exactly what the hook puts on the wire -- on a canary
    gradient of norm ``10 C`` along a fixed direction (clipped to ``C``) in world IN, and on
    its neighbour in world OUT: zero (``adjacency="add_remove"``) or the opposite gradient
    (``"replace"``). The attacker de-sketches each message with the public ``R_t``
    (``Sketch.transpose``), projects on the direction, and scores the steps with
    :func:`poisson_gaussian_llr` at the state's reported ``sample_rate`` (add/remove with
    sampling) or with their sum (:func:`projection_score`: otherwise). The reported epsilon
    is what the state's ledger would report for ``steps`` released steps.

    Use a state whose sketch is orthogonal (``sketch="srht", sketch_ratio=1.0``) for the
    tightest audit; other sketches are audited too, with a weaker (still valid) attacker.
    The state's step counter and ledger are not touched; its noise generator advances.

    Args:
        state: the state to audit (``level="client"``; any world size: no collective runs).
        trials: runs, both worlds together (:func:`run_audit`).
        steps: steps per run (composition and sampling need several).
        dim: length of the audited gradient.
        alpha, delta: the audit's confidence and the delta of the reported epsilon
            (default: the state's ``target_delta``).
    """
    from ..accounting import PrivacyLedger  # noqa: PLC0415 (keeps scipy/dp imports lazy)

    if getattr(state, "level", None) != "client":
        raise ValueError("commcomp: audit_sketch_dp audits level='client' states (the message of "
                         "one client per step)")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"commcomp: steps must be an int >= 1, got {steps!r}")
    C = state.clip_norm if state.clip_norm is not None else 1.0
    delta = state.target_delta if delta is None else delta
    ledger = PrivacyLedger(state.noise_multiplier, state.sample_rate, state.accountant,
                           state.adjacency)
    ledger.record(steps)
    reported = ledger.epsilon(delta) if state.clip_norm is not None else math.inf
    u = torch.zeros(dim)
    u[0] = 1.0
    canary = 10.0 * C * u
    neighbour = -canary if state.adjacency == "replace" else torch.zeros(dim)
    sampled = state.adjacency == "add_remove" and state.sample_rate < 1.0
    noise_std = max(state.noise_multiplier, 1e-12) * C

    def trial(canary_in: bool, index: int) -> float:
        x = canary if canary_in else neighbour
        proj = []
        for t in range(steps):
            msg, sks, _ = state.encode([(0, x.clone())], index * steps + t)
            proj.append(float(sks[0].transpose(msg[:sks[0].sketch_size]) @ u))
        if sampled:
            return poisson_gaussian_llr(proj, C, noise_std, state.sample_rate)
        return float(sum(proj))

    return run_audit(trial, trials, delta, reported, alpha)


__all__ = ["audit_sketch_dp", "poisson_gaussian_llr", "projection_score", "projections"]
