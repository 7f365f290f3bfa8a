"""``commcomp perfmodel`` and ``commcomp calibrate``: the performance model's prediction of
each hook's step time and speed-up, and the measurement of this machine's costs it uses.

    commcomp perfmodel --model-params 25.6M --world-size 64 --bandwidth-gbps 10 --compute-ms 100
    commcomp calibrate --world 4
"""

from __future__ import annotations

import argparse
import json
from typing import List

from ._common import add_topic

_PERF_DESCRIPTION = ("Predict, before running anything, the step time and speed-up of each hook "
                     "and TernGrad collective for a model size, world size, link and compute time. "
                     "terngrad (auto) shows the collective TernGradState(collective='auto') picks.")
_CALIBRATE_DESCRIPTION = ("Spawn --world ranks on gloo over loopback, time plain all-reduces (latency, "
                          "bandwidth), a compute-only step and a DDP step with every hook at two model "
                          "sizes, and save each hook's CPU cost per bucket and per pass-element. "
                          "Run it with the ranks per host you deploy with: their contention for cores is "
                          "part of the cost. The link of your cluster is an input of `commcomp perfmodel`, "
                          "not measured here.")

_PERF_EPILOG = """\
the model (commcomp.perfmodel; the TernGrad paper's scalability analysis is its anchor):
  step = compute + cpu + max(0, wire - overlap),  wire = messages x latency + bytes / bandwidth,
  cpu = a calibrated cost per bucket + the hook's memory passes x params x a calibrated cost per
  pass-element.
  speed-up = N x compute / step (N workers' throughput over one worker's). Bytes and messages
  follow each algorithm per DDP bucket; CPU costs come from `commcomp calibrate` (run it once on
  your machine with the ranks per host you deploy), else from a built-in calibration of a 2-core
  development machine, which is not yours.

hooks (comma list; options after a colon):
  none, fp16, terngrad (collective auto), terngrad:int8, terngrad:allgather, terngrad:two_phase,
  sketch_dp:0.01 (sketch ratio), gradient_coding:1 (s), gradient_tracking:ternary (compressor;
  or :exact), with --degree neighbours

examples:
  commcomp perfmodel --model-params 25.6M --world-size 64 --bandwidth-gbps 10 --compute-ms 100
  commcomp perfmodel --model-params 138M --world-size 8,64,512 --bandwidth-gbps 1,10,100 \\
      --compute-ms 300 --hook none,fp16,terngrad,sketch_dp:0.01 --json
  commcomp calibrate --world 4          # then every prediction uses this machine's costs
"""


def _count(text: str) -> int:
    """25.6M, 138m, 7e6, 1_000 -> an integer count."""
    t = text.strip().replace("_", "")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(t[-1:].lower(), 1)
    try:
        return int(round(float(t[:-1] if mult != 1 else t) * mult))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 25.6M or 7000000, got {text!r}") from None


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def _hook_specs(text: str) -> List[tuple]:
    specs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, arg = item.partition(":")
        if name == "terngrad":
            specs.append((name, {"collective": arg or "auto"}))
        elif name == "sketch_dp":
            specs.append((name, {"sketch_ratio": float(arg) if arg else 0.01}))
        elif name == "gradient_coding":
            specs.append((name, {"s": int(arg) if arg else 1}))
        elif name == "gradient_tracking":
            specs.append((name, {"compressor": None if arg == "exact" else (arg or "ternary")}))
        elif name in ("none", "fp16") and not arg:
            specs.append((name, {}))
        else:
            raise SystemExit(f"commcomp: unknown hook spec {item!r}; see `commcomp perfmodel --help` for the list")
    return specs


