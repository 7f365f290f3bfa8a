"""A performance model of data-parallel steps: what each hook and collective costs on a link.

The TernGrad paper's scalability analysis (Wen et al. 2017, sec. 5) is the anchor: a step is
compute plus communication, and communication is bytes over bandwidth plus per-message
latency; a compressor trades bytes for codec work. Here, per step and per rank::

    step = compute + cpu(hook) + max(0, wire - overlap)
    wire = messages * latency + bytes_sent / bandwidth
    cpu  = (fixed(hook) * buckets + passes(hook, N) * P * seconds_per_pass_element(hook)) * contention

* ``bytes_sent`` and ``messages`` follow each algorithm (ring all-reduce for fp32 and fp16,
  :func:`commcomp.utils.ring_allreduce_bytes`; the ternary collectives; a sketch
  all-reduce; neighbour messages for gradient tracking; for gradient coding the busiest link,
  the coordinator's), per DDP bucket. Gradient coding's gain, not waiting for stragglers, is
  not in this model: ``commcomp stragglers simulate`` models it on real traces.
* ``passes(hook, N)`` counts the memory passes of the hook's CPU work per gradient element
  (it grows with N where decoding does: the all-gather collective decodes N payloads).
* ``seconds_per_pass_element`` and ``fixed`` (per step) are what ``commcomp calibrate``
  measures on the local machine: it runs every hook end to end on a loopback group at two model
  sizes and subtracts the wire time of the bytes on the loopback link it also measures.
  Without a calibration the model uses the measurement of the 2-core development machine
  (``BUILTIN``), which is wrong for yours: calibrate.
* ``overlap``: DDP starts a bucket's exchange while the backward pass goes on; the model lets
  communication hide behind the backward part of compute (two thirds of it), never more.
* ``contention``: calibration measured ``ranks_per_host`` processes on ``cores`` cores; a
  deployment with more ranks per core pays proportionally.

Speed-up is the TernGrad paper's: N workers' throughput over one worker's,
``N * compute / step``.

The TernGrad hook's ``collective="auto"`` asks :func:`choose_collective` (through
:func:`commcomp.perfmodel.choose`), so what ``commcomp perfmodel`` prints is what the hook does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from commcomp.utils.metrics import ring_allreduce_bytes

TERNARY = ("int8", "allgather", "two_phase")
HOOKS = ("none", "fp16", "terngrad", "sketch_dp", "gradient_coding", "gradient_tracking")

# Measured by `commcomp calibrate --world 4 --params 4M` on the 2-core development machine
# (torch 2.13 CPU, gloo on loopback), 2026-12-04, after issue 15's TernGrad work (pooled buffers,
# pipelined pieces, ternary spec v2 on AVX-512): per hook, the CPU cost per pass-element and per
# step, with 4 ranks sharing 2 cores. Not fitted to the benchmarks it is checked against.
BUILTIN = {
    "source": "builtin: commcomp calibrate --world 4 --params 4M on the 2-core development machine, torch 2.13 CPU, "
              "2026-12-04",
    "ranks_per_host": 4, "cores": 2,
    "link": {"bandwidth_bytes_per_s": 1.47e+09, "latency_s": 0.00145},
    "seconds_per_pass_element": {"none": 7.02e-09, "fp16": 3.42e-09, "terngrad/int8": 5.69e-09, "terngrad/allgather": 5.61e-09, "terngrad/two_phase": 3.81e-09, "sketch_dp": 5.71e-08, "gradient_tracking": 5.37e-09},
    "fixed_s": {"none": 0.00253, "fp16": 0.0167, "terngrad/int8": 0.0105, "terngrad/allgather": 0.0128, "terngrad/two_phase": 0.00887, "sketch_dp": 0.00771, "gradient_tracking": 0},
}


def calibration_path() -> str:
    """Where ``commcomp calibrate`` saves, and the model looks first: ``$COMMCOMP_CALIBRATION``,
    else ``~/.cache/commcomp/calibration.json``."""
    return os.environ.get("COMMCOMP_CALIBRATION") or os.path.join(
        os.path.expanduser("~"), ".cache", "commcomp", "calibration.json")


def load_calibration(path: Optional[str] = None) -> dict:
    """The calibration at `path`, else at ``$COMMCOMP_CALIBRATION``, else at
    ``~/.cache/commcomp/calibration.json``; :data:`BUILTIN` only when that default file does
    not exist. A path you named that does not exist, or a file that cannot be read, is an
    error, not a silent fallback."""
    named = path or os.environ.get("COMMCOMP_CALIBRATION")
    path = named or calibration_path()
    if not os.path.exists(path):
        if named:
            who = "$COMMCOMP_CALIBRATION" if named == os.environ.get("COMMCOMP_CALIBRATION") else "--calibration"
            raise ValueError(f"commcomp: the calibration {path} named by {who} does not exist; run `commcomp "
                             "calibrate --out PATH` to make it, or name none to use the default")
        return dict(BUILTIN)
    try:
        with open(path) as f:
            cal = json.load(f)
        cal["seconds_per_pass_element"]
        cal["link"]["bandwidth_bytes_per_s"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"commcomp: the calibration {path} is unreadable ({exc}); rerun `commcomp calibrate` "
                         "or delete the file to use the built-in one") from exc
    return cal


@dataclass
class Scenario:
    """One deployment. Sizes in elements and bytes, times in seconds, rates in bytes/s."""

    params: int
    world: int
    bandwidth_bytes_per_s: float
    compute_s: float
    latency_s: float = 50e-6
    bucket_bytes: int = 25 * 2**20
    ranks_per_host: int = 1
    cores_per_host: int = 0  # 0: as many as ranks (no contention)

    def __post_init__(self):
        if not (isinstance(self.params, int) and self.params >= 1):
            raise ValueError(f"commcomp: params must be a positive integer, got {self.params!r}")
        if not (isinstance(self.world, int) and self.world >= 1):
            raise ValueError(f"commcomp: world size must be a positive integer, got {self.world!r}")
        for name in ("bandwidth_bytes_per_s", "compute_s", "latency_s", "bucket_bytes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (
                    name in ("bandwidth_bytes_per_s", "bucket_bytes") and v <= 0):
                raise ValueError(f"commcomp: {name} must be a finite number > 0 (>= 0 for times), got {v!r}")

    @property
    def buckets(self) -> int:
        return max(1, math.ceil(4 * self.params / self.bucket_bytes))


@dataclass
class Prediction:
    hook: str
    step_s: float
    speedup: float
    bytes_sent: float
    messages: int
    cpu_s: float
    wire_s: float
    detail: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def traffic(hook: str, sc: Scenario, *, collective: str = "two_phase", sketch_ratio: float = 0.01,
            s: int = 1, degree: int = 2, compressor: Optional[str] = "ternary") -> tuple:
    """(bytes sent per rank per step, messages per rank per step, CPU passes per element)."""
    P, N, B = sc.params, sc.world, sc.buckets
    if N == 1:
        return 0.0, 0, 0.0
    if hook == "none":
        return ring_allreduce_bytes(4 * P, N), B * 2 * (N - 1), 2.0 * (N - 1) / N
    if hook == "fp16":
        return ring_allreduce_bytes(2 * P, N), B * 2 * (N - 1), 2.0 + 2.0 * (N - 1) / N
    if hook == "terngrad":  # every collective starts with a MAX all-reduce of the scales: 2(N-1) messages
        if collective == "int8":  # codes summed by a ring all-reduce: int8, int32 past 127 ranks
            return ring_allreduce_bytes(P if N <= 127 else 4 * P, N), B * 4 * (N - 1), 2.0
        if collective == "allgather":  # everyone's 2-bit payload (a ring all-gather), decoded by everyone
            return (N - 1) * P / 4, B * 3 * (N - 1), 1.0 + N / 4
        if collective == "two_phase":  # 2-bit all-to-all (reduce-scatter), requantize, 2-bit all-gather
            return ring_allreduce_bytes(P / 4, N), B * 4 * (N - 1), 3.0 + 2.0 / N
        raise ValueError(f"commcomp: unknown TernGrad collective {collective!r}; allowed {TERNARY}")
    if hook == "sketch_dp":
        size = max(1.0, sketch_ratio * P)
        return ring_allreduce_bytes(4 * size, N), B * 2 * (N - 1), 3.0
    if hook == "gradient_coding":  # the busiest link, the coordinator's: N - 1 coded gradients in,
        # the decoded one back out to N - 1 workers (full duplex); it sums n - s of them
        return 4.0 * P * (N - 1), B * 2 * (N - 1), float(N - s + 1)
    if hook == "gradient_tracking":  # two rounds (tracker and model), one message per neighbour
        per_elem = {"ternary": 0.2, "ternary-2bit": 0.25, None: 4.0}.get(compressor, 4.0)
        return 2.0 * degree * per_elem * P, 2 * degree, 25.0
    raise ValueError(f"commcomp: unknown hook {hook!r}; allowed {HOOKS}")


def cpu_key(hook: str, collective: str) -> str:
    return f"terngrad/{collective}" if hook == "terngrad" else hook


def predict(hook: str, sc: Scenario, calibration: Optional[dict] = None, **options) -> Prediction:
    """Step time and speed-up of `hook` in scenario `sc` (options: collective, sketch_ratio,
    s for gradient coding, degree and compressor for gradient tracking)."""
    cal = calibration if calibration is not None else load_calibration()
    collective = options.get("collective", "two_phase")
    auto = hook == "terngrad" and collective == "auto"
    if auto:
        collective = choose_collective(sc.params // sc.buckets, sc.world, sc, cal)
        options["collective"] = collective
    nbytes, msgs, passes = traffic(hook, sc, **options)
    spe = cal["seconds_per_pass_element"].get(cpu_key(hook, collective))
    if spe is None:
        spe = cal["seconds_per_pass_element"].get("none", BUILTIN["seconds_per_pass_element"]["none"])
    cal_pressure = max(1.0, cal.get("ranks_per_host", 1) / max(1, cal.get("cores", 1)))
    pressure = max(1.0, sc.ranks_per_host / sc.cores_per_host) if sc.cores_per_host else 1.0
    fixed = cal.get("fixed_s", {}).get(cpu_key(hook, collective), 0.0) * sc.buckets if sc.world > 1 else 0.0
    cpu = (fixed + passes * sc.params * spe) * pressure / cal_pressure
    wire = msgs * sc.latency_s + nbytes / sc.bandwidth_bytes_per_s
    compute = sc.compute_s * ((options.get("s", 1) + 1) if hook == "gradient_coding" else 1)
    hidden = min(wire, 2.0 / 3.0 * sc.compute_s) if hook not in ("gradient_coding", "gradient_tracking") else 0.0
    step = compute + cpu + wire - hidden
    speedup = sc.world * sc.compute_s / step if step > 0 else float(sc.world)
    detail = {"compute_s": compute, "hidden_s": hidden, "passes_per_element": passes}
    name = f"terngrad/{collective}" + (" (auto)" if auto else "") if hook == "terngrad" else hook
    return Prediction(name, step, speedup, nbytes, int(msgs), cpu, wire, detail)


def choose_collective(numel: int, world: int, sc: Optional[Scenario] = None, calibration: Optional[dict] = None,
                      *, bandwidth_bytes_per_s: Optional[float] = None, latency_s: Optional[float] = None) -> str:
    """The ternary collective with the least predicted time for one bucket of `numel` elements."""
    cal = calibration if calibration is not None else load_calibration()
    bw = bandwidth_bytes_per_s or (sc.bandwidth_bytes_per_s if sc else cal["link"]["bandwidth_bytes_per_s"])
    lat = latency_s if latency_s is not None else (sc.latency_s if sc else cal["link"]["latency_s"])
    one = Scenario(params=max(1, int(numel)), world=world, bandwidth_bytes_per_s=bw, compute_s=0.0,
                   latency_s=lat, bucket_bytes=max(4, 4 * int(numel)),
                   ranks_per_host=sc.ranks_per_host if sc else 1, cores_per_host=sc.cores_per_host if sc else 0)
    return min(TERNARY, key=lambda c: predict("terngrad", one, cal, collective=c).step_s)


def table(sc: Scenario, hooks: List[tuple], calibration: Optional[dict] = None) -> List[Prediction]:
    """Predictions for (hook, options) pairs, plus the fp32 baseline first."""
    cal = calibration if calibration is not None else load_calibration()
    out = [predict("none", sc, cal)]
    out += [predict(h, sc, cal, **dict(o)) for h, o in hooks if h != "none"]
    return out


__all__ = ["BUILTIN", "HOOKS", "Prediction", "Scenario", "TERNARY", "calibration_path", "choose_collective",
           "load_calibration", "predict", "table", "traffic"]
