"""Measure the performance model's constants on this machine: ``commcomp calibrate``.

It spawns ``world`` ranks on gloo over loopback (CPU) and, in each:

1. times plain all-reduces of 4 KB and of the model's size: per-message latency and the
   loopback bandwidth;
2. times a compute-only step of an MLP with ``params`` parameters and a DDP step with each
   hook (plain DDP, torch's fp16 hook, TernGrad with each collective, sketch_dp, gradient
   tracking with ternary compression), alternately, so load that drifts during the run hits
   both: the overhead is the median difference over ``steps`` pairs after two warm-up pairs;
3. takes each hook's overhead over compute, removes the wire time the model predicts for its
   bytes on the measured loopback link, and divides the rest by the hook's memory passes:
   seconds per pass-element, the model's CPU constant for that hook.

Everything else about a deployment (bandwidth, world size, model size) is an input of the
model; only these machine-dependent costs are measured. Run it with the ranks per host you
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

from . import model as pm

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


def _rank(rank: int, world: int, init_file: str, params: int, steps: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commcomp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    base = _mlp(params)
    n = sum(p.numel() for p in base.parameters())
    width = base[0].in_features
    x, y = torch.randn(32, width), torch.randn(32, width)
    small = _allreduce_s(1024, steps)
    big = _allreduce_s(n, steps)
    latency = small / (2 * (world - 1))
    bandwidth = pm._ring_bytes(4 * n, world) / max(big - 2 * (world - 1) * latency, 1e-9)
    link = {"bandwidth_bytes_per_s": bandwidth, "latency_s": latency}

    def compute_step(m):
        m.zero_grad()
        ((m(x) - y) ** 2).mean().backward()

    compute = _median_step(lambda: compute_step(base), 2, steps)
    sc = pm.Scenario(params=n, world=world, bandwidth_bytes_per_s=bandwidth, compute_s=compute, latency_s=latency,
                     bucket_bytes=25 * 2**20)
    spe, overheads = {}, {}
    for hook, opts in CONFIGS:
        m = _mlp(params)
        m.load_state_dict(base.state_dict())
        ddp = DDP(m, bucket_cap_mb=25)
        if hook == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "gradient_tracking":
            gt = commcomp.decentralized.GradientTracking(ddp, 0.01, topology="ring", **opts)
        elif hook != "none":
            commcomp.register(ddp, hook, **({"noise_multiplier": 1.0, "clip_norm": 1.0} if hook == "sketch_dp" else {}),
                              **opts)

        def step():
            compute_step(ddp)
            if hook == "gradient_tracking":
                gt.step()

        # Alternate compute-only and hook steps: load that drifts during the run hits both.
        diffs = []
        for i in range(2 + steps):
            t0 = time.perf_counter()
            compute_step(base)
            t1 = time.perf_counter()
            step()
            t2 = time.perf_counter()
            if i >= 2:
                diffs.append((t2 - t1) - (t1 - t0))
        overhead = statistics.median(diffs)
        key = pm._cpu_key(hook, opts.get("collective", ""))
        nbytes, msgs, passes = pm.traffic(hook, sc, **opts)
        wire = msgs * latency + nbytes / bandwidth
        hidden = min(wire, 2.0 / 3.0 * compute) if hook != "gradient_tracking" else 0.0
        overheads[key] = overhead
        spe[key] = max(overhead - (wire - hidden), 0.0) / (passes * n) if passes else 0.0
    # every rank measured; the slowest rank sets the step, so keep the largest of each
    gathered = [None] * world
    dist.all_gather_object(gathered, {"spe": spe, "overheads": overheads, "link": link, "compute": compute})
    if rank == 0:
        result = {
            "source": f"commcomp calibrate on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M')}",
            "torch": torch.__version__, "ranks_per_host": world, "cores": os.cpu_count(), "params": n,
            "compute_s": max(g["compute"] for g in gathered),
            "link": {"bandwidth_bytes_per_s": min(g["link"]["bandwidth_bytes_per_s"] for g in gathered),
                     "latency_s": max(g["link"]["latency_s"] for g in gathered)},
            "seconds_per_pass_element": {k: max(g["spe"][k] for g in gathered) for k in spe},
            "overhead_s": {k: max(g["overheads"][k] for g in gathered) for k in overheads},
        }
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
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
