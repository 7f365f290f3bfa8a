"""Bad input gets an error that names the argument, and leaves buffers untouched."""

import pytest
import torch

from commcomp import ops

ERR = (TypeError, ValueError, RuntimeError)


def test_wrong_dtype_is_named(device):
    for bad in (torch.zeros(8, dtype=torch.float64, device=device),
                torch.zeros(8, dtype=torch.int32, device=device)):
        with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
            ops.ternarize_pack(bad, 1.0, seed=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.ternarize_pack([1.0, 2.0], 1.0, seed=0)


def test_non_contiguous_is_named(device):
    x = torch.randn(8, 8, device=device).t()
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.ternarize_pack(x, 1.0, seed=0)
    out = torch.zeros(8, 2, device=device).t()
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.unpack_accumulate(torch.zeros(1, 4, dtype=torch.uint8, device=device), [1.0], out)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_is_refused(device, value):
    x = torch.randn(100, device=device)
    x[37] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.ternarize_pack(x, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"NaN or Inf \(segment\(s\) \[1\]\)"):
        ops.ternarize_int8(x, torch.ones(2, device=device), seed=0, segments=[30, 70])


def test_bad_scales_are_refused(device):
    x = torch.randn(10, device=device)
    for s in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite and >= 0"):
            ops.ternarize_pack(x, s, seed=0)
    with pytest.raises(ValueError, match="scale is 0 for segment"):
        ops.ternarize_pack(x, 0.0, seed=0)
    with pytest.raises(ValueError, match=r"scale has 3 element\(s\) but 2"):
        ops.ternarize_pack(x, torch.ones(3, device=device), seed=0, segments=[5, 5])
    with pytest.raises(TypeError, match="scale must be a floating-point tensor"):
        ops.ternarize_pack(x, torch.ones(1, dtype=torch.int64, device=device), seed=0)


def test_bad_segments_are_refused(device):
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="segments sum to 9 but the tensor has 10"):
        ops.ternarize_pack(x, torch.ones(2, device=device), seed=0, segments=[4, 5])
    with pytest.raises(ValueError, match=r"segments\[1\] must be an int in \[0, "):
        ops.segment_stats(x, [11, -1])
    with pytest.raises(TypeError, match="segments must be a list of ints"):
        ops.segment_stats(x, torch.tensor([10]))
    with pytest.raises(ValueError, match="segments is empty"):
        ops.segment_stats(x, [])


def test_bad_seed_and_offset_are_refused(device):
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        ops.ternarize_pack(x, 1.0, seed=-1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        ops.ternarize_pack(x, 1.0, seed=2**63)
    with pytest.raises(TypeError, match="offset must be an int"):
        ops.ternarize_pack(x, 1.0, seed=0, offset=1.5)


def test_mismatched_lengths_are_refused(device):
    packed = torch.zeros(3, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="packed has 3 bytes but numel=13 needs 4"):
        ops.unpack(packed, 13, 1.0)
    with pytest.raises(TypeError, match="packed must be uint8"):
        ops.unpack(packed.to(torch.int8), 12, 1.0)
    out = torch.zeros(13, device=device)
    with pytest.raises(ValueError, match=r"packed must be \[world, ceil\(n / 4\)\]"):
        ops.unpack_accumulate(torch.zeros(2, 3, dtype=torch.uint8, device=device), [1.0, 1.0], out)
    with pytest.raises(ValueError, match=r"scales has 1 element\(s\) but 2"):
        ops.unpack_accumulate(torch.zeros(2, 4, dtype=torch.uint8, device=device), [1.0], out)


def test_failed_accumulate_leaves_out_untouched(device):
    out = torch.arange(8, dtype=torch.float32, device=device)
    before = out.clone()
    packed = torch.full((2, 2), 0b01010101, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="scales must be finite"):
        ops.unpack_accumulate(packed, torch.tensor([1.0, float("nan")], device=device), out)
    assert torch.equal(out, before)


def test_native_ops_check_arguments_themselves(native, device):
    """Direct torch.ops calls skip the Python wrappers; the kernels still refuse bad input."""
    x = torch.randn(10, device=device)
    s = torch.ones(1, device=device)
    with pytest.raises(RuntimeError, match="segments sum to 9"):
        native.ternarize_pack(x, s, [9], 0, 0)
    with pytest.raises(RuntimeError, match="x must be float32"):
        native.ternarize_pack(x.double(), s, None, 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.ternarize_pack(torch.randn(4, 4, device=device).t(), s, None, 0, 0)
    with pytest.raises(RuntimeError, match="scales has 1 elements but 2"):
        native.ternarize_pack(x, s, [5, 5], 0, 0)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        native.ternarize_pack(x, s, None, -3, 0)
    with pytest.raises(RuntimeError, match="packed has 3 bytes"):
        native.unpack(torch.zeros(3, dtype=torch.uint8, device=device), 13, s, None, torch.float32)


def test_scale_shapes_and_ranges_are_checked(device):
    x = torch.randn(10, device=device)
    with pytest.raises(ValueError, match="does not fit in float32"):
        ops.ternarize_pack(x, 1e39, seed=0)
    packed = torch.zeros(2, 3, dtype=torch.uint8, device=device)
    out = torch.zeros(10, device=device)
    # [segments, world] instead of [world, segments]: same count, wrong meaning.
    with pytest.raises(ValueError, match=r"shape \(5, 2\) but \[payloads, segments\] = \[2, 5\]"):
        ops.unpack_accumulate(packed, torch.ones(5, 2, device=device), out, segments=[2] * 5)


def test_zero_payloads_leave_out_untouched(device):
    out = torch.full((10,), -0.0, device=device)
    ops.unpack_accumulate(torch.empty(0, 3, dtype=torch.uint8, device=device),
                          torch.empty(0, device=device), out)
    assert torch.equal(out.view(torch.int32), torch.full((10,), -0.0, device=device).view(torch.int32))


def test_raw_ops_refuse_segments_that_overflow(device):
    x = torch.randn(4, device=device)
    big = 2**63 - 1
    with pytest.raises(ERR, match="segments"):
        torch.ops.commcomp.segment_stats(x, [big, big, 6])
    with pytest.raises(ERR, match="segments"):
        torch.ops.commcomp.ternarize_pack(x, torch.ones(3, device=device), [big, big, 6], 0, 0)
