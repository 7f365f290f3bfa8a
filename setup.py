"""Build of the native extension ``commcomp._C`` (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are added when the torch doing the build has CUDA
and a CUDA toolkit is found (``COMMCOMP_CUDA=0`` forces them off, ``=1`` forces them on).
Build against the torch you run: ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import sys

import torch
from packaging.version import Version
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    flag = os.environ.get("COMMCOMP_CUDA", "auto")
    if flag in ("0", "1"):
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    version = Version(torch.__version__)
    macros = [("COMMCOMP_TORCH_MAJOR", str(version.major)), ("COMMCOMP_TORCH_MINOR", str(version.minor))]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp in *this*
        # build its pragmas are ignored and every kernel runs on one thread.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not want_cuda():
        return [
            CppExtension(
                "commcomp._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                extra_link_args=link,
            )
        ]
    macros.append(("COMMCOMP_WITH_CUDA", "1"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        CUDAExtension(
            "commcomp._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension})
