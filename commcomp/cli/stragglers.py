"""``commcomp stragglers simulate``: the runtime of straggler-mitigation schemes (GC, SR-SGC,
M-SGC) on a recorded trace or a synthetic straggler model, round by round.

    commcomp stragglers simulate --trace Canada-w256-r20-load0_250-b2048-desktop.npz \\
        --scheme msgc --B 1 --W 3 --lambd 30 --n-jobs 10 --mu 1.0 --base-comp 2.2 --json
    commcomp stragglers simulate --model bursty --rounds 300 --workers 256 --search --png cmp.png
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ._common import add_topic

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


# the trace resampling's and synthetic models' knobs: flag, type, default, help
_MODEL_KNOBS = (
    ("--block", int, 1, "block length for --extend (default 1: i.i.d. rounds)"),
    ("--rounds", int, 40, "rounds of a synthetic model (default 40)"),
    ("--workers", int, 256, "workers n (simulate: of a synthetic model, default 256; run: worker processes, "
                            "default 8, the first n of a trace)"),
    ("--seed", int, 0, "seed of the synthetic model / resampling (default 0)"),
    ("--base", float, 1.0, "a fast worker's time in seconds (default 1.0)"),
    ("--slow", float, 5.0, "a straggler is this many times slower (default 5)"),
    ("--p", float, 0.02, "bernoulli: straggling probability (default 0.02)"),
    ("--shift", float, 1.0, "exp: shift in seconds (default 1.0)"),
    ("--rate", float, 5.0, "exp: rate in 1/seconds (default 5)"),
    ("--gen-B", int, 2, "bursty model: longest burst B (default 2)"),
    ("--gen-W", int, 5, "bursty model: window W (default 5)"),
    ("--gen-lambd", int, 20, "bursty model: distinct stragglers per window (default 20)"),
    ("--p-start", float, 0.05, "bursty model: burst start probability (default 0.05)"),
    ("--p-gb", float, 0.01, "ge: good->bad probability per round (default 0.01)"),
    ("--p-bg", float, 0.5, "ge: bad->good probability per round (default 0.5)"),
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("durations (where the per-round worker times come from)")
    g.add_argument("--model", choices=("trace", "none", "bernoulli", "exp", "bursty", "ge"), default="trace",
                   help="trace: replay --trace; none: all workers equal; bernoulli: each worker slow with prob "
                        "--p; exp: shift + Exp(rate); bursty: a (B, W, lambd) bursty pattern (--gen-*); "
                        "ge: Gilbert-Elliott good/bad chain per worker (--p-gb, --p-bg). Default: trace")
    g.add_argument("--trace", help="trace .npz (a path, or a file name from the shipped/full trace sets)")
    g.add_argument("--extend", type=int, metavar="ROUNDS",
                   help="resample the trace's rounds (block bootstrap, --block) up to ROUNDS rounds")
    for flag, kind, default, text in _MODEL_KNOBS:
        g.add_argument(flag, type=kind, default=default, help=text)


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
    _elapsed(fig, ax[1], {f"{k} {results[k].params}": results[k].round_durations for k in names},
             "elapsed (s)", title, path)


def _elapsed(fig, ax, series: dict, ylabel: str, title: str, path: str) -> None:
    """The elapsed-time-per-round panel of both plots, then the title and the file."""
    for label, durations in series.items():
        ax.plot(np.cumsum(durations), label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
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


_RUN_EPILOG = """\
the live engine (commcomp.coding.engine): a coordinator process and --workers worker processes on
this machine (gloo P2P; or the current torchrun job; or mpiexec with --transport mpi). Each round
the coordinator sends every worker its tasks (the scheme's schedule) and the parameters of the
jobs' models; a worker computes real gradients of a small MLP on MNIST digits, sleeps its
injected delay (the durations, load-shifted by --base-comp, times --time-scale) and answers; the
coordinator applies the simulator's round rule live and decodes every job exactly. Jobs are
spread over concurrent models (a learning-rate sweep, at least T + 1 of them).

examples:
  commcomp stragglers run --scheme msgc --B 1 --W 3 --lambd 2 --model bursty --gen-B 1 --gen-W 3 \\
      --gen-lambd 2 --workers 8 --rounds 60 --jobs 40 --time-scale 0.1
  commcomp stragglers run --search --trace Canada-w256-r20-load0_250-b2048-desktop.npz --extend 60 \\
      --workers 8 --jobs 40 --base-comp 2.2013 --time-scale 0.1 --json --png live.png
"""


def _plot_live(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [f"{r['scheme']}\n{','.join(str(v) for v in r['params'].values())}" for r in rows]
    x = np.arange(len(rows))
    ax[0].bar(x - 0.2, [r["runtime"] for r in rows], 0.4, label="live (measured)")
    ax[0].bar(x + 0.2, [r["predicted"] for r in rows], 0.4, label="simulator (predicted)")
    ax[0].set_xticks(x, names, fontsize=7)
    ax[0].set_ylabel("runtime of all jobs (s)")
    ax[0].legend(fontsize=7)
    _elapsed(fig, ax[1], {r["scheme"]: r["round_durations"] for r in rows}, "elapsed, live (s)", title, path)


def _cmd_run(a) -> int:
    from commcomp.coding.live import ENGINE_SCHEMES, plan_runs, run_live

    d, trace_load, label = _durations(a)
    if a.model == "trace":
        if a.workers > d.shape[1]:
            raise SystemExit(f"commcomp: --workers {a.workers} but the trace has {d.shape[1]} workers")
        d = d[:, a.trace_offset:a.trace_offset + a.workers]
        if d.shape[1] < a.workers:
            raise SystemExit(f"commcomp: --trace-offset {a.trace_offset} leaves {d.shape[1]} workers, fewer than "
                             f"--workers {a.workers}")
    if a.trace_load is not None:
        trace_load = a.trace_load
    if a.scheme:
        if a.scheme not in ENGINE_SCHEMES:
            raise SystemExit(f"commcomp: the live engine runs {', '.join(ENGINE_SCHEMES)}; got --scheme {a.scheme}")
        schemes, given = [a.scheme], {a.scheme: _params(a)}
        from commcomp.coding.sequential import make_scheme
        try:
            T = make_scheme(a.scheme, d.shape[1], **given[a.scheme]).T
        except ValueError as e:
            raise SystemExit(f"commcomp: {e}")
        if d.shape[0] < a.jobs + T:
            raise SystemExit(f"commcomp: {a.jobs} jobs of {a.scheme} (delay T={T}) need {a.jobs + T} rounds of "
                             f"durations, there are {d.shape[0]}; pass --extend ROUNDS (a trace) or --rounds "
                             "(a model), or fewer --jobs")
    else:
        if not a.search:
            raise SystemExit("commcomp: give --scheme (with its parameters) or --search (each of --schemes with "
                             "its best simulated parameters)")
        schemes, given = [x for x in a.schemes.split(",") if x], {}
    lam = range(1, min(a.lambd_max or d.shape[1], d.shape[1] - 1) + 1, a.lambd_step)
    try:
        plans = plan_runs(d, schemes, a.jobs, params=given, mu=a.mu, base_comp=a.base_comp, trace_load=trace_load,
                          time_scale=a.time_scale, lambds=lam)
        rows = run_live(plans, a.jobs, workers=a.workers, mu=a.mu, models=a.models, transport=a.transport,
                        progress=not a.json and sys.stderr.isatty(), timeout=a.timeout)
    except ValueError as e:
        raise SystemExit(f"commcomp: {e}")
    if rows is None:  # a worker process of a torchrun / mpiexec job
        return 0
    title = (f"{label}, n={a.workers} workers, {a.jobs} jobs, mu={a.mu}, base_comp={a.base_comp}, "
             f"time_scale={a.time_scale}")
    if a.png:
        _plot_live(rows, a.png, title)
    if a.json:
        keep = ("scheme", "params", "load", "T", "runtime", "predicted", "ratio", "num_waits", "predicted_waits",
                "wall_s", "late_dropped", "not_sent", "skipped", "bytes_sent")
        print(json.dumps({"setup": title, "runs": [{k: r[k] for k in keep} for r in rows]}, indent=1))
        return 0
    print(title)
    print(f"{'scheme':8} {'params':24} {'load':>7} {'T':>2} {'live_s':>8} {'pred_s':>8} {'live/pred':>9} "
          f"{'waits':>9} {'late':>5}")
    for r in rows:
        print(f"{r['scheme']:8} {str(r['params']):24} {r['load']:7.4f} {r['T']:2d} {r['runtime']:8.3f} "
              f"{r['predicted']:8.3f} {r['ratio']:9.3f} {r['num_waits']:>4}/{r['predicted_waits']:<4} "
              f"{r['late_dropped']:5d}")
    return 0


def add_stragglers(sub) -> None:
    p = add_topic(sub, "stragglers", None, help="straggler models and gradient-coding runtime simulation",
                  description="Straggler models and the runtime of straggler-mitigation schemes "
                              "(GC, SR-SGC, M-SGC; Krishnan et al. ICLR 2023).")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = add_topic(acts, "simulate", _cmd_simulate,
                  help="runtime of a scheme (or the best of each) on a trace or a model",
                  description="Simulate a straggler-mitigation scheme round by round.", epilog=_SIM_EPILOG, raw=True)
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

    r = add_topic(acts, "run", _cmd_run, help="run schemes live on worker processes and compare with the simulator",
                  description="Train concurrent models with a scheme on real worker processes with injected "
                              "stragglers; report the measured runtime beside the simulator's prediction.",
                  epilog=_RUN_EPILOG, raw=True)
    _add_model_args(r)
    r.set_defaults(workers=8, rounds=60)
    g = r.add_argument_group("scheme")
    g.add_argument("--scheme", choices=_SCHEMES, help="uncoded, gc (--s), srsgc or msgc (--B --W --lambd)")
    g.add_argument("--s", "--stragglers", dest="s", type=int,
                   help="gc: stragglers tolerated per round (--stragglers under torchrun, which takes --s as its own)")
    g.add_argument("--B", type=int, help="srsgc/msgc: longest burst, in rounds")
    g.add_argument("--W", type=int, help="srsgc/msgc: window, in rounds")
    g.add_argument("--lambd", type=int, help="srsgc/msgc: distinct stragglers per window (< workers)")
    g.add_argument("--search", action="store_true", help="run each of --schemes with its best simulated parameters")
    g.add_argument("--schemes", default="uncoded,gc,srsgc,msgc", help="comma-separated schemes for --search")
    g.add_argument("--lambd-max", type=int, help="search lambd and s only up to this")
    g.add_argument("--lambd-step", type=int, default=1, help="search every k-th lambd and s (default 1)")
    e = r.add_argument_group("run")
    e.add_argument("--jobs", type=int, default=40, help="jobs (gradients) to decode (default 40)")
    e.add_argument("--models", type=int, help="concurrent models (default: the largest T + 1 of the schemes)")
    e.add_argument("--trace-offset", type=int, default=0, help="trace: use workers offset..offset+workers-1")
    e.add_argument("--time-scale", type=float, default=0.1,
                   help="injected delay = simulated seconds x this (default 0.1: a 1 s round takes 0.1 s)")
    e.add_argument("--mu", type=float, default=1.0, help="the coordinator waits fastest*(1+mu) (default 1.0)")
    e.add_argument("--base-comp", type=float, default=0.0, help="seconds per unit of normalized load (default 0)")
    e.add_argument("--trace-load", type=float, help="load the durations were measured at (default: the trace's)")
    e.add_argument("--transport", choices=("torch", "mpi"), default="torch",
                   help="torch: gloo P2P (spawned here, or the torchrun job); mpi: under mpiexec")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds any wait may take (default 120)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--png", help="write a plot: live vs predicted runtime per scheme, elapsed per round")
