"""Byte-payload compressors: exact payload sizes, round trips, the statistical claims each
compressor makes (unbiased / contractive), sender-receiver agreement, and the errors."""

import json
import math
import subprocess
import sys

import pytest
import torch

from commcomp.codecs import Compressor, Ctx, Identity, RandomK, Ternary, TopK, make_compressor
from commcomp.codecs.sparse import RANDPERM_MAX, random_indices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def distinct_magnitudes(n, seed=0):
    """A vector whose |x_i| are all different (1..n in random order, random signs)."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.randperm(n, generator=g).float() + 1
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return mags * signs


def all_compressors():
    return [Identity(), Ternary(), Ternary(clip_factor=2.5), TopK(0.1), TopK(k=7),
            RandomK(0.1), RandomK(k=7, rescale=True)]


def expected_nbytes(comp, n, segments=None, itemsize=4):
    """Payload sizes written out from the formats (not from payload_nbytes)."""
    if isinstance(comp, Identity):
        return n * itemsize
    if isinstance(comp, Ternary):
        return 4 * (1 if segments is None else len(segments)) + math.ceil(n / 4)
    k = min(n, comp.k if comp.k is not None else max(1, math.ceil(comp.ratio * n)))
    return 8 * k if isinstance(comp, TopK) else 8 + 4 * k


# ---------------------------------------------------------------------------- sizes & format

@pytest.mark.parametrize("n", [1, 3, 5, 1001])
@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_payload_nbytes_matches_actual_payload(comp, n):
    x = randn(n, seed=n)
    payload, ctx = comp.compress(x, seed=11)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
    assert payload.numel() == expected_nbytes(comp, n)
    # the receiver's ctx, built from the layout alone, gives the same size and equals the sender's
    recv_ctx = comp.context((n,), torch.float32)
    assert recv_ctx == ctx and recv_ctx.numel == n
    assert comp.payload_nbytes(recv_ctx) == payload.numel()


@pytest.mark.parametrize("segments", [[1], [2, 0, 3], [1000, 1], [1, 1, 1, 1, 1]])
@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_payload_nbytes_with_segments(comp, segments):
    n = sum(segments)
    payload, ctx = comp.compress(randn(n, seed=1), seed=2, segments=segments)
    assert ctx.segments == tuple(segments)
    assert payload.numel() == expected_nbytes(comp, n, segments)
    assert comp.payload_nbytes(comp.context(n, torch.float32, segments)) == payload.numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_nbytes_follow_dtype(dtype):
    comp = Identity()
    ctx = comp.context((3, 5), dtype)
    assert comp.payload_nbytes(ctx) == 15 * (4 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_empty_tensor(comp):
    x = torch.zeros(0, 4)
    payload, ctx = comp.compress(x)
    assert payload.numel() == comp.payload_nbytes(ctx)
    y = comp.decompress(payload, ctx)
    assert y.shape == (0, 4) and y.dtype == torch.float32


# ---------------------------------------------------------------------------- Identity

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64, torch.int32])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (5, 3), (2, 3, 7)])
def test_identity_round_trip_is_exact(device, dtype, shape):
    x = (randn(*shape, seed=3) * 100).to(dtype).to(device)
    comp = Identity()
    payload, ctx = comp.compress(x)
    assert payload.device == x.device
    y = comp.decompress(payload, ctx)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert torch.equal(y, x)
    want = x.clone()
    payload.zero_()  # decompress returned a copy, not a view of the receive buffer
    assert torch.equal(y, want)


def test_identity_non_contiguous_input():
    x = randn(4, 6, seed=4).t()
    comp = Identity()
    assert torch.equal(comp.decompress(*comp.compress(x)), x)


# ---------------------------------------------------------------------------- TopK

@pytest.mark.parametrize("n,ratio", [(1, 0.01), (5, 0.5), (1001, 0.01), (1001, 0.3), (64, 1.0)])
def test_topk_keeps_exactly_the_k_largest(device, n, ratio):
    x = distinct_magnitudes(n, seed=n).to(device)
    comp = TopK(ratio)
    k = max(1, math.ceil(ratio * n))
    y = comp.decompress(*comp.compress(x))
    kept = y != 0
    assert int(kept.sum()) == k
    want = torch.zeros(n, dtype=torch.bool, device=device)
    want[x.abs().argsort(descending=True)[:k]] = True
    assert torch.equal(kept, want)
    assert torch.equal(y[kept], x[kept])
    # contraction: ||C(x) - x||^2 <= (1 - k/d) ||x||^2, deterministically
    assert (y - x).pow(2).sum() <= (1 - k / n) * x.pow(2).sum() * (1 + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_dtypes_and_shape(dtype):
    x = randn(6, 7, seed=5, dtype=dtype)
    comp = TopK(k=10)
    y = comp.decompress(*comp.compress(x))
    assert y.dtype == dtype and y.shape == (6, 7)
    kept = y != 0
    assert int(kept.sum()) == 10 and torch.equal(y[kept], x[kept])
    assert y.abs()[kept].min() >= x.abs()[~kept].max()


def test_topk_fixed_k_is_capped():
    comp = TopK(k=50)
    x = distinct_magnitudes(20)
    payload, ctx = comp.compress(x)
    assert payload.numel() == 8 * 20
    assert torch.equal(comp.decompress(payload, ctx), x)


def test_topk_refuses_int32_overflow():
    comp = TopK(0.01)
    ctx = comp.context((2**31,), torch.float32)  # a layout only: nothing allocated
    with pytest.raises(ValueError, match="2\\*\\*31"):
        comp.payload_nbytes(ctx)


# ---------------------------------------------------------------------------- RandomK

def receive(payload_bytes: bytes, shape, options: dict) -> torch.Tensor:
    """A receiver that shares nothing with the sender but the layout and the options."""
    comp = RandomK(**options)
    payload = torch.frombuffer(bytearray(payload_bytes), dtype=torch.uint8)
    return comp.decompress(payload, comp.context(shape, torch.float32))


@pytest.mark.parametrize("n,ratio", [(1, 0.5), (10, 0.3), (1001, 0.05), (RANDPERM_MAX + 5, 0.01)])
def test_randomk_receiver_regenerates_the_senders_indices(device, n, ratio):
    x = distinct_magnitudes(n, seed=n).to(device)  # no zeros: the kept set is y != 0
    sender = RandomK(ratio)
    payload, ctx = sender.compress(x, seed=1234 + n)
    y = receive(payload.cpu().numpy().tobytes(), (n,), sender.options())
    k = max(1, math.ceil(ratio * n))
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x.cpu()[kept])
    # the sender's own decode agrees, and another seed samples another set
    assert torch.equal(sender.decompress(payload, ctx).cpu(), y)
    if n > 1:
        other = sender.decompress(*sender.compress(x, seed=99))
        assert not torch.equal((other != 0).cpu(), kept)


@pytest.mark.parametrize("numel,k", [(1000, 10), (RANDPERM_MAX + 1, 300), (10**6, 5000), (10**6, 400_000)])
def test_random_indices_are_distinct_and_in_range(numel, k):
    idx = random_indices(numel, k, seed=7)
    assert idx.dtype == torch.int64 and idx.numel() == k
    assert idx.unique().numel() == k and int(idx.min()) >= 0 and int(idx.max()) < numel
    assert torch.equal(idx, random_indices(numel, k, seed=7))


def test_random_indices_are_uniform_on_the_large_path():
    # d > RANDPERM_MAX and k < d / 4: the draw-and-dedupe path. Each index has probability k/d
    # per seed; count hits per bucket of 1/8 of the range over many seeds (chi-square, 7 dof).
    d, k, seeds = RANDPERM_MAX * 2, 2000, 200
    counts = torch.zeros(8)
    for s in range(seeds):
        counts += torch.bincount(random_indices(d, k, s) * 8 // d, minlength=8).float()
    expected = k * seeds / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30  # P(chi2_7 > 30) ~ 1e-4


def test_random_indices_agree_across_processes():
    cases = [(500, 50, 3), (10**6, 1000, 2**62 + 5)]
    code = (
        "from commcomp.codecs.sparse import random_indices\n"
        f"for n, k, s in {cases!r}:\n"
        "    print(random_indices(n, k, s).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(cases)
    for line, (n, k, s) in zip(lines, cases):
        assert json.loads(line) == random_indices(n, k, s).tolist()


def test_randomk_with_rescale_is_unbiased():
    d, k, seeds = 40, 8, 3000
    x = randn(d, seed=8)
    comp = RandomK(k=k, rescale=True)
    assert comp.unbiased and not comp.contractive
    mean = torch.stack([comp.decompress(*comp.compress(x, seed=s)) for s in range(seeds)]).mean(0)
    # each y_i is x_i * d/k with probability k/d: Var = x_i^2 (d/k - 1)
    sd = x.abs() * math.sqrt((d / k - 1) / seeds)
    assert float(((mean - x).abs() / sd).max()) < 5


def test_randomk_without_rescale_is_contractive_and_biased():
    d, k, seeds = 40, 8, 3000
    x = randn(d, seed=9)
    comp = RandomK(k=k)
    assert comp.contractive and not comp.unbiased
    ys = torch.stack([comp.decompress(*comp.compress(x, seed=s)) for s in range(seeds)])
    err = (ys - x).pow(2).sum(1) / x.pow(2).sum()
    assert float(err.max()) <= 1.0  # never worse than sending nothing
    # E||C(x) - x||^2 = (1 - k/d) ||x||^2; per seed the ratio lies in [0, 1]: sd <= 0.5
    assert abs(float(err.mean()) - (1 - k / d)) < 5 * 0.5 / math.sqrt(seeds)
    # E[C(x)] = (k/d) x: biased towards 0
    sd = x.abs() * math.sqrt((k / d) * (1 - k / d) / seeds)
    assert float(((ys.mean(0) - (k / d) * x).abs() / sd).max()) < 5


def test_randomk_rescaled_error_exceeds_the_norm():
    x = randn(100, seed=10)
    comp = RandomK(0.1, rescale=True)
    y = comp.decompress(*comp.compress(x, seed=0))
    # E||C(x) - x||^2 = (d/k - 1) ||x||^2 = 9 ||x||^2: not a contraction
    assert (y - x).pow(2).sum() > x.pow(2).sum()


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomk_dtypes(dtype):
    x = randn(3, 30, seed=12, dtype=dtype)
    comp = RandomK(0.2)
    y = comp.decompress(*comp.compress(x, seed=5))
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    assert int(kept.sum()) == 18 and torch.equal(y[kept], x[kept])


# ---------------------------------------------------------------------------- Ternary

def scales_in(payload, nseg):
    return payload[: 4 * nseg].clone().view(torch.float32)


def test_ternary_is_unbiased(device):
    d, seeds = 64, 2000
    x = randn(d, seed=13).to(device)
    comp = Ternary()
    assert comp.unbiased and not comp.contractive
    ys = torch.stack([comp.decompress(*comp.compress(x, seed=s)) for s in range(seeds)])
    s = x.abs().max()
    # y_i = s sign(x_i) with probability |x_i|/s: Var = s |x_i| - x_i^2
    top = int(x.abs().argmax())
    assert torch.equal(ys[:, top], x[top].expand(seeds))  # the max is sent exactly (variance 0)
    rest = torch.arange(d, device=device) != top
    sd = (s * x.abs() - x * x)[rest].div(seeds).sqrt()
    z = (ys.mean(0) - x)[rest].abs() / sd
    assert float(z.max()) < 5.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_values_and_per_segment_scales(device, dtype):
    segments = [5, 0, 1, 300, 17]
    x = torch.cat([randn(n, seed=n) * (10.0 ** j) for j, n in enumerate(segments)]).to(dtype).to(device)
    comp = Ternary()
    payload, ctx = comp.compress(x, seed=3, segments=segments)
    parts = torch.split(x.float(), segments)
    want = torch.stack([p.abs().max() if p.numel() else torch.zeros((), device=device) for p in parts])
    assert torch.equal(scales_in(payload, len(segments)), want)
    y = comp.decompress(payload, ctx)
    assert y.dtype == dtype
    for part_y, part_x, s in zip(torch.split(y.float(), segments), parts, want):
        assert bool(((part_y == 0) | (part_y == s) | (part_y == -s)).all())
        assert bool((part_y * part_x >= 0).all())  # never the wrong sign
    assert bool((y != 0).any())


def test_ternary_same_seed_same_bytes():
    x = randn(1001, seed=14)
    comp = Ternary()
    a, b, c = (comp.compress(x, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ternary_clip_factor_clips():
    x = randn(1000, seed=15)
    x[17] = 50.0  # an outlier far beyond 2.5 std
    comp = Ternary(clip_factor=2.5)
    assert not comp.unbiased
    payload, ctx = comp.compress(x, seed=0)
    s = float(scales_in(payload, 1))
    want = 2.5 * float(x.double().std(correction=0))
    assert s == pytest.approx(want, rel=1e-5) and s < float(x.abs().max())
    y = comp.decompress(payload, ctx)
    assert float(y.abs().max()) == pytest.approx(s)
    assert float(y[17]) == pytest.approx(s)  # clipped values above s always keep their sign
    # an unclipped segment beside it keeps max |x|; a constant segment (std 0) is not zeroed
    payload, _ = comp.compress(torch.cat([x, torch.full((4,), 3.0)]), segments=[1000, 4])
    assert float(scales_in(payload, 2)[1]) == 3.0


def test_ternary_zero_tensor_and_zero_segments():
    comp = Ternary()
    y = comp.decompress(*comp.compress(torch.zeros(3, 7)))
    assert torch.equal(y, torch.zeros(3, 7))
    x = torch.cat([torch.zeros(5), randn(9, seed=16), torch.zeros(4)])
    payload, ctx = comp.compress(x, segments=[5, 9, 4], seed=1)
    assert torch.equal(scales_in(payload, 3)[[0, 2]], torch.zeros(2))
    y = comp.decompress(payload, ctx)
    assert torch.equal(y[:5], torch.zeros(5)) and torch.equal(y[14:], torch.zeros(4))
    assert bool((y[5:14] != 0).any())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_ternary_rejects_non_finite(bad):
    x = randn(20, seed=17)
    x[13] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(segment\(s\) \[1\]"):
        Ternary().compress(x, segments=[10, 10])
    with pytest.raises(ValueError, match="NaN or Inf"):
        Ternary(clip_factor=2.0).compress(x)


# ---------------------------------------------------------------------------- decompress checks

@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_decompress_rejects_wrong_size_or_dtype(comp):
    payload, ctx = comp.compress(randn(101, seed=18), seed=1)
    n = payload.numel()
    for bad in (payload[:-1], torch.cat([payload, payload[:1]])):
        with pytest.raises(ValueError, match=f"has {bad.numel()} bytes but {n} were expected"):
            comp.decompress(bad, ctx)
    with pytest.raises(ValueError, match="must be torch.uint8"):
        comp.decompress(payload.to(torch.int8), ctx)


def test_decompress_rejects_a_payload_of_other_options():
    payload, ctx = TopK(0.5).compress(randn(100))
    with pytest.raises(ValueError, match="were expected"):
        TopK(0.1).decompress(payload, ctx)


@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_decompress_from_an_unaligned_receive_buffer(comp):
    x = randn(33, seed=19)
    payload, ctx = comp.compress(x, seed=4)
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), payload])  # payload at byte offset 1
    assert torch.equal(comp.decompress(buf[1:], ctx), comp.decompress(payload, ctx))


# ---------------------------------------------------------------------------- specs & options

@pytest.mark.parametrize("spec,cls", [(None, Identity), ("identity", Identity), ("none", Identity),
                                      ("ternary", Ternary), ("topk", TopK), ("randomk", RandomK)])
def test_make_compressor_names(spec, cls):
    comp = make_compressor(spec)
    assert type(comp) is cls and isinstance(comp, Compressor)


def test_make_compressor_ratio_shorthand_and_passthrough():
    assert make_compressor("topk:0.25").ratio == 0.25
    rk = make_compressor("randomk:0.05")
    assert isinstance(rk, RandomK) and rk.ratio == 0.05 and not rk.rescale
    comp = Ternary(clip_factor=2.5)
    assert make_compressor(comp) is comp
    assert make_compressor("topk").options() == {"ratio": 0.01, "k": None}


@pytest.mark.parametrize("spec", ["terngrad", "topk:", "topk:abc", "topk:0", "topk:1.5", "randomk:-0.1",
                                  "topk:nan", "ternary:0.1", "identity:1", 3, {"name": "topk"}])
def test_make_compressor_rejects(spec):
    with pytest.raises(ValueError, match="allowed: None, 'identity'"):
        make_compressor(spec)


@pytest.mark.parametrize("make,match", [
    (lambda: TopK(ratio=0), "ratio must be a number in \\(0, 1\\]"),
    (lambda: TopK(ratio=1.5), "got 1.5"),
    (lambda: RandomK(ratio=True), "got True"),
    (lambda: TopK(k=0), "k must be an int >= 1 or None"),
    (lambda: RandomK(k=2.5), "got 2.5"),
    (lambda: RandomK(rescale="yes"), "rescale must be True or False"),
    (lambda: Ternary(clip_factor=0), "clip_factor must be None"),
    (lambda: Ternary(clip_factor=float("nan")), "got nan"),
])
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("comp", all_compressors(), ids=repr)
def test_options_are_json_and_rebuild_the_same_format(comp):
    opts = json.loads(json.dumps(comp.options()))
    twin = type(comp)(**opts)
    assert twin.options() == comp.options() and twin.name == comp.name
    x = randn(50, seed=20)
    payload, ctx = comp.compress(x, seed=9)
    assert torch.equal(twin.decompress(payload, ctx), comp.decompress(payload, ctx))


def test_context_and_argument_errors():
    comp = TopK()
    ctx = comp.context(torch.zeros(2, 3, dtype=torch.float16), segments=[4, 2])
    assert ctx == Ctx(torch.Size([2, 3]), torch.float16, (4, 2)) and ctx.numel == 6
    with pytest.raises(ValueError, match="segments sum to 5 but the tensor has 6"):
        comp.context((2, 3), torch.float32, [3, 2])
    with pytest.raises(TypeError, match="float64"):
        comp.compress(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        RandomK().compress(torch.zeros(3), seed=-1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        Ternary().compress(torch.zeros(3), seed=2**63)


def test_contractive_ternary_is_a_contraction_with_the_same_bytes():
    from commcomp.codecs import Ternary

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3000, generator=g), 10 * torch.randn(500, generator=g), torch.zeros(7)])
    segs = [3000, 500, 7]
    plain, contr = Ternary(), Ternary(contractive=True)
    ratio = {}
    for name, comp in (("plain", plain), ("contractive", contr)):
        errs = []
        for seed in range(40):
            payload, ctx = comp.compress(x, seed=seed, segments=segs)
            assert payload.numel() == comp.payload_nbytes(ctx)
            errs.append(float(((comp.decompress(payload, ctx) - x) ** 2).sum()))
        ratio[name] = sum(errs) / len(errs) / float((x * x).sum())
    assert ratio["plain"] > 1.0  # the unbiased codec's error exceeds the signal here
    assert ratio["contractive"] < 0.9, ratio
    # the expected error is exactly (1 - 1/tau) ||x||^2 per segment
    l1, l2, s = x[:3000].abs().sum(), (x[:3000] ** 2).sum(), x[:3000].abs().max()
    tau = float(s * l1 / l2)
    errs = []
    for seed in range(200):
        payload, ctx = contr.compress(x, seed=seed, segments=segs)
        errs.append(float(((contr.decompress(payload, ctx)[:3000] - x[:3000]) ** 2).sum()))
    assert abs(sum(errs) / len(errs) / float(l2) - (1 - 1 / tau)) < 0.02
    payload, ctx = contr.compress(x, seed=0, segments=segs)
    assert torch.equal(contr.decompress(payload, ctx)[3500:], torch.zeros(7))
    with pytest.raises(ValueError, match="clip_factor must be None"):
        Ternary(clip_factor=2.5, contractive=True)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 11, 1003])
def test_base3_packing_carries_the_same_codes_in_fewer_bytes(n):
    from commcomp.codecs import Ternary
    from commcomp.ops.reference import pack_base3
    from commcomp.ops.reference import unpack_base3_codes as unpack_base3

    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64).to(torch.int8)
    packed = pack_base3(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 4) // 5 and int(packed.max()) <= 242
    assert torch.equal(unpack_base3(packed, n), codes)
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    two, three = Ternary(), Ternary(packing="base3")
    segs = [n] if n < 3 else [n // 3, n - n // 3]
    p2, ctx = two.compress(x, seed=9, segments=segs)
    p3, ctx3 = three.compress(x, seed=9, segments=segs)
    assert p3.numel() == three.payload_nbytes(ctx3) <= p2.numel()
    assert torch.equal(two.decompress(p2, ctx), three.decompress(p3, ctx3))  # same codes, same scales
    with pytest.raises(ValueError, match="packing"):
        Ternary(packing="3bit")
