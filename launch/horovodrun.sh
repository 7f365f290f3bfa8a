#!/usr/bin/env bash
# Train the MNIST CNN under horovodrun, N processes on this machine, in one of two ways:
#
# Horovod's own loop (hvd.DistributedOptimizer) with a commcomp compressor,
# examples/train_horovod.py:
#   bash launch/horovodrun.sh 4                               # 4 ranks, ternary codes (default)
#   bash launch/horovodrun.sh 2 --compression sketch --ratio 0.05 --kind srht
#   bash launch/horovodrun.sh 2 --compression fp16            # Horovod's own baseline
#
# The DDP demo with any commcomp hook, examples/train_ddp.py (chosen when the arguments name a
# --hook): horovodrun starts the processes, commcomp.launch.init_from_env() builds the
# torch.distributed group from Horovod's environment, and torch.distributed carries the traffic:
#   bash launch/horovodrun.sh 2 --hook terngrad --opt error_feedback=True
#   bash launch/horovodrun.sh 2 --hook gradient_tracking --opt compressor=ternary --steps 50
#
# What happens:
# - `horovodrun` starts N copies of examples/train_horovod.py and gives each HOROVOD_RANK,
#   HOROVOD_SIZE and a rendezvous address; `hvd.init()` in the script reads them.
# - `--gloo` uses Horovod's Gloo controller and collectives (TCP, no MPI needed). Drop it to run
#   over MPI (`horovodrun` then calls `mpirun`; Horovod must have been built with MPI, see
#   `python -c "import horovod.torch as h; print(h.mpi_built())"`).
# - `-H localhost:N` says: N slots on this host. For several machines list them,
#   `-H host1:4,host2:4 -np 8`, with passwordless ssh between them and the same Python
#   environment and code path on each.
# - Every rank computes the same compression of its own gradients; hvd.DistributedOptimizer
#   all-reduces (sums or averages) the compressed tensors and decompresses the result, which is
#   why commcomp's Horovod compressors are built to be linear (see
#   commcomp/integrations/horovod.py).
#
# Horovod is not on PyPI in a form that builds against current torch: run
# `bash launch/install_horovod.sh` once (about 5 minutes on 2 cores). PYTHON picks the
# interpreter (default: .venv/bin/python if present, else python3); horovodrun is that
# interpreter's `python -m horovod.runner.launch`.
set -euo pipefail
cd "$(dirname "$0")/.."

np=2  # N: the first argument when it is a number
case ${1:-} in ''|*[!0-9]*) ;; *) np=$1; shift;; esac
[ "$np" -gt 0 ] || { echo "usage: $0 [N processes] [train_horovod.py options | --hook H train_ddp.py options]" >&2; exit 2; }

py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$py" -c "import horovod.torch" 2>/dev/null; then
  echo "[horovodrun] horovod.torch does not import in $py; run: PYTHON=$py bash launch/install_horovod.sh" >&2
  exit 1
fi
# `horovodrun` is a console script for the module horovod.runner.launch: run the module with $py,
# so the launcher is the one installed with that interpreter's Horovod even where no horovodrun
# is on PATH (a venv that sees a system-wide Horovod has none of its own).
runner=("$py" -m horovod.runner.launch)

# Each rank would otherwise start as many threads as there are cores: share them instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set -x
script=examples/train_horovod.py
for arg in "$@"; do
  case $arg in --hook|--hook=*) script=examples/train_ddp.py; break;; esac
done
exec "${runner[@]}" --gloo -np "$np" -H "localhost:$np" "$py" "$script" "$@"
