"""Summarize and plot runs written by examples/train_ddp.py.

    python examples/plot_runs.py runs/*.json --png docs/img/mnist_ddp.png

Prints, per hook, the final test accuracy (mean and spread over seeds), step time and bytes
per step, and draws loss per step and accuracy per epoch (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(paths):
    runs = defaultdict(list)
    for p in paths:
        with open(p) as f:
            run = json.load(f)
        runs[run["hook"]].append(run)
    return runs


def summarize(runs) -> str:
    lines = [f"{'hook':10s} {'seeds':>5s} {'final acc %':>16s} {'step ms':>8s} {'kB/step':>9s} {'vs fp32':>8s}"]
    for hook, rs in runs.items():
        accs = [r["acc"][-1] for r in rs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ms = statistics.mean(statistics.mean(r["step_ms"]) for r in rs)
        sent = statistics.mean(statistics.mean(r["bytes_per_step"]) for r in rs)
        fp32 = rs[0]["fp32_bytes_per_step"]
        lines.append(f"{hook:10s} {len(rs):5d} {statistics.mean(accs):9.2f} +- {spread:4.2f} "
                     f"{ms:8.1f} {sent / 1e3:9.1f} {fp32 / sent:7.1f}x")
    return "\n".join(lines)


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for hook, rs in runs.items():
        steps = min(len(r["losses"]) for r in rs)
        mean = [statistics.mean(r["losses"][i] for r in rs) for i in range(steps)]
        k = 5  # moving average over 5 steps
        smooth = [statistics.mean(mean[max(0, i - k + 1): i + 1]) for i in range(steps)]
        ax_loss.plot(range(1, steps + 1), smooth, label=f"{hook} ({len(rs)} seeds)")
        epochs = min(len(r["acc"]) for r in rs)
        ax_acc.plot(range(1, epochs + 1), [statistics.mean(r["acc"][e] for r in rs) for e in range(epochs)],
                    marker="o", label=hook)
    ax_loss.set(xlabel="step", ylabel="training loss (rank 0, 5-step mean)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax_acc.set_xticks(range(1, max(len(r["acc"]) for rs in runs.values() for r in rs) + 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("CNN on 5,000 real MNIST digits, 4 DDP ranks (gloo, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--png", help="write the curves here")
    args = ap.parse_args()
    runs = load(args.runs)
    print(summarize(runs))
    if args.png:
        plot(runs, args.png)
        print(f"curves: {args.png}")


if __name__ == "__main__":
    main()
