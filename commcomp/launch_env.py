"""Which launcher started this process (torchrun, srun, mpirun, horovodrun), read from its
environment, and where its ranks meet.

    from commcomp.launch_env import detect
    print(detect().describe())    # e.g. "srun: rank 3 of 8 (local rank 1), rendezvous at gpu-07:29500"

:mod:`commcomp.launch` starts the process group from what this module finds, so the same script
runs unchanged under every launcher (recipes in ``launch/``):

================  =============================================  ==========================================
launcher          rank / world size / local rank from            rendezvous (MASTER_ADDR, MASTER_PORT)
================  =============================================  ==========================================
torchrun          RANK, WORLD_SIZE, LOCAL_RANK                   set by torchrun (``env://``)
srun (SLURM)      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID      env; else the first host of
                                                                 SLURM_JOB_NODELIST (``scontrol show
                                                                 hostnames``) and port 15000 + job id % 20000
mpirun (Open MPI) OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK       env; else rank 0's hostname and a free
mpiexec (MPICH,   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID            port, broadcast with mpi4py (if installed)
Intel MPI)
horovodrun        HOROVOD_RANK, HOROVOD_SIZE, HOROVOD_LOCAL_RANK env; else HOROVOD_GLOO_RENDEZVOUS_ADDR and
                                                                 HOROVOD_GLOO_RENDEZVOUS_PORT + 1
nothing           world size 1 (logged)                          none needed (an in-memory store)
================  =============================================  ==========================================

The checks go in that order (horovodrun and mpirun before SLURM: an ``mpirun`` inside an
``sbatch`` script inherits the batch step's ``SLURM_PROCID=0`` on every rank).

Notes on the rendezvous. Rank 0 hosts a TCP store at MASTER_ADDR:MASTER_PORT and every other
rank connects to it, so MASTER_ADDR must be rank 0's host, reachable from every node, and the
port free there. In an ``sbatch`` script, set both explicitly (``launch/slurm.sbatch``)::

    export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export MASTER_PORT=29500

Under horovodrun the default is right when rank 0 runs on the host that ran ``horovodrun``
(its first ``-H`` host is the local one, as in ``horovodrun -np 4 -H localhost:4``); otherwise
export MASTER_ADDR and MASTER_PORT. The port mpi4py's rank 0 picks is free when picked and
bound a moment later, a small race that an explicit MASTER_PORT avoids.

:func:`detect` reads an environment and nothing else (it is what the tests exercise);
:func:`resolve` adds the look-ups with side effects (``scontrol``, mpi4py) and
:func:`commcomp.launch.init_from_env` the ``init_process_group``. Every error says what was
found, what is missing and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
from typing import Dict, Mapping, Optional, Tuple

logger = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "env", "horovod", "openmpi", "mpich", "slurm", "none")
_NAMES = {"torchrun": "torchrun", "env": "RANK/WORLD_SIZE set by hand", "horovod": "horovodrun",
          "openmpi": "Open MPI mpirun", "mpich": "MPICH/Hydra mpiexec", "slurm": "srun", "none": "none"}


def launcher_name(launcher: str) -> str:
    """The launcher as a person calls it (``"openmpi"`` -> ``"Open MPI mpirun"``), for messages."""
    return _NAMES.get(launcher, launcher)


class LaunchError(RuntimeError):
    """The environment does not describe a consistent distributed job, or the ranks did not meet."""


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """What the environment says about this process.

    ``launcher`` is one of :data:`LAUNCHERS` (``"env"``: RANK / WORLD_SIZE set by hand, not
    by torchrun). ``master_addr`` / ``master_port`` are None when the environment does not give
    them and :func:`init_from_env` must find them (``scontrol``, mpi4py). ``found`` holds the
    variables that were read, for messages.
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    found: Dict[str, str] = dataclasses.field(default_factory=dict)
    local_rank_known: bool = True  # False: the launcher set no local-rank variable (0 was assumed)

    def describe(self) -> str:
        where = f"{self.master_addr or '?'}:{self.master_port or '?'}"
        return (f"{launcher_name(self.launcher)}: rank {self.rank} of {self.world_size} "
                f"(local rank {self.local_rank}), rendezvous at {where}")


# -- parsing (pure)
def _int(env: Mapping[str, str], name: str, low: int = 0) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchError(f"commcomp: {name}={raw!r} is not an integer; the launcher sets it to a number: "
                          "unset it if you exported it by hand") from None
    if value < low:
        raise LaunchError(f"commcomp: {name}={value} must be >= {low}")
    return value


