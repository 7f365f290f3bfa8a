"""The ``commcomp`` command line. One sub-command per topic; each topic has its own actions.

    commcomp stragglers simulate --trace Canada-w256-r20-load0_250-b2048-desktop.npz \\
        --scheme msgc --B 1 --W 3 --lambd 30 --n-jobs 10 --mu 1.0 --base-comp 2.2 --json
    commcomp stragglers simulate --model bursty --rounds 300 --workers 256 --search --png cmp.png
    commcomp info [--json]
    commcomp perfmodel --model-params 25.6M --world-size 64 --bandwidth-gbps 10 --compute-ms 100
    commcomp calibrate --world 4
    commcomp bench codec --numel 16777216

New topics register a ``add_<topic>(subparsers)`` function in ``_TOPICS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import numpy as np

_SCHEMES = ("uncoded", "ignore", "gc", "srsgc", "msgc")

_SIM_EPILOG = """\
round model (the one of Krishnan et al., ICLR 2023, and their simulator):
  a scheme of normalized load L replays durations + (L - trace_load) * base_comp; each round the
  master waits fastest * (1 + mu); slower workers are stragglers. If they fit the scheme's model
  (<= s per round for gc; the (B, W, lambd) bursty model for srsgc/msgc) the round lasts
  min(wait, slowest), else the master waits for all (counted in num_waits). n_jobs jobs with
  delay T take n_jobs + T rounds; runtime is the sum of their durations.

examples:
  commcomp stragglers simulate --trace Canada-w256-r20-load0_250-b2048-desktop.npz --scheme gc --s 14 --mu 1 --json
  commcomp stragglers simulate --trace FILE.npz --search --lambd-max 64 --png compare.png
  commcomp stragglers simulate --model bursty --gen-B 2 --gen-W 5 --gen-lambd 20 --rounds 220 \\
      --scheme msgc --B 2 --W 5 --lambd 20 --n-jobs 200 --base-comp 10
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("durations (where the per-round worker times come from)")
    g.add_argument("--model", choices=("trace", "none", "bernoulli", "exp", "bursty", "ge"), default="trace",
                   help="trace: replay --trace; none: all workers equal; bernoulli: each worker slow with prob "
                        "--p; exp: shift + Exp(rate); bursty: a (B, W, lambd) bursty pattern (--gen-*); "
                        "ge: Gilbert-Elliott good/bad chain per worker (--p-gb, --p-bg). Default: trace")
    g.add_argument("--trace", help="trace .npz (a path, or a file name from the shipped/full trace sets)")
    g.add_argument("--extend", type=int, metavar="ROUNDS",
                   help="resample the trace's rounds (block bootstrap, --block) up to ROUNDS rounds")
    g.add_argument("--block", type=int, default=1, help="block length for --extend (default 1: i.i.d. rounds)")
    g.add_argument("--rounds", type=int, default=40, help="rounds of a synthetic model (default 40)")
    g.add_argument("--workers", type=int, default=256, help="workers n of a synthetic model (default 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic model / resampling (default 0)")
    g.add_argument("--base", type=float, default=1.0, help="a fast worker's time in seconds (default 1.0)")
    g.add_argument("--slow", type=float, default=5.0, help="a straggler is this many times slower (default 5)")
    g.add_argument("--p", type=float, default=0.02, help="bernoulli: straggling probability (default 0.02)")
    g.add_argument("--shift", type=float, default=1.0, help="exp: shift in seconds (default 1.0)")
    g.add_argument("--rate", type=float, default=5.0, help="exp: rate in 1/seconds (default 5)")
    g.add_argument("--gen-B", type=int, default=2, help="bursty model: longest burst B (default 2)")
    g.add_argument("--gen-W", type=int, default=5, help="bursty model: window W (default 5)")
    g.add_argument("--gen-lambd", type=int, default=20,
                   help="bursty model: distinct stragglers per window (default 20)")
    g.add_argument("--p-start", type=float, default=0.05, help="bursty model: burst start probability (default 0.05)")
    g.add_argument("--p-gb", type=float, default=0.01, help="ge: good->bad probability per round (default 0.01)")
    g.add_argument("--p-bg", type=float, default=0.5, help="ge: bad->good probability per round (default 0.5)")


