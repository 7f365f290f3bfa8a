"""FSDP2 (``fully_shard``) training of a small transformer on real MNIST digits, with FSDP2's
own reduce-scatter or commcomp's TernGrad compressed reduce-scatter.

    torchrun --standalone --nproc_per_node 4 examples/train_fsdp.py --hook terngrad
    torchrun --standalone --nproc_per_node 4 examples/train_fsdp.py --hook none --reduce-dtype bf16
    SCRIPT=examples/train_fsdp.py launch/torchrun_single.sh 4 --hook terngrad --steps 200

Each 28x28 digit is a sequence of 28 rows (tokens of 28 pixels); two pre-norm transformer
blocks (``nn.TransformerEncoderLayer``) and a linear head classify it. Every block is sharded
with ``fully_shard`` and so is the root. ``--hook terngrad`` registers commcomp's compressed
reduce-scatter on every sharded module in one line (``commcomp.register(model, "terngrad")``);
``--opt key=value`` passes options (``clip_factor``, ``min_compress_numel``, ``seed``).
``--reduce-dtype bf16`` reduces in bfloat16 (FSDP2's ``MixedPrecisionPolicy``): the usual
baseline. Rank 0 prints the test accuracy, step time and bytes per step, and writes the run to
``--out`` as JSON. ``--checkpoint-dir D`` saves model, optimizer and commcomp state through
``torch.distributed.checkpoint`` at the end and resumes from it when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without install
from _mnist import mnist  # noqa: E402
from train_ddp import parse_opts, set_threads  # noqa: E402

import commcomp  # noqa: E402
from commcomp.launch import init_from_env  # noqa: E402


class RowTransformer(nn.Module):
    """Rows of pixels as tokens: embedding, learned positions, ``depth`` pre-norm encoder
    blocks, mean pooling, a linear head."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(28, dim)
        self.pos = nn.Parameter(torch.zeros(28, dim))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.embed(x.reshape(-1, 28, 28)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def build(args, device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(args.seed)
    model = RowTransformer(args.dim, args.depth).to(device)
    kw = {}
    if args.reduce_dtype != "fp32":
        kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[
            args.reduce_dtype])
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    state = commcomp.register(model, "terngrad", **parse_opts(args.opt)) if args.hook == "terngrad" else None
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, opt, state


def accuracy(model, data) -> float:
    """Test accuracy in %: every rank runs the sharded model on the whole test set (the forward
    all-gathers parameters, so all ranks take part)."""
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def checkpoint(args, model, opt, state, step: int, load: bool) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "meta": {"step": step}}
    if state is not None:
        sd["commcomp"] = state  # a DCP Stateful: step counters of the random streams, metrics, options
    if load:
        dcp.load(sd, checkpoint_id=args.checkpoint_dir)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return int(sd["meta"]["step"])
    dcp.save(sd, checkpoint_id=args.checkpoint_dir)
    return step


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", choices=("none", "terngrad"), default="terngrad")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="terngrad options")
    ap.add_argument("--reduce-dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--out", default=None, help="rank 0 writes the run here as JSON")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world, _, device = init_from_env()
    set_threads(world)
    (train_x, train_y), test = mnist()
    test = (test[0].to(device), test[1].to(device))
    model, opt, state = build(args, device)
    start = 0
    if args.checkpoint_dir and os.path.exists(os.path.join(args.checkpoint_dir, ".metadata")):
        start = checkpoint(args, model, opt, state, 0, load=True)
        if rank == 0:
            print(f"resumed from step {start}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_x), generator=gen)
    per_step = world * args.batch
    times, log = [], {"args": vars(args), "world": world, "curve": []}
    for step in range(start, args.steps):
        pos = (step * per_step) % (len(train_x) - per_step + 1)
        idx = order[pos + rank * args.batch: pos + (rank + 1) * args.batch]
        x, y = train_x[idx].to(device), train_y[idx].to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = accuracy(model, test)
            log["curve"].append({"step": step + 1, "loss": loss.item(), "accuracy": acc})
            if rank == 0:
                sent = "" if state is None else (f", {state.metrics['bytes_sent'] / state.step / 1e3:.1f} kB sent per "
                                                 f"step ({state.compression_ratio():.1f}x fewer than fp32)")
                print(f"step {step + 1}: loss {loss.item():.3f}, test accuracy {acc:.2f}%, step "
                      f"{1e3 * statistics.median(times[-50:]):.1f} ms{sent}", flush=True)
    if args.checkpoint_dir:
        checkpoint(args, model, opt, state, args.steps, load=False)
    log["final_accuracy"] = log["curve"][-1]["accuracy"] if log["curve"] else None
    log["median_step_s"] = statistics.median(times) if times else None
    if state is not None:
        log["metrics"] = dict(state.metrics)
    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(log, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
