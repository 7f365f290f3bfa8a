"""Gradient coding in a real run: 4 CPU ranks train a CNN on real MNIST digits while every
rank is slowed by injected straggler delays, and the round ends when the first n - s coded
gradients are in, not when the slowest rank is done.

    python examples/train_gc.py                         # uncoded (s=0) vs cyclic GC s=1, 4 ranks
    python examples/train_gc.py --world 6 --s 2 --delays exp

What it does, per scheme (``--schemes``, default ``0,1``: s = 0 is uncoded wait-for-all through
the same coordinator, s = 1 tolerates one straggler per round):

1. spawns ``--world`` gloo ranks; each wraps the CNN in DDP (``broadcast_buffers=False``) and
   registers ``commcomp.register(model, "gradient_coding", s=s, code=--code)``;
2. a :class:`commcomp.coding.CodedSampler` gives rank i its s + 1 partitions of every global
   batch (``--world`` partitions of ``--partition-size`` digits), and
   :func:`commcomp.coding.coded_loss` weights their losses with row i of B (one backward);
3. before each step rank i sleeps ``delay[step, i]``: columns of a real AWS Lambda trace
   (``--delays trace``, scaled so that its median is ``--delay-scale`` seconds; resampled by
   rounds when the run is longer than the trace) or a shifted exponential (``--delays exp``);
4. rank 0 (the coordinator) times each step; its fastest warm-up step (no delay) is the
   compute-and-exchange time of one step.

It prints, per scheme: the mean measured step time; the prediction of the round model (a round
ends at the (n - s)-th arrival, never before the coordinator's own, each rank finishing at its
start + delay + the warm-up step time, a straggler's lateness carried into its next round);
the same with s = 0 (wait for the slowest); the final test accuracy, and the largest difference
between this scheme's final parameters and the uncoded (s = 0) run's -- gradient coding
changes *when* the round ends, not *what* the update is (identical up to float rounding).
``--json FILE`` writes it all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _mnist import CNN, accuracy, mnist  # noqa: E402

import commcomp  # noqa: E402
from commcomp.coding import CodedSampler, coded_loss  # noqa: E402
from commcomp.coding.stragglers import extend_trace, find_traces, load_trace  # noqa: E402

WARMUP = 3  # DDP's first steps are collective (bucket rebuild): no delays there, not timed


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4, help="ranks (workers) to spawn")
    ap.add_argument("--schemes", default="0,1", help="comma-separated s values; 0 = uncoded wait-for-all")
    ap.add_argument("--code", default="cyclic", choices=["cyclic", "fractional"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps (after %d warm-up steps)" % WARMUP)
    ap.add_argument("--partition-size", type=int, default=32, help="digits per data partition")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--delays", choices=["trace", "exp", "none"], default="trace")
    ap.add_argument("--trace", default=None,
                    help="an .npz trace (default: the shipped Canada load-0.25 desktop trace)")
    ap.add_argument("--delay-scale", type=float, default=0.3,
                    help="seconds: the trace's median (trace) or the exponential's mean (exp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap.parse_args(argv)


def make_delays(args, rounds: int) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    if args.delays == "none":
        return np.zeros((rounds, args.world))
    if args.delays == "exp":  # shifted exponential: half fixed, half exponential
        return args.delay_scale * (0.5 + rng.exponential(0.5, size=(rounds, args.world)))
    path = args.trace or str(find_traces("Canada-w256-r20-load0_250*")[0])
    d = load_trace(path).durations[:, : args.world]
    if d.shape[0] < rounds:
        d = extend_trace(d, rounds, rng)
    return d[:rounds] / np.median(d) * args.delay_scale


def train(rank: int, world: int, s: int, args, data, delays) -> dict:
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
    (train_x, train_y), test = data
    torch.manual_seed(args.seed)
    model = torch.nn.parallel.DistributedDataParallel(CNN(), broadcast_buffers=False)
    state = commcomp.register(model, "gradient_coding", s=s, code=args.code if s > 0 else "cyclic", timeout=120)
    sampler = CodedSampler(len(train_x), state.code, rank, args.partition_size, seed=args.seed)
    weights = sampler.sample_weights(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = WARMUP + args.steps
    times, warm = [], []
    for step in range(steps):
        epoch, k = divmod(step, len(sampler))
        sampler.set_epoch(epoch)
        idx = sampler.batch(k)
        t0 = time.perf_counter()
        if step >= WARMUP:
            time.sleep(float(delays[step - WARMUP, rank]))
        losses = F.cross_entropy(model(train_x[idx]), train_y[idx], reduction="none")
        opt.zero_grad()
        coded_loss(losses, weights).backward()
        opt.step()
        (times if step >= WARMUP else warm).append(time.perf_counter() - t0)
    state.close()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    summary = state.metrics_summary() if rank == 0 else {}
    return {"s": s, "times": times, "compute": min(warm[1:]), "params": flat, "accuracy": accuracy(model.module, test),
            "survivor_counts": summary.get("survivor_counts"), "late_dropped": summary.get("late_dropped"),
            "bytes_sent": state.metrics["bytes_sent"], "bytes_fp32": state.metrics["bytes_sent_fp32_allreduce"]}


def _spawned(rank, world, init_file, s, args, data, delays, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    try:
        out = train(rank, world, s, args, data, delays)
        if rank == 0:
            torch.save(out, result_file)
    finally:
        dist.destroy_process_group()


def predicted(delays: np.ndarray, s: int, compute: float = 0.0) -> np.ndarray:
    """The coordinator's step times if a round ends at the (n - s)-th arrival (and never
    before the coordinator's own): rank i finishes at start_i + delay + compute, and starts
    the next step when both its own work and the round's result are done -- so a straggler's
    lateness carries into the next round."""
    rounds, n = delays.shape
    start, last, out = np.zeros(n), 0.0, []
    for t in range(rounds):
        finish = start + delays[t] + compute
        decoded = max(np.sort(finish)[n - s - 1], finish[0])
        out.append(decoded - last)
        start, last = np.maximum(finish, decoded), decoded
    return np.array(out)


def main(argv=None):
    args = parse_args(argv)
    schemes = [int(v) for v in args.schemes.split(",")]
    if any(not 0 <= s < args.world for s in schemes):
        raise SystemExit(f"--schemes {args.schemes}: every s must be in 0..{args.world - 1}")
    data = mnist(args.seed)
    delays = make_delays(args, args.steps)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in schemes:
            out_file = os.path.join(tmp, f"s{s}.pt")
            mp.spawn(_spawned, args=(args.world, os.path.join(tmp, f"rdv-{s}"), s, args, data, delays, out_file),
                     nprocs=args.world, join=True)
            results[s] = torch.load(out_file)
    base = results.get(0)
    rows = []
    print(f"{args.world} ranks, {args.steps} timed steps, delays: {args.delays} "
          f"(mean {delays.mean():.3f} s, mean slowest {delays.max(1).mean():.3f} s per step)")
    print(f"{'s':>2} {'measured s/step':>16} {'model: (n-s)-th':>16} {'model: slowest':>15} {'accuracy %':>10} "
          f"{'max |dparam| vs s=0':>20} {'late dropped':>12}")
    for s, r in results.items():
        measured = float(np.mean(r["times"]))
        pred = float(predicted(delays, s, r["compute"]).mean())
        diff = float((r["params"] - base["params"]).abs().max()) if base is not None else float("nan")
        slowest = float(predicted(delays, 0, r["compute"]).mean())
        rows.append({"s": s, "measured_step_s": measured, "predicted_kth_fastest_s": pred,
                     "predicted_wait_for_all_s": slowest, "compute_s": r["compute"],
                     "accuracy": r["accuracy"], "max_param_diff": diff,
                     "survivor_counts": r["survivor_counts"], "late_dropped": r["late_dropped"],
                     "bytes_sent_rank0": r["bytes_sent"], "bytes_fp32_allreduce_rank0": r["bytes_fp32"]})
        print(f"{s:>2} {measured:>16.3f} {pred:>16.3f} {slowest:>15.3f} {r['accuracy']:>10.2f} "
              f"{diff:>20.2e} {str(r['late_dropped']):>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