def _durations(a) -> tuple:
    """(durations, trace_load, label)."""
    from commcomp.coding import stragglers as st

    rng = np.random.default_rng(a.seed)
    if a.model == "trace":
        if not a.trace:
            raise SystemExit("commcomp: --model trace needs --trace FILE.npz (or choose a synthetic --model)")
        tr = st.load_trace(a.trace)
        d = tr.durations if not a.extend else st.extend_trace(tr.durations, a.extend, rng, a.block)
        return d, tr.load, tr.name
    r, n = a.rounds, a.workers
    if a.model == "none":
        d = st.no_stragglers(r, n, a.base)
    elif a.model == "bernoulli":
        d = st.bernoulli(r, n, a.p, rng, a.base, a.slow)
    elif a.model == "exp":
        d = st.shifted_exponential(r, n, a.shift, a.rate, rng)
    elif a.model == "bursty":
        pat = st.bursty(r, n, a.gen_B, a.gen_W, a.gen_lambd, rng, a.p_start)
        d = st.pattern_to_durations(pat, rng, a.base, a.slow)
    else:
        d = st.gilbert_elliott(r, n, a.p_gb, a.p_bg, rng, a.base, a.slow)
    return d, 0.0, f"{a.model} model"


def _params(a) -> dict:
    if a.scheme in ("gc", "ignore"):
        if a.s is None:
            raise SystemExit(f"commcomp: --scheme {a.scheme} needs --s S (stragglers tolerated per round)")
        return {"s": a.s}
    if a.scheme in ("srsgc", "msgc"):
        missing = [f"--{k}" for k in ("B", "W", "lambd") if getattr(a, k) is None]
        if missing:
            raise SystemExit(f"commcomp: --scheme {a.scheme} needs --B, --W and --lambd; missing {' '.join(missing)}")
        return {"B": a.B, "W": a.W, "lambd": a.lambd}
    return {}


