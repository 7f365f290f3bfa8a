"""launch/slurm.sbatch under a real SLURM.

launch/slurm_local_cluster.sh brings up a two-node cluster on this machine (munged and slurmctld
on the host; ccnode1 and ccnode2, a slurmd each in a network namespace of its own behind a
bridge, with their own hostnames). The recipe is submitted unmodified, sized for the CPU on the
sbatch command line (``--gpus-per-node=0 --ntasks-per-node=N --cpus-per-task=1``), with two
hooks: terngrad with 2 ranks on each node, gradient tracking with 1. Each job must complete
across both nodes: the recipe's line names both nodes and the rendezvous on the first, rank 0
prints its epoch line and writes its run with every rank counted, every rank saves a checkpoint
at the last step, and the replicas in them agree (bitwise under DDP; close but each its own
under gradient tracking, which is decentralized).

Needs root and Debian's SLURM (``apt-get install -y --no-install-recommends slurmctld slurmd
slurm-client munge``); skips with the reason otherwise, or fails under COMMCOMP_REQUIRE_SLURM=1
(CI, after installing it). A cluster that was already up is used and left up; one the test
brought up is torn down whatever happens.
"""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from commcomp import checkpoint
from commcomp.testing import netns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "launch", "slurm_local_cluster.sh")
RECIPE = "launch/slurm.sbatch"  # relative: sbatch runs from the repository root, as the recipe asks
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
TOOLS = ("sbatch", "scontrol", "scancel", "sinfo", "srun", "slurmctld", "slurmd", "munged", "nsenter", "unshare")
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
NODES = "ccnode[1-2]"
STEPS = 3
# (hook, tasks on each of the 2 nodes, extra arguments of train_ddp.py); 1 CPU per task
JOBS = (("terngrad", 2, ()), ("gradient_tracking", 1, ("--opt", "compressor=ternary")))
TIMEOUT = 240.0  # both jobs: 20-50 s on 2 busy cores, most of it the ranks importing torch and reading MNIST
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}
# launcher variables of the process running pytest must not reach the job (sbatch exports the environment)
FOREIGN = re.compile(r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|OMPI_|PMI_|PMIX_|HOROVOD_|TORCHELASTIC_|COMMCOMP_EXAMPLE_)"
                     r"|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT)$")


def unavailable_reason():
    """Why this machine cannot run a local SLURM cluster, or None."""
    if not sys.platform.startswith("linux"):
        return f"a local SLURM cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (daemons, network namespaces, a bridge)"
    missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found): {INSTALL}"
    reason = netns.unavailable_reason()
    if reason is not None:
        return f"cannot give the nodes network namespaces: {reason}"
    return None


def cluster(command, timeout=120.0):
    return subprocess.run(["bash", CLUSTER, command], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PATH=PATH), check=False)


def skip_unless_slurm():
    """Skip without root or SLURM; fail instead under COMMCOMP_REQUIRE_SLURM=1 (CI after the install)."""
    reason = unavailable_reason()
    if reason is not None:
        missing = pytest.fail if os.environ.get("COMMCOMP_REQUIRE_SLURM") == "1" else pytest.skip
        missing(reason)


@pytest.fixture
def slurm_conf():
    skip_unless_slurm()
    was_up = cluster("status", timeout=60).returncode == 0
    try:
        t0 = time.monotonic()
        up = cluster("up")
        print(f"slurm_local_cluster.sh up: {time.monotonic() - t0:.1f} s", flush=True)
        assert up.returncode == 0, f"slurm_local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
        assert conf, up.stdout
        yield conf.group(1)
    finally:
        if not was_up:
            down = cluster("down")
            assert down.returncode == 0, f"slurm_local_cluster.sh down failed:\n{down.stdout}\n{down.stderr}"


def job_env(conf):
    env = {k: v for k, v in os.environ.items() if not FOREIGN.match(k)}
    return dict(env, SLURM_CONF=conf, PATH=PATH, PYTHON=sys.executable)


