"""Audit the sketch_dp hook's messages: an empirical lower bound on epsilon, for the mechanism
as shipped and for deliberately broken versions of it.

    python examples/dp_audit.py                 # the four audits of docs/privacy.md (about 1 min)
    python examples/dp_audit.py --trials 8000   # more runs: a tighter bound, twice the time

Each audit runs :func:`commcomp.privacy.audit_sketch_dp`: ``trials`` runs of the hook's real
message encoder (clip, participation coin, ChaCha20 noise, sketch) on a canary gradient and
on its neighbour, an attacker that knows the public sketch seed scores every run, and a
Clopper-Pearson bound on its error rates gives epsilon >= the number printed (95%
confidence). A correct mechanism stays below the reported epsilon; the broken ones must not.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

from commcomp.hooks import SketchDPState
from commcomp.privacy import audit_sketch_dp


def state(noise_seed, **options) -> SketchDPState:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a seeded (repeatable, insecure) generator warns
        return SketchDPState(sketch="srht", sketch_ratio=1.0, clip_norm=1.0, noise_seed=noise_seed,
                             **options)


def no_noise(s: SketchDPState) -> SketchDPState:
    s.noise.gaussian = lambda n, std, device: torch.zeros(n, device=device)
    return s


def never_sits_out(s: SketchDPState) -> SketchDPState:
    s.takes_part = lambda step: True  # reports sample_rate, takes part in every step
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="repeatable audits (default: fresh secure noise each run)")
    args = ap.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdv')}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
        one = dict(noise_multiplier=3.2)  # replace adjacency (client default), 1 step
        sampled = dict(noise_multiplier=1.5, sample_rate=0.1, adjacency="add_remove")  # 10 steps
        cases = [
            ("as shipped: sigma 3.2, replace, 1 step", state(args.noise_seed, **one), 1),
            ("broken: noise off", no_noise(state(args.noise_seed, **one)), 1),
            ("as shipped: sigma 1.5, q 0.1, add/remove, 10 steps", state(args.noise_seed, **sampled), 10),
            ("broken: q reported 0.1, every step taken (10x)", never_sits_out(state(args.noise_seed, **sampled)),
             10),
        ]
        print(f"{'mechanism':52s} {'reported eps':>12s} {'audit eps >=':>12s}  verdict   s")
        for name, s, steps in cases:
            t = time.perf_counter()
            res = audit_sketch_dp(s, trials=args.trials, steps=steps)
            verdict = "passed" if res.passed else "FAILED"
            print(f"{name:52s} {res.reported_epsilon:12.3f} {res.epsilon_lower_bound:12.3f}  {verdict:8s} "
                  f"{time.perf_counter() - t:4.0f}", flush=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
