"""A small cost model that picks the ternary collective for a bucket.

time = messages * latency + bytes sent per rank / bandwidth + elements touched * codec cost.
Constants are deliberately coarse defaults (1 Gbit/s, 50 us per message, 2 ns per element
per codec pass on a CPU core); pass a LinkModel measured on your network to refine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    bandwidth_bytes_per_s: float = 1.25e8  # 1 Gbit/s
    latency_s: float = 50e-6
    codec_s_per_element: float = 2e-9


def estimate(name: str, numel: int, world: int, link: LinkModel = LinkModel()) -> float:
    w, n = world, numel
    if name == "int8":
        msgs, sent, passes = 2 * (w - 1), 2 * (w - 1) / w * n, 2.0
    elif name == "allgather":
        msgs, sent, passes = w - 1, (w - 1) * n / 4, 1.0 + w / 4
    elif name == "two_phase":
        msgs, sent, passes = 2 * (w - 1), 2 * (w - 1) / w * n / 4, 2.0 + 2.0 / w + 1.0
    else:
        raise ValueError(f"unknown collective {name!r}")
    return msgs * link.latency_s + sent / link.bandwidth_bytes_per_s + passes * n * link.codec_s_per_element


def choose(numel: int, world: int, link: LinkModel = LinkModel()) -> str:
    """The cheapest exact-or-unbiased collective for one bucket under `link`."""
    names = ["int8", "allgather", "two_phase"]
    return min(names, key=lambda name: estimate(name, numel, world, link))
