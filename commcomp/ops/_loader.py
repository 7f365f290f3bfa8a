"""Load the native kernels, or fall back to the pure-PyTorch reference.

After :func:`load`, every operator in :data:`commcomp.ops._schemas.SCHEMAS` exists as
``torch.ops.commcomp.<name>`` with a kernel for CPU and CUDA tensors:

* the compiled extension ``commcomp._C`` declares the schemas and registers its CPU kernels
  (and CUDA kernels when it was built with CUDA);
* ``COMMCOMP_FORCE_REFERENCE=1`` skips the extension (to debug or compare);
* an extension compiled from another version of the ternary codec's specification
  (``_C.ternary_spec_version`` != :data:`commcomp.ops.reference.TERNARY_SPEC_VERSION`, i.e.
  a stale build) is refused with an error: it would draw other bytes than the reference, the
  CUDA kernels of a fresh build, and every rank running the current spec;
* any backend it does not cover gets the reference twin from :mod:`commcomp.ops.reference`
  registered through ``torch.library``, so the dispatcher, ``torch.compile`` and ``opcheck``
  treat both paths the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Dict

import torch
from packaging.version import Version

from . import _checks, reference
from ._schemas import SCHEMAS

logger = logging.getLogger(__name__)

_libraries = []  # torch.library.Library objects must stay alive for their registrations
BACKENDS: Dict[str, str] = {}  # dispatch key ("CPU", "CUDA") -> "native" | "reference"
LOAD_ERROR: str = ""
MISSING: list = []  # ops a stale compiled extension lacks (served by their reference twins)


def _import_native():
    """Return the native module, or None with the reason recorded in LOAD_ERROR."""
    global LOAD_ERROR
    if os.environ.get("COMMCOMP_FORCE_REFERENCE") == "1":
        LOAD_ERROR = "COMMCOMP_FORCE_REFERENCE=1 is set"
        return None
    try:
        from commcomp import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if importlib.util.find_spec("commcomp._C") is None:
            LOAD_ERROR = f"no compiled extension (_C*.so) in {package_dir}"
            if os.path.exists(os.path.join(package_dir, "..", "setup.py")):
                LOAD_ERROR += (
                    " (a source tree: build in place with `pip install --no-build-isolation -e .`,"
                    " or run from another directory to use an installed copy)"
                )
        else:
            LOAD_ERROR = str(exc)  # present but not loadable: an ABI or library problem
        return None
    built = Version(getattr(_C, "torch_version", "0.0"))
    running = Version(Version(torch.__version__).base_version)
    if (built.major, built.minor) != (running.major, running.minor):
        warnings.warn(
            f"commcomp's native extension was built against torch {built} but torch "
            f"{torch.__version__} is running; rebuild it with "
            "`pip install --no-build-isolation -e .` to avoid crashes.",
            RuntimeWarning,
            stacklevel=3,
        )
    _check_spec_version(_C)
    return _C


def _check_spec_version(native) -> None:
    """Refuse a compiled extension whose ternary codec follows another spec version."""
    built = getattr(native, "ternary_spec_version", 1)  # builds before version 2 had no attribute
    if built != reference.TERNARY_SPEC_VERSION:
        where = getattr(native, "__file__", "commcomp._C")
        raise RuntimeError(
            f"commcomp: the compiled extension {where} implements version {built} of the ternary "
            "codec's specification (csrc/ternary.h) but this Python package implements version "
            f"{reference.TERNARY_SPEC_VERSION}: the two would draw different bytes for the same "
            "(x, scale, seed, offset). Rebuild the extension with "
            "`pip install --no-build-isolation -e .` (or set COMMCOMP_FORCE_REFERENCE=1 to run "
            "on the pure-PyTorch kernels)"
        )


def _checked_reference(name: str):
    """The reference twin of op `name`, behind the argument checks the native kernels make."""
    check, fn = _checks.RAW_CHECKS[name], getattr(reference, name)

    def op(*args):
        check(*args)
        return fn(*args)

    op.__name__ = name
    return op


def _missing_ops() -> list:
    """Operators of :data:`SCHEMAS` an (older) compiled extension does not declare: they are
    declared here and served by their reference twins, with a warning to rebuild."""
    missing = []
    for name in SCHEMAS:
        try:
            getattr(torch.ops.commcomp, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    if missing:
        lib = torch.library.Library("commcomp", "FRAGMENT")
        for name in missing:
            lib.define(SCHEMAS[name])
        _libraries.append(lib)
        warnings.warn(
            f"commcomp: the compiled extension lacks the operator(s) {missing}, so their pure-PyTorch "
            "reference kernels are used (slower). Rebuild it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=4,
        )
    return missing


def load() -> Dict[str, str]:
    if BACKENDS:
        return BACKENDS
    native = _import_native()
    if native is None:
        lib = torch.library.Library("commcomp", "DEF")
        for schema in SCHEMAS.values():
            lib.define(schema)
        _libraries.append(lib)
        warnings.warn(
            "commcomp: the native extension is not built, so the pure-PyTorch reference "
            "kernels are used (same results, much slower). Build it with "
            "`pip install --no-build-isolation -e .` from the source tree. "
            f"(reason: {LOAD_ERROR})",
            RuntimeWarning,
            stacklevel=3,
        )
    BACKENDS["CPU"] = "native" if native is not None else "reference"
    BACKENDS["CUDA"] = "native" if native is not None and native.with_cuda else "reference"
    missing = _missing_ops() if native is not None else []
    MISSING.extend(missing)
    impl = torch.library.Library("commcomp", "IMPL")
    for key, kind in BACKENDS.items():
        for name in SCHEMAS:
            if kind == "reference" or name in missing:
                impl.impl(name, _checked_reference(name), key)
    _libraries.append(impl)
    logger.debug("commcomp kernels: %s", BACKENDS)
    return BACKENDS
