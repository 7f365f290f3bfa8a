"""End-to-end DDP step time over a shaped network: two emulated hosts (network namespaces
joined by a veth pair, shaped with ``tc tbf``), 2 ranks per host via torchrun, a 11 M
parameter MLP. Compares no hook, torch's fp16, bf16 and PowerSGD (``powersgd/1``,
``powersgd/4``: ranks 1 and 4, one bucket) hooks, and TernGrad with each collective and
``terngrad/auto``, at several bandwidths (``--repeats R``: every configuration R times,
interleaved; the table gives the median of the runs' median steps and their min-max), and decentralized training on a ring
(``gt/identity``: DProxSGT, ``gt/ternary``, ``gt/topk:0.02``: CDProxSGT; pass them in
``--hooks``), FSDP2 (``fsdp/fp32``, ``fsdp/bf16``: FSDP2's own reduce-scatter in fp32 or
bf16; ``fsdp/terngrad``: commcomp's compressed reduce-scatter; every Linear and the root
sharded with ``fully_shard`` over the 4 ranks; their ratio column is against ``fsdp/fp32``),
plus the compute-only step time (the
same model, 4 processes at once, no DDP), so communication overhead = step - compute-only.

    sudo python benchmarks/network.py                      # 100mbit, 1gbit, unshaped
    sudo python benchmarks/network.py --rates 1gbit --steps 10 --repeats 3 --json out.json --png out.png

Needs root (ip netns, tc). The namespaces are removed on exit, failure included. Only the
project's own test hosts (the two namespaces) are addressed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NS = ("ccbench_a", "ccbench_b")
DEV = ("ccb_va", "ccb_vb")
ADDR = ("10.231.77.1", "10.231.77.2")  # inside our own namespaces only
SUBNET = "10.231.77.0/24"  # ADDR are its first two hosts
PORT = 29641
HOOKS = [("none", ""), ("fp16", ""), ("bf16", ""), ("powersgd", "1"), ("powersgd", "4"), ("terngrad", "int8"),
         ("terngrad", "allgather"), ("terngrad", "two_phase"), ("terngrad", "auto")]


# ----------------------------------------------------------------------------- the worker
def build_model():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(1000, 2500), nn.ReLU(), nn.Linear(2500, 2500), nn.ReLU(),
                         nn.Linear(2500, 1000), nn.ReLU(), nn.Linear(1000, 10))


def train_steps(model, step_fn, warmup: int, steps: int, opt=None):
    import torch

    torch.manual_seed(0)
    x, y = torch.randn(32, 1000), torch.randint(0, 10, (32,))
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        step_fn(x, y)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def codec_ms(numel: int, world: int, repeat: int = 5) -> float:
    """The hook's codec work for `numel` gradients, alone: stats, ternarize, decode W payloads."""
    import torch

    import commcomp

    g = torch.randn(numel)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        s = commcomp.ops.segment_stats(g)[0]
        p = commcomp.ops.ternarize_pack(g, s, seed=1, validate=False)
        out = torch.zeros(numel)
        commcomp.ops.unpack_accumulate(p.expand(world, -1).contiguous(), s.expand(world), out, validate=False)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from train_ddp import attach_hook, baseline_bytes

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    model = build_model()
    if args.hook == "gt":
        return decentralized_worker(args, model, world)
    if args.hook == "fsdp":
        return fsdp_worker(args, model, world)
    ddp = DDP(model, bucket_cap_mb=1000 if args.hook == "powersgd" else 25)
    if args.hook in ("powersgd", "bf16"):  # powersgd/<rank>; torch's bf16 hook
        state = torch_hook(ddp, args.hook, args.collective)
    else:
        spec = types.SimpleNamespace(hook=args.hook, seed=0, collective=args.collective or "auto", total_steps=None)
        state, _ = attach_hook(ddp, None, spec, json.loads(args.options) if args.hook == "terngrad" else {})
    times = train_steps(ddp, lambda x, y: F.cross_entropy(ddp(x), y).backward(), args.warmup, args.steps)
    n = sum(p.numel() for p in model.parameters())
    if state is not None and hasattr(state, "metrics"):  # commcomp's hooks count what they send
        sent = state.metrics["bytes_sent"] / (args.warmup + args.steps)
    else:
        rank = int(args.collective or 1) if args.hook == "powersgd" else 1
        sent = baseline_bytes(model, "fp16" if args.hook == "bf16" else args.hook, world, rank=rank)
    chosen = sorted(set(getattr(state, "choices", {}).values()))  # TernGrad: the collectives used
    result = {"hook": args.hook, "collective": args.collective, "world": world, "params": n, "chosen": chosen,
              "step_s": sorted(times)[len(times) // 2], "bytes_per_step": sent,
              "fp32_bytes_per_step": baseline_bytes(model, "none", world),
              "codec_ms": codec_ms(n, world) if args.hook == "terngrad" else 0.0}
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def torch_hook(ddp, hook: str, rank: str):
    """torch's own hooks: PowerSGD of rank ``rank`` (default 1; one bucket, as its docs advise,
    error feedback and warm start on) or the bf16 all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "bf16":
        # torch's bf16_compress_hook itself; DDP refuses it by name without CUDA and NCCL, but gloo
        # all-reduces bfloat16 on CPU, so it runs under another name.
        def bf16_compress_on_cpu(process_group, bucket):
            return default_hooks.bf16_compress_hook(process_group, bucket)

        ddp.register_comm_hook(None, bf16_compress_on_cpu)
        return None
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(rank or 1),
                                        start_powerSGD_iter=2, min_compression_rate=2)
    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return None


def decentralized_worker(args, model, world) -> None:
    """``gt/<compressor>[@before]``: DProxSGT (``identity``) or CDProxSGT on a ring, no DDP: two
    rounds of one message per neighbour per step (``ternary`` = contractive, base-3 packed;
    ``ternary-2bit`` = contractive, the native 2-bit packing; ``topk:0.02``); ``@before``:
    ``x_mixing="before"``, the model round travels during the next forward and backward."""
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from train_ddp import baseline_bytes

    from commcomp.codecs import Ternary
    from commcomp.decentralized import GradientTracking

    spec, _, x_mixing = (args.collective or "identity").partition("@")
    comp = Ternary(contractive=True) if spec == "ternary-2bit" else spec
    gt = GradientTracking(model, 0.01, topology="ring", compressor=comp, x_mixing=x_mixing or "after")
    times = train_steps(model, lambda x, y: F.cross_entropy(model(x), y).backward(), args.warmup, args.steps, opt=gt)
    n = sum(p.numel() for p in model.parameters())
    result = {"hook": "gt", "collective": args.collective or "identity", "world": world, "params": n,
              "step_s": sorted(times)[len(times) // 2],
              "bytes_per_step": gt.metrics["bytes_sent"] / (args.warmup + args.steps),
              "fp32_bytes_per_step": baseline_bytes(model, "none", world), "codec_ms": 0.0}
    gt.close()  # (a model round of x_mixing="before" is in flight)
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def fsdp_worker(args, model, world) -> None:
    """``fsdp/<fp32|bf16|terngrad>``: every Linear and the root under ``fully_shard``; FSDP2's
    reduce-scatter in fp32 or bf16 (``MixedPrecisionPolicy(reduce_dtype=...)``), or commcomp's
    TernGrad reduce-scatter. Bytes per step: the reduction's (counted by commcomp's state, or
    FSDP2's reduce-scatter, (W - 1) / W of the padded gradient) plus the parameter all-gathers,
    the same in all three (forward and backward for each Linear: FSDP2 reshards after forward)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import commcomp

    kind = args.collective or "fp32"
    kw = {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)} if kind == "bf16" else {}
    leaves = [m for m in model if any(True for _ in m.parameters())]
    for m in leaves:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    state = commcomp.register(model, "terngrad", **json.loads(args.options)) if kind == "terngrad" else None
    times = train_steps(model, lambda x, y: F.cross_entropy(model(x), y).backward(), args.warmup, args.steps)
    padded = sum(fp.padded_sharded_param_size.numel() * world for m in leaves
                 for fp in m._get_fsdp_state()._fsdp_param_groups[0].fsdp_params)
    reduce_fp32 = (world - 1) * padded // world * 4
    gathers = 2 * reduce_fp32  # two all-gathers of the fp32 parameters per step
    if state is not None:
        reduce = state.metrics["bytes_sent"] / (args.warmup + args.steps)
    else:
        reduce = reduce_fp32 // (2 if kind == "bf16" else 1)
    result = {"hook": "fsdp", "collective": kind, "world": world, "params": sum(p.numel() for p in model.parameters()),
              "step_s": sorted(times)[len(times) // 2], "bytes_per_step": reduce + gathers,
              "reduce_bytes_per_step": reduce, "reduce_fp32_bytes_per_step": reduce_fp32,
              "fp32_bytes_per_step": reduce_fp32 + gathers, "codec_ms": 0.0}
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def compute_only(args) -> None:
    """4 processes at once, no DDP: the floor that communication adds to."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compute_rank, args=(tmp, args.warmup, args.steps), nprocs=4, join=True)
        vals = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(4)]
    with open(args.result, "w") as f:
        json.dump({"hook": "compute-only", "step_s": sum(vals) / len(vals)}, f)


def _compute_rank(rank, tmp, warmup, steps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model = build_model()
    times = train_steps(model, lambda x, y: F.cross_entropy(model(x), y).backward(), warmup, steps)
    with open(os.path.join(tmp, f"{rank}.json"), "w") as f:
        json.dump(sorted(times)[len(times) // 2], f)


# ----------------------------------------------------------------------- the orchestrator
def pair():
    """The two emulated hosts (commcomp.testing.netns; imported here, so --help needs no torch)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # commcomp from this checkout, as the workers get it
    from commcomp.testing.netns import HostPair

    return HostPair(NS, DEV, SUBNET)


def teardown():
    pair().teardown()


def setup():
    pair().create()


def shape(rate: str):
    pair().shape(rate)


def run_pair(hook: str, collective: str, args, result: str) -> dict:
    agents = pair().launch_torchrun(
        __file__, ["--worker", "--hook", hook, "--collective", collective, "--options", args.options,
                   "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--result", result],
        nproc_per_node=2, port=PORT, timeout=args.timeout, run_id="ccbench",
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    if any(a.killed for a in agents):
        raise RuntimeError(f"{hook} {collective}: timed out after {args.timeout} s")
    if any(a.returncode for a in agents):
        raise RuntimeError(f"{hook} {collective} failed:\n" + "\n".join(a.output[-3000:] for a in agents))
    with open(result) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100mbit,1gbit,unshaped")
    ap.add_argument("--hooks", default=",".join(h + (f"/{c}" if c else "") for h, c in HOOKS),
                    help="comma list of hook[/collective]")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every configuration (median and spread)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compute-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hook", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--collective", default="", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}",
                    help='further TernGrad options as JSON, e.g. \'{"pipeline_numel": 0}\'')
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.compute_only:
        return compute_only(args)
    if os.geteuid() != 0:
        sys.exit("benchmarks/network.py needs root for ip netns and tc; run it with sudo")
    runs, computes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        try:
            setup()
            for rep in range(args.repeats):  # every configuration once per repeat: drift hits all alike
                subprocess.run([sys.executable, __file__, "--compute-only", "--steps", str(args.steps),
                                "--warmup", str(args.warmup), "--result", result], check=True)
                computes.append(json.load(open(result))["step_s"])
                print(f"repeat {rep + 1}/{args.repeats}: compute-only step (4 processes, no DDP) "
                      f"{computes[-1] * 1e3:.0f} ms", flush=True)
                for rate in args.rates.split(","):
                    shape(rate)
                    for spec in args.hooks.split(","):
                        hook, _, collective = spec.partition("/")
                        r = run_pair(hook, collective, args, result)
                        r.update(rate=rate, compute_s=computes[-1], repeat=rep)
                        runs.append(r)
                        print(f"{rate:>9s} {spec:20s} step {r['step_s'] * 1e3:7.0f} ms  comm overhead "
                              f"{(r['step_s'] - computes[-1]) * 1e3:7.0f} ms  sent "
                              f"{r['bytes_per_step'] / 1e6:7.2f} MB/step"
                              + (f"  chose {','.join(r['chosen'])}" if r.get("chosen") else ""), flush=True)
        finally:
            teardown()
    compute = statistics.median(computes)
    rows = summarize(runs)
    print_table(rows, compute, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compute_s": compute, "compute_runs_s": computes, "rows": rows, "runs": runs}, f, indent=1)
    if args.png:
        plot(rows, compute, args.png)


def summarize(runs):
    """One row per (rate, hook): the median over repeats of each run's median step, and the
    spread (min and max of the runs' medians)."""
    rows = {}
    for r in runs:
        key = (r["rate"], r["hook"], r["collective"])
        rows.setdefault(key, dict(r, step_runs_s=[], chosen=set()))
        rows[key]["step_runs_s"].append(r["step_s"])
        rows[key]["chosen"].update(r.get("chosen", []))
    for row in rows.values():
        row.update(step_s=statistics.median(row["step_runs_s"]), step_min_s=min(row["step_runs_s"]),
                   step_max_s=max(row["step_runs_s"]), chosen=sorted(row["chosen"]))
    return list(rows.values())


def print_table(rows, compute, repeats=1):
    print(f"\ncompute-only {compute * 1e3:.0f} ms; medians over {repeats} run(s) of each run's median step; "
          "overhead = step - compute-only")
    print(f"{'rate':>9s} {'hook':20s} {'step ms':>8s} {'min-max':>11s} {'overhead ms':>11s} {'x fp32 overhead':>15s} "
          f"{'MB/step':>8s}")
    def family(r):  # FSDP2 rows against FSDP2's fp32 reduce-scatter, the rest against DDP's fp32 all-reduce
        return "fsdp" if r["hook"] == "fsdp" else "ddp"

    fp32 = {(r["rate"], family(r)): r["step_s"] - compute for r in rows
            if r["hook"] == "none" or (r["hook"] == "fsdp" and r["collective"] == "fp32")}
    for r in rows:
        name = r["hook"] + (f"/{r['collective']}" if r["collective"] else "")
        over = r["step_s"] - compute
        spread = f"{r.get('step_min_s', r['step_s']) * 1e3:.0f}-{r.get('step_max_s', r['step_s']) * 1e3:.0f}"
        key = (r["rate"], family(r))
        ratio = f"{over / fp32[key]:15.2f}" if key in fp32 else f"{'-':>15s}"
        reduce = (f"  (reduction {r['reduce_bytes_per_step'] / 1e6:.2f} MB, fp32 "
                  f"{r['reduce_fp32_bytes_per_step'] / 1e6:.2f})" if "reduce_bytes_per_step" in r else "")
        print(f"{r['rate']:>9s} {name:20s} {r['step_s'] * 1e3:8.0f} {spread:>11s} {over * 1e3:11.0f} "
              f"{ratio} {r['bytes_per_step'] / 1e6:8.2f}" + (f"  ({','.join(r['chosen'])})" if r.get("chosen") else "")
              + reduce)


def plot(rows, compute, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    names = list(dict.fromkeys(r["hook"] + (f"/{r['collective']}" if r["collective"] else "") for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next(r["step_s"] for r in rows if r["rate"] == rate and
                     r["hook"] + (f"/{r['collective']}" if r["collective"] else "") == name) for rate in rates]
        ax.bar([k + i * width for k in range(len(rates))], vals, width, label=name)
    ax.axhline(compute, color="k", ls="--", lw=1, label="compute only")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rates))], rates)
    ax.set(ylabel="step time (s)", yscale="log", title="11 M-parameter MLP, 2 hosts x 2 ranks, gloo")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
