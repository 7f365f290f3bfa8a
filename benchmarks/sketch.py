"""Kept for the commands in docs/benchmarks.md: the benchmark lives in commcomp.bench.sketch
(``commcomp bench sketch --help``)."""

from commcomp.bench.sketch import main

if __name__ == "__main__":
    main()
