"""Data-parallel training of a CNN on real MNIST digits with a choice of DDP communication hook.

    torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook terngrad

Hooks: ``none`` (plain fp32 all-reduce), torch's own ``fp16`` and ``powersgd`` (rank 1, one
bucket: torch's PowerSGD hangs on gloo with several) as baselines, and commcomp's
``terngrad``. Each epoch prints test accuracy, step time, bytes sent per step and the
reduction against fp32; rank 0 writes the curves to ``--out`` as JSON, and
``examples/plot_runs.py`` draws them. CPU and gloo by default; NCCL when CUDA is present.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _mnist import CNN, accuracy, mnist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp


def ring_bytes(nbytes: float, world: int) -> float:
    return 2 * (world - 1) / world * nbytes


def baseline_bytes(model, hook: str, world: int, rank: int = 1, min_rate: float = 2.0) -> float:
    """Bytes one rank sends per step under torch's hooks, from their algorithms (ring
    all-reduce): fp32 all, fp16 half, PowerSGD P and Q factors for matrices it compresses."""
    total = 0.0
    for p in model.parameters():
        n = p.numel()
        if hook == "fp16":
            total += ring_bytes(2 * n, world)
        elif hook == "powersgd" and p.dim() > 1:
            rows, cols = p.shape[0], n // p.shape[0]
            compressed = (rows + cols) * rank
            total += ring_bytes(4 * (compressed if n >= min_rate * compressed else n), world)
        else:
            total += ring_bytes(4 * n, world)
    return total


def attach_hook(ddp, name: str, seed: int, collective: str):
    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=2, min_compression_rate=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif name == "terngrad":
        return commcomp.register(ddp, "terngrad", seed=seed, collective=collective)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", choices=["none", "fp16", "powersgd", "terngrad"], default="terngrad")
    ap.add_argument("--collective", default="auto", help="terngrad: auto, int8, allgather, two_phase")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    (train_x, train_y), test = mnist()
    torch.manual_seed(args.seed)
    model = CNN().to(device)
    # ~3 buckets for this model; PowerSGD gets one (torch's hook hangs on gloo with several).
    ddp = DDP(model, bucket_cap_mb=1000 if args.hook == "powersgd" else 0.1)
    state = attach_hook(ddp, args.hook, args.seed, args.collective)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    fp32_bytes = baseline_bytes(model, "none", world)
    est_bytes = baseline_bytes(model, args.hook, world)
    per_step = world * args.batch
    log = {"hook": args.hook, "seed": args.seed, "world": world, "losses": [], "acc": [], "step_ms": [],
           "bytes_per_step": [], "fp32_bytes_per_step": fp32_bytes}
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1000 * args.seed + epoch))
        batches = range(0, len(train_x) - per_step + 1, per_step)
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"{args.hook} epoch {epoch + 1}", leave=False)
        times, sent_before = [], state.metrics["bytes_sent"] if state else 0
        for start in batches:
            idx = order[start + rank * args.batch: start + (rank + 1) * args.batch]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(ddp(train_x[idx].to(device)), train_y[idx].to(device))
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            log["losses"].append(loss.item())
            step += 1
            if rank == 0 and not args.no_progress:
                batches.set_postfix(loss=f"{loss.item():.3f}")
        sent = (state.metrics["bytes_sent"] - sent_before) / len(times) if state else est_bytes
        acc = accuracy(model.cpu(), test) if rank == 0 else float("nan")
        model.to(device)
        step_ms = 1e3 * sum(times) / len(times)
        log["acc"].append(acc)
        log["step_ms"].append(step_ms)
        log["bytes_per_step"].append(sent)
        if rank == 0:
            how = "measured" if state else "from the algorithm"
            print(f"{args.hook:9s} epoch {epoch + 1}: test accuracy {acc:5.2f}%  step {step_ms:6.1f} ms  "
                  f"sent {sent / 1e3:8.1f} kB/step ({how}), {fp32_bytes / sent:5.1f}x less than fp32", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{args.hook}-seed{args.seed}.json")
        with open(path, "w") as f:
            json.dump(log, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
