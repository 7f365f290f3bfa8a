#!/usr/bin/env bash
# Several machines: torchrun on every node, meeting at a c10d rendezvous. Run this same
# script on each node (ssh, pdsh, a cluster scheduler), with the same environment:
#
#   RDZV_HOST=10.0.0.1 NNODES=2 NPROC=4 launch/torchrun_multinode.sh --hook terngrad
#
# Environment:
#   RDZV_HOST   (required) address of the node that hosts the rendezvous store; every node
#               must reach it. Usually the first node.
#   RDZV_PORT   port of the store on RDZV_HOST (default 29400); open it in the firewall.
#   RDZV_ID     job id, the same on every node and different for concurrent jobs (default commcomp).
#   NNODES      number of nodes (default 2), or MIN:MAX for an elastic job.
#   NPROC       processes per node (default: one per visible GPU, else 1).
#   IS_HOST     1 on the node at RDZV_HOST, 0 on the others: passes --rdzv-conf=is_host=1|0.
#               torchrun otherwise guesses by comparing RDZV_HOST with this machine's names and
#               addresses, which fails when RDZV_HOST is a NAT'ed, load-balanced or alias address.
#   LOCAL_ADDR  this node's address as the other nodes see it: passes --local-addr. Needed when
#               the hostname resolves to a loopback address (127.0.1.1 in /etc/hosts is common
#               in containers and VMs, and in network namespaces): torchrun gives that
#               name to the workers as MASTER_ADDR, and the other nodes cannot reach it.
#               torch >= 2.5 (2.4's torchrun hands out the hostname whatever --local-addr says).
#   MAX_RESTARTS  (default 3) restarts of every worker after a failure; with --checkpoint-dir
#               (on storage all nodes see, or per node: one file per rank) training resumes
#               from the newest step that every rank saved.
#   PYTHON      interpreter (default .venv/bin/python if present, else python3).
#
# torchrun hands each worker RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
# commcomp.launch.init_from_env() reads them, and starts a fresh TCP store for each restart
# (torch's shared store would otherwise serve the previous attempt's addresses,
# pytorch/pytorch#135712). Other arguments go to examples/train_ddp.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${RDZV_HOST:-}" ]]; then
  echo "RDZV_HOST is not set: export RDZV_HOST=<address of the first node> on every node" >&2
  exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")}
extra=()
if [[ -n "${IS_HOST:-}" ]]; then extra+=(--rdzv-conf "is_host=${IS_HOST}"); fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then extra+=(--local-addr "$LOCAL_ADDR"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-2}" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST}:${RDZV_PORT:-29400}" --rdzv-id "${RDZV_ID:-commcomp}" \
  --max-restarts "${MAX_RESTARTS:-3}" "${extra[@]}" "${SCRIPT:-examples/train_ddp.py}" "$@"
