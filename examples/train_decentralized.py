"""Decentralized training on non-IID MNIST: fp32 DDP against neighbour-only methods.

    python examples/train_decentralized.py --world 8 --steps 600 --out runs/decentralized.json

Each of ``--world`` CPU processes (gloo) sees only 3 of the 10 digit classes (rank i holds
classes 3i, 3i+1, 3i+2 mod 10; a class shared by several ranks is split between them), so the
local gradients disagree: the heterogeneous setting of Yan et al. 2023. Methods, all with the
same CNN, learning rate, batch size and l1 regularizer (``--l1``, proximal step on weights):

* ``ddp``: fp32 all-reduce of gradients (torch DDP) + centralized proximal SGD (the target);
* ``dsgd``: decentralized proximal SGD without gradient tracking (exact messages);
* ``dproxsgt``: DProxSGT (tracking, exact messages);
* ``cdproxsgt-ternary``, ``cdproxsgt-topk``: CDProxSGT with TernGrad ternary / top-k messages;
* ``cdsgd-ternary``, ``cdsgd-topk``: compressed decentralized SGD without tracking
  (CHOCO-style), the compressed baselines.

Compressed methods use the library's default consensus step sizes (``--gamma`` overrides):
0.2 for the contractive, base-3 packed ternary codec, 2.5x the kept fraction for top-k.

Decentralized methods run on ``--topology`` (ring by default). Every ``--eval-every`` steps,
one diagnostic all-reduce gives the average model (its test accuracy is reported, as in the
paper), the consensus error and the accuracy of rank 0's own model; these diagnostics are not
counted in bytes. Rank 0 writes everything to ``--out`` (JSON); ``--png`` draws the curves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _mnist import CNN, accuracy, mnist  # noqa: E402

from commcomp.utils import ring_allreduce_bytes  # noqa: E402
from commcomp.decentralized import L1, GradientTracking, sparsity  # noqa: E402

METHODS = {
    "ddp": None,
    "dsgd": dict(tracking=False, compressor=None),
    "dproxsgt": dict(tracking=True, compressor=None),
    "cdproxsgt-ternary": dict(tracking=True, compressor="ternary"),
    "cdproxsgt-topk": dict(tracking=True, compressor="topk"),
    "cdsgd-ternary": dict(tracking=False, compressor="ternary"),
    "cdsgd-topk": dict(tracking=False, compressor="topk"),
}


def classes_of(rank: int, per_rank: int = 3):
    return [(rank * per_rank + j) % 10 for j in range(per_rank)]


def split_non_iid(x, y, rank: int, world: int, per_rank: int):
    """This rank's share: its classes, each split evenly among the ranks that hold it."""
    holders = {c: [r for r in range(world) if c in classes_of(r, per_rank)] for c in range(10)}
    keep = []
    for c in classes_of(rank, per_rank):
        idx = (y == c).nonzero().flatten()
        share = holders[c].index(rank)
        keep.append(idx[share::len(holders[c])])
    keep = torch.cat(keep)
    return x[keep], y[keep]


def weights_only(name: str) -> bool:
    return name.endswith("weight")


def train_step(net, model, gt, opt, prox, x, y, lr):
    """One step: DDP + SGD + the prox on the weights (``gt`` None), or a GradientTracking step."""
    loss = F.cross_entropy(net(x), y)
    if gt is None:
        opt.zero_grad()
        loss.backward()
        opt.step()
        if prox is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if weights_only(name):
                        prox.apply_(p, lr)
    else:
        gt.zero_grad()
        loss.backward()
        gt.step()
    return loss


