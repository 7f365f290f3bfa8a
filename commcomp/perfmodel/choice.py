"""Which ternary collective a TernGrad bucket uses under ``collective="auto"``.

The decision is the performance model's (:mod:`commcomp.perfmodel.model`): for one bucket, the
predicted time of each collective (messages x latency + bytes / bandwidth + its CPU passes x
the calibrated cost per pass-element), and the least wins. So ``commcomp perfmodel`` shows
the same choice the hook makes. The link comes from :class:`LinkModel` (default 1 Gbit/s,
50 us per message); the CPU costs from ``commcomp calibrate`` (or the built-in calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import model as pm


@dataclass(frozen=True)
class LinkModel:
    """A link for the choice: bandwidth in bytes/s, latency per message in seconds, and
    optionally one CPU cost per pass-element for every collective, with no fixed cost
    (``None``: the calibrated costs)."""

    bandwidth_bytes_per_s: float = 1.25e8  # 1 Gbit/s
    latency_s: float = 50e-6
    codec_s_per_element: Optional[float] = None


def _calibration(link: LinkModel, calibration: Optional[dict] = None) -> dict:
    cal = calibration if calibration is not None else pm.load_calibration()
    if link.codec_s_per_element is not None:  # the link's one CPU cost replaces the calibrated model
        spe = dict(cal["seconds_per_pass_element"])
        spe.update({f"terngrad/{c}": link.codec_s_per_element for c in pm.TERNARY})
        fixed = dict(cal.get("fixed_s", {}))
        fixed.update({f"terngrad/{c}": 0.0 for c in pm.TERNARY})
        cal = dict(cal, seconds_per_pass_element=spe, fixed_s=fixed)
    return cal


def estimate(name: str, numel: int, world: int, link: LinkModel = LinkModel()) -> float:
    """Predicted seconds for one bucket of `numel` elements with collective `name`."""
    if name not in pm.TERNARY:
        raise ValueError(f"commcomp: unknown collective {name!r}; allowed {pm.TERNARY}")
    sc = pm.Scenario(params=max(1, int(numel)), world=world, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
                     compute_s=0.0, latency_s=link.latency_s, bucket_bytes=max(4, 4 * int(numel)))
    return pm.predict("terngrad", sc, _calibration(link), collective=name).step_s


def choose(numel: int, world: int, link: LinkModel = LinkModel(), calibration: Optional[dict] = None) -> str:
    """The collective with the least predicted time for one bucket under `link` (CPU costs
    from `calibration`, default :func:`commcomp.perfmodel.load_calibration`)."""
    return pm.choose_collective(numel, world, None, _calibration(link, calibration),
                                bandwidth_bytes_per_s=link.bandwidth_bytes_per_s, latency_s=link.latency_s)