def _cmd_perfmodel(a) -> int:
    from commcomp import perfmodel as pm

    cal = pm.load_calibration(a.calibration)
    specs = _hook_specs(a.hook)
    for _, opts in specs:
        if "collective" in opts and opts["collective"] not in pm.TERNARY + ("auto",):
            raise SystemExit(f"commcomp: terngrad collective {opts['collective']!r}; allowed auto, "
                             f"{', '.join(pm.TERNARY)}")
        if "compressor" in opts:
            opts["degree"] = a.degree
    rows = []
    for n in a.world_size:
        for gbps in a.bandwidth_gbps:
            try:
                sc = pm.Scenario(params=a.model_params, world=n, bandwidth_bytes_per_s=gbps * 1e9 / 8,
                                 compute_s=a.compute_ms / 1e3, latency_s=a.latency_us / 1e6,
                                 bucket_bytes=int(a.bucket_mb * 2**20), ranks_per_host=a.ranks_per_host,
                                 cores_per_host=a.cores_per_host)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
            base = pm.predict("none", sc, cal)
            for hook, opts in [("none", {})] + [s for s in specs if s[0] != "none"]:
                p = pm.predict(hook, sc, cal, **dict(opts))
                rows.append(dict(p.as_dict(), world=n, gbps=gbps, vs_fp32=base.step_s / p.step_s))
    if a.json:
        print(json.dumps({"calibration": cal.get("source"), "rows": rows}, indent=1))
        return 0
    print(f"calibration: {cal.get('source')}")
    print(f"{'N':>5} {'Gbit/s':>7} {'hook':24s} {'step ms':>9} {'speed-up':>9} {'vs fp32':>8} {'MB/step':>9} "
          f"{'cpu ms':>8} {'wire ms':>9}")
    for r in rows:
        print(f"{r['world']:5d} {r['gbps']:7g} {r['hook']:24s} {1e3 * r['step_s']:9.1f} {r['speedup']:9.2f} "
              f"{r['vs_fp32']:7.2f}x {r['bytes_sent'] / 1e6:9.2f} {1e3 * r['cpu_s']:8.1f} {1e3 * r['wire_s']:9.1f}")
    return 0


def add_perfmodel(sub) -> None:
    p = add_topic(sub, "perfmodel", _cmd_perfmodel, help="predict step time and speed-up of each hook on a network",
                  description=_PERF_DESCRIPTION, epilog=_PERF_EPILOG, raw=True)
    p.add_argument("--model-params", type=_count, required=True, metavar="P",
                   help="parameters (gradient elements), e.g. 25.6M")
    p.add_argument("--world-size", type=lambda t: [int(v) for v in _floats(t)], required=True, metavar="N[,N...]",
                   help="workers; a comma list gives one row each")
    p.add_argument("--bandwidth-gbps", type=_floats, required=True, metavar="B[,B...]",
                   help="link bandwidth per rank in Gbit/s; a comma list gives one row each")
    p.add_argument("--compute-ms", type=float, required=True, metavar="C",
                   help="forward + backward time of one step on one worker, in ms")
    p.add_argument("--hook", default="none,fp16,terngrad,sketch_dp:0.01",
                   help="comma list of hooks (see below); default none,fp16,terngrad,sketch_dp:0.01")
    p.add_argument("--latency-us", type=float, default=50.0, help="per-message latency in us (default 50)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size in MB (default 25, DDP's)")
    p.add_argument("--ranks-per-host", type=int, default=1, help="ranks sharing one host's cores (default 1)")
    p.add_argument("--cores-per-host", type=int, default=0,
                   help="cores per host; with --ranks-per-host, CPU work slows when ranks outnumber cores")
    p.add_argument("--degree", type=int, default=2, help="gradient_tracking: neighbours per rank (default 2, ring)")
    p.add_argument("--calibration",
                   help="calibration JSON (default: the one `commcomp calibrate` saved, else built-in)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_calibrate(a) -> int:
    from commcomp.bench.calibrate import calibrate
    from commcomp.perfmodel import calibration_path

    path = a.out or calibration_path()
    print(f"commcomp calibrate: {a.world} local ranks, {a.params:,} parameters; this takes about a minute",
          flush=True)
    try:
        cal = calibrate(world=a.world, params=a.params, steps=a.steps, path=path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if a.json:
        print(json.dumps(cal, indent=1))
    else:
        link = cal["link"]
        print(f"loopback link: {link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, {1e6 * link['latency_s']:.0f} us per "
              f"message; compute-only step {1e3 * cal['compute_s']:.1f} ms")
        for k, v in cal["seconds_per_pass_element"].items():
            print(f"  {k:22s} {1e9 * v:8.2f} ns per pass-element   (overhead {1e3 * cal['overhead_s'][k]:7.1f} ms)")
    print(f"saved to {path}; `commcomp perfmodel` and TernGrad's collective='auto' use it from now on")
    return 0


def add_calibrate(sub) -> None:
    p = add_topic(sub, "calibrate", _cmd_calibrate,
                  help="measure this machine's codec and hook costs for the performance model",
                  description=_CALIBRATE_DESCRIPTION, raw=True)
    p.add_argument("--world", type=int, default=4, help="local ranks (default 4)")
    p.add_argument("--params", type=_count, default=2_000_000, help="parameters of the timed MLP (default 2M)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per hook, after 2 warm-up (default 7)")
    p.add_argument("--out", help="where to save (default $COMMCOMP_CALIBRATION or ~/.cache/commcomp/calibration.json)")
    p.add_argument("--json", action="store_true", help="also print the calibration as JSON")
