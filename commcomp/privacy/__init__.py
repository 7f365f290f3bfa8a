"""Differential privacy for gradient exchange: clipping, per-rank Gaussian noise, and
(epsilon, delta) accounting through the maintained ``dp-accounting`` library.

* :mod:`.accounting`: :func:`epsilon`, :func:`noise_for_epsilon`, :class:`PrivacyLedger`
  (add/remove or replace adjacency; Poisson sampling; one event per released step).
* :mod:`.csprng`: :class:`SecureGenerator`, ChaCha20 with a 256-bit key turned into
  Gaussians (the noise an eavesdropper cannot regenerate); the cipher is :mod:`.chacha20`.
* :mod:`.mechanisms`: :class:`NoiseSource`, :func:`clip_per_sample_` (record level, on top
  of Opacus' ``GradSampleModule``; the hook's own :meth:`SketchDPState.clip_per_sample_`
  is what its ``reduce_`` accepts).
* :mod:`.sampling`: :class:`PoissonBatchSampler`, :func:`dp_data_loader`: record-level
  Poisson sampling from OS entropy, which the accounting assumes.
* :mod:`.audit`: an empirical lower bound on epsilon (membership inference over repeated
  runs), :func:`audit_sketch_dp` against the hook's real message encoder.
* :mod:`.attack`: a gradient-inversion (DLG) attack on sketched gradients, to show what
  the noise is for; :mod:`.lenet`: the sigmoid LeNet it attacks.

The DP hook itself is :class:`commcomp.hooks.SketchDPState`.
"""

from .accounting import PrivacyLedger, epsilon, noise_for_epsilon
from .attack import AttackResult, invert_gradient, message_for, reconstruction_mse
from .audit import AuditResult, audit_sketch_dp, epsilon_lower_bound, run_audit
from .csprng import SecureGenerator
from .mechanisms import NoiseSource, clip_coefficient, clip_per_sample_
from .sampling import PoissonBatchSampler, dp_data_loader

__all__ = ["AttackResult", "AuditResult", "NoiseSource", "PoissonBatchSampler", "PrivacyLedger",
           "SecureGenerator", "audit_sketch_dp", "clip_coefficient", "clip_per_sample_",
           "dp_data_loader", "epsilon", "epsilon_lower_bound", "invert_gradient", "message_for",
           "noise_for_epsilon", "reconstruction_mse", "run_audit"]
