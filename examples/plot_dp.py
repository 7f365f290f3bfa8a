"""Summarize and plot runs written by examples/train_dp.py: accuracy vs epsilon vs bytes.

    python examples/plot_dp.py runs/dp/*.json --png docs/img/dp_convergence.png

Prints a Markdown table (one row per setting; mean and spread over seeds when there are
several) and draws final test accuracy against the target epsilon per sketch ratio and noise
placement (left) and the test accuracy per epoch at one epsilon (right).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict


def load(paths):
    groups = defaultdict(list)
    for p in paths:
        with open(p) as f:
            run = json.load(f)
        a = run["args"]
        key = (a["level"], a["clip"] > 0 or math.isfinite(a["epsilon"]), a["sketch"], a["sketch_ratio"],
               a["noise_placement"], a["epsilon"], a["lr"])
        groups[key].append(run)
    return groups


def setting(key) -> str:
    level, private, sketch, ratio, placement, eps, _ = key
    if not private:
        what = "non-private" + (" (unsketched)" if ratio == 1 else f" ({sketch})")
    elif not math.isfinite(eps):
        what = "clipping only" + (", unsketched" if ratio == 1 else f", {sketch}")
    elif ratio == 1:
        what = "unsketched DP-SGD"
    else:
        what = f"sketched DP ({sketch})"
    if placement == "sketch":
        what += ", noise on sketch*"
    return what + (" [client level]" if level == "client" else "")


def order(key):
    level, private, _, ratio, placement, eps, lr = key
    return (level != "record", private, -ratio, placement, -eps if math.isfinite(eps) else -1e9, lr)


COLORS = {1.0: "C0", 0.1: "C1", 0.01: "C3"}  # by sketch ratio; dashed: noise on the sketch


def fmt_bytes(ratio: float) -> str:
    if ratio <= 1:
        return f"{ratio:.4f} ({1 / ratio:.1f}x fewer)"
    return f"{ratio:.4f} (SRHT pads d to whole blocks)"


def fmt_mean(vals, digits=2) -> str:
    m = statistics.mean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(groups) -> str:
    lines = [("| setting | sketch ratio | noise placement | target eps | noise mult. | eps spent | "
              "lr | test accuracy % | bytes vs fp32 | seeds | wall s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=order):
        rs = groups[key]
        _, private, _, ratio, placement, eps, lr = key
        spent = statistics.mean(r["epsilon_spent"] for r in rs)
        ratio_bytes = statistics.mean(r["bytes_ratio"] for r in rs)
        lines.append(
            f"| {setting(key)} | {ratio:g} | {placement if private else '-'} | "
            f"{eps:g} | {rs[0]['noise_multiplier']:.3f} | {spent:.2f} | {lr:g} | "
            f"{fmt_mean([r['final_acc'] for r in rs])} | {fmt_bytes(ratio_bytes)} | "
            f"{len(rs)} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def plot(groups, path: str, curve_eps: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eps, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = {2.0: 0, 8.0: 1, math.inf: 2}
    lines = defaultdict(list)
    for key, rs in groups.items():
        level, private, sketch, ratio, placement, eps, _ = key
        if level != "record":
            continue
        if not private:
            ax_eps.axhline(statistics.mean(r["final_acc"] for r in rs), color="k", ls=":",
                           label=f"non-private, ratio {ratio:g}")
            continue
        if eps in xs:
            lines[(ratio, placement, sketch)].append((xs[eps], [r["final_acc"] for r in rs]))
    for (ratio, placement, sketch), pts in sorted(lines.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        pts.sort()
        label = "unsketched" if ratio == 1 else f"{sketch} s/d={ratio:g}"
        ax_eps.errorbar([p[0] for p in pts], [statistics.mean(p[1]) for p in pts],
                        yerr=[statistics.stdev(p[1]) if len(p[1]) > 1 else 0 for p in pts],
                        marker="o" if placement == "gradient" else "s", capsize=3,
                        color=COLORS.get(ratio),
                        ls="-" if placement == "gradient" else "--",
                        label=f"{label}, noise on {placement}")
    ax_eps.set_xticks(range(3), ["2", "8", "inf (clip only)"])
    ax_eps.set(xlabel="target epsilon (delta = 1e-5)", ylabel="final test accuracy (%)",
               title="record-level DP, MNIST-5k, 4 ranks")
    for key, rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        level, private, sketch, ratio, placement, eps, _ = key
        if level != "record" or (private and eps != curve_eps):
            continue
        epochs = min(len(r["acc"]) for r in rs)
        ax_curve.plot(range(1, epochs + 1), [statistics.mean(r["acc"][e] for r in rs) for e in range(epochs)],
                      marker=".", color=COLORS.get(ratio) if private else "k", ls="-" if placement == "gradient" else "--", label=setting(key) +
                      ("" if ratio == 1 else f" s/d={ratio:g}"))
    ax_curve.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"curves at epsilon {curve_eps:g}")
    for ax in (ax_eps, ax_curve):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON files from train_dp.py")
    ap.add_argument("--png", default=None)
    ap.add_argument("--curve-epsilon", type=float, default=8.0)
    args = ap.parse_args()
    groups = load(args.runs)
    print(table(groups))
    if args.png:
        plot(groups, args.png, args.curve_epsilon)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
