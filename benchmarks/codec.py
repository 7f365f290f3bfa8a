"""Kept for the commands in docs/benchmarks.md: the benchmark lives in commcomp.bench.codec
(``commcomp bench codec --help``)."""

from commcomp.bench.codec import main

if __name__ == "__main__":
    main()
