"""Start torch.distributed under whatever launched this process: torchrun, srun, mpirun, horovodrun.

    from commcomp.launch import init_from_env
    rank, world_size, local_rank, device = init_from_env()    # nccl with CUDA, else gloo

The same script then runs unchanged under every launcher (recipes in ``launch/``):

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
:func:`init_from_env` adds the look-ups with side effects (``scontrol``, mpi4py) and
``init_process_group``. Every error says what was found, what is missing and what to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
LAUNCHERS = ("torchrun", "env", "horovod", "openmpi", "mpich", "slurm", "none")
_NAMES = {"torchrun": "torchrun", "env": "RANK/WORLD_SIZE set by hand", "horovod": "horovodrun",
          "openmpi": "Open MPI mpirun", "mpich": "MPICH/Hydra mpiexec", "slurm": "srun", "none": "none"}


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
        return (f"{_NAMES.get(self.launcher, self.launcher)}: rank {self.rank} of {self.world_size} "
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
            logger.warning("commcomp.launch: scontrol show hostnames failed (%s); parsing %s instead", e, nodelist)
    return first_host(nodelist)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_library(MPI) -> str:
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
                          f"than the {what} that started this job ({_mpi_library(MPI)}). Use "
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


# -- process group
def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


# the variable each launcher's local rank is read from (see detect); named in errors
_LOCAL_VARS = {"torchrun": "LOCAL_RANK", "env": "LOCAL_RANK", "horovod": "HOROVOD_LOCAL_RANK",
               "openmpi": "OMPI_COMM_WORLD_LOCAL_RANK", "mpich": "MPI_LOCALRANKID", "slurm": "SLURM_LOCALID"}


_LOCAL_SIZES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "HOROVOD_LOCAL_SIZE",
                "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def _shared_node(env: Mapping[str, str]) -> Optional[str]:
    """``"NAME=value"`` of the first variable saying that several ranks run on this node, or None.
    (SLURM's per-node counts read like ``2(x4)`` or ``4,2``: any count above 1 counts.)"""
    for name in _LOCAL_SIZES:
        counts = [int(c) for c in re.findall(r"(\d+)(?:\(x\d+\))?", env.get(name, ""))]
        if any(c > 1 for c in counts):
            return f"{name}={env[name]}"
    return None


def _device(backend: str, local_rank: int, info: Optional[LaunchInfo] = None,
            env: Optional[Mapping[str, str]] = None) -> torch.device:
    if backend == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if info is not None and not info.local_rank_known and info.world_size > 1 and count > 1:
        var = _LOCAL_VARS.get(info.launcher, "LOCAL_RANK")
        shared = _shared_node(os.environ if env is None else env)
        if shared is not None:
            # several ranks share this node and nothing says which GPU is whose: cuda:0 for all
            # of them would crowd one GPU (or fail in NCCL), so ask instead of guessing
            raise LaunchError(f"commcomp: {_NAMES.get(info.launcher, info.launcher)} set no local rank for rank "
                              f"{info.rank} of {info.world_size}, several ranks share this node ({shared}) and it "
                              f"has {count} CUDA devices: every rank would use cuda:0. Export {var}=<this "
                              "process's index on its node> in each process, or give each process one GPU with "
                              "CUDA_VISIBLE_DEVICES")
        logger.warning("commcomp.launch: %s set no local rank (%s) and this node has %d CUDA devices: using cuda:0, "
                       "right for one rank per node; with several ranks per node export %s in each",
                       _NAMES.get(info.launcher, info.launcher), var, count, var)
    if count == 1 and local_rank > 0:  # one GPU per task (srun --gpus-per-task=1, per-rank CUDA_VISIBLE_DEVICES)
        logger.info("commcomp.launch: local rank %d sees one CUDA device: using cuda:0", local_rank)
        local_rank = 0
    if local_rank >= count:
        raise LaunchError(f"commcomp: local rank {local_rank} but this node has {count} CUDA device(s); start at "
                          f"most {count} processes per node (one per GPU) or set CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _url(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
    return f"tcp://{host}:{port}"


def _seconds(timeout) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"commcomp: timeout must be seconds > 0 or a timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def init_from_env(backend: Optional[str] = None, timeout: Union[float, datetime.timedelta] = DEFAULT_TIMEOUT_S,
                  env: Optional[Mapping[str, str]] = None) -> Tuple[int, int, int, torch.device]:
    """Initialize the default process group from the launcher's environment; returns
    ``(rank, world_size, local_rank, device)``.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ... (default: nccl when CUDA is available, else gloo).
        timeout: seconds (or a timedelta) the ranks wait for each other, at the rendezvous and
            in every later collective (torch's default is 10 minutes). A rank that never
            starts makes the others fail with a :class:`LaunchError` after this long.
        env: the environment to read (default ``os.environ``, into which RANK, WORLD_SIZE,
            LOCAL_RANK, MASTER_ADDR and MASTER_PORT are then also written where unset, for
            code that reads them).

    With CUDA and nccl, the device is ``cuda:<local rank>`` and becomes the current device.
    If the group is already initialized, it is reused.
    """
    td = _seconds(timeout)
    use_os = env is None
    env = os.environ if env is None else env
    backend = backend or default_backend()
    info = detect(env)
    if dist.is_initialized():
        logger.info("commcomp.launch: the process group is already initialized; reusing it")
        return dist.get_rank(), dist.get_world_size(), info.local_rank, _device(dist.get_backend(), info.local_rank)
    if info.launcher == "none":
        logger.warning("commcomp.launch: no launcher found (none of RANK/WORLD_SIZE, HOROVOD_RANK, "
                       "OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID is set): running as one process, world size 1. "
                       "Start several with torchrun, srun, mpirun or horovodrun (see launch/README.md)")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
        return 0, 1, 0, _device(backend, 0)
    if info.world_size == 1:  # one task of srun / mpirun -np 1 / RANK=0 WORLD_SIZE=1: nobody to meet
        logger.info("commcomp.launch: %s with world size 1: a local store, no rendezvous", info.launcher)
        device = _device(backend, info.local_rank)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=td)
        return 0, 1, info.local_rank, device
    info = resolve(info, env)
    device = _device(backend, info.local_rank, info, env)
    if use_os:
        for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                           ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", info.master_port)):
            if value is not None:
                os.environ.setdefault(key, str(value))
    logger.info("commcomp.launch: %s, backend %s, device %s", info.describe(), backend, device)
    try:
        if info.launcher == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _attempt_store(info, td)
            dist.init_process_group(backend, store=dist.PrefixStore("commcomp", store), rank=info.rank,
                                    world_size=info.world_size, timeout=td)
        elif info.launcher == "torchrun":
            dist.init_process_group(backend, init_method="env://", timeout=td)
        else:
            dist.init_process_group(backend, init_method=_url(info.master_addr, info.master_port), rank=info.rank,
                                    world_size=info.world_size, timeout=td)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise LaunchError(_rendezvous_failed(info, td, e)) from e
    return info.rank, info.world_size, info.local_rank, device