def run(rank, world, method, args, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        train, test = mnist(seed=0)
        xs, ys = split_non_iid(*train, rank, world, args.classes_per_rank)
        torch.manual_seed(args.seed)  # the same initial model everywhere
        model = CNN()
        prox = L1(args.l1) if args.l1 > 0 else None
        spec = METHODS[method]
        if spec is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            gt = None
        else:
            net, opt = model, None
            comp = spec["compressor"]
            if comp == "topk":
                comp = f"topk:{args.topk_ratio}"
            gt = GradientTracking(model, args.lr, topology=args.topology, compressor=comp, tracking=spec["tracking"],
                                  prox=prox, prox_params=weights_only, gamma_x=args.gamma if comp else None,
                                  gamma_y=args.gamma if comp else None, seed=args.seed)
            if rank == 0:
                print(repr(gt), flush=True)
        numel = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(1000 + rank)
        curve = []
        t0 = time.perf_counter()
        compute = 0.0
        for step in range(1, args.steps + 1):
            if gt is not None and args.exact_tail and step == args.steps - args.exact_tail + 1:
                gt.exact_mixing()  # the last --exact-tail steps: exact x and y messages (DProxSGT)
            batch = torch.randint(len(xs), (args.batch,), generator=gen)
            c0 = time.perf_counter()
            loss = train_step(net, model, gt, opt, prox, xs[batch], ys[batch], args.lr)
            compute += time.perf_counter() - c0
            if step % args.eval_every == 0 or step == args.steps:
                if gt is None:
                    avg_acc = own_acc = accuracy(model, test)
                    cons = 0.0
                    prox_sp = None
                    sent = step * ring_allreduce_bytes(numel * 4, world)
                    sp = sparsity(p for n, p in model.named_parameters() if weights_only(n))
                else:
                    m = gt.measure()
                    cons = m["consensus_error"]
                    prox_sp = m.get("prox_sparsity", 0.0)
                    own_acc = accuracy(model, test)
                    avg = gt.average_parameters()
                    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            p.copy_(avg[n])
                    avg_acc = accuracy(model, test)
                    sp = sparsity(p for n, p in model.named_parameters() if weights_only(n))
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            p.copy_(saved[n])
                    sent = gt.metrics["bytes_sent"]
                loss_t = torch.tensor([float(loss.detach())])
                dist.all_reduce(loss_t)
                curve.append({"step": step, "test_acc": avg_acc, "rank0_acc": own_acc, "consensus_error": cons,
                              "bytes_per_rank": sent, "train_loss": float(loss_t) / world,
                              "weight_sparsity": sp, "prox_sparsity": prox_sp if prox_sp is not None else sp})
                if rank == 0:
                    print(f"{method:>18} step {step:4d}  acc(avg) {avg_acc:5.2f}%  acc(rank0) {own_acc:5.2f}%  "
                          f"consensus {cons:.3e}  loss {float(loss_t) / world:.3f}  "
                          f"MB/rank {sent / 1e6:8.2f}  sparsity {sp:.3f} (prox output {prox_sp or sp:.3f})", flush=True)
        wall = time.perf_counter() - t0
        if rank == 0:
            fp32 = args.steps * ring_allreduce_bytes(numel * 4, world)
            out = {"method": method, "world": world, "topology": args.topology if gt else "all-reduce",
                   "params": numel, "curve": curve, "final_acc": curve[-1]["test_acc"],
                   "best_acc": max(c["test_acc"] for c in curve), "final_rank0_acc": curve[-1]["rank0_acc"],
                   "final_consensus_error": curve[-1]["consensus_error"],
                   "final_prox_sparsity": curve[-1]["prox_sparsity"], "bytes_per_rank": curve[-1]["bytes_per_rank"],
                   "fp32_allreduce_bytes_per_rank": fp32,
                   "reduction_vs_fp32": fp32 / max(curve[-1]["bytes_per_rank"], 1),
                   "wall_s": wall, "compute_s": compute, "repr": repr(gt) if gt else "DDP fp32"}
            with open(result_file, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def plot(results, path, classes: int = 3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        ratio = r["reduction_vs_fp32"]
        bytes_note = f"{ratio:.1f}x fewer bytes" if ratio >= 1 else f"{1 / ratio:.1f}x more bytes"
        label = "ddp (fp32 all-reduce)" if r["method"] == "ddp" else f"{r['method']} ({bytes_note})"
        style = dict(color=colors[r["method"]], ls="--" if r["method"].startswith(("dsgd", "cdsgd")) else "-")
        axes[0].plot(steps, [c["test_acc"] for c in r["curve"]], label=label, **style)
        axes[1].plot([max(c["bytes_per_rank"], 1) / 1e6 for c in r["curve"]], [c["test_acc"] for c in r["curve"]],
                     label=r["method"], **style)
        if r["method"] != "ddp":
            axes[2].semilogy(steps, [max(c["consensus_error"], 1e-12) for c in r["curve"]], label=r["method"], **style)
    axes[0].set(xlabel="step", ylabel="test accuracy of the average model (%)", title="accuracy")
    axes[1].set(xlabel="MB sent per rank", ylabel="test accuracy (%)", xscale="log", title="accuracy vs bytes")
    axes[2].set(xlabel="step", ylabel="(1/n) sum ||x_i - mean x||^2", title="consensus error")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    world = results[0]["world"]
    fig.suptitle(f"non-IID MNIST-5k, {world} ranks, {classes} classes per rank (dashed: no gradient tracking)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--l1", type=float, default=1e-4, help="l1 strength on weights (0: none)")
    ap.add_argument("--gamma", type=float, default=None,
                    help="consensus step size of the compressed methods (default: the library's, by compressor)")
    ap.add_argument("--exact-tail", type=int, default=0,
                    help="decentralized methods: mix x and y exactly in the last this many steps "
                         "(GradientTracking.exact_mixing), which restores the prox's sparsity under compression")
    ap.add_argument("--topk-ratio", type=float, default=0.02)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--classes-per-rank", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/decentralized.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--plot-only", action="store_true", help="redraw --png from an existing --out JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(args.out) as f:
            saved = json.load(f)
        plot(saved["results"], args.png, saved["args"]["classes_per_rank"])
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            result_file = os.path.join(tmp, f"{method}.json")
            init_file = os.path.join(tmp, f"rdzv-{method}")
            mp.spawn(run, args=(args.world, method, args, init_file, result_file), nprocs=args.world, join=True)
            with open(result_file) as f:
                results.append(json.load(f))
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\n{'method':>18} | final acc | best acc | MB/rank | fewer bytes than fp32 DDP | wall s")
    for r in results:
        print(f"{r['method']:>18} | {r['final_acc']:8.2f}% | {r['best_acc']:7.2f}% | "
              f"{r['bytes_per_rank'] / 1e6:7.1f} | "
              f"{r['reduction_vs_fp32']:25.1f}x | {r['wall_s']:6.1f}")
    if args.png:
        plot(results, args.png, args.classes_per_rank)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
