#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + Gloo + MPI) against the torch that is already
# installed, for commcomp.integrations.horovod and `horovodrun`.
#
#   bash launch/install_horovod.sh                 # into python3
#   PYTHON=.venv/bin/python bash launch/install_horovod.sh
#
# Why a script and not `pip install horovod`:
#
# 1. Horovod 0.28.1 (the newest release) ships only a source distribution, and its CMake files
#    force C++14 (`set(CMAKE_CXX_STANDARD 14)` in CMakeLists.txt and horovod/torch/CMakeLists.txt),
#    while torch's headers require C++17 (torch/all.h: "#error C++17 or later"). Upstream moved
#    to C++17 after the release; this script makes the same change to the downloaded sdist:
#    those two lines, 14 -> 17, and nothing else.
# 2. `pip install horovod` builds in an isolated environment, which would download a fresh
#    torch (a multi-GB CUDA build) and compile against it. The build must see the installed
#    torch: `--no-build-isolation --no-deps`. Horovod's small runtime dependencies
#    (cloudpickle, psutil, pyyaml, packaging) are installed explicitly instead.
#
# MPI: if an MPI compiler wrapper (mpicxx) is found -- first next to $PYTHON (the `mpich` wheel
# of `pip install mpi4py mpich` puts it there), then on PATH -- Horovod is built with MPI and
# Gloo; otherwise with Gloo only (enough for `horovodrun --gloo`), and the script says so.
#
# Knobs (environment): PYTHON (default python3), HOROVOD_BUILD_JOBS (parallel compile jobs,
# default: the number of cores), HOROVOD_BUILD_DIR (keep the sdist and build there instead of a
# temporary directory), HOROVOD_MPI=0 (build Gloo only even if MPI is found).
#
# Time, measured on a 2-core machine (gcc 12, -O3 -g, torch 2.13 headers, Gloo + MPI): 4 min 46 s
# in all (264 s for the build itself, 340 CPU-seconds) while the cores were fairly quiet, 10 min
# while other jobs were using them. Re-running is free: the script exits at once when
# `import horovod.torch` works.
set -euo pipefail

HVD_VERSION=0.28.1
PYTHON=${PYTHON:-python3}
say() { echo "[horovod] $*"; }
die() { echo "[horovod] ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable; set PYTHON=/path/to/python"
if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
  say "horovod.torch already imports in $PYTHON ($("$PYTHON" -c 'import horovod; print(horovod.__version__)')): nothing to do"
  exit 0
fi
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null) ||
  die "$PYTHON cannot import torch; install torch first (Horovod compiles against it)"
say "python $("$PYTHON" -c 'import sys; print(sys.executable)'), torch $torch_version"

# Tools the build needs: CMake >= 3.13 (Horovod's setup.py would otherwise pip-install an old
# cmake behind our back) and a C++17 compiler. The interpreter's own bin directory goes first on
# PATH, so a `pip install cmake` or the `mpich` wheel's mpicxx in that environment are found.
scripts=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_path('scripts'))")
export PATH="$scripts:$PATH"
cmake_version=$({ cmake --version 2>/dev/null || true; } | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')
[ -n "$cmake_version" ] || die "cmake not found; install it (apt-get install cmake, or $PYTHON -m pip install cmake)"
printf '%s\n' 3.13 "$cmake_version" | sort -V -C ||
  die "cmake $cmake_version is older than 3.13; $PYTHON -m pip install 'cmake>=3.13'"
command -v "${CXX:-c++}" >/dev/null || die "no C++ compiler (${CXX:-c++}); install g++ (apt-get install g++)"
say "cmake $cmake_version, $("${CXX:-c++}" --version | head -1)"

pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

# MPI: the wrapper next to the interpreter first (the pip `mpich` wheel), then PATH.
mpi_flags=(HOROVOD_WITHOUT_MPI=1)
mpi_note="Gloo only (no MPI compiler wrapper found; pip install mpi4py mpich, then re-run, for MPI)"
if [ "${HOROVOD_MPI:-1}" != "0" ]; then
  mpicxx=""
  for cand in "$scripts/mpicxx" "$(command -v mpicxx || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -show >/dev/null 2>&1; then mpicxx=$cand; break; fi
  done
  if [ -n "$mpicxx" ]; then
    # CMake's FindMPI looks for mpicxx/mpiexec on PATH: put this MPI's bin directory first.
    export PATH="$(dirname "$mpicxx"):$PATH"
    mpi_flags=(HOROVOD_WITH_MPI=1)
    mpi_note="Gloo and MPI ($mpicxx: $("$mpicxx" -show | cut -c1-80)...)"
  fi
else
  mpi_note="Gloo only (HOROVOD_MPI=0)"
fi
say "controllers: $mpi_note"

# Workspace: the sdist, unpacked and patched, and CMake's build tree.
if [ -n "${HOROVOD_BUILD_DIR:-}" ]; then
  work=$HOROVOD_BUILD_DIR; mkdir -p "$work"
else
  work=$(mktemp -d -t horovod-build.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
say "downloading the horovod==$HVD_VERSION sdist into $work"
pip download --quiet --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work" ||
  die "could not download horovod==$HVD_VERSION from PyPI (network? index?)"
src="$work/horovod-$HVD_VERSION"
rm -rf "$src"
tar -xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"

# The C++17 patch. Each file must contain exactly the line we expect, or the sdist is not the
# one this script was written for: stop rather than build something half-patched.
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
  n=$(grep -c 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || true)
  [ "$n" = "1" ] || die "$f: expected one 'set(CMAKE_CXX_STANDARD 14)', found $n; the sdist changed, review the patch"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/$f"
  say "patched $f: CMAKE_CXX_STANDARD 14 -> 17"
done

say "installing Horovod's runtime dependencies (cloudpickle psutil pyyaml packaging)"
pip install --quiet cloudpickle psutil pyyaml packaging || die "pip could not install Horovod's runtime dependencies"

jobs=${HOROVOD_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
say "building with $jobs parallel jobs (HOROVOD_BUILD_JOBS to change); takes minutes, the log is $work/build.log"
start=$SECONDS
if ! env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 \
    "${mpi_flags[@]}" MAKEFLAGS="-j$jobs" \
    "$PYTHON" -m pip --disable-pip-version-check install --no-build-isolation --no-deps --no-cache-dir -v "$src" \
    >"$work/build.log" 2>&1; then
  grep -n -E "error|Error" "$work/build.log" | head -20 >&2 || true
  if [ -z "${HOROVOD_BUILD_DIR:-}" ]; then cp "$work/build.log" /tmp/horovod-build.log; log=/tmp/horovod-build.log
  else log=$work/build.log; fi
  die "the build failed after $((SECONDS - start)) s; the first errors are above, the whole log is $log"
fi
say "built and installed in $((SECONDS - start)) s"

"$PYTHON" -c "import horovod.torch as hvd; print('[horovod]', 'horovod', __import__('horovod').__version__,
  'gloo:', hvd.gloo_built(), 'mpi:', hvd.mpi_built())" ||
  die "installed, but 'import horovod.torch' fails (see above); torch changed since the build?"
say "done: try  bash launch/horovodrun.sh 2"
