"""The gradient-coding coordinator over MPI (mpi4py), run under mpiexec."""

import os
import shutil
import subprocess
import sys

import pytest

mpi4py = pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the mpich wheel's, in a venv
    path = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")
    return path


def test_coordinator_over_mpi_decodes_with_stragglers():
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "tests.coding._mpi_gc"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(": ok") == 3, out.stdout
