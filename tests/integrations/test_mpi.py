"""commcomp.integrations.mpi under mpiexec -n 3."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
from tests._dist import mpiexec  # noqa: E402
from tests.coding.test_mpi_transport import ROOT  # noqa: E402


def test_compressed_allreduce_and_gather_over_mpi():
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "tests.integrations._mpi_reduce"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(": ok") == 3, out.stdout