def job_info(env, job):
    """scontrol's fields of the job; {} when scontrol did not answer (a busy slurmctld)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, env=env,
                             timeout=30, check=False).stdout
    except subprocess.TimeoutExpired:
        return {}
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def daemon_logs(conf, lines=25):
    text = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(conf), "log", "*.log"))):
        with open(path, errors="replace") as f:
            text.append(f"--- {os.path.basename(path)}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(text)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return f"({path} was not written)"


def wait_for(env, jobs, timeout):
    """Poll until every job has ended; past the deadline scancel the rest and say so."""
    deadline = time.monotonic() + timeout
    while True:
        states = {job: job_info(env, job).get("JobState", "?") for job in jobs}
        if not (ACTIVE | {"?"}).intersection(states.values()):  # "?": no answer yet, ask again
            return states
        if time.monotonic() > deadline:
            late = [job for job, state in states.items() if state in ACTIVE or state == "?"]
            subprocess.run(["scancel", *map(str, late)], env=env, timeout=30, check=False)
            end = time.monotonic() + 15
            while time.monotonic() < end and any(job_info(env, j).get("JobState") in ACTIVE for j in late):
                time.sleep(0.5)
            states.update({job: f"TIMEOUT after {timeout:g} s ({states[job]}, cancelled)" for job in late})
            return states
        time.sleep(0.5)


@pytest.mark.slow
def test_the_sbatch_recipe_across_two_nodes(slurm_conf, tmp_path):
    env = job_env(slurm_conf)
    jobs = {}
    t0 = time.monotonic()
    for hook, per_node, extra in JOBS:
        out = tmp_path / hook
        out.mkdir()  # SLURM does not create the --output directory
        argv = ["sbatch", "--parsable", "--gpus-per-node=0", f"--ntasks-per-node={per_node}",
                "--cpus-per-task=1", "--time=00:05:00", f"--output={out}/slurm-%j.out", RECIPE,
                "--hook", hook, *extra, "--steps", str(STEPS), "--no-progress", "--out", str(out / "runs"),
                "--checkpoint-dir", str(out / "ckpt"), "--checkpoint-every", str(STEPS)]
        # a rendezvous left in the submitting shell (192.0.2.1: TEST-NET, unreachable) must not reach the job
        stale = dict(env, MASTER_ADDR="192.0.2.1", MASTER_PORT="9") if hook == "terngrad" else env
        sub = subprocess.run(argv, cwd=ROOT, env=stale, capture_output=True, text=True, timeout=60, check=False)
        assert sub.returncode == 0, f"{' '.join(argv)}: {sub.stdout}{sub.stderr}\n{daemon_logs(slurm_conf)}"
        jobs[int(sub.stdout.strip().split(";")[0])] = (hook, 2 * per_node, out)
    states = wait_for(env, list(jobs), TIMEOUT)
    print(f"{len(jobs)} jobs in {time.monotonic() - t0:.1f} s: {states}", flush=True)

    for job, (hook, world, out) in jobs.items():
        info = job_info(env, job)
        log = read(out / f"slurm-{job}.out")
        where = f"\n--- job {job} ({hook}): {states[job]}, exit {info.get('ExitCode')}\n{log[-6000:]}"
        assert states[job] == "COMPLETED" and info.get("ExitCode") == "0:0", where + "\n" + daemon_logs(slurm_conf)
        # the job spans both nodes and meets on the first, at the port derived from its id
        assert info.get("NodeList") == NODES and info.get("NumNodes") == "2", f"{info}{where}"
        port = 15000 + job % 20000
        assert f"commcomp: {world} tasks on {NODES}, rendezvous at ccnode1:{port}" in log, where
        assert re.search(rf"^{hook}\s+epoch 1: test accuracy", log, re.MULTILINE), where
        if hook == "terngrad":
            assert "ignoring MASTER_ADDR=192.0.2.1 from the submitting shell" in log, where
        with open(out / "runs" / f"{hook}-seed0.json") as f:
            run = json.load(f)
        assert run["world"] == world and len(run["losses"]) == STEPS, f"{run}{where}"
        assert all(math.isfinite(x) for x in run["losses"]), f"{run['losses']}{where}"
        # every rank reached the last step and saved it
        paths = [out / "ckpt" / f"rank{r:05d}-step{STEPS:09d}.pt" for r in range(world)]
        assert all(p.exists() for p in paths), f"{sorted(os.listdir(out / 'ckpt'))}{where}"
        models = [checkpoint.read(str(p))["model"] for p in paths]
        gaps = [max((m[k] - models[0][k]).abs().max().item() for k in m) for m in models[1:]]
        if hook == "gradient_tracking":  # decentralized: each rank its own replica, near consensus
            assert all(0 < g < 0.05 for g in gaps), f"replica gaps to rank 0: {gaps}{where}"
        else:  # DDP: one model, bit for bit
            assert gaps == [0.0] * (world - 1), f"replica gaps to rank 0: {gaps}{where}"


# -- without a cluster: the skip reasons and the script's usage

def test_skips_without_root(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in unavailable_reason()


def test_skips_without_slurm_and_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None if name in ("sbatch", "slurmd") else "/x")
    reason = unavailable_reason()
    assert "sbatch, slurmd not found" in reason and INSTALL in reason


def test_the_cluster_script_says_how_to_use_it():
    proc = subprocess.run(["bash", CLUSTER], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr and "up|down|status" in proc.stderr


def test_required_slurm_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("COMMCOMP_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        skip_unless_slurm()
    monkeypatch.setenv("COMMCOMP_REQUIRE_SLURM", "0")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        skip_unless_slurm()
