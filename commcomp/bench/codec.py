"""Throughput of the codec kernels: native vs the pure-PyTorch reference, against a plain
memory copy measured in the same run (machines here are noisy; only same-run ratios mean
anything).

For each op the table counts the bytes the op must move (read + write) and reports GB/s,
that rate as a fraction of the copy's rate, and native's speed-up over the reference.

    commcomp bench codec                       # every device present
    commcomp bench codec --numel 16777216 --world 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import commcomp
from ._util import device_label, parse_devices
from commcomp.ops import reference


def timer(device: torch.device, fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(n: int, world: int, device: torch.device):
    """(name, bytes moved, native fn, reference fn) for each kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).to(device)
    xb = x.bfloat16()
    s = x.abs().amax().reshape(1)
    lengths = [n // 4, n // 2, n - n // 4 - n // 2]  # three "layers"
    s3 = s.repeat(3)
    ops = torch.ops.commcomp
    packed = torch.stack([ops.ternarize_pack(x, s, None, w, 0) for w in range(world)])
    scales = s.repeat(world)
    out = torch.zeros(n, device=device)
    nb = (n + 3) // 4
    return [
        ("ternarize_pack fp32", 4 * n + nb,
         lambda: ops.ternarize_pack(x, s, None, 1, 0),
         lambda: reference.ternarize_pack(x, s, None, 1, 0)),
        ("ternarize_pack bf16", 2 * n + nb,
         lambda: ops.ternarize_pack(xb, s, None, 1, 0),
         lambda: reference.ternarize_pack(xb, s, None, 1, 0)),
        ("ternarize_pack fp32, 3 segments", 4 * n + nb,
         lambda: ops.ternarize_pack(x, s3, lengths, 1, 0),
         lambda: reference.ternarize_pack(x, s3, lengths, 1, 0)),
        ("ternarize_int8 fp32", 5 * n,
         lambda: ops.ternarize_int8(x, s, None, 1, 0),
         lambda: reference.ternarize_int8(x, s, None, 1, 0)),
        ("unpack -> fp32", nb + 4 * n,
         lambda: ops.unpack(packed[0], n, s, None, torch.float32),
         lambda: reference.unpack(packed[0], n, s, None, torch.float32)),
        (f"unpack_accumulate W={world}", world * nb + 8 * n,
         lambda: ops.unpack_accumulate(packed, scales, None, out),
         lambda: reference.unpack_accumulate(packed, scales, None, out)),
        ("segment_stats fp32, 3 segments", 4 * n,
         lambda: ops.segment_stats(x, lengths),
         lambda: reference.segment_stats(x, lengths)),
    ]


def run(device: torch.device, n: int, world: int, repeat: int, ref_repeat: int):
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = timer(device, lambda: dst.copy_(src), repeat)
    copy_gbs = 8 * n / copy_s / 1e9
    rows = []
    for name, nbytes, native_fn, ref_fn in cases(n, world, device):
        t_nat = timer(device, native_fn, repeat)
        t_ref = timer(device, ref_fn, ref_repeat)
        gbs = nbytes / t_nat / 1e9
        rows.append({
            "device": str(device), "op": name, "bytes": nbytes,
            "native_ms": t_nat * 1e3, "reference_ms": t_ref * 1e3,
            "native_GBps": gbs, "frac_of_copy": gbs / copy_gbs, "speedup_vs_reference": t_ref / t_nat,
        })
    return {"device": str(device), "numel": n, "copy_GBps": copy_gbs, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(prog="commcomp bench codec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 22)
    p.add_argument("--world", type=int, default=8, help="payloads summed by unpack_accumulate")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--ref-repeat", type=int, default=3)
    p.add_argument("--devices", default="auto", help="comma list, e.g. cpu,cuda")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for dev in parse_devices(args.devices):
        if commcomp.ops.backend(dev) != "native":
            print(f"# {dev}: native kernels not built; native and reference would be the same code")
        res = run(dev, args.numel, args.world, args.repeat, args.ref_repeat)
        results.append(res)
        name = device_label(dev)
        print(f"\n{dev} ({name}), numel={args.numel:,}, torch {torch.__version__}: "
              f"copy {res['copy_GBps']:.1f} GB/s (read+write)")
        print(f"{'op':34s} {'bytes':>12s} {'native ms':>10s} {'GB/s':>8s} {'x copy':>7s} {'ref ms':>9s} "
              f"{'native/ref':>10s}")
        for r in res["rows"]:
            print(f"{r['op']:34s} {r['bytes']:>12,d} {r['native_ms']:10.3f} {r['native_GBps']:8.2f} "
                  f"{r['frac_of_copy']:7.2f} {r['reference_ms']:9.2f} {r['speedup_vs_reference']:9.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
