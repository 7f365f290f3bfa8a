"""Live runs of the sequential-coding round engine, measured against the simulator's prediction.

:func:`plan_runs` picks each scheme's parameters (given, or the best of
:func:`~commcomp.coding.simulate.search` on the same durations, as ``commcomp stragglers simulate
--search`` does) and turns the durations into each scheme's injected delays
(:func:`~commcomp.coding.engine.engine_delays`: the load shift, then ``time_scale``), with the
simulator's runtime for exactly those delays as the prediction. :func:`run_live` runs the plans
on ``workers + 1`` processes of this machine (gloo P2P, a file rendezvous; rank 0 coordinates),
or in the current process group when launched by ``torchrun`` / ``mpiexec``. Behind
``commcomp stragglers run``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .engine import ENGINE_SCHEMES, RoundEngine, check_engine_params, digits_sweep, engine_delays
from .simulate import search, simulate

__all__ = ["LivePlan", "plan_runs", "run_live", "ENGINE_SCHEMES"]

@dataclass
class LivePlan:
    """One scheme to run live: its parameters, the injected ``delays`` (rounds, n) in seconds,
    and the simulator's ``predicted`` runtime (seconds) and waits for them."""

    scheme: str
    params: Dict[str, int]
    delays: np.ndarray
    predicted: float
    predicted_waits: int
    load: float
    T: int


def plan_runs(durations, schemes: Sequence[str], n_jobs: int, *, params: Optional[Dict[str, dict]] = None,
              mu: float = 1.0, base_comp: float = 0.0, trace_load: float = 0.0, time_scale: float = 1.0,
              lambds=None, s_values=None) -> List[LivePlan]:
    """A :class:`LivePlan` per scheme: ``params[scheme]`` where given, else the best parameters of
    :func:`~commcomp.coding.simulate.search` on ``durations`` (``lambds``/``s_values`` narrow
    its grid); λ is kept below the worker count (the engine needs at least one worker outside
    every window's stragglers)."""
    d = np.asarray(durations, dtype=np.float64)
    n = d.shape[1]
    bad = [s for s in schemes if s not in ENGINE_SCHEMES]
    if bad:
        raise ValueError(f"the live engine runs {', '.join(ENGINE_SCHEMES)}; got {bad}")
    params = dict(params or {})
    todo = [s for s in schemes if s not in params]
    if todo:
        lam = [x for x in (lambds if lambds is not None else range(1, n)) if x < n]
        best = search(d, todo, n_jobs=n_jobs, mu=mu, base_comp=base_comp, trace_load=trace_load,
                      lambds=lam, s_values=s_values, progress=False)
        for s in todo:
            if s not in best:
                raise ValueError(f"no parameters of {s} fit {d.shape[0]} rounds with n_jobs={n_jobs}; extend the trace")
            params[s] = dict(best[s].params)
    plans = []
    for s in schemes:
        delays = engine_delays(d, s, params[s], trace_load=trace_load, base_comp=base_comp, time_scale=time_scale)
        sim = simulate(delays, s, params[s], n_jobs=n_jobs, mu=mu)
        plans.append(LivePlan(s, params[s], delays, sim.runtime, sim.num_waits, sim.load, sim.T))
    return plans


def _run_in_group(plans: List[LivePlan], n_jobs: int, mu: float, models: int, transport: str, progress: bool,
                  timeout: float, hidden: int) -> Optional[List[dict]]:
    """Run every plan in the current group (every rank calls it); the coordinator's results."""
    cm = digits_sweep(models=models, hidden=hidden)
    out = []
    for p in plans:
        eng = RoundEngine(cm, p.scheme, p.params, n_jobs=n_jobs, delays=p.delays, mu=mu, transport=transport,
                          progress=progress, timeout=timeout)
        res = eng.run()
        if res is not None:
            d = res.to_dict()
            d.update(predicted=p.predicted, predicted_waits=p.predicted_waits,
                     ratio=res.runtime / p.predicted if p.predicted > 0 else float("nan"))
            out.append(d)
    return out if out else None


def _local_entry(rank, world, init_file, out_path, args):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    res = _run_in_group(*args)
    if res is not None:
        with open(out_path, "w") as f:
            json.dump(res, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown under gloo's threads (see tests/_dist.py)


def run_live(plans: List[LivePlan], n_jobs: int, *, workers: int, mu: float = 1.0, models: Optional[int] = None,
             transport: str = "torch", progress: bool = False, timeout: float = 120.0,
             hidden: int = 16) -> Optional[List[dict]]:
    """Run ``plans`` live, one after another, with ``workers`` workers and a coordinator; returns
    one result dict per plan (``runtime``, ``predicted``, ``ratio``, ``num_waits``,
    ``predicted_waits``, ...) where this process is the coordinator (else None).

    Launch: inside a ``torchrun`` job (``RANK`` set) or with ``transport="mpi"`` (under
    ``mpiexec``) every process runs its part here, and the world must be ``workers + 1``;
    otherwise ``workers + 1`` processes are spawned on this machine over gloo. ``models``:
    concurrent models (default: the largest ``T + 1`` of the plans)."""
    models = models or max(p.T + 1 for p in plans)
    for p in plans:  # before any process starts: a clear error, not a crashed child
        check_engine_params(p.scheme, p.params, workers, n_jobs, models)
        if p.delays.shape[1] != workers:
            raise ValueError(f"{p.scheme}: the delays have {p.delays.shape[1]} workers, --workers is {workers}")
        if p.delays.shape[0] < n_jobs + p.T:
            raise ValueError(f"{p.scheme}: {n_jobs} jobs with delay T={p.T} need {n_jobs + p.T} rounds of delays; "
                             f"there are {p.delays.shape[0]} (extend the trace, or lower n_jobs)")
    args = (plans, n_jobs, mu, models, transport, progress, timeout, hidden)
    if transport == "mpi" or "RANK" in os.environ:
        if transport != "mpi":
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            if dist.get_world_size() != workers + 1:
                raise ValueError(f"--workers {workers} needs a world of {workers + 1} processes (a coordinator "
                                 f"and the workers); this one has {dist.get_world_size()}")
        return _run_in_group(*args)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.spawn(_local_entry, args=(workers + 1, os.path.join(tmp, "rendezvous"), out_path, args),
                 nprocs=workers + 1, join=True)
        with open(out_path) as f:
            return json.load(f)
