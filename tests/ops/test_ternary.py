"""The ternary codec: bit-exact agreement of every backend with the reference, round trips,
the segment and offset semantics, and unbiasedness."""

import math
import os
import subprocess
import sys
import types

import pytest
import torch

import commcomp
from commcomp import ops
from tests.ops._spec import philox_words

LENGTHS = [0, 1, 3, 4, 5, 4097, 10**6 + 3]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) * 3
    return x.to(dtype).to(device)


def absmax(x):
    return x.float().abs().amax().reshape(1) if x.numel() else torch.ones(1, device=x.device)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_pack_matches_reference_bit_exactly(native, ref, device, n, dtype):
    x = make(n, dtype, device, seed=n)
    s = absmax(x) * 0.7  # clips the tail too
    for seed, offset in [(0, 0), (2**40 + 3, 6), (7, 2**35 + 1)]:
        want = ref.ternarize_pack(x, s, None, seed, offset)
        got = native.ternarize_pack(x, s, None, seed, offset)
        assert got.dtype == torch.uint8 and got.numel() == (n + 3) // 4
        assert torch.equal(got, want)
        assert torch.equal(native.ternarize_int8(x, s, None, seed, offset),
                           ref.ternarize_int8(x, s, None, seed, offset))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_decodes_the_int8_codes(device, n, dtype):
    x = make(n, dtype, device, seed=1)
    s = absmax(x)
    packed = ops.ternarize_pack(x, s, seed=11, offset=4)
    codes = ops.ternarize_int8(x, s, seed=11, offset=4)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(ops.reference.unpack_codes(packed, n), codes)
    y = ops.unpack(packed, n, s, dtype)
    assert y.dtype == dtype
    assert torch.equal(y, (codes.float() * s).to(dtype))
    # Every code is 0 or the sign of its value.
    xf = x.float()
    assert bool(((codes == 0) | (codes.float() == torch.sign(xf))).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_unpack_and_accumulate_match_reference(native, ref, device, dtype):
    n, world = 4097, 5
    lengths = [1000, 0, 7, 3090]
    xs = [make(n, torch.float32, device, seed=w) for w in range(world)]
    scales = torch.stack([ops.segment_stats(x, lengths)[0] for x in xs])  # [W, S]
    packed = torch.stack([ops.ternarize_pack(x, s, seed=w, segments=lengths)
                          for w, (x, s) in enumerate(zip(xs, scales))])
    assert torch.equal(native.unpack(packed[2], n, scales[2], lengths, dtype),
                       ref.unpack(packed[2], n, scales[2], lengths, dtype))
    base = make(n, dtype, device, seed=99)
    out_native, out_ref = base.clone(), base.clone()
    native.unpack_accumulate(packed, scales.reshape(-1), lengths, out_native)
    ref.unpack_accumulate(packed, scales.reshape(-1), lengths, out_ref)
    assert torch.equal(out_native, out_ref)


def test_unpack_accumulate_sums_the_decoded_payloads(device):
    n, world = 1001, 4
    xs = [make(n, torch.float32, device, seed=10 + w) for w in range(world)]
    scales = torch.cat([absmax(x) for x in xs])
    packed = torch.stack([ops.ternarize_pack(x, s, seed=w) for w, (x, s) in enumerate(zip(xs, scales))])
    out = torch.full((n,), 0.5, device=device)
    ops.unpack_accumulate(packed, scales, out)
    want = 0.5 + sum(ops.unpack(p, n, s) for p, s in zip(packed, scales))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_segments_with_equal_scales_match_one_segment(device):
    x = make(5000, torch.float32, device)
    s = absmax(x)
    lengths = [1, 2, 3, 0, 994, 4000]
    one = ops.ternarize_pack(x, s, seed=5)
    many = ops.ternarize_pack(x, s.expand(len(lengths)).contiguous(), seed=5, segments=lengths)
    assert torch.equal(one, many)


def test_each_segment_uses_its_own_scale(device):
    x = torch.tensor([0.5, -0.5, 3.0, -3.0, 3.0], device=device)
    scales = torch.tensor([0.25, 10.0], device=device)
    codes = ops.ternarize_int8(x, scales, seed=0, segments=[2, 3], validate=False)
    # Segment 0 clips at 0.25 < |x|: codes are always the sign.
    assert codes[:2].tolist() == [1, -1]
    y = ops.unpack(ops.ternarize_pack(x, scales, seed=0, segments=[2, 3]), 5, scales, segments=[2, 3])
    assert set(y[:2].abs().tolist()) == {0.25}
    assert set(y[2:].abs().tolist()) <= {0.0, 10.0}


def test_slice_with_offset_draws_what_the_whole_draws(device):
    x = make(1000, torch.float32, device)
    s = absmax(x)
    whole = ops.ternarize_int8(x, s, seed=3, offset=100)
    for start in [0, 1, 2, 3, 4, 17, 999]:
        part = ops.ternarize_int8(x[start:].contiguous(), s, seed=3, offset=100 + start)
        assert torch.equal(part, whole[start:])


def test_different_seeds_and_offsets_give_different_streams(device):
    x = torch.full((4096,), 0.5, device=device)
    s = torch.ones(1, device=device)
    a = ops.ternarize_pack(x, s, seed=1)
    assert not torch.equal(a, ops.ternarize_pack(x, s, seed=2))
    assert not torch.equal(a, ops.ternarize_pack(x, s, seed=1, offset=4096))


def test_all_zero_tensor_with_zero_scale_gives_zeros(device):
    for dtype in DTYPES:
        x = torch.zeros(13, dtype=dtype, device=device)
        packed = ops.ternarize_pack(x, 0.0, seed=0)
        assert packed.tolist() == [0] * 4
        y = ops.unpack(packed, 13, 0.0, dtype)
        assert not bool(y.isnan().any()) and bool((y == 0).all())
        absmax_, std = ops.segment_stats(x)
        assert absmax_.tolist() == [0.0] and std.tolist() == [0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbiased_against_the_variance(device, dtype):
    """E[s * code] = clip(x, -s, s): each element's sample mean over K independent draws lies
    within 5 standard errors, sigma_i = s * sqrt(p_i (1 - p_i) / K) with p_i = min(|x_i|, s) / s,
    plus the bias bound of the 16-bit draws (csrc/ternary.h: |P - p_i| < 2^-16)."""
    m, draws = 64, 4000
    x = (torch.linspace(-1.5, 1.5, m) ** 3).to(dtype).to(device)  # tiny, mid, clipped values
    s = 1.0
    codes = ops.ternarize_int8(x.repeat(draws), s, seed=123).reshape(draws, m).double()
    mean = codes.mean(0) * s
    xf = x.double()
    clipped = xf.clamp(-s, s)
    p = clipped.abs() / s
    sigma = s * torch.sqrt(p * (1 - p) / draws)
    tol = 5 * sigma + 2.0**-16 * s
    assert bool(((mean - clipped).abs() <= tol).all()), (mean - clipped).abs().max()
    # Jointly: the standardized errors of the random elements are chi-square with ~m dof.
    rand = sigma > 0
    z2 = (((mean - clipped)[rand] / sigma[rand]) ** 2).sum().item()
    dof = int(rand.sum())
    assert z2 < dof + 6 * math.sqrt(2 * dof)


def test_backend_reports_native_when_built():
    assert commcomp.ops.backend("cpu") in ("native", "reference")
    if commcomp.ops.backend("cpu") == "native":
        from commcomp import _C

        assert _C.torch_version.count(".") == 1


def test_unaligned_views_match_reference(native, ref, device):
    """A contiguous view starting mid-allocation takes the kernels' unaligned (scalar) path."""
    base = make(4099, torch.float32, device, seed=4)
    for start in (1, 2, 3):
        x = base[start:]
        s = absmax(x)
        assert torch.equal(native.ternarize_pack(x, s, None, 9, 1), ref.ternarize_pack(x, s, None, 9, 1))
        assert torch.equal(native.ternarize_int8(x.half(), s, None, 9, 0),
                           ref.ternarize_int8(x.half(), s, None, 9, 0))
        packed = ref.ternarize_pack(x, s, None, 9, 0)
        rows = torch.stack([packed, packed])
        out_n, out_r = base.clone()[start:], base.clone()[start:]
        native.unpack_accumulate(rows, s.repeat(2), None, out_n)
        ref.unpack_accumulate(rows, s.repeat(2), None, out_r)
        assert torch.equal(out_n, out_r)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_bytes_equal_cpu_bytes(dtype):
    """The claim that matters across machines: the GPU kernels write the CPU kernels' bytes."""
    n = 10**6 + 3
    x = make(n, dtype, "cpu", seed=5)
    lengths = [1, 0, 500_000, n - 500_001]
    s = ops.segment_stats(x, lengths)[0] * 0.8
    xc, sc = x.cuda(), s.cuda()
    for seed, offset in [(0, 0), (5, 3), (2**40, 2**33 + 1)]:
        cpu = ops.ternarize_pack(x, s, seed, offset, segments=lengths)
        assert torch.equal(ops.ternarize_pack(xc, sc, seed, offset, segments=lengths).cpu(), cpu)
        assert torch.equal(ops.ternarize_int8(xc, sc, seed, offset, segments=lengths).cpu(),
                           ops.ternarize_int8(x, s, seed, offset, segments=lengths))
    packed = torch.stack([ops.ternarize_pack(x, s, w, segments=lengths) for w in range(3)])
    scales = torch.stack([s * (w + 1) for w in range(3)])
    assert torch.equal(ops.unpack(packed[0].cuda(), n, sc, dtype, segments=lengths).cpu(),
                       ops.unpack(packed[0], n, s, dtype, segments=lengths))
    out = x.clone()
    out_c = x.cuda()
    ops.unpack_accumulate(packed, scales, out, segments=lengths)
    ops.unpack_accumulate(packed.cuda(), scales.cuda(), out_c, segments=lengths)
    assert torch.equal(out_c.cpu(), out)
    a_cpu, s_cpu = ops.segment_stats(x, lengths)
    a_gpu, s_gpu = ops.segment_stats(xc, lengths)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=0)


def test_offsets_at_the_ends_of_the_counter_range(native, ref, device):
    x = make(1001, torch.float32, device, seed=6)
    s = absmax(x)
    # The counter g >> 3 carries into its high word at g = 2^35 (2^34: where spec v1's did).
    for offset in (2**35 - 500, 2**35 - 3, 2**34 - 500, 2**34 - 3, 2**63 - 1 - 1001, 2**62 + 1):
        for seed in (0, 2**63 - 1):
            assert torch.equal(native.ternarize_pack(x, s, None, seed, offset),
                               ref.ternarize_pack(x, s, None, seed, offset))


def test_misaligned_segments_match_reference(native, ref, device):
    """Segments whose lengths are not multiples of 4 shift the Philox alignment mid-buffer."""
    x = make(5003, torch.float32, device, seed=8)
    lengths = [10, 1, 3, 4989]
    s = ops.segment_stats(x, lengths)[0]
    for offset in (0, 1, 2, 3):
        assert torch.equal(native.ternarize_int8(x, s, lengths, 4, offset),
                           ref.ternarize_int8(x, s, lengths, 4, offset))


def test_ops_are_not_differentiable(device):
    x = torch.randn(9, device=device, requires_grad=True)
    s = torch.ones(1, device=device, requires_grad=True)
    absmax, std = ops.segment_stats(x)
    assert not absmax.requires_grad and not std.requires_grad
    y = ops.unpack(ops.ternarize_pack(x, s, seed=0), 9, s)
    assert not y.requires_grad


@pytest.mark.cuda
def test_cuda_grid_stride_loop_covers_large_tensors():
    """More packed bytes than one grid of 65535 x 256 threads: the grid-stride loop runs."""
    n = 65535 * 256 * 4 + 4099
    x = torch.randn(n, device="cuda")
    s = x.abs().amax().reshape(1)
    gpu = ops.ternarize_pack(x, s, seed=1, validate=False)
    assert torch.equal(gpu.cpu(), ops.ternarize_pack(x.cpu(), s.cpu(), seed=1, validate=False))


# ---------------------------------------------------------------- spec version 2, by hand

def _draw16(g, seed):
    """The spec's 16-bit draw of global index g: half g & 1 of word (g >> 1) & 3 of counter
    g >> 3."""
    r = philox_words(g >> 3, seed)[(g >> 1) & 3]
    return (r >> 16) if g & 1 else (r & 0xFFFF)


@pytest.mark.parametrize("impl", ["native", "ref"])
def test_spec_v2_draws_on_hand_chosen_indices(request, device, impl):
    """Each element's 16-bit draw h, recovered exactly through the comparison u * s < a: with
    s = 2^j, u * s = h 2^(j-16) is exact, so x = h 2^(j-16) gives code 0 and x = (h + 1) 2^(j-16)
    gives sign(x). Elements 0..15 at an odd offset (two counters, unaligned), and segments
    whose boundary falls inside an 8-element group, with scales 1 and 2."""
    ops_ = request.getfixturevalue(impl)
    for seed, offset, lengths, scales in [
        (12345, 13, [16], [1.0]),
        (2**40 + 7, 3, [5, 11], [1.0, 2.0]),     # boundary at global index 8: a group edge
        (99, 2**33 + 1, [3, 6, 7], [2.0, 1.0, 2.0]),  # boundaries at g = 4, 2 (mod 8): inside
    ]:
        n = sum(lengths)
        s_el = [s for s, k in zip(scales, lengths) for _ in range(k)]
        h = [_draw16(offset + i, seed) for i in range(n)]
        sign = [1 if i % 3 else -1 for i in range(n)]
        st = torch.tensor(scales, device=device)
        segs = None if len(lengths) == 1 else lengths
        # At x = h u_step the draw does not fire (h * step < h * step is false) ...
        at = torch.tensor([sg * hh * 2.0**-16 * s for sg, hh, s in zip(sign, h, s_el)],
                          device=device)
        codes_at = ops_.ternarize_int8(at, st, segs, seed, offset).tolist()
        assert codes_at == [0] * n, (seed, offset)
        # ... one step above it does, with the value's sign.
        above = torch.tensor([sg * (hh + 1) * 2.0**-16 * s for sg, hh, s in zip(sign, h, s_el)],
                             device=device)
        assert ops_.ternarize_int8(above, st, segs, seed, offset).tolist() == sign, (seed, offset)
        # And the packed bytes are the packed codes of the same draws.
        want = ops.reference.pack_codes(torch.tensor(sign, dtype=torch.int8, device=device))
        assert torch.equal(ops_.ternarize_pack(above, st, segs, seed, offset), want)


def test_spec_version_is_exposed_and_checked():
    assert ops.TERNARY_SPEC_VERSION == ops.reference.TERNARY_SPEC_VERSION == 2
    if ops.backend("cpu") == "native":
        from commcomp import _C

        assert _C.ternary_spec_version == ops.TERNARY_SPEC_VERSION
    from commcomp.ops import _loader

    _loader._check_spec_version(types.SimpleNamespace(ternary_spec_version=2))
    for stale in (types.SimpleNamespace(ternary_spec_version=1), types.SimpleNamespace()):
        with pytest.raises(RuntimeError, match="version 1 of the ternary codec.*Rebuild"):
            _loader._check_spec_version(stale)


# ---------------------------------------------------------------- CPU instruction sets

def _isas():
    if ops.backend("cpu") != "native":
        pytest.skip("no native CPU kernels")
    from commcomp import _C

    return _C, _C._ternary_isas()


def test_cpu_isa_paths_give_identical_bytes():
    """Every instruction set this CPU runs (SSE2 baseline, AVX2, AVX-512) draws the same bytes,
    and the same as the reference, over odd lengths, offsets, segments and dtypes."""
    _C, isas = _isas()
    assert isas[0] in ("sse2", "portable")
    before = _C._ternary_isa()
    cases = []
    g = torch.Generator().manual_seed(21)
    for n in list(range(71)) + [127, 128, 129, 255, 256, 257, 1031, 40_000 + 3]:
        x = torch.randn(n, generator=g) * 2
        for offset in range(10) if n <= 70 or n == 1031 else (0, 3, 8):
            if n >= 9:
                lengths = [n // 3, 1, 0, n - n // 3 - 6, 5]  # boundaries inside 8-groups
            else:
                lengths = [n]
            for segs in ([None, lengths] if len(lengths) > 1 else [None]):
                k = 1 if segs is None else len(segs)
                scales = torch.rand(k, generator=g) + 0.3
                cases.append((x, scales, segs, 1000 + n, offset))
    cases.append((torch.randn(3000, generator=g).half(), torch.ones(2), [1501, 1499], 5, 7))
    cases.append((torch.randn(3000, generator=g).bfloat16(), torch.ones(1), None, 6, 2**40 + 5))
    # The counter's low word carries into its high word inside this one.
    cases.append((torch.randn(5000, generator=g), torch.ones(1) * 2, None, 7, 2**35 - 2001))
    try:
        results = {}
        for isa in isas:
            assert _C._ternary_isa(isa) in isas
            assert _C._ternary_isa() == isa
            results[isa] = [(torch.ops.commcomp.ternarize_pack(*c),
                             torch.ops.commcomp.ternarize_int8(*c)) for c in cases]
    finally:
        _C._ternary_isa(before)
    base = results[isas[0]]
    for c, (packed, codes) in zip(cases, base):
        assert torch.equal(packed, ops.reference.ternarize_pack(*c)), c[2:]
        assert torch.equal(codes, ops.reference.ternarize_int8(*c)), c[2:]
    for isa in isas[1:]:
        for c, (p0, c0), (p1, c1) in zip(cases, base, results[isa]):
            assert torch.equal(p1, p0) and torch.equal(c1, c0), (isa, c[0].numel(), c[2:])


def test_cpu_isa_large_multithreaded_matches_baseline():
    """A buffer of many parallel tasks and pack blocks, unaligned offset, several segments."""
    _C, isas = _isas()
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(2))
    lengths = [1, 300_000, 7, 0, 699_995]
    s = ops.segment_stats(x, lengths)[0] * 0.6 + 1e-3
    before = _C._ternary_isa()
    try:
        outs = []
        for isa in isas:
            _C._ternary_isa(isa)
            outs.append((ops.ternarize_pack(x, s, 77, 5, segments=lengths),
                         ops.ternarize_int8(x, s, 77, 5, segments=lengths)))
    finally:
        _C._ternary_isa(before)
    for p, c in outs[1:]:
        assert torch.equal(p, outs[0][0]) and torch.equal(c, outs[0][1])
    assert torch.equal(outs[0][0], ops.reference.ternarize_pack(x, s, lengths, 77, 5))


def test_cpu_isa_rejects_unknown_names():
    _C, isas = _isas()
    with pytest.raises(ValueError, match="not an instruction set"):
        _C._ternary_isa("avx9000")
    assert _C._ternary_isa() in isas


_ENV_SCRIPT = """
import torch, commcomp.ops as ops
from commcomp import _C
x = torch.randn(100)
try:
    ops.ternarize_pack(x, 1.0, seed=0)
except RuntimeError as e:
    print("error:", e)
else:
    print("isa:", _C._ternary_isa())
"""


def test_cpu_isa_env_var_forces_a_path():
    _, isas = _isas()
    for value, want in [(isas[0], f"isa: {isas[0]}"),
                        ("bogus", "error: commcomp: COMMCOMP_TERNARY_ISA=bogus")]:
        env = dict(os.environ, COMMCOMP_TERNARY_ISA=value)
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", _ENV_SCRIPT], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.startswith(want), out
