"""Helpers for testing and benchmarking commcomp beyond one process group on one host.

:mod:`commcomp.testing.netns` emulates two hosts on one Linux machine (network namespaces
joined by a veth pair, optionally shaped with ``tc tbf``) and runs one ``torchrun`` agent in
each. It needs root; :func:`commcomp.testing.netns.unavailable_reason` says why not otherwise.
"""
