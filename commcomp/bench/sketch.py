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

import time

import torch

import commcomp
from commcomp.ops import reference

from ._util import parser, run_devices, timer


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


# title (device, options, result), column header, one row per sketch and direction
_TABLE = """
{dev} ({name}), d={numel:,}, torch {torch}: x.clone() {clone_ms:.2f} ms = {copy_GBps:.1f} GB/s (read+write)
sketch       direction   s/d          s  native ms    GB/s  x copy    ref ms native/ref
{sketch:12s} {direction:9s} {ratio:5g} {sketch_size:>10,d} {native_ms:10.3f} {GBps:7.2f} {frac_of_copy:7.3f} \
{reference_ms:9.1f} {speedup_vs_reference:9.1f}x
"""


def main(argv=None):
    p = parser("commcomp bench sketch", __doc__, numel=1 << 24)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    run_devices(p, argv, lambda a, dev: run(dev, a.numel, a.ratios, a.repeat, not a.no_reference), _TABLE)


if __name__ == "__main__":
    main()
