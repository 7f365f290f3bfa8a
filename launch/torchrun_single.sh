#!/usr/bin/env bash
# One machine, several processes: torchrun with its standalone rendezvous.
#
#   launch/torchrun_single.sh [NPROC] [examples/train_ddp.py arguments...]
#   launch/torchrun_single.sh 4 --hook terngrad --opt error_feedback=True
#   NPROC=2 MAX_RESTARTS=3 launch/torchrun_single.sh --hook gradient_coding --opt s=1 --checkpoint-dir ckpt
#
# --standalone starts a rendezvous store on a free local port, so there is no MASTER_ADDR or
# MASTER_PORT to choose. torchrun then gives each worker RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT, which commcomp.launch.init_from_env() reads (nccl and GPU
# LOCAL_RANK when CUDA is present, else gloo on the CPU).
#
# NPROC: the first argument if it is a number, else $NPROC, else one process per visible GPU,
# else 2. MAX_RESTARTS (default 0): how often torchrun restarts every worker after one fails;
# with --checkpoint-dir the restarted workers resume from the newest checkpoint all ranks
# have. PYTHON: the interpreter (default .venv/bin/python if present, else python3); torchrun
# is its module torch.distributed.run, so the workers run on the same interpreter.
# Every other argument goes to examples/train_ddp.py (--hook, --opt key=value, --steps ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# torchrun sets OMP_NUM_THREADS=1 (with a warning) when unset; the example sizes its own threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-0}" "${SCRIPT:-examples/train_ddp.py}" "$@"
