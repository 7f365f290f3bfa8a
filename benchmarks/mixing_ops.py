"""Single-thread timings of the base-3 and mixing ops at 11.3M float32 elements, native kernels
against their reference twins (the numbers are in docs/decentralized.md).

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \
        .venv/bin/python benchmarks/mixing_ops.py [reference repetitions, 0 to skip]

Times are the thread's CPU time (the best of several calls), so other processes on the machine
disturb them less; the malloc settings keep glibc from returning the large outputs to the
kernel after every call, whose page faults would otherwise be timed too (ternarize_int8 and
unpack allocate 11 and 45 MB per call). COMMCOMP_TERNARY_ISA=sse2|avx2|avx512 picks a path.
"""

import sys
import time
import warnings

import torch

warnings.simplefilter("ignore")
import commcomp.ops  # noqa: E402, F401  (loads the kernels)
from commcomp import _C  # noqa: E402
from commcomp.ops import reference as R  # noqa: E402

torch.set_num_threads(1)
C = torch.ops.commcomp
n = 11_300_000
g = torch.Generator().manual_seed(0)
segs = [n // 2, n - n // 2]
v, hat, acc = (torch.randn(n, generator=g) for _ in range(3))
s = torch.tensor([4.0, 4.0])
hs = torch.tensor([0.5, 0.5])
as_ = hs * 0.25
y, gr, gp = (torch.randn(n, generator=g) for _ in range(3))
pk2 = [C.ternarize_pack(torch.randn(n, generator=g), s, segs, w, 0) for w in range(2)]
pk3 = [C.ternarize_base3(torch.randn(n, generator=g), s, segs, w, 0) for w in range(2)]
sc = torch.rand(2, 2, generator=g)
ref_reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2


def best(f, reps):
    f()
    t = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        f()
        t = min(t, time.thread_time() - t0)
    return t * 1e3


rows = [
    ("ternarize_int8", lambda o: o.ternarize_int8(v, s, segs, 1, 0)),
    ("ternarize_pack (2-bit)", lambda o: o.ternarize_pack(v, s, segs, 1, 0)),
    ("ternarize_base3", lambda o: o.ternarize_base3(v, s, segs, 1, 0)),
    ("unpack (2-bit) -> f32", lambda o: o.unpack(pk2[0], n, s, segs, torch.float32)),
    ("unpack_base3 -> f32", lambda o: o.unpack_base3(pk3[0], n, s, segs, torch.float32)),
    ("mix_stats", lambda o: o.mix_stats(v, hat, segs)),
    ("mix_encode 2-bit", lambda o: o.mix_encode(v, hat, acc, s, hs, as_, segs, 1, 0, False)),
    ("mix_encode base3", lambda o: o.mix_encode(v, hat, acc, s, hs, as_, segs, 1, 0, True)),
    ("mix_decode 2-bit W=2", lambda o: o.mix_decode(v, hat, acc, pk2, sc, segs, 0.5, False)),
    ("mix_decode base3 W=2", lambda o: o.mix_decode(v, hat, acc, pk3, sc, segs, 0.5, True)),
    ("track_prep", lambda o: o.track_prep(y, gr, gp)),
]
print(f"n = {n}, threads = {torch.get_num_threads()}, isa = {_C._ternary_isa()}")
print(f"{'op':28s} {'native ms':>10s} {'reference ms':>13s}")
for name, f in rows:
    tn = best(lambda: f(C), 7)
    tr = best(lambda: f(R), ref_reps) if ref_reps else float("nan")
    print(f"{name:28s} {tn:10.2f} {tr:13.1f}")
print(f"{'torch hat.add_(v), one pass':28s} {best(lambda: hat.add_(v), 7):10.2f}")
