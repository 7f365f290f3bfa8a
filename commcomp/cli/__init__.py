"""The ``commcomp`` command line. One sub-command per topic; each topic has its own actions.

    commcomp stragglers simulate --trace Canada-w256-r20-load0_250-b2048-desktop.npz \\
        --scheme msgc --B 1 --W 3 --lambd 30 --n-jobs 10 --mu 1.0 --base-comp 2.2 --json
    commcomp stragglers simulate --model bursty --rounds 300 --workers 256 --search --png cmp.png
    commcomp info [--json]
    commcomp perfmodel --model-params 25.6M --world-size 64 --bandwidth-gbps 10 --compute-ms 100
    commcomp calibrate --world 4
    commcomp bench codec --numel 16777216

One module per topic group: :mod:`.stragglers`, :mod:`.info`, :mod:`.perf` (perfmodel and
calibrate), :mod:`.bench`. A new topic is an ``add_<topic>(subparsers)`` function (registered
with :func:`._common.add_topic`) listed in ``_TOPICS``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from .bench import add_bench
from .info import add_info
from .perf import add_calibrate, add_perfmodel
from .stragglers import add_stragglers

_TOPICS = [add_stragglers, add_info, add_perfmodel, add_calibrate, add_bench]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="commcomp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="commcomp command line tools: what compression will buy you (perfmodel, calibrate), how fast "
                    "the kernels run here (bench), straggler simulation on real traces (stragglers), and what "
                    "this installation can use (info). `commcomp TOPIC --help` teaches each one.",
        epilog="examples:\n  commcomp info\n"
               "  commcomp perfmodel --model-params 25.6M --world-size 8,64,512 --bandwidth-gbps 1,10 "
               "--compute-ms 100\n"
               "  commcomp calibrate --world 4\n  commcomp bench codec --numel 16777216\n"
               "  commcomp stragglers simulate --model bursty --rounds 300 --workers 256 --search")
    sub = p.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    for add in _TOPICS:
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    return a.func(a)


__all__ = ["add_bench", "add_calibrate", "add_info", "add_perfmodel", "add_stragglers", "build_parser", "main"]
