"""Measure the performance model's constants on this machine: ``commcomp calibrate``.

It spawns ``world`` ranks on gloo over loopback (CPU) and, in each:

1. times plain all-reduces of 4 KB and of the model's size: per-message latency and the
   loopback bandwidth;
2. times a compute-only step of an MLP with ``params`` parameters and a DDP step with each
   hook (plain DDP, torch's fp16 hook, TernGrad with each collective, sketch_dp, gradient
   tracking with ternary compression), alternately, so load that drifts during the run hits
   both: the overhead is the median difference over ``steps`` pairs after two warm-up pairs;
3. takes each hook's overhead over compute, removes the wire time the model predicts for its
   bytes on the measured loopback link, and splits the rest, from two model sizes (``params``
   and a quarter of it), into a fixed cost per step and a cost per pass-element (divided by
   the hook's memory passes): the model's CPU constants for that hook.

Everything else about a deployment (bandwidth, world size, model size) is an input of the
model (:mod:`commcomp.perfmodel`); only these machine-dependent costs are measured. It lives
with the benchmarks, at the top of the dependency graph, because it runs every hook. Run it with the ranks per host you
deploy with (``--world``): the CPU cost includes their contention for cores.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from packaging.version import Version

from ..perfmodel import model as pm
from ..utils import ring_allreduce_bytes

CONFIGS = [("none", {}), ("fp16", {}), ("terngrad", {"collective": "int8"}),
           ("terngrad", {"collective": "allgather"}), ("terngrad", {"collective": "two_phase"}),
           ("sketch_dp", {"sketch_ratio": 0.01}), ("gradient_tracking", {"compressor": "ternary"})]


def _mlp(params: int) -> torch.nn.Module:
    width = max(8, int((params / 2) ** 0.5))
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))


def _median_step(step, warmup: int = 2, steps: int = 5) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _allreduce_s(numel: int, steps: int) -> float:
    import torch.distributed as dist

    t = torch.ones(numel)
    return _median_step(lambda: dist.all_reduce(t), 2, steps)


def _hook_overhead(hook, opts, base, size, compute_step, steps) -> float:
    """Median over `steps` of (DDP step with `hook`) - (compute-only step of `base`), taken
    alternately so that load drifting during the run hits both."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commcomp

    m = _mlp(size)
    m.load_state_dict(base.state_dict())
    ddp = DDP(m, bucket_cap_mb=25)
    gt = None
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "gradient_tracking":
        gt = commcomp.decentralized.GradientTracking(ddp, 0.01, topology="ring", **opts)
    elif hook != "none":
        extra = {"noise_multiplier": 1.0, "clip_norm": 1.0} if hook == "sketch_dp" else {}
        commcomp.register(ddp, hook, **extra, **opts)
    diffs = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        compute_step(base)
        t_compute = time.perf_counter() - t0
        dist.barrier()  # the ranks enter the DDP step together, as in training
        t1 = time.perf_counter()
        compute_step(ddp)
        if gt is not None:
            gt.step()
        t2 = time.perf_counter()
        if i >= 2:
            diffs.append((t2 - t1) - t_compute)
    return statistics.median(diffs)


def _measure_size(size: int, world: int, steps: int, latency: float, with_link: bool) -> dict:
    """At one model size: its parameter count ``n``, the compute-only step, each hook's
    overhead over it (by calibration key) and, with ``with_link``, the loopback bandwidth from
    an all-reduce of the model's size."""
    torch.manual_seed(0)
    base = _mlp(size)
    n = sum(p.numel() for p in base.parameters())
    bandwidth = None
    if with_link:
        big = _allreduce_s(n, steps)
        bandwidth = ring_allreduce_bytes(4 * n, world) / max(big - 2 * (world - 1) * latency, 1e-9)
    width = base[0].in_features
    x, y = torch.randn(32, width), torch.randn(32, width)

    def compute_step(m):
        m.zero_grad()
        ((m(x) - y) ** 2).mean().backward()

    compute = _median_step(lambda: compute_step(base), 2, steps)
    overheads = {}
    for hook, opts in CONFIGS:
        key = pm.cpu_key(hook, opts.get("collective", ""))
        overheads[key] = _hook_overhead(hook, opts, base, size, compute_step, steps)
    return {"n": n, "compute": compute, "overheads": overheads, "bandwidth": bandwidth}


