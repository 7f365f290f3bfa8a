"""Throughput of the codec kernels: native vs the pure-PyTorch reference, against a plain
memory copy measured in the same run (machines here are noisy; only same-run ratios mean
anything).

For each op the table counts the bytes the op must move (read + write) and reports GB/s,
that rate as a fraction of the copy's rate, and native's speed-up over the reference.

    commcomp bench codec                       # every device present
    commcomp bench codec --numel 16777216 --world 8 --json out.json
"""

from __future__ import annotations

import torch

from commcomp.ops import reference

from ._util import parser, run_devices, timer  # noqa: F401 - timer was importable from here


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


# title (device, options, result), column header, one row per op
_TABLE = """
{dev} ({name}), numel={numel:,}, torch {torch}: copy {copy_GBps:.1f} GB/s (read+write)
op                                        bytes  native ms     GB/s  x copy    ref ms native/ref
{op:34s} {bytes:>12,d} {native_ms:10.3f} {native_GBps:8.2f} {frac_of_copy:7.2f} {reference_ms:9.2f} \
{speedup_vs_reference:9.1f}x
"""


def main(argv=None):
    p = parser("commcomp bench codec", __doc__, numel=1 << 22)
    p.add_argument("--world", type=int, default=8, help="payloads summed by unpack_accumulate")
    p.add_argument("--ref-repeat", type=int, default=3)
    run_devices(p, argv, lambda a, dev: run(dev, a.numel, a.world, a.repeat, a.ref_repeat), _TABLE)


if __name__ == "__main__":
    main()
