"""Where a TernGrad step's time goes, on the network benchmark's 11.3 M-parameter MLP over
``--world`` gloo ranks on loopback. Per collective: the DDP step time with the hook, and the
same step's bucket exchanges (recorded from DDP, then replayed one bucket after another on the
main thread, exactly as the hook's executor runs them) profiled op by op with torch.profiler:
per stage, CPU milliseconds and calls per step (rank 0, medians over ``--steps``), next to the
compute-only step and fp32 DDP's, all from this run.

    python benchmarks/terngrad_profile.py                       # 4 ranks, every collective
    python benchmarks/terngrad_profile.py --world 2 --collectives two_phase --json out.json

Stages are read off the op names: ``segment_stats`` (statistics), ``ternarize_*`` (encode),
``unpack*`` and the int8 path's per-element scale expansion (decode), ``aten::where`` (the NaN
mask), zero fills, copies/casts/scaling, collective launches; what no op accounts for is time
spent waiting on the wire and the peers. The replay does not
overlap the backward pass, so the stage sum is the exchange's whole cost; step - compute-only
is the part of it the backward pass did not hide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # commcomp from this checkout
sys.path.insert(0, HERE)

STAGES = [  # (stage, substrings of op names), first match wins
    ("statistics", ("segment_stats",)),
    ("encode", ("ternarize",)),
    ("decode", ("unpack", "repeat_interleave", "index_select")),  # int8 expands scales per element
    ("NaN mask", ("aten::where", "aten::full_like", "aten::isfinite", "aten::isnan")),
    ("zero fills", ("aten::fill_", "aten::zero_", "aten::zeros")),
    ("copies, casts, scaling", ("aten::copy_", "aten::cat", "aten::to", "aten::_to_copy", "aten::clone",
                                "aten::contiguous", "aten::div", "aten::mul", "aten::add", "aten::sub",
                                "aten::slice", "aten::stack")),
    ("collective launches", ("c10d", "gloo")),
]


def stage_of(name: str) -> str:
    for stage, keys in STAGES:
        if any(k in name for k in keys):
            return stage
    return "other"


def _record_buckets(model, x, y):
    """The DDP buckets of one step (after DDP's bucket rebuild): (index, gradients, lengths)."""
    import torch
    import torch.nn.functional as F

    from commcomp.core import bucket_lengths

    seen = []

    def record(_, bucket):
        seen.append((bucket.index(), bucket.buffer().clone(), bucket_lengths(bucket)))
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, record)
    for _ in range(2):  # the second step has the rebuilt buckets
        seen.clear()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    return list(seen)


def _profile_exchange(state, buckets, steps):
    """Replay the hook's exchange of every bucket of a step on this thread, under the profiler:
    per stage, the CPU ms and calls per step (median over ``steps``), and the serial wall time."""
    from torch.profiler import ProfilerActivity, profile

    from commcomp.hooks.terngrad import _reduce_bucket

    stage_ms, calls, walls, ops = {}, {}, [], {}
    bufs = [grads.clone() for _, grads, _ in buckets]  # DDP's bucket buffers exist across steps too
    for step in range(steps + 1):
        for buf, (_, grads, _) in zip(bufs, buckets):  # the recorded gradients, outside the profile
            buf.copy_(grads)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for buf, (index, _, lengths) in zip(bufs, buckets):
                _reduce_bucket(state, index, step, buf, lengths, buf, [], last=buf is bufs[-1])
            wall = time.perf_counter() - t0
        if step == 0:
            continue  # warm-up: first collective connections, allocator
        walls.append(1e3 * wall)
        per = {}
        for evt in prof.key_averages():
            st = stage_of(evt.key)
            ms, n = per.get(st, (0.0, 0))
            per[st] = (ms + evt.self_cpu_time_total / 1e3, n + evt.count)
            ops.setdefault(evt.key, []).append(evt.self_cpu_time_total / 1e3)
        for st, (ms, n) in per.items():
            stage_ms.setdefault(st, []).append(ms)
            calls[st] = n
    top = sorted(((statistics.median(v), k) for k, v in ops.items()), reverse=True)[:12]
    return {st: statistics.median(v) for st, v in stage_ms.items()}, calls, walls, {k: ms for ms, k in top}