def _cpu_costs(hook: str, opts: dict, sizes: list, world: int, link: dict) -> tuple:
    """(seconds per pass-element, fixed seconds per step) of one hook from its overheads at two
    model sizes: each overhead less the wire time the model predicts on this link is CPU time,
    and two sizes split it into a part per pass-element and a fixed part."""
    key = pm.cpu_key(hook, opts.get("collective", ""))
    bandwidth, latency = link["bandwidth_bytes_per_s"], link["latency_s"]
    own, passes = [], 0.0
    for m in sizes:
        sc = pm.Scenario(params=m["n"], world=world, bandwidth_bytes_per_s=bandwidth, compute_s=m["compute"],
                         latency_s=latency, bucket_bytes=25 * 2**20)
        nbytes, msgs, passes = pm.traffic(hook, sc, **opts)
        wire = msgs * latency + nbytes / bandwidth
        hidden = min(wire, 2.0 / 3.0 * m["compute"]) if hook != "gradient_tracking" else 0.0
        own.append(max(m["overheads"][key] - (wire - hidden), 0.0))
    (n1, n2), (c1, c2) = [m["n"] for m in sizes], own
    slope = (c2 - c1) / (passes * (n2 - n1)) if passes and n2 > n1 else 0.0
    if slope <= 0:  # noise swamped the difference: all of it per element
        return (c2 / (passes * n2) if passes else 0.0), 0.0
    return slope, max(c2 - slope * passes * n2, 0.0)


def _measure(world: int, params: int, steps: int) -> dict:
    """This rank's measurements: the link, the compute step and each hook's CPU costs."""
    latency = _allreduce_s(1024, steps) / (2 * (world - 1))
    sizes = [_measure_size(size, world, steps, latency, with_link=size == params)
             for size in (max(1000, params // 4), params)]
    link = {"bandwidth_bytes_per_s": sizes[-1]["bandwidth"], "latency_s": latency}
    spe, fixed = {}, {}
    for hook, opts in CONFIGS:
        key = pm.cpu_key(hook, opts.get("collective", ""))
        spe[key], fixed[key] = _cpu_costs(hook, opts, sizes, world, link)
    return {"spe": spe, "fixed": fixed, "overheads": sizes[-1]["overheads"], "link": link,
            "compute": sizes[-1]["compute"], "n": sizes[-1]["n"]}


def _combine(gathered: list, world: int) -> dict:
    """The calibration from every rank's measurements: the slowest rank sets the step, so keep
    the largest cost (and the slowest link) of each."""
    keys = gathered[0]["spe"]
    return {
        "source": f"commcomp calibrate on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M')}",
        "torch": torch.__version__, "ranks_per_host": world, "params": gathered[0]["n"],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "compute_s": max(g["compute"] for g in gathered),
        "link": {"bandwidth_bytes_per_s": min(g["link"]["bandwidth_bytes_per_s"] for g in gathered),
                 "latency_s": max(g["link"]["latency_s"] for g in gathered)},
        "seconds_per_pass_element": {k: max(g["spe"][k] for g in gathered) for k in keys},
        "fixed_s": {k: max(g["fixed"][k] for g in gathered) for k in keys},
        "overhead_s": {k: max(g["overheads"][k] for g in gathered) for k in keys},
    }


def _rank(rank: int, world: int, init_file: str, params: int, steps: int, out: str) -> None:
    """One spawned rank: measure, gather every rank's measurements, rank 0 writes ``out``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    gathered = [None] * world
    dist.all_gather_object(gathered, _measure(world, params, steps))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(_combine(gathered, world), f, indent=1)
    # torch < 2.8 can deadlock destroying a gloo group (pytorch/pytorch#154976); os._exit ends it
    if Version(torch.__version__).release >= (2, 8):
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def calibrate(world: int = 4, params: int = 2_000_000, steps: int = 5, path: str = None) -> dict:
    """Run the measurement with `world` local ranks and save it to `path` (default
    :func:`commcomp.perfmodel.calibration_path`); returns the calibration."""
    import torch.multiprocessing as mp

    if world < 2:
        raise ValueError(f"commcomp: calibrate needs world >= 2 ranks to measure a link, got {world}")
    if params < 1000:
        raise ValueError(f"commcomp: calibrate needs params >= 1000, got {params}")
    path = path or pm.calibration_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "calibration.json")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "rdzv"), params, steps, out), nprocs=world, join=True)
        with open(out) as f:
            result = json.load(f)
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp_path, path)
    return result


__all__ = ["CONFIGS", "calibrate"]