def _port(env: Mapping[str, str], name: str = "MASTER_PORT") -> Optional[int]:
    if not env.get(name):
        return None
    port = _int(env, name, low=1)
    if port > 65535:
        raise LaunchError(f"commcomp: {name}={port} is not a TCP port (1..65535); pick a free port such as 29500")
    return port


def _triple(env: Mapping[str, str], launcher: str, rank: str, size: str, local: Optional[str],
            tool: Optional[str] = None) -> LaunchInfo:
    """rank / world size / local rank from three variables, checked (``tool``: for messages)."""
    if size not in env:
        raise LaunchError(f"commcomp: {rank}={env[rank]!r} is set but {size} is not; {tool or launcher} sets both. "
                          f"Export {size} (the number of processes) or unset {rank}")
    r, n = _int(env, rank), _int(env, size, low=1)
    if r >= n:
        raise LaunchError(f"commcomp: {rank}={r} is not below {size}={n}; ranks run 0..{n - 1}")
    known = bool(local) and local in env
    lr = _int(env, local) if known else 0
    found = {k: env[k] for k in (rank, size, local, "MASTER_ADDR", "MASTER_PORT") if k and k in env}
    return LaunchInfo(launcher, r, n, lr, env.get("MASTER_ADDR") or None, _port(env), found, known)


def _horovod(env: Mapping[str, str]) -> LaunchInfo:
    info = _triple(env, "horovod", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "horovodrun")
    addr, port = info.master_addr, info.master_port
    found = dict(info.found)
    if addr is None and env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):
        addr = env["HOROVOD_GLOO_RENDEZVOUS_ADDR"]
        found["HOROVOD_GLOO_RENDEZVOUS_ADDR"] = addr
    if port is None and env.get("HOROVOD_GLOO_RENDEZVOUS_PORT"):
        rdzv = _port(env, "HOROVOD_GLOO_RENDEZVOUS_PORT")
        found["HOROVOD_GLOO_RENDEZVOUS_PORT"] = str(rdzv)
        port = rdzv + 1 if rdzv < 65535 else 1024  # horovod's own HTTP rendezvous holds rdzv itself
    return dataclasses.replace(info, master_addr=addr, master_port=port, found=found)


def _slurm(env: Mapping[str, str]) -> LaunchInfo:
    size = "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_STEP_NUM_TASKS"
    info = _triple(env, "slurm", "SLURM_PROCID", size, "SLURM_LOCALID", "srun")
    port, found = info.master_port, dict(info.found)
    if port is None:  # every task of the job derives the same port, and jobs sharing a node differ
        job = env.get("SLURM_JOB_ID", "")
        port = 15000 + int(job) % 20000 if job.isdigit() else 29500
        found["SLURM_JOB_ID"] = job
    if env.get("SLURM_JOB_NODELIST"):
        found["SLURM_JOB_NODELIST"] = env["SLURM_JOB_NODELIST"]
    return dataclasses.replace(info, master_port=port, found=found)


