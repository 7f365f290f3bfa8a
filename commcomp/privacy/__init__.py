"""Differential privacy for gradient exchange: clipping, per-rank Gaussian noise, and
(epsilon, delta) accounting through the maintained ``dp-accounting`` library.

* :mod:`.accounting`: :func:`epsilon`, :func:`noise_for_epsilon`, :class:`PrivacyLedger`.
* :mod:`.mechanisms`: :class:`NoiseSource`, :func:`clip_per_sample_` (record level, on top
  of Opacus' ``GradSampleModule``).
* :mod:`.attack`: a gradient-inversion (DLG) attack on sketched gradients, to show what
  the noise is for.

The DP hook itself is :class:`commcomp.hooks.SketchDPState`.
"""

from .accounting import PrivacyLedger, epsilon, noise_for_epsilon
from .attack import AttackResult, invert_gradient, message_for, reconstruction_mse
from .mechanisms import NoiseSource, clip_coefficient, clip_per_sample_

__all__ = ["AttackResult", "NoiseSource", "PrivacyLedger", "clip_coefficient", "clip_per_sample_",
           "epsilon", "invert_gradient", "message_for", "noise_for_epsilon", "reconstruction_mse"]
