"""The ternary codec: bit-exact agreement of every backend with the reference, round trips,
the segment and offset semantics, and unbiasedness."""

import math

import pytest
import torch

import commcomp
from commcomp import ops

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
    plus the generator's 24-bit resolution (2^-22 s covers the rounding of u * s)."""
    m, draws = 64, 4000
    x = (torch.linspace(-1.5, 1.5, m) ** 3).to(dtype).to(device)  # tiny, mid, clipped values
    s = 1.0
    codes = ops.ternarize_int8(x.repeat(draws), s, seed=123).reshape(draws, m).double()
    mean = codes.mean(0) * s
    xf = x.double()
    clipped = xf.clamp(-s, s)
    p = clipped.abs() / s
    sigma = s * torch.sqrt(p * (1 - p) / draws)
    tol = 5 * sigma + 2.0**-22 * s
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
    for offset in (2**34 - 500, 2**34 - 3, 2**63 - 1 - 1001, 2**62 + 1):  # counter hi word flips
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