def _plot(results: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(results)
    ax[0].bar(names, [results[k].runtime for k in names], color="tab:blue")
    ax[0].set_ylabel("runtime (s)")
    ax[0].set_title("best runtime per scheme")
    for k in names:
        ax[1].plot(np.cumsum(results[k].round_durations), label=f"{k} {results[k].params}")
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("elapsed (s)")
    ax[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cmd_simulate(a) -> int:
    from commcomp.coding.simulate import search, simulate

    d, trace_load, label = _durations(a)
    if a.trace_load is not None:
        trace_load = a.trace_load
    kw = dict(n_jobs=a.n_jobs, mu=a.mu, base_comp=a.base_comp, trace_load=trace_load)
    try:
        if a.search or a.png and not a.scheme:
            lam = range(1, (a.lambd_max or d.shape[1]) + 1, a.lambd_step)
            ss = range(0, (a.lambd_max or d.shape[1]), a.lambd_step)
            res = search(d, a.schemes.split(","), lambds=lam, s_values=ss,
                         progress=not a.json and sys.stderr.isatty(), **kw)
        else:
            if not a.scheme:
                raise SystemExit("commcomp: give --scheme (or --search to find each scheme's best parameters)")
            res = {a.scheme: simulate(d, a.scheme, _params(a), **kw)}
    except ValueError as e:
        raise SystemExit(f"commcomp: {e}")
    if a.png:
        _plot(res, a.png, f"{label}, n={d.shape[1]}, mu={a.mu}, base_comp={a.base_comp}")
    keys = ("runtime", "load", "T", "num_waits", "params")
    if a.json:
        out = {k: {f: v.to_dict()[f] for f in keys} for k, v in res.items()}
        print(json.dumps(out[a.scheme] if len(out) == 1 and not a.search else out, indent=1))
    else:
        print(f"{label}: {d.shape[0]} rounds x {d.shape[1]} workers, mu={a.mu}, base_comp={a.base_comp}, "
              f"trace_load={trace_load}")
        print(f"{'scheme':8} {'runtime_s':>10} {'load':>8} {'T':>3} {'waits':>5}  params")
        for k, r in res.items():
            print(f"{k:8} {r.runtime:10.3f} {r.load:8.5f} {r.T:3d} {r.num_waits:5d}  {r.params}")
    return 0


def add_stragglers(sub) -> None:
    p = sub.add_parser("stragglers", help="straggler models and gradient-coding runtime simulation",
                       description="Straggler models and the runtime of straggler-mitigation schemes "
                                   "(GC, SR-SGC, M-SGC; Krishnan et al. ICLR 2023).")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = acts.add_parser("simulate", help="runtime of a scheme (or the best of each) on a trace or a model",
                        description="Simulate a straggler-mitigation scheme round by round.",
                        epilog=_SIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(s)
    g = s.add_argument_group("scheme")
    g.add_argument("--scheme", choices=_SCHEMES, help="uncoded: wait for all; ignore: wait for the fastest n-s; "
                   "gc: gradient coding (--s); srsgc, msgc: sequential GC for the bursty model (--B --W --lambd)")
    g.add_argument("--s", type=int, help="gc/ignore: stragglers tolerated per round (gc load (s+1)/n)")
    g.add_argument("--B", type=int, help="srsgc/msgc: longest burst, in rounds (srsgc needs B | W-1)")
    g.add_argument("--W", type=int, help="srsgc/msgc: window, in rounds (> B)")
    g.add_argument("--lambd", type=int, help="srsgc/msgc: distinct stragglers tolerated per window of W rounds")
    g.add_argument("--n-jobs", type=int, help="jobs (gradient steps) to finish; default: half the rounds")
    g.add_argument("--mu", type=float, default=1.0, help="the master waits fastest*(1+mu) per round (default 1.0)")
    g.add_argument("--base-comp", type=float, default=0.0,
                   help="seconds a worker spends per unit of normalized load (default 0: load is free)")
    g.add_argument("--trace-load", type=float, help="load the durations were measured at (default: the trace's)")
    o = s.add_argument_group("search and output")
    o.add_argument("--search", action="store_true", help="best parameters of each of --schemes (grid search)")
    o.add_argument("--schemes", default=",".join(_SCHEMES), help="comma-separated schemes for --search/--png")
    o.add_argument("--lambd-max", type=int, help="search lambd and s only up to this (default n; smaller is faster)")
    o.add_argument("--lambd-step", type=int, default=1, help="search every k-th lambd and s (default 1)")
    o.add_argument("--json", action="store_true", help="print JSON: runtime, load, T, num_waits, params")
    o.add_argument("--png", help="write a plot comparing the schemes (implies --search without --scheme)")
    s.set_defaults(func=_cmd_simulate)


def _info() -> dict:
    """What this installation has: versions, backends, native kernels, accelerators, launchers."""
    import importlib.util
    import platform

    import torch
    import torch.distributed as dist

    import commcomp
    from commcomp import ops
    from commcomp.decentralized import TOPOLOGIES
    from commcomp.hooks import HOOKS

    def has(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    info = {
        "commcomp": commcomp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "distributed": dist.is_available(),
        "backends": {name: bool(getattr(dist, f"is_{name}_available", lambda: False)())
                     for name in ("gloo", "nccl", "mpi", "ucc")},
        "native_kernels": {"cpu": ops.backend("cpu"),
                           "cuda": ops.backend("cuda") if torch.cuda.is_available() else "no CUDA device"},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "nccl": None,
        "mpi4py": None,
        "horovod": None,
        "hooks": sorted(HOOKS),
        "topologies": list(TOPOLOGIES),
        "compressors": ["identity", "ternary", "topk", "randomk"],
    }
    if torch.cuda.is_available() and info["backends"]["nccl"]:
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info["nccl"] = f"unavailable ({exc})"
    if has("mpi4py"):
        try:
            from mpi4py import MPI

            # Open MPI's string ends in a NUL byte (it counts the terminator), which made this output binary
            info["mpi4py"] = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - e.g. no MPI library behind the wheel
            info["mpi4py"] = f"installed, but MPI failed to load ({exc})"
    if has("horovod"):
        try:
            import horovod

            info["horovod"] = horovod.__version__
        except Exception as exc:  # noqa: BLE001
            info["horovod"] = f"installed, but failed to import ({exc})"
    return info


def _cmd_info(a) -> int:
    info = _info()
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:>{width}}  {'-' if value is None else value}")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, distributed backends, native kernels, CUDA/NCCL/MPI/Horovod",
                       description="What this installation of commcomp can use: torch and Python versions, which "
                                   "torch.distributed backends are built in, whether the native kernels serve CPU "
                                   "and CUDA tensors (else the pure-PyTorch reference runs), CUDA devices, NCCL, "
                                   "mpi4py's MPI library, Horovod, and the hooks, topologies and compressors.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------- perfmodel

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
    p = sub.add_parser("perfmodel", help="predict step time and speed-up of each hook on a network",
                       description="Predict, before running anything, the step time and speed-up of each hook "
                                   "and TernGrad collective for a model size, world size, link and compute time. "
                                   "terngrad (auto) shows the collective TernGradState(collective='auto') picks.",
                       epilog=_PERF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.set_defaults(func=_cmd_perfmodel)


def _cmd_calibrate(a) -> int:
    from commcomp.perfmodel import calibration_path
    from commcomp.perfmodel.calibrate import calibrate

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
    p = sub.add_parser("calibrate", help="measure this machine's codec and hook costs for the performance model",
                       description="Spawn --world ranks on gloo over loopback, time plain all-reduces (latency, "
                                   "bandwidth), a compute-only step and a DDP step with every hook at two model "
                                   "sizes, and save each hook's CPU cost per bucket and per pass-element. "
                                   "Run it with the ranks per host you deploy with: their contention for cores is "
                                   "part of the cost. The link of your cluster is an input of `commcomp perfmodel`, "
                                   "not measured here.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="local ranks (default 4)")
    p.add_argument("--params", type=_count, default=2_000_000, help="parameters of the timed MLP (default 2M)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per hook, after 2 warm-up (default 7)")
    p.add_argument("--out", help="where to save (default $COMMCOMP_CALIBRATION or ~/.cache/commcomp/calibration.json)")
    p.add_argument("--json", action="store_true", help="also print the calibration as JSON")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_bench(a) -> int:
    import importlib

    importlib.import_module(f"commcomp.bench.{a.which}").main(a.args)
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="kernel benchmarks: native vs reference vs a same-run copy",
                       description="Throughput of the native kernels against the pure-PyTorch reference and a memory "
                                   "copy timed in the same run (only same-run ratios mean anything on a shared "
                                   "machine). `commcomp bench codec --help` and `commcomp bench sketch --help` "
                                   "list their options.",
                       epilog="examples:\n  commcomp bench codec --numel 16777216 --world 8\n"
                              "  commcomp bench sketch --devices cuda --numel 67108864 --json out.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("codec", "sketch"), help="codec: ternary ops; sketch: CountSketch and SRHT")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    p.set_defaults(func=_cmd_bench)


_TOPICS = [add_stragglers, add_info, add_perfmodel, add_calibrate, add_bench]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="commcomp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="commcomp command line tools: what compression will buy you (perfmodel, calibrate), how fast "
                    "the kernels run here (bench), straggler simulation on real traces (stragglers), and what "
                    "this installation can use (info). `commcomp TOPIC --help` teaches each one.",
        epilog="examples:\n  commcomp info\n"
               "  commcomp perfmodel --model-params 25.6M --world-size 8,64,512 --bandwidth-gbps 1,10 "
               "--compute-ms 100\n"
               "  commcomp calibrate --world 4\n  commcomp bench codec --numel 16777216\n"
               "  commcomp stragglers simulate --model bursty --rounds 300 --workers 256 --search")
    sub = p.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    for add in _TOPICS:
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
