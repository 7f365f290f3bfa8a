"""The audit against the sketch_dp hook's real message encoder: its empirical epsilon lower
bound stays below the reported epsilon for the mechanism as shipped, and exceeds it when the
mechanism is deliberately broken (noise off; sampling rate under-reported 10x, i.e. the coin
never tossed, as in the hook before sampling was carried out). Both directions are tested, so
the audit itself can fail."""

import logging
import warnings

import torch

from commcomp.hooks import SketchDPState
from commcomp.privacy.audit import audit_sketch_dp
from tests._dist import spawn


def _state(**options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded (repeatable, insecure) noise warns
        return SketchDPState(sketch="srht", sketch_ratio=1.0, clip_norm=1.0, noise_seed=11, **options)


def run_audits(rank, world):
    logging.getLogger("absl").setLevel(logging.ERROR)
    # One step, replace adjacency (the client-level default): reported epsilon ~ 2.6.
    ok = audit_sketch_dp(_state(noise_multiplier=3.2), trials=4000, steps=1)
    assert ok.passed and 0.3 < ok.epsilon_lower_bound < ok.reported_epsilon, str(ok)
    off = _state(noise_multiplier=3.2)
    off.noise.gaussian = lambda n, std, device: torch.zeros(n, device=device)  # noise dropped
    broken = audit_sketch_dp(off, trials=4000, steps=1)
    assert not broken.passed and broken.epsilon_lower_bound > ok.reported_epsilon + 2, str(broken)
    # Sampling: 10 steps at q = 0.1, add/remove (RDP): reported epsilon ~ 1.55.
    sampled = dict(noise_multiplier=1.5, sample_rate=0.1, adjacency="add_remove")
    ok = audit_sketch_dp(_state(**sampled), trials=4000, steps=10)
    assert ok.passed, str(ok)
    never = _state(**sampled)
    never.takes_part = lambda step: True  # reports q = 0.1, takes part in every step
    broken = audit_sketch_dp(never, trials=4000, steps=10)
    assert not broken.passed and broken.epsilon_lower_bound > broken.reported_epsilon + 0.5, str(broken)
    print("\n".join(str(r) for r in (ok, broken)))


def test_audit_separates_the_hook_from_broken_versions(tmp_path):
    spawn(run_audits, 1, tmp_path)
