"""``commcomp info``: what this installation can use (versions, backends, native kernels,
accelerators, MPI, Horovod, and the hooks, topologies and compressors it offers)."""

from __future__ import annotations

import json

from ._common import add_topic

_INFO_DESCRIPTION = ("What this installation of commcomp can use: torch and Python versions, which "
                     "torch.distributed backends are built in, whether the native kernels serve CPU "
                     "and CUDA tensors (else the pure-PyTorch reference runs), CUDA devices, NCCL, "
                     "mpi4py's MPI library, Horovod, and the hooks, topologies and compressors.")


def _info() -> dict:
    """What this installation has: versions, backends, native kernels, accelerators, launchers."""
    import importlib.util
    import platform

    import torch
    import torch.distributed as dist

    import commcomp
    from commcomp import ops
    from commcomp.decentralized import TOPOLOGIES
    from commcomp.hooks import HOOKS

    def has(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    info = {
        "commcomp": commcomp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "distributed": dist.is_available(),
        "backends": {name: bool(getattr(dist, f"is_{name}_available", lambda: False)())
                     for name in ("gloo", "nccl", "mpi", "ucc")},
        "native_kernels": {"cpu": ops.backend("cpu"),
                           "cuda": ops.backend("cuda") if torch.cuda.is_available() else "no CUDA device"},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "nccl": None,
        "mpi4py": None,
        "horovod": None,
        "hooks": sorted(HOOKS),
        "topologies": list(TOPOLOGIES),
        "compressors": ["identity", "ternary", "topk", "randomk"],
    }
    if torch.cuda.is_available() and info["backends"]["nccl"]:
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info["nccl"] = f"unavailable ({exc})"
    if has("mpi4py"):
        try:
            from mpi4py import MPI

            from commcomp.launch_env import mpi_library

            info["mpi4py"] = mpi_library(MPI)
        except Exception as exc:  # noqa: BLE001 - e.g. no MPI library behind the wheel
            info["mpi4py"] = f"installed, but MPI failed to load ({exc})"
    if has("horovod"):
        try:
            import horovod

            info["horovod"] = horovod.__version__
        except Exception as exc:  # noqa: BLE001
            info["horovod"] = f"installed, but failed to import ({exc})"
    return info


def _cmd_info(a) -> int:
    info = _info()
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:>{width}}  {'-' if value is None else value}")
    return 0


def add_info(sub) -> None:
    p = add_topic(sub, "info", _cmd_info, help="versions, distributed backends, native kernels, CUDA/NCCL/MPI/Horovod",
                  description=_INFO_DESCRIPTION)
    p.add_argument("--json", action="store_true", help="print one JSON object")