def worker(rank, world, init_file, args, out_file):
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commcomp
    from commcomp.core import hook_group
    from commcomp.hooks import TernGradState
    from network import build_model, train_steps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(rank)
    x, y = torch.randn(32, 1000), torch.randint(0, 10, (32,))
    results = {}

    def step_fn(model):
        return lambda xb, yb: F.cross_entropy(model(xb), yb).backward()

    compute = build_model()
    results["compute-only"] = {"step_ms": [1e3 * t for t in train_steps(compute, step_fn(compute), args.warmup,
                                                                           args.steps)]}
    fp32 = DDP(build_model())
    results["fp32"] = {"step_ms": [1e3 * t for t in train_steps(fp32, step_fn(fp32), args.warmup, args.steps)]}
    buckets = _record_buckets(DDP(build_model()), x, y)
    pipe = {} if args.pipeline_numel is None else {"pipeline_numel": args.pipeline_numel}
    for collective in args.collectives:
        model = DDP(build_model())
        state = commcomp.register(model, "terngrad", collective=collective, **pipe)
        step_ms = [1e3 * t for t in train_steps(model, step_fn(model), args.warmup, args.steps)]
        state.close()
        replay = TernGradState(process_group=hook_group(None), collective=collective, **pipe)
        stages, calls, walls, top = _profile_exchange(replay, buckets, args.steps)
        results[f"terngrad/{collective}"] = {"step_ms": step_ms, "stages": stages, "calls": calls, "top_ops": top,
                                             "exchange_ms": walls, "buckets": len(buckets)}
        dist.barrier()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--collectives", type=lambda s: s.split(","), default=["int8", "allgather", "two_phase"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pipeline-numel", type=int, default=None,
                    help="TernGradState(pipeline_numel=...) (default: its default); 0: each bucket in one piece")
    ap.add_argument("--json")
    ap.add_argument("--ops", action="store_true", help="also print the costliest ops of each collective")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "profile.json")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "rdv"), args, out_file), nprocs=args.world)
        with open(out_file) as f:
            results = json.load(f)
    base = statistics.median(results["compute-only"]["step_ms"])
    fp32 = statistics.median(results["fp32"]["step_ms"]) - base
    print(f"{args.world} gloo ranks on loopback, 11.3 M-parameter MLP, batch 32, pipeline_numel "
          f"{'default' if args.pipeline_numel is None else args.pipeline_numel}; medians of {args.steps} steps (rank 0)")
    print(f"compute-only {base:.0f} ms; fp32 DDP overhead {fp32:.0f} ms")
    for label, r in results.items():
        if not label.startswith("terngrad"):
            continue
        step = r["step_ms"]
        med = statistics.median(step)
        ex = r["exchange_ms"]
        print(f"\n{label}: step {med:.0f} ms (min {min(step):.0f}, max {max(step):.0f}), "
              f"overhead {med - base:.0f} ms = {(med - base) / fp32:.2f}x fp32's; the {r['buckets']} buckets' "
              f"exchanges replayed serially: {statistics.median(ex):.0f} ms (min {min(ex):.0f}, max {max(ex):.0f})")
        print(f"  {'stage':22s} {'ms/step':>8s} {'calls':>6s}")
        for st, ms in sorted(r["stages"].items(), key=lambda kv: -kv[1]):
            print(f"  {st:22s} {ms:8.1f} {r['calls'].get(st, 0):6d}")
        waits = statistics.median(ex) - sum(r["stages"].values())
        print(f"  {'in no op: waits':22s} {waits:8.1f}        (wire, peers; replay wall - ops)")
        if args.ops:
            print("  top ops (self CPU ms per step): " + ", ".join(f"{k} {v:.1f}" for k, v in r["top_ops"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
