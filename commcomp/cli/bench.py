"""``commcomp bench codec|sketch``: throughput of the native kernels against the pure-PyTorch
reference and a same-run memory copy (the benchmarks live in :mod:`commcomp.bench`)."""

from __future__ import annotations

import argparse

from ._common import add_topic

_DESCRIPTION = ("Throughput of the native kernels against the pure-PyTorch reference and a memory "
                "copy timed in the same run (only same-run ratios mean anything on a shared "
                "machine). `commcomp bench codec --help` and `commcomp bench sketch --help` "
                "list their options.")
_EPILOG = ("examples:\n  commcomp bench codec --numel 16777216 --world 8\n"
           "  commcomp bench sketch --devices cuda --numel 67108864 --json out.json")


def _cmd_bench(a) -> int:
    import importlib

    importlib.import_module(f"commcomp.bench.{a.which}").main(a.args)
    return 0


def add_bench(sub) -> None:
    p = add_topic(sub, "bench", _cmd_bench, help="kernel benchmarks: native vs reference vs a same-run copy",
                  description=_DESCRIPTION, epilog=_EPILOG, raw=True)
    p.add_argument("which", choices=("codec", "sketch"), help="codec: ternary ops; sketch: CountSketch and SRHT")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
