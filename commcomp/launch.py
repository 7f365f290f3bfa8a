"""Start torch.distributed under whatever launched this process: torchrun, srun, mpirun, horovodrun.

    from commcomp.launch import init_from_env
    rank, world_size, local_rank, device = init_from_env()    # nccl with CUDA, else gloo

The same script then runs unchanged under every launcher (recipes in ``launch/``).
:mod:`commcomp.launch_env` reads which launcher it was and where the ranks meet (its docstring
has the table of variables, per launcher); this module picks the device, starts the process
group, and turns a rendezvous that failed into a message that says what to check.
:func:`detect`, :func:`resolve`, :func:`first_host`, :class:`LaunchInfo` and
:class:`LaunchError` are importable from here as well.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
import uuid
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .launch_env import LAUNCHERS, LaunchError, LaunchInfo, detect, first_host, launcher_name, resolve

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0


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
            raise LaunchError(f"commcomp: {launcher_name(info.launcher)} set no local rank for rank "
                              f"{info.rank} of {info.world_size}, several ranks share this node ({shared}) and it "
                              f"has {count} CUDA devices: every rank would use cuda:0. Export {var}=<this "
                              "process's index on its node> in each process, or give each process one GPU with "
                              "CUDA_VISIBLE_DEVICES")
        logger.warning("commcomp.launch: %s set no local rank (%s) and this node has %d CUDA devices: using cuda:0, "
                       "right for one rank per node; with several ranks per node export %s in each",
                       launcher_name(info.launcher), var, count, var)
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
                f"({launcher_name(info.launcher)}, rendezvous {where}): {type(e).__name__}: {e}. "
                "This is not a rendezvous timeout: check the backend (nccl needs CUDA; gloo works everywhere) "
                "and the torch installation")
    if info.rank == 0:
        what = (f"rank 0 of {info.world_size} waited {secs} at the rendezvous {where} for the other "
                f"{info.world_size - 1} rank(s)")
    else:
        what = f"rank {info.rank} of {info.world_size} could not join the rendezvous at {where} within {secs}"
    found = ", ".join(f"{k}={v}" for k, v in sorted(info.found.items())) or "nothing"
    said = str(e).strip().rstrip(".")
    launcher = launcher_name(info.launcher)
    return (f"commcomp: the process group did not form: {what} (launcher: {launcher}; found {found}). "
            f"torch said: {type(e).__name__}: {said}. Check that all {info.world_size} processes were started and "
            f"none died before this point; that {info.master_addr} is rank 0's host and the others reach it on port "
            f"{info.master_port} (firewall, interface; in containers a hostname may resolve to loopback); that "
            "nothing else holds that port there. Raise init_from_env(timeout=...) if some ranks start much later.")


__all__ = ["DEFAULT_TIMEOUT_S", "LAUNCHERS", "LaunchError", "LaunchInfo", "default_backend", "detect", "first_host",
           "init_from_env", "launcher_name", "resolve"]
