"""Empirical privacy auditing: a statistical *lower* bound on the epsilon a mechanism spends,
from repeated-trial membership inference (Jagielski et al. 2020; Nasr et al. 2021).

* :mod:`.bounds` -- the method: Clopper-Pearson bounds on the attacker's error rates, the
  epsilon they force (:func:`epsilon_lower_bound`), and :func:`run_audit` over a trial
  function;
* :mod:`.attacks` -- the attacker: optimal scores against Gaussian-mechanism messages
  (:func:`projection_score`, :func:`poisson_gaussian_llr`) and :func:`audit_sketch_dp`, the
  audit of the ``sketch_dp`` hook's real message encoder.
"""

from .attacks import audit_sketch_dp, poisson_gaussian_llr, projection_score, projections
from .bounds import (
    AuditResult,
    clopper_pearson_upper,
    epsilon_lower_bound,
    max_certifiable_epsilon,
    run_audit,
)

__all__ = ["AuditResult", "audit_sketch_dp", "clopper_pearson_upper", "epsilon_lower_bound",
           "max_certifiable_epsilon", "poisson_gaussian_llr", "projection_score", "projections", "run_audit"]
