// Stand-in for a header that CPU-only torch wheels do not ship (CUDA builds generate it).
// Used only by .ci/compile-cuda.sh to syntax- and type-check csrc/cuda/*.cu with nvcc.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
