"""Property tests of the codec over random lengths, dtypes, segments, seeds and offsets."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import commcomp
from commcomp import ops
from commcomp.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    n = draw(st.integers(0, 300))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0, *cuts, n]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    values = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    scale_mult = draw(st.sampled_from([0.25, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**63 - 1))
    offset = draw(st.integers(0, 2**50))
    return x, lengths, scale_mult, seed, offset


def _scales(x, lengths, mult):
    absmax, _ = ops.segment_stats(x, lengths)
    return torch.where(absmax > 0, absmax * mult, torch.ones_like(absmax))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_codec_properties(problem):
    x, lengths, mult, seed, offset = problem
    n = x.numel()
    s = _scales(x, lengths, mult)
    packed = ops.ternarize_pack(x, s, seed, offset, segments=lengths)
    codes = ops.ternarize_int8(x, s, seed, offset, segments=lengths)
    # Every backend agrees with the reference, bit for bit.
    assert torch.equal(packed, reference.ternarize_pack(x, s, lengths, seed, offset))
    # Packing is lossless for the codes, and trailing fields are zero.
    assert torch.equal(reference.unpack_codes(packed, n), codes)
    if n % 4:
        assert int(packed[-1]) >> (2 * (n % 4)) == 0
    # Codes are 0 or sign(x); values at or beyond their scale always keep their sign.
    xf = x.float()
    s_el = reference.per_element(s, lengths, n)
    assert bool(((codes == 0) | (codes.float() == torch.sign(xf))).all())
    beyond = xf.abs() >= s_el
    assert torch.equal(codes[beyond].float(), torch.sign(xf[beyond]))
    assert bool((codes[xf == 0] == 0).all())
    # Decoding gives scale * code in the requested dtype.
    y = ops.unpack(packed, n, s, x.dtype, segments=lengths)
    assert torch.equal(y, (codes.float() * s_el).to(x.dtype))


@pytest.fixture
def native_cpu():
    if commcomp.ops.backend("cpu") != "native":
        if os.environ.get("COMMCOMP_REQUIRE_NATIVE") == "1":
            pytest.fail("native kernels required but not loaded")
        pytest.skip("native kernels not built")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), world=st.integers(0, 6))
def test_accumulate_matches_reference(native_cpu, problem, world):
    x, lengths, mult, seed, offset = problem
    n = x.numel()
    s = _scales(x, lengths, mult)
    nbytes = (n + 3) // 4
    packed = torch.stack([ops.ternarize_pack(x, s, (seed + w) % 2**63, offset, segments=lengths)
                          for w in range(world)]) if world else torch.empty(0, nbytes, dtype=torch.uint8)
    scales = torch.stack([s * (w + 1) for w in range(world)]).reshape(-1) if world else torch.empty(0)
    out_native, out_ref = x.clone(), x.clone()
    torch.ops.commcomp.unpack_accumulate(packed, scales, lengths, out_native)
    reference.unpack_accumulate(packed, scales, lengths, out_ref)
    assert torch.equal(out_native, out_ref)
