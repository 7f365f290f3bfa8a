"""Where a decentralized (DProxSGT / CDProxSGT) step's time goes: the network benchmark's
11.3 M-parameter MLP, ``--world`` gloo ranks on loopback (a ring), one thread per rank.

For each method (``--methods``: ``identity`` = DProxSGT, ``ternary`` = CDProxSGT with the
contractive base-3 ternary codec, ``ternary-2bit``, ``topk:0.02``; ``@before`` appended selects
``x_mixing="before"``) it prints the median step, the compute-only part (zero_grad + forward +
backward, measured inside the same steps), and ``GradientTracking.step()`` profiled op by op on
rank 0 (torch.profiler, self CPU time per op, median over the profiled steps): the commcomp
ops, the PyTorch ops, and the rest (waiting for the neighbours' messages, Python). The CPU
work is also given in *passes*: one pass is the time of ``a.add_(b)`` over the model's
11.3 M floats on one thread (read two, write one 45 MB vector), measured in the same run; the
issue's target is at most 3 passes of CPU work per step beyond compute and wire.

    python benchmarks/gt_profile.py                                   # 4 ranks, every method
    python benchmarks/gt_profile.py --world 2 --methods ternary,ternary@before --steps 6 --json out.json

On loopback the wire is nearly free, so ``step() - ops`` is mostly waiting for the slowest
neighbour; run ``benchmarks/network.py --hooks gt/...`` for shaped links.
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

DEFAULT = "identity,ternary,ternary@before,ternary-2bit,topk:0.02"


def parse(method: str):
    spec, _, mode = method.partition("@")
    return spec, (mode or "after")


def pass_ms(numel: int, repeat: int = 7) -> float:
    """One pass over the model: ``a.add_(b)`` on ``numel`` float32, one thread (median ms)."""
    import torch

    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _worker(rank, world, init, method, warmup, steps, out):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from network import build_model

    from commcomp.codecs import Ternary
    from commcomp.decentralized import GradientTracking

    spec, mode = parse(method)
    comp = Ternary(contractive=True) if spec == "ternary-2bit" else spec
    torch.manual_seed(0)
    model = build_model()
    gt = GradientTracking(model, 0.01, topology="ring", compressor=comp, x_mixing=mode)
    x, y = torch.randn(32, 1000), torch.randint(0, 10, (32,))
    steps_s, compute_s, step_fn_s, profiles = [], [], [], []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        gt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        if i >= warmup and rank == 0:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                gt.step()
        else:
            gt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            steps_s.append(t2 - t0)
            compute_s.append(t1 - t0)
            step_fn_s.append(t2 - t1)
            if rank == 0:
                ops = {}
                for ev in prof.key_averages():
                    if ev.self_cpu_time_total > 0 and not ev.key.startswith("ProfilerStep"):
                        ops[ev.key] = ops.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e3
                profiles.append(ops)
    n = sum(p.numel() for p in model.parameters())
    rec = {"method": method, "params": n, "step_ms": 1e3 * statistics.median(steps_s),
           "step_spread_ms": [1e3 * min(steps_s), 1e3 * max(steps_s)],
           "compute_ms": 1e3 * statistics.median(compute_s), "step_fn_ms": 1e3 * statistics.median(step_fn_s),
           "bytes_per_step": gt.metrics["bytes_sent"] / (warmup + steps)}
    if rank == 0:
        names = sorted({k for p in profiles for k in p})
        rec["ops_ms"] = {k: statistics.median([p.get(k, 0.0) for p in profiles]) for k in names}
        rec["pass_ms"] = pass_ms(n)
        with open(out, "w") as f:
            json.dump(rec, f)
    gt.close()
    dist.destroy_process_group()


def run(method, world, warmup, steps, tries: int = 3) -> dict:
    """One method's record; retried, because torch.profiler's kineto sometimes crashes on this
    machine at the end of a profile (SIGSEGV in libkineto::MemoryTraceLogger's destructor, seen
    2026-12-04 with torch 2.13; the same steps without the profiler, and the kernels under glibc's
    malloc checker, run clean)."""
    import torch.multiprocessing as mp

    for attempt in range(tries):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rec.json")
            try:
                mp.spawn(_worker, args=(world, f"file://{tmp}/rdzv", method, warmup, steps, out), nprocs=world)
            except mp.ProcessExitedException as exc:
                if attempt == tries - 1:
                    raise
                print(f"{method}: {exc}; again", flush=True)
                continue
            with open(out) as f:
                return json.load(f)


def summarize(rec: dict) -> dict:
    ops = rec["ops_ms"]
    mine = sum(v for k, v in ops.items() if k.startswith("commcomp::"))
    torch_ops = sum(v for k, v in ops.items() if k.startswith("aten::"))
    other_ops = sum(v for k, v in ops.items() if not k.startswith(("commcomp::", "aten::")))
    cpu = mine + torch_ops + other_ops
    return {"commcomp_ms": mine, "aten_ms": torch_ops, "other_ops_ms": other_ops, "cpu_ms": cpu,
            "wait_ms": max(rec["step_fn_ms"] - cpu, 0.0), "passes": cpu / rec["pass_ms"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=8, help="ops listed per method")
    ap.add_argument("--json")
    args = ap.parse_args()
    recs = []
    for method in args.methods.split(","):
        rec = run(method, args.world, args.warmup, args.steps)
        rec.update(summarize(rec))
        recs.append(rec)
        top = sorted(rec["ops_ms"].items(), key=lambda kv: -kv[1])[:args.top]
        print(f"{method}: " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
    print(f"\n{args.world} ranks on loopback, ring, {recs[0]['params'] / 1e6:.1f} M parameters; "
          f"one pass (a.add_(b), 1 thread) = {recs[0]['pass_ms']:.1f} ms")
    print("| method | step ms (min-max) | compute | step() | commcomp ops | torch ops | other | wait | CPU passes "
          "| MB/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        print(f"| {r['method']} | {r['step_ms']:.0f} ({r['step_spread_ms'][0]:.0f}-{r['step_spread_ms'][1]:.0f}) "
              f"| {r['compute_ms']:.0f} | {r['step_fn_ms']:.0f} | {r['commcomp_ms']:.1f} | {r['aten_ms']:.1f} "
              f"| {r['other_ops_ms']:.1f} | {r['wait_ms']:.1f} | {r['passes']:.1f} | {r['bytes_per_step'] / 1e6:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
