"""Throughput of the sketch kernels (CountSketch, block SRHT): native vs the pure-PyTorch
reference, against x.clone() measured in the same run (only same-run ratios mean anything).

For each sketch and ratio s / d the table gives the sketch (R x) and de-sketch (R^T y) time,
GB/s of the full-length vector (4 B per element of d, read or written), the fraction of copy
bandwidth (clone's time over the op's: a clone moves 2 * 4 B * d, the floor for any op that
reads or writes the full vector and allocates), and native's speed-up over the reference.

    commcomp bench sketch --devices cpu --numel 16777216
    commcomp bench sketch --devices cuda --numel 67108864 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from codec import timer  # same directory: the median-of-runs timer of the codec benchmark

import commcomp
from ._util import device_label, parse_devices
from commcomp.ops import reference


def once(device: torch.device, fn) -> float:
    """Seconds of one call (the reference is too slow to repeat at large sizes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def cases(n: int, ratio: float, device: torch.device):
    """(sketch, direction, native fn, reference fn) for one ratio."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).to(device)
    s = max(1, int(n * ratio))
    y = torch.randn(s, generator=g).to(device)
    block = commcomp.ops.default_block(n)
    ops = torch.ops.commcomp
    return s, [
        ("countsketch", "sketch", lambda: ops.countsketch(x, s, 1),
         lambda: reference.countsketch(x, s, 1)),
        ("countsketch", "de-sketch", lambda: ops.countsketch_transpose(y, n, 1),
         lambda: reference.countsketch_transpose(y, n, 1)),
        (f"srht b={block}", "sketch", lambda: ops.srht(x, s, block, 1),
         lambda: reference.srht(x, s, block, 1)),
        (f"srht b={block}", "de-sketch", lambda: ops.srht_transpose(y, n, block, 1),
         lambda: reference.srht_transpose(y, n, block, 1)),
    ]


def run(device: torch.device, n: int, ratios, repeat: int, with_reference: bool):
    x = torch.randn(n, device=device)
    clone_s = timer(device, lambda: x.clone(), repeat)
    rows = []
    for ratio in ratios:
        s, todo = cases(n, ratio, device)
        for name, direction, native_fn, ref_fn in todo:
            t_nat = timer(device, native_fn, repeat)
            t_ref = once(device, ref_fn) if with_reference else float("nan")
            rows.append({
                "device": str(device), "sketch": name, "direction": direction, "ratio": ratio,
                "sketch_size": s, "native_ms": t_nat * 1e3, "reference_ms": t_ref * 1e3,
                "GBps": 4 * n / t_nat / 1e9, "frac_of_copy": clone_s / t_nat,
                "speedup_vs_reference": t_ref / t_nat,
            })
    return {"device": str(device), "numel": n, "clone_ms": clone_s * 1e3,
            "copy_GBps": 8 * n / clone_s / 1e9, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(prog="commcomp bench sketch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    p.add_argument("--devices", default="auto", help="comma list, e.g. cpu,cuda")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for dev in parse_devices(args.devices):
        if commcomp.ops.backend(dev) != "native":
            print(f"# {dev}: native kernels not built; native and reference would be the same code")
        res = run(dev, args.numel, args.ratios, args.repeat, not args.no_reference)
        results.append(res)
        name = device_label(dev)
        print(f"\n{dev} ({name}), d={args.numel:,}, torch {torch.__version__}: "
              f"x.clone() {res['clone_ms']:.2f} ms = {res['copy_GBps']:.1f} GB/s (read+write)")
        print(f"{'sketch':12s} {'direction':9s} {'s/d':>5s} {'s':>10s} {'native ms':>10s} "
              f"{'GB/s':>7s} {'x copy':>7s} {'ref ms':>9s} {'native/ref':>10s}")
        for r in res["rows"]:
            print(f"{r['sketch']:12s} {r['direction']:9s} {r['ratio']:5g} {r['sketch_size']:>10,d} "
                  f"{r['native_ms']:10.3f} {r['GBps']:7.2f} {r['frac_of_copy']:7.3f} "
                  f"{r['reference_ms']:9.1f} {r['speedup_vs_reference']:9.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
