"""Kernel benchmarks that print same-run ratios (a copy, the reference twin): ``commcomp bench
codec`` and ``commcomp bench sketch``; and :mod:`.calibrate`, the measurement of this
machine's hook costs behind ``commcomp calibrate``. End-to-end network benchmarks need root
and two network namespaces: ``benchmarks/network.py`` in a source checkout."""
