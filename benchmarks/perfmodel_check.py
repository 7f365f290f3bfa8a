"""Check the performance model against measured step times: the network benchmark of the
TernGrad issue (docs/benchmarks.md, "End to end: DDP over a shaped network"), 4 ranks on two
emulated hosts of one 2-core machine, an 11.3 M-parameter MLP, 25 MB buckets; each row with
the compute-only step of its run. Prints predicted vs measured step time and the error; writes a plot of the
predicted speed-up for N = 2..1024 at 1, 10 and 100 Gbit/s.

    commcomp calibrate --world 4            # on the machine that ran the benchmark
    python benchmarks/perfmodel_check.py --png docs/img/perfmodel_speedup.png
"""

from __future__ import annotations

import argparse
import json

from commcomp import perfmodel as pm

# Measured step times in ms (docs/benchmarks.md) with that run's compute-only step. "current":
# measured with today's hook code: the 2026-12-04 issue-15 run (median of 2 runs at 1 Gbit/s,
# 1-2 at 100 Mbit/s; compute-only 111 ms). Older rows (the 2026-11-23 runs, before pooled
# buffers, pipelining and ternary spec v2) are printed for reference, not the model's target.
MEASURED = [
    ("1gbit", "none", {}, 710, 111, True), ("1gbit", "fp16", {}, 451, 111, True),
    ("1gbit", "terngrad", {"collective": "int8"}, 332, 111, True),
    ("1gbit", "terngrad", {"collective": "allgather"}, 287, 111, True),
    ("1gbit", "terngrad", {"collective": "two_phase"}, 300, 111, True),
    ("1gbit", "terngrad", {"collective": "auto"}, 270, 111, True),
    ("100mbit", "none", {}, 5902, 111, True), ("100mbit", "fp16", {}, 3060, 111, True),
    ("100mbit", "terngrad", {"collective": "int8"}, 1568, 111, True),
    ("100mbit", "terngrad", {"collective": "allgather"}, 874, 111, True),
    ("100mbit", "terngrad", {"collective": "two_phase"}, 613, 111, True),
    ("100mbit", "terngrad", {"collective": "auto"}, 584, 111, True),
    ("100mbit", "none", {}, 5893, 105, False), ("100mbit", "fp16", {}, 2978, 105, False),
    ("1gbit", "terngrad", {"collective": "allgather"}, 591, 105, False),
    ("1gbit", "terngrad", {"collective": "two_phase"}, 556, 105, False),
    ("100mbit", "terngrad", {"collective": "int8"}, 2069, 149, False),
    ("100mbit", "terngrad", {"collective": "allgather"}, 1134, 149, False),
    ("100mbit", "terngrad", {"collective": "two_phase"}, 953, 149, False),
]
RATES = {"100mbit": 100e6 / 8, "1gbit": 1e9 / 8}
PARAMS = 11_266_010  # benchmarks/network.py's MLP


def check(cal: dict) -> list:
    rows = []
    for rate, hook, opts, ms, compute_ms, current in MEASURED:
        sc = pm.Scenario(params=PARAMS, world=4, bandwidth_bytes_per_s=RATES[rate], compute_s=compute_ms / 1e3,
                         latency_s=cal["link"]["latency_s"], ranks_per_host=4, cores_per_host=2)
        p = pm.predict(hook, sc, cal, **opts)
        rows.append({"rate": rate, "hook": p.hook, "measured_ms": ms, "predicted_ms": 1e3 * p.step_s,
                     "error": (1e3 * p.step_s - ms) / ms, "current": current})
    return rows


def plot(cal: dict, path: str, params: int, compute_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [2 ** k for k in range(1, 11)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    # latency per message of a cluster's link, not the calibration's loopback (which measures
    # process scheduling on a busy 2-core machine): Ethernet 1 and 10 Gbit/s, InfiniBand-class 100
    for ax, gbps, lat in zip(axes, (1, 10, 100), (50e-6, 20e-6, 5e-6)):
        for hook, opts, label in (("none", {}, "fp32 all-reduce"), ("fp16", {}, "fp16"),
                                  ("terngrad", {"collective": "auto"}, "TernGrad (auto collective)"),
                                  ("sketch_dp", {"sketch_ratio": 0.01}, "sketch 1%")):
            ys = [pm.predict(hook, pm.Scenario(params=params, world=n, bandwidth_bytes_per_s=gbps * 1e9 / 8,
                                               compute_s=compute_s, latency_s=lat),
                             cal, **dict(opts)).speedup for n in worlds]
            ax.plot(worlds, ys, marker="o", ms=3, label=label)
        ax.plot(worlds, worlds, ls=":", c="grey", label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{gbps} Gbit/s, {lat * 1e6:g} us per message")
        ax.set_xlabel("workers N")
    axes[0].set_ylabel("predicted speed-up (N x compute / step)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{params / 1e6:.1f} M parameters, {1e3 * compute_s:.0f} ms compute per step; "
                 f"calibration: {cal.get('source', '?')[:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", help="calibration JSON (default: commcomp's calibration path, else built-in)")
    ap.add_argument("--png", help="write the N = 2..1024 speed-up plot here")
    ap.add_argument("--plot-params", type=int, default=25_600_000, help="model size of the plot (ResNet-50)")
    ap.add_argument("--plot-compute-ms", type=float, default=100.0)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    cal = pm.load_calibration(a.calibration)
    rows = check(cal)
    print(f"calibration: {cal.get('source')}")
    print(f"{'rate':>8} {'hook':22s} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for r in rows:
        print(f"{r['rate']:>8} {r['hook']:22s} {r['measured_ms']:12.0f} {r['predicted_ms']:13.0f} {r['error']:+7.1%}"
              + ("" if r["current"] else "   (older hook code)"))
    cur = [r for r in rows if r["current"]]
    within = sum(abs(r["error"]) <= 0.2 for r in cur)
    print(f"current code: {within}/{len(cur)} points within 20%; worst {max(abs(r['error']) for r in cur):.1%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"calibration": cal, "rows": rows}, f, indent=1)
    if a.png:
        plot(cal, a.png, a.plot_params, a.plot_compute_ms / 1e3)


if __name__ == "__main__":
    main()
