"""Best runtime of each straggler-mitigation scheme: on the real AWS Lambda traces (short), and on
long horizons (bursty model; traces extended by resampling). Prints markdown tables; --png writes
docs/img/stragglers.png. Used for docs/stragglers.md:

    python benchmarks/stragglers.py --png docs/img/stragglers.png
"""

import argparse
import sys

import numpy as np

from commcomp.coding import stragglers as st
from commcomp.coding.simulate import search

SCHEMES = ("uncoded", "gc", "srsgc", "msgc")


def _row(label, best):
    # a scheme is missing when every parameter set made a duration non-positive (load shift too large)
    cells = " | ".join(f"{best[k].runtime:.2f} ({_p(best[k])})" if k in best else "n/a" for k in SCHEMES)
    if "gc" in best and "msgc" in best:
        g, m = best["gc"].runtime, best["msgc"].runtime
        return f"| {label} | {cells} | {100 * (g - m) / g:+.1f}% |"
    return f"| {label} | {cells} | n/a |"


def _p(r):
    return ",".join(str(v) for v in r.params.values()) or "-"


def real_traces(mu, base_comp, lam):
    print(f"\n### Real traces (mu={mu}, base_comp={base_comp}, n_jobs = rounds/2, lambd/s <= {lam[-1]})\n")
    print("| trace | " + " | ".join(SCHEMES) + " | M-SGC vs GC |")
    print("|---|" + "---|" * (len(SCHEMES) + 1))
    out = {}
    for f in st.find_traces("*-r20-*.npz") + st.find_traces("*-r10-*.npz"):
        t = st.load_trace(f)
        best = search(t.durations, SCHEMES, mu=mu, base_comp=base_comp, trace_load=t.load, lambds=lam,
                      s_values=range(0, lam[-1] + 1), progress=False)
        print(_row(f.name.replace("-w256", "").replace(".npz", ""), best), flush=True)
        out[f.name] = best
    return out


def long_horizon(mu, base_comp, lam, rounds, seed, trace_base_comp=2.2013, skip_bursty=False):
    print(f"\n### Long horizon ({rounds} rounds, n=256, mu={mu}, base_comp={base_comp} (bursty) / "
          f"{trace_base_comp} (traces), n_jobs={rounds - 20})\n")
    print("| durations | " + " | ".join(SCHEMES) + " | M-SGC vs GC |")
    print("|---|" + "---|" * (len(SCHEMES) + 1))
    rng = np.random.default_rng(seed)
    cases = {}
    for B, W, L in [(1, 3, 10), (2, 5, 20), (3, 7, 40)]:
        pat = st.bursty(rounds, 256, B, W, L, rng, p_start=0.05)
        cases[f"bursty B={B} W={W} lambd={L}"] = (st.pattern_to_durations(pat, rng, base=1.0, slow=5.0), 0.0)
    for f in ["Canada-w256-r30-load0_250-b2048-long.npz", "Canada-w256-r20-load0_250-b2048-desktop.npz",
              "Sydney-w256-r20-load0_000-b256-est-mbp2.npz"]:
        hits = st.find_traces(f)
        if hits:
            t = st.load_trace(hits[0])
            for block in (1, 5):
                # base_comp is applied as given: a trace at load 0.25 cannot shed more than its fastest time
                cases[f"{f[:-4]} extended, block={block}"] = (st.extend_trace(t.durations, rounds, rng, block), t.load)
    res = {}
    for label, (d, tl) in cases.items():
        bc = base_comp if label.startswith("bursty") else trace_base_comp
        if label.startswith("bursty") and skip_bursty:
            continue
        best = search(d, SCHEMES, n_jobs=rounds - 20, mu=mu, base_comp=bc, trace_load=tl, lambds=lam,
                      s_values=range(0, lam[-1] + 1), progress=False)
        print(_row(label, best), flush=True)
        res[label] = best
    return res


def plot(real, long, path):
    """Best runtime of each scheme relative to uncoded wait-for-all, per trace or model (rows
    where uncoded is n/a -- load shift below zero -- are left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = [(axes[0], real, "real traces (10-20 rounds)"), (axes[1], long, "long horizon (220 rounds)")]
    if not long:
        panels = panels[:1]
    for ax, data, title in panels:
        labels = [lb for lb in data if "uncoded" in data[lb]]
        x = np.arange(len(labels))
        base = np.array([data[lb]["uncoded"].runtime for lb in labels])
        for i, k in enumerate(SCHEMES):
            vals = np.array([data[lb][k].runtime if k in data[lb] else np.nan for lb in labels])
            ax.bar(x + (i - 1.5) * 0.2, vals / base, 0.2, label=k)
        ax.set_xticks(x, [lb.replace("-w256", "")[:34] for lb in labels], rotation=70, fontsize=6)
        ax.set_ylabel("best runtime / uncoded runtime")
        ax.set_title(title)
        ax.set_ylim(0, 1.6)
        ax.axhline(1.0, color="k", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mu", type=float, default=1.0)
    p.add_argument("--base-comp", type=float, default=2.2013, help="s per unit load on the traces (authors' value)")
    p.add_argument("--long-base-comp", type=float, default=10.0, help="s per unit load, long horizon")
    p.add_argument("--lambd-max", type=int, default=128)
    p.add_argument("--lambd-step", type=int, default=1)
    p.add_argument("--rounds", type=int, default=220)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-bursty", action="store_true")
    p.add_argument("--skip-long", action="store_true", help="only the real-trace table")
    p.add_argument("--png")
    a = p.parse_args(argv)
    lam = list(range(1, a.lambd_max + 1, a.lambd_step))
    real = {} if a.skip_real else real_traces(a.mu, a.base_comp, lam)
    long = {} if a.skip_long else long_horizon(a.mu, a.long_base_comp, lam, a.rounds, a.seed, a.base_comp,
                                               a.skip_bursty)
    if a.png and real:
        plot(real, long, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
