#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with the local nvcc against torch's headers, for Hopper
# (sm_90) and a portable PTX target (compute_75, JIT-compiled by newer drivers). CI has no
# GPU, so this proves the CUDA code compiles; running it needs a CUDA machine
# (see docs/benchmarks.md for the GPU recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
if ! command -v nvcc >/dev/null; then
  if [ "${CI:-}" = "true" ]; then echo "[cuda] nvcc not found; CI must compile the .cu files" >&2; exit 1; fi
  echo "[cuda] nvcc not found: skipping the CUDA compile check"; exit 0
fi
# torch's headers as system headers: their warnings are not ours, ours stay visible.
includes=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
# The C++ standard torch's own extension builder uses for this torch (c++20 from 2.10 on).
std=$("$py" -c "import torch; from packaging.version import Version as V; print('c++20' if V(torch.__version__).release >= (2, 10) else 'c++17')")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for f in csrc/cuda/*.cu; do
  echo "[cuda] nvcc $f"
  nvcc -std="$std" -O3 --expt-relaxed-constexpr -DCOMMCOMP_WITH_CUDA -Xcompiler -Wall \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_75,code=compute_75 \
    -isystem .ci/cuda-shim $includes -c "$f" -o "$out/$(basename "$f").o" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] && echo "[cuda] all .cu files compiled" || echo "[cuda] compile FAILED" >&2
exit $status
