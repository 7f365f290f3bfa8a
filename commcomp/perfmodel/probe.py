"""Measure the link a process group runs on, for TernGrad's ``collective="auto"``.

The choice of collective turns on the link: at 100 Mbit/s bytes decide, on a fast link CPU
passes do. Rather than assume one, the hook times a few all-reduces on its own process group
the first time it must choose (every rank at the same point of its collective order), and
every rank takes the slowest rank's times, so all of them make the same choice.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from commcomp.utils.metrics import ring_allreduce_bytes

from .choice import LinkModel

PROBE_NUMEL = 1 << 18  # 1 MB of float32: long enough to see the bandwidth, short on a slow link


def _timed(t: torch.Tensor, group, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(t, group=group)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_link(group=None, device=None, probe_numel: int = PROBE_NUMEL, repeats: int = 3) -> tuple:
    """``(LinkModel, bytes sent)`` from ring all-reduces of 1 and ``probe_numel`` float32
    elements on ``group`` (a collective: every rank must call it at the same point). The
    latency per message is the small all-reduce's time over its 2 (W - 1) messages; the
    bandwidth is the large one's ring bytes over its time less that latency."""
    world = dist.get_world_size(group)
    small = torch.zeros(1, device=device)
    big = torch.zeros(probe_numel, device=device)
    dist.all_reduce(small, group=group)  # warm the connections
    lat_t, big_t = _timed(small, group, 2 * repeats), _timed(big, group, repeats)
    worst = torch.tensor([lat_t, big_t], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)  # the same numbers on every rank
    lat_t, big_t = worst.tolist()
    hops = 2 * max(1, world - 1)
    latency = lat_t / hops
    wire = max(big_t - hops * latency, 1e-9)
    link = LinkModel(bandwidth_bytes_per_s=ring_allreduce_bytes(4 * probe_numel, world) / wire, latency_s=latency)
    sent = (1 + 2 * repeats) * ring_allreduce_bytes(4, world) + repeats * ring_allreduce_bytes(4 * probe_numel, world) \
        + ring_allreduce_bytes(16, world)
    return link, sent


__all__ = ["PROBE_NUMEL", "measure_link"]
