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
includes=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for f in csrc/cuda/*.cu; do
  echo "[cuda] nvcc $f"
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -DCOMMCOMP_WITH_CUDA \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_75,code=compute_75 \
    -I.ci/cuda-shim $includes -w -c "$f" -o "$out/$(basename "$f").o" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] && echo "[cuda] all .cu files compiled" || echo "[cuda] compile FAILED" >&2
exit $status
