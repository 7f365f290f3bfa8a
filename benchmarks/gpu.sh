#!/usr/bin/env bash
# Everything that needs a CUDA machine, in one command (device time is scarce): build the
# extension with CUDA, run the whole suite (the CUDA tests included: CUDA bytes == CPU bytes
# == reference bytes; every hook on CUDA tensors over gloo and NCCL), then the codec and sketch
# benchmarks. Results go to $OUT (the device tool's folder) or out/gpu. Usage, from the
# repository root on the GPU machine:
#     bash benchmarks/gpu.sh              # build, the CUDA tests, the benchmarks
#     GPU_TESTS=all bash benchmarks/gpu.sh  # the whole suite instead of the CUDA tests
#     GPU_BENCH=0 bash benchmarks/gpu.sh    # no benchmarks
#     GPU_K=cuda bash benchmarks/gpu.sh     # only the tests whose id mentions cuda (pytest -k)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/machine.txt"
echo "[gpu] building with CUDA (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, not an installed copy
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} COMMCOMP_CUDA=1
# The compilers on PATH, not an inherited CC/CXX: a toolchain that links libstdc++ statically
# into the extension (the GPU image's /opt/gcc wrapper did) gives it a second copy of
# std::ostream, and formatting any integer into an error message then segfaults.
export CC=${GPU_CC:-gcc} CXX=${GPU_CXX:-g++}
echo "[gpu] CC=$CC CXX=$CXX ($("$CXX" --version | head -1))"
rm -rf build commcomp/_C*.so
t0=$SECONDS
"$py" setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "[gpu] built in $((SECONDS - t0)) s"
if nm -C --defined-only commcomp/_C*.so | grep -q "std::basic_ostream<char, std::char_traits<char> >::_M_insert<long>"; then
  echo "[gpu] the extension carries its own copy of libstdc++ (linked statically): errors raised by the"
  echo "      kernels would crash; build with a g++ that links libstdc++.so (set GPU_CXX)"; exit 1
fi
"$py" -c "import commcomp; print('[gpu] kernels: cpu', commcomp.ops.backend('cpu'), 'cuda', commcomp.ops.backend('cuda'))"
set +e
if [ "${GPU_TESTS:-cuda}" = all ]; then
  targets=(tests)
else  # the tests with a CUDA path: kernels, codecs, the CLI's report, hooks on CUDA tensors
  targets=(tests/ops tests/codecs tests/collectives tests/test_cli_info.py tests/test_cuda_hooks.py)
fi
t0=$SECONDS
COMMCOMP_REQUIRE_NATIVE=1 "$py" -m pytest -q -p no:cacheprovider -rs ${GPU_K:+-k "$GPU_K"} "${targets[@]}" 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
set -e
echo "[gpu] tests took $((SECONDS - t0)) s"
[ "${GPU_BENCH:-1}" = 0 ] && exit "$tests"
"$py" benchmarks/codec.py --devices cuda --numel $((1 << 26)) --world 8 --json "$out/codec_cuda.json" | tee "$out/codec_cuda.txt"
"$py" benchmarks/codec.py --devices cuda --numel $((1 << 20)) --world 8 | tee "$out/codec_cuda_small.txt"
for e in 24 26; do
  "$py" benchmarks/sketch.py --devices cuda --numel $((1 << e)) --repeat 20 \
    --json "$out/sketch_cuda_2e$e.json" | tee "$out/sketch_cuda_2e$e.txt"
done
exit "$tests"
