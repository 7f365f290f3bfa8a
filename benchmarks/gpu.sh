#!/usr/bin/env bash
# Everything that needs a CUDA machine, in one command (device time is scarce): build the
# extension with CUDA, run the whole suite (the CUDA tests included: CUDA bytes == CPU bytes
# == reference bytes), then the codec and sketch benchmarks. Results go to $OUT (the device tool's
# folder) or out/gpu. Usage, from the repository root on the GPU machine:
#     bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/machine.txt"
echo "[gpu] building with CUDA (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} COMMCOMP_CUDA=1
"$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
"$py" -c "import commcomp; print('[gpu] kernels: cpu', commcomp.ops.backend('cpu'), 'cuda', commcomp.ops.backend('cuda'))"
set +e
COMMCOMP_REQUIRE_NATIVE=1 "$py" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
set -e
"$py" benchmarks/codec.py --devices cuda --numel $((1 << 26)) --world 8 --json "$out/codec_cuda.json" | tee "$out/codec_cuda.txt"
"$py" benchmarks/codec.py --devices cuda --numel $((1 << 20)) --world 8 | tee "$out/codec_cuda_small.txt"
for e in 24 26; do
  "$py" benchmarks/sketch.py --devices cuda --numel $((1 << e)) --repeat 20 \
    --json "$out/sketch_cuda_2e$e.json" | tee "$out/sketch_cuda_2e$e.txt"
done
exit "$tests"