_ATTEMPT_KEY = "commcomp/launch/attempt_store"
_PROBE_S = 2.0
_servers = []  # this process's store servers: alive as long as the process


def _attempt_store(info: LaunchInfo, td: datetime.timedelta):
    """A TCP store of this torchrun attempt's own, hosted by rank 0.

    torchrun's agent shares its TCP store with the workers and keeps it across restarts, so
    the workers of a restarted attempt can read keys the previous attempt wrote -- gloo's or
    NCCL's addresses of dead processes -- and fail to connect (pytorch/pytorch#135712; the
    attempt counter cannot namespace them, as it differs between nodes). Rank 0 starts a fresh
    store on a free port and publishes "port nonce" in the agent's store; the other ranks
    retry until they reach a live store holding that nonce. A stale entry points at a store
    that died with its process (torchrun stops every worker before it restarts any).
    """
    agent = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=td)
    if info.rank == 0:
        server = dist.TCPStore(info.master_addr, 0, info.world_size, is_master=True, timeout=td,
                               wait_for_workers=False)
        nonce = uuid.uuid4().hex
        server.set("nonce", nonce)
        agent.set(_ATTEMPT_KEY, f"{server.port} {nonce}")
        _servers.append(server)
        return server
    deadline = time.monotonic() + td.total_seconds()
    while True:
        port, nonce = agent.get(_ATTEMPT_KEY).decode().split()
        try:
            # a plain connect first: a dead store is refused at once, without torch's retries and logs
            socket.create_connection((info.master_addr, int(port)), timeout=_PROBE_S).close()
            client = dist.TCPStore(info.master_addr, int(port), info.world_size, is_master=False,
                                   timeout=datetime.timedelta(seconds=_PROBE_S))
            if client.get("nonce").decode() == nonce:
                client.set_timeout(td)
                return client
        except (RuntimeError, OSError) as e:  # refused: the previous attempt's store, gone
            logger.debug("commcomp.launch: store at port %s not live yet (%s)", port, e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no live store of this attempt announced in torchrun's store at "
                               f"{info.master_addr}:{info.master_port} within {td.total_seconds():g} s")
        time.sleep(0.2)


def _rendezvous_failed(info: LaunchInfo, td: datetime.timedelta, e: BaseException) -> str:
    secs, where = f"{td.total_seconds():g} s", f"{info.master_addr}:{info.master_port}"
    text = f"{type(e).__name__}: {e}".lower()
    if not any(w in text for w in ("timeout", "timed out", "connect", "refused", "reset", "store", "socket")):
        return (f"commcomp: torch.distributed.init_process_group failed on rank {info.rank} of {info.world_size} "
                f"({_NAMES.get(info.launcher, info.launcher)}, rendezvous {where}): {type(e).__name__}: {e}. "
                "This is not a rendezvous timeout: check the backend (nccl needs CUDA; gloo works everywhere) "
                "and the torch installation")
    if info.rank == 0:
        what = (f"rank 0 of {info.world_size} waited {secs} at the rendezvous {where} for the other "
                f"{info.world_size - 1} rank(s)")
    else:
        what = f"rank {info.rank} of {info.world_size} could not join the rendezvous at {where} within {secs}"
    found = ", ".join(f"{k}={v}" for k, v in sorted(info.found.items())) or "nothing"
    said = str(e).strip().rstrip(".")
    launcher = _NAMES.get(info.launcher, info.launcher)
    return (f"commcomp: the process group did not form: {what} (launcher: {launcher}; found {found}). "
            f"torch said: {type(e).__name__}: {said}. Check that all {info.world_size} processes were started and "
            f"none died before this point; that {info.master_addr} is rank 0's host and the others reach it on port "
            f"{info.master_port} (firewall, interface; in containers a hostname may resolve to loopback); that "
            "nothing else holds that port there. Raise init_from_env(timeout=...) if some ranks start much later.")


__all__ = ["DEFAULT_TIMEOUT_S", "LAUNCHERS", "LaunchError", "LaunchInfo", "default_backend", "detect", "first_host",
           "init_from_env", "resolve"]
