"""Build of the native extension ``commcomp._C`` (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are added when the torch doing the build has CUDA
and a CUDA toolkit is found (``COMMCOMP_CUDA=0`` forces them off, ``=1`` forces them on).
Build against the torch you run: ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil
import subprocess
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


# libstdc++'s `std::ostream::_M_insert<long>`: undefined (taken from libstdc++.so) in a normal
# build, defined when the toolchain linked libstdc++ statically into the extension.
_OWN_LIBSTDCXX = "_ZNSo9_M_insertIlEERSoT_"


class Build(BuildExtension):
    """torch's BuildExtension, refusing an extension that carries its own copy of libstdc++.

    Such a copy (a compiler wrapper that links libstdc++ statically, as one GPU image's did)
    gives the extension a second std::ostream next to torch's, and formatting a number into an
    error a kernel raises then breaks: on the H100 image the process crashed (SIGSEGV), on this
    CPU build the message stops at the number ("sketch_size = " and nothing after it).
    """

    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        nm = shutil.which("nm")
        if nm is None or not os.path.exists(path) or os.environ.get("COMMCOMP_ALLOW_STATIC_LIBSTDCXX") == "1":
            return
        # the symbol table, and the dynamic one (all that is left of a stripped build)
        symbols = "".join(subprocess.run([nm, *flags, "--defined-only", path], capture_output=True, text=True).stdout
                          for flags in ([], ["-D"]))
        if _OWN_LIBSTDCXX in symbols:
            os.remove(path)
            cxx = os.environ.get("CXX", "c++")
            raise SystemExit(
                f"commcomp: {path} was linked with its own static copy of libstdc++ (CXX={cxx}); errors "
                "raised by its kernels would lose their text or crash the process. Build with a compiler that "
                "links libstdc++.so, e.g. `CC=gcc CXX=g++ pip install --no-build-isolation -e .`, without "
                "-static-libstdc++ in LDFLAGS or in a compiler wrapper (COMMCOMP_ALLOW_STATIC_LIBSTDCXX=1 keeps "
                "such a build anyway)")


setup(ext_modules=extensions(), cmdclass={"build_ext": Build})
