"""commcomp.integrations.mpi under mpiexec -n 3."""


import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
from tests._dist import run_mpi_module  # noqa: E402


def test_compressed_allreduce_and_gather_over_mpi():
    run_mpi_module("tests.integrations._mpi_reduce", 3)