def detect(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Which launcher started this process, and this process's place in the job.

    Reads only ``env`` (default ``os.environ``). The rendezvous address may come back as
    None (SLURM without MASTER_ADDR: the first node of the job; MPI without it: mpi4py);
    :func:`init_from_env` resolves it.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env:
            raise LaunchError(f"commcomp: WORLD_SIZE={env['WORLD_SIZE']!r} is set but RANK is not; torchrun sets "
                              "both. Launch with torchrun, or export RANK (0..WORLD_SIZE-1) in each process")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return _triple(env, launcher, "RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "HOROVOD_RANK" in env:
        return _horovod(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _triple(env, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                       "Open MPI's mpirun")
    if "PMI_RANK" in env:
        # MPICH's mpiexec sets MPI_LOCALRANKID; Cray's and Flux's srun set PMI_LOCAL_RANK, or only SLURM_LOCALID
        local = next((k for k in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID") if k in env), None)
        info = _triple(env, "mpich", "PMI_RANK", "PMI_SIZE", local, "mpiexec")
        if info.master_port is None and env.get("SLURM_JOB_NODELIST"):  # an srun with PMI: SLURM's rendezvous
            slurm = _slurm(dict(env, SLURM_PROCID=str(info.rank), SLURM_NTASKS=str(info.world_size)))
            return dataclasses.replace(slurm, launcher="slurm", local_rank=info.local_rank,
                                       local_rank_known=info.local_rank_known, found=dict(info.found, **slurm.found))
        return info
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return _slurm(env)
    return LaunchInfo("none", 0, 1, 0, found={})


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, e.g. ``"gpu-[07-09,12],cpu1"`` -> ``"gpu-07"``
    (what ``scontrol show hostnames`` prints first; used when scontrol is not on PATH)."""
    text = nodelist.strip()
    if not text:
        raise LaunchError("commcomp: SLURM_JOB_NODELIST is empty; export MASTER_ADDR=<first node of the job>")
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first comma outside brackets ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = text[:end]
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", entry)
    if not m:
        return entry
    prefix, ranges, rest = m.groups()
    first = ranges.split(",")[0]
    r = _RANGE.match(first)
    if not r or "[" in rest:
        raise LaunchError(f"commcomp: cannot read the node list {nodelist!r}; export MASTER_ADDR=<first node of "
                          "the job> (scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)")
    return prefix + r.group(1) + rest


# -- resolving the rendezvous (side effects: scontrol, mpi4py)
def _slurm_master(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("commcomp: MASTER_ADDR is not set and SLURM_JOB_NODELIST is empty; in the sbatch script "
                          "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)")
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("commcomp.launch_env: scontrol show hostnames failed (%s); parsing %s instead", e, nodelist)
    return first_host(nodelist)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_library(MPI) -> str:
    """The first line of the MPI library's version (Open MPI's ends in a NUL byte: dropped)."""
    return MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]


def _mpi_master(info: LaunchInfo) -> Tuple[str, int]:
    """Rank 0's hostname and a free port on it, broadcast with mpi4py."""
    what = "mpirun" if info.launcher == "openmpi" else "mpiexec"
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(f"commcomp: MASTER_ADDR is not set; under {what} export MASTER_ADDR=<host of rank 0> and "
                          "MASTER_PORT=<free port> (e.g. mpirun -x MASTER_ADDR -x MASTER_PORT for Open MPI), or "
                          "install mpi4py (pip install mpi4py) so that rank 0 can broadcast them") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise LaunchError(f"commcomp: mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the environment says "
                          f"rank {info.rank} of {info.world_size} ({info.launcher}): mpi4py was built for another MPI "
                          f"than the {what} that started this job ({mpi_library(MPI)}). Use "
                          "that MPI's mpiexec, or export MASTER_ADDR and MASTER_PORT")
    mine = (os.environ.get("MASTER_ADDR") or socket.gethostname(), _free_port()) if info.rank == 0 else None
    addr, port = comm.bcast(mine, root=0)
    return addr, int(port)


def resolve(info: LaunchInfo, env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """``info`` with ``master_addr`` / ``master_port`` filled in (scontrol, mpi4py) where the
    environment left them out; raises :class:`LaunchError` saying what to set otherwise."""
    env = os.environ if env is None else env
    if info.world_size == 1 or info.launcher in ("torchrun", "env"):
        if info.world_size > 1 and (info.master_addr is None or info.master_port is None):
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
            raise LaunchError(f"commcomp: RANK={info.rank} and WORLD_SIZE={info.world_size} are set but {missing} "
                              "not; torchrun sets all of them. Launch with torchrun, or export MASTER_ADDR=<host of "
                              "rank 0> and MASTER_PORT=<free port> in every process")
        return info
    addr, port = info.master_addr, info.master_port
    if info.launcher == "slurm" and addr is None:
        addr = _slurm_master(env)
    elif info.launcher in ("openmpi", "mpich") and (addr is None or port is None):
        if addr is None:
            addr, mpi_port = _mpi_master(info)
            port = port or mpi_port  # an exported MASTER_PORT wins
        if port is None:
            raise LaunchError(f"commcomp: MASTER_ADDR={addr} is set but MASTER_PORT is not; export MASTER_PORT=<a "
                              "free port on rank 0's host, e.g. 29500> for every rank")
    elif info.launcher == "horovod" and (addr is None or port is None):
        raise LaunchError("commcomp: under horovodrun, MASTER_ADDR/MASTER_PORT are not set and no "
                          "HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT was found (horovodrun --mpi sets none); export "
                          "MASTER_ADDR=<host of rank 0> and MASTER_PORT=<free port> (horovodrun passes the "
                          "environment on), or run with horovodrun --gloo")
    return dataclasses.replace(info, master_addr=addr, master_port=port)


__all__ = ["LAUNCHERS", "LaunchError", "LaunchInfo", "detect", "first_host", "launcher_name", "mpi_library",
           "resolve"]
