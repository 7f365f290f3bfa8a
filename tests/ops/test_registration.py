"""The operator library: schemas, fake kernels (opcheck), and torch.compile."""


import pytest
import torch

import commcomp
from commcomp.ops._schemas import SCHEMAS
from tests.ops._fresh import run_on_reference


def test_every_schema_is_registered_as_declared():
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.commcomp, name).default
        assert str(op._schema) == "commcomp::" + schema


def test_backend_names():
    assert commcomp.ops.backend("cpu") in ("native", "reference")
    assert commcomp.ops.backend(torch.device("cuda")) in ("native", "reference")


def _cases(device):
    x = torch.randn(37, device=device)
    s = torch.ones(1, device=device) * 2
    seg_s = torch.ones(2, device=device)
    packed = torch.ops.commcomp.ternarize_pack(x, s, None, 1, 0)
    rows = torch.stack([packed, packed])
    return [
        (torch.ops.commcomp.ternarize_pack.default, (x, s, None, 1, 0)),
        (torch.ops.commcomp.ternarize_pack.default, (x.half(), seg_s, [30, 7], 1, 5)),
        (torch.ops.commcomp.ternarize_int8.default, (x.bfloat16(), s, None, 2, 8)),
        (torch.ops.commcomp.unpack.default, (packed, 37, s, None, torch.float16)),
        (torch.ops.commcomp.unpack_accumulate.default, (rows, torch.ones(2, device=device), None, x.clone())),
        (torch.ops.commcomp.segment_stats.default, (x, [30, 7])),
    ]


def test_opcheck(device):
    for op, args in _cases(device):
        torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile(device):
    def step(x, s, out):
        packed = commcomp.ops.ternarize_pack(x, s, seed=3, validate=False)
        commcomp.ops.unpack_accumulate(packed.reshape(1, -1), s, out, validate=False)
        return out

    x = torch.randn(50, device=device)
    s = x.abs().amax().reshape(1)
    eager = step(x, s, torch.zeros(50, device=device))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, s, torch.zeros(50, device=device)), eager)


@pytest.mark.cuda
def test_cuda_ops_run_on_current_stream():
    """Kernels launched under a side stream must queue behind that stream's work, not run on
    the default stream: with the side stream busy, the default stream stays idle."""
    x = torch.randn(1 << 20, device="cuda")
    s = x.abs().amax().reshape(1)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # keeps the side stream busy for a while
        packed = torch.ops.commcomp.ternarize_pack(x, s, None, 1, 0)
    assert torch.cuda.default_stream().query()
    assert not stream.query()
    stream.synchronize()
    assert torch.equal(packed.cpu(), torch.ops.commcomp.ternarize_pack(x.cpu(), s.cpu(), None, 1, 0))


FALLBACK = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import commcomp
    import commcomp.ops
runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "commcomp" in str(w.message)]
assert len(runtime) == 1, [str(w.message) for w in caught]
assert commcomp.ops.backend("cpu") == "reference"
x = torch.randn(10)
p = commcomp.ops.ternarize_pack(x, x.abs().max(), seed=1)
assert commcomp.ops.unpack(p, 10, x.abs().max()).shape == (10,)
try:
    torch.ops.commcomp.ternarize_pack(x, torch.ones(1), [9], 0, 0)
except ValueError as e:
    assert "segments sum to 9" in str(e)
else:
    raise AssertionError("raw reference op accepted bad segments")
print("ok")
"""


def test_reference_fallback_in_a_fresh_process():
    run_on_reference(FALLBACK)
