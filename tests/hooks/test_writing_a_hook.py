"""docs/writing_a_hook.md writes a fifth hook with the contract alone; this runs that very code
on two ranks: the average is right, the bytes are counted, options are checked across ranks
and checkpoints round-trip."""

import pathlib
import re

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from tests._dist import spawn
from tests.hooks._models import local_grads, make_model, true_mean

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "writing_a_hook.md"


def hook_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return blocks[0]  # the complete hook


def run_doc_hook(rank, world):
    namespace = {"__name__": "writing_a_hook"}
    exec(compile(hook_code(), str(DOC), "exec"), namespace)
    model = DDP(make_model(), bucket_cap_mb=0.001)
    state = commcomp.register(model, "half", dtype="bfloat16")
    grads = local_grads(model, rank)
    mean, _ = true_mean(world)
    for g, m in zip(grads, mean):
        torch.testing.assert_close(g, m, rtol=2e-2, atol=2e-3)  # bfloat16 on the wire
    assert state.step == 1 and state.compression_ratio() == pytest.approx(2.0, rel=0.01)
    saved = state.state_dict()
    fresh = namespace["HalfState"](dtype="bfloat16")
    fresh.load_state_dict(saved)
    assert fresh.step == 1 and dict(fresh.metrics) == dict(state.metrics)
    with pytest.raises(ValueError, match="checkpoint options differ"):
        namespace["HalfState"](dtype="float16").load_state_dict(saved)
    with pytest.raises(ValueError, match=r"dtype must be one of \('float16', 'bfloat16'\), got 'fp8'"):
        namespace["HalfState"](dtype="fp8")
    other = DDP(make_model(), bucket_cap_mb=0.001)
    with pytest.raises(RuntimeError, match=r"ranks disagree on the options \['dtype'\]"):
        commcomp.register(other, "half", dtype="bfloat16" if rank == 0 else "float16")
    state.close()


def test_the_documented_hook_works(tmp_path):
    spawn(run_doc_hook, 2, tmp_path)
