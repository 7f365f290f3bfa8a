"""The gradient-coding coordinator over MPI (mpi4py), run under mpiexec."""

import os
import subprocess
import sys

import pytest

mpi4py = pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._dist import mpiexec  # noqa: E402  (after the skip: this module needs mpi4py)


def test_coordinator_over_mpi_decodes_with_stragglers():
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "tests.coding._mpi_gc"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(": ok") == 3, out.stdout
