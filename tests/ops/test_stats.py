"""segment_stats: per-segment max |x| and population std."""

import math

import pytest
import torch

from commcomp import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_torch_per_segment(device, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = [1, 0, 5, 16384, 16385, 40000, 3]
    x = (torch.randn(sum(lengths), generator=g) * 2 + 0.3).to(dtype).to(device)
    absmax, std = ops.segment_stats(x, lengths)
    assert absmax.dtype == std.dtype == torch.float32 and absmax.shape == (len(lengths),)
    for k, part in enumerate(torch.split(x.float(), lengths)):
        want_max = part.abs().max() if part.numel() else torch.tensor(0.0, device=device)
        want_std = part.double().std(correction=0).float() if part.numel() else want_max * 0
        assert absmax[k] == want_max
        torch.testing.assert_close(std[k], want_std, rtol=1e-5, atol=1e-7)


def test_native_matches_reference(native, ref, device):
    x = torch.randn(100_000, device=device) * 1e-3 + 5.0  # a large mean: cancellation-prone
    lengths = [10, 99_000, 990]
    a1, s1 = native.segment_stats(x, lengths)
    a2, s2 = ref.segment_stats(x, lengths)
    assert torch.equal(a1, a2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=0)


def test_deterministic_across_thread_counts():
    x = torch.randn(300_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.segment_stats(x, [100_000, 200_000])
        torch.set_num_threads(max(2, threads))
        two = ops.segment_stats(x, [100_000, 200_000])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_non_finite_values_propagate_to_absmax(device):
    x = torch.zeros(50, device=device)
    x[3], x[30] = float("inf"), float("nan")
    absmax, _ = ops.segment_stats(x, [20, 20, 10])
    assert absmax[0].item() == float("inf")
    assert absmax[1].isnan()
    assert absmax[2].item() == 0.0


def test_large_finite_values_do_not_overflow(native, ref, device):
    for values in ([-1e20, 1e20], [3e38, 3e38], [1e37] * 64, [3e38, -3e38] * 10000):
        x = torch.tensor(values, device=device)
        a1, s1 = native.segment_stats(x, None)
        a2, s2 = ref.segment_stats(x, None)
        assert torch.equal(a1, a2)
        assert bool(torch.isfinite(s1).all())
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)


def test_high_mean_over_many_pieces_is_accurate(native, ref, device):
    g = torch.Generator().manual_seed(1)
    x = (1e4 + 0.01 * torch.randn(65543, generator=g)).to(device)  # 5 pieces
    _, s1 = native.segment_stats(x, None)
    _, s2 = ref.segment_stats(x, None)
    torch.testing.assert_close(s1, s2, rtol=2e-6, atol=0)


def _four_lane_std(values):
    """The CPU kernel's std of one piece (< 16384 values), in Python floats (IEEE doubles):
    lane k sums the values i = k (mod 4) centred on the first one, the tail goes to lane 0."""
    n, k0 = len(values), values[0]
    lin, sq = [0.0] * 4, [0.0] * 4
    body = n & ~3
    for i, v in enumerate(values):
        k = i % 4 if i < body else 0
        d = v - k0
        lin[k] += d
        sq[k] += d * d
    total = (lin[0] + lin[1]) + (lin[2] + lin[3])
    m2 = max(((sq[0] + sq[1]) + (sq[2] + sq[3])) - total * total / n, 0.0)
    return torch.tensor(math.sqrt(m2 / n), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_cpu_std_is_the_four_lane_float64_sum_exactly(dtype):
    """The vectorized CPU loop rounds exactly like the plain four-accumulator loop."""
    if ops.backend("cpu") != "native":
        pytest.skip("no native CPU kernels")
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 5, 8, 11, 1003, 4099):
        x = (torch.randn(n, generator=g) * 3 + 7).to(dtype)
        _, std = torch.ops.commcomp.segment_stats(x, None)
        assert std[0].item() == _four_lane_std(x.float().tolist()).item(), n
