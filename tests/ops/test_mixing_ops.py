"""The base-3 codec (ternarize_base3, unpack_base3) and compressed mixing's fused passes
(mix_stats, mix_encode, mix_decode, track_prep): every native kernel against its reference twin
in commcomp/ops/reference.py, computed on CPU copies of the same inputs.

Bit-exact everywhere (floats compared as their bit patterns, so NaN payloads and the sign of
zero count too) except mix_stats' float64 sums, which the kernels add in another order (within
rtol 1e-6 once cast to float32; the max and the count are exact). Lengths are chosen off the
multiples of 4, 5, 8 and 40, segmentings hold empty and tiny segments and boundaries inside a
Philox counter's 8 elements. The same tests run on CUDA where a GPU is present (test ids with
``cuda``); the tests marked ``cuda`` are GPU-only checks, small enough to run in seconds.
"""

import pytest
import torch

from commcomp import ops
from commcomp.ops import reference as R

LENGTHS = [0, 1, 4, 5, 7, 39, 40, 41, 129, 1001, 40_003]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- helpers

def bits(t):
    """A view of t whose equality is bitwise (floats as integers of their width)."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t


def same(got, want, what=""):
    """Bit-equal, except that any NaN equals any NaN: a NaN's sign and payload are not part of
    the spec (x86 makes 0xffc00000 from an invalid operation, CUDA 0x7fffffff)."""
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype,
                                                                   got.shape, want.shape)
    differ = bits(got) != bits(want)
    if got.is_floating_point():
        differ &= ~(torch.isnan(got) & torch.isnan(want))
    if bool(differ.any()):
        bad = differ.nonzero().flatten()[:5].tolist()
        raise AssertionError(f"{what}: differs at {bad}: {got.flatten()[bad].tolist()} vs "
                             f"{want.flatten()[bad].tolist()}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def segmentings(n):
    """None, one explicit segment, and cuts with empty, tiny and misaligned segments."""
    out = [None, [n]]
    if n >= 9:
        out.append([0, n // 3, 0, 1, 3, n - n // 3 - 6, 2, 0])
        out.append([5, 11] + [n - 16] if n >= 16 else [n - 1, 1])
    elif n >= 1:
        out.append([0, n, 0])
    return out


def nseg(segs):
    return 1 if segs is None else len(segs)


def state(n, seed, nonfinite=True):
    """v, hat, acc (CPU, float32) with some non-finite entries in v and in hat."""
    g = gen(seed)
    v = torch.randn(n, generator=g) * 2
    hat = v + torch.randn(n, generator=g) * 0.5
    hat[torch.rand(n, generator=g) < 0.3] = 0.0
    acc = torch.randn(n, generator=g)
    if nonfinite and n >= 8:
        v[1], v[n // 2] = NAN, INF
        hat[3], hat[n - 1] = -INF, NAN
        v[n - 2] = -INF
        acc[4] = -0.0
    return v, hat, acc


def seg_scales(segs, n, seed, lo=0.3):
    return torch.rand(nseg(segs), generator=gen(seed)) * 2 + lo


def codes_of_d(v, hat):
    """d = v - hat with its non-finite entries set to 0 (what mix_encode ternarizes)."""
    d = v - hat
    return torch.where(torch.isfinite(d), d, torch.zeros_like(d))


# ---------------------------------------------------------------- ternarize_base3

@pytest.mark.parametrize("n", LENGTHS)
def test_ternarize_base3_matches_reference(native, device, n):
    x = torch.randn(n, generator=gen(n)) * 3
    for segs in segmentings(n):
        s = seg_scales(segs, n, n + 1)
        for seed, offset in [(0, 0), (2**40 + 3, 6), (7, 2**35 + 1), (2**63 - 1, 13)]:
            want = R.ternarize_base3(x, s, segs, seed, offset)
            got = native.ternarize_base3(x.to(device), s.to(device), segs, seed, offset)
            assert got.numel() == (n + 4) // 5
            same(got, want, f"n={n} segs={segs} seed={seed} offset={offset}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternarize_base3_dtypes_match_reference(native, device, dtype):
    n = 5003
    x = (torch.randn(n, generator=gen(3)) * 2).to(dtype)
    segs = [1000, 0, 7, 3996]
    s = seg_scales(segs, n, 4)
    for offset in (0, 3, 21):
        same(native.ternarize_base3(x.to(device), s.to(device), segs, 9, offset),
             R.ternarize_base3(x, s, segs, 9, offset), f"{dtype} offset={offset}")


def test_ternarize_base3_codes_are_those_of_ternarize_int8(native, device):
    """The same draws: base-3 bytes decode to ternarize_int8's codes, and packing those codes
    gives the same bytes."""
    n = 10_007
    x = (torch.randn(n, generator=gen(5)) * 2).to(device)
    segs = [3, 5000, 0, 5004]
    s = (torch.rand(4, generator=gen(6)) + 0.5).to(device)
    for seed, offset in [(1, 0), (99, 5), (2**33, 2**34 - 3)]:
        packed = native.ternarize_base3(x, s, segs, seed, offset)
        codes = native.ternarize_int8(x, s, segs, seed, offset)
        same(R.unpack_base3_codes(packed.cpu(), n), codes, "decoded codes")
        same(R.pack_base3(codes.cpu()), packed, "packed codes")


def test_base3_wrappers_round_trip(device):
    x = torch.randn(1003, generator=gen(7)).to(device)
    s = x.abs().amax().reshape(1)
    packed = ops.ternarize_base3(x, s, seed=4, offset=2)
    assert packed.dtype == torch.uint8 and packed.numel() == 201
    codes = ops.ternarize_int8(x, s, seed=4, offset=2)
    same(ops.unpack_base3(packed, 1003, s), codes.float() * s, "round trip")
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


# ---------------------------------------------------------------- unpack_base3

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 4, 6, 41, 1279, 1280, 1281, 40_003])
def test_unpack_base3_matches_reference(native, device, n, dtype):
    packed = torch.randint(0, 256, ((n + 4) // 5,), generator=gen(n), dtype=torch.uint8)
    for segs in segmentings(n):
        s = seg_scales(segs, n, n + 2) * (-1.0 if n == 41 else 1.0)  # the sign goes through
        same(native.unpack_base3(packed.to(device), n, s.to(device), segs, dtype),
             R.unpack_base3(packed, n, s, segs, dtype), f"n={n} segs={segs}")


def test_base3_digits_of_every_byte(native, device):
    """The decode table: byte b holds the base-3 digits of b (b - 243 from 243 on), code =
    digit - 1, element 5k + j = digit j."""
    packed = torch.arange(256, dtype=torch.uint8)
    want = []
    for b in range(256):
        r = b - 243 if b >= 243 else b
        for _ in range(5):
            want.append(r % 3 - 1)
            r //= 3
    want = torch.tensor(want, dtype=torch.float32)
    same(R.unpack_base3_codes(packed, 1280).float(), want, "reference table")
    same(native.unpack_base3(packed.to(device), 1280, torch.ones(1, device=device), None,
                             torch.float32), want, "native table")
    # And the packing: the 243 valid bytes are exactly the base-3 numbers of their codes.
    codes = R.unpack_base3_codes(packed[:243], 1215)
    same(R.pack_base3(codes), packed[:243], "pack of the codes")


# ---------------------------------------------------------------- mix_stats

def check_stats(got, want, what):
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == torch.float32, what
    same(got[:, 0], want[:, 0], f"{what}: max |d|")
    same(got[:, 3], want[:, 3], f"{what}: non-finite count")
    torch.testing.assert_close(got[:, 1:3], want[:, 1:3], rtol=1e-6, atol=0, msg=what)


@pytest.mark.parametrize("n", LENGTHS + [100_003])
def test_mix_stats_matches_reference(native, device, n):
    v, hat, _ = state(n, n)
    for segs in segmentings(n):
        check_stats(native.mix_stats(v.to(device), hat.to(device), segs),
                    R.mix_stats(v, hat, segs), f"n={n} segs={segs}")


def test_mix_stats_counts_and_skips_non_finite_entries(native, device):
    v = torch.tensor([1.0, NAN, 3.0, INF, -2.0, 0.5, -INF, 1.0])
    hat = torch.tensor([0.0, 0.0, INF, 1.0, 0.0, NAN, -INF, 1.0])  # d[6] = -inf - -inf = NaN
    got = native.mix_stats(v.to(device), hat.to(device), [2, 3, 0, 3]).cpu()
    want = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 2.0]])
    same(got, want, "by hand")
    check_stats(got, R.mix_stats(v, hat, [2, 3, 0, 3]), "reference")


# ---------------------------------------------------------------- mix_encode

def encode_both(native, device, v, hat, acc, s, hs, as_, segs, seed, offset, base3):
    """(native results on device, reference results on CPU): packed, v, hat, acc."""
    dv, dh, da = (t.to(device, copy=True) for t in (v, hat, acc))  # native works in place
    p = native.mix_encode(dv, dh, da, s.to(device), hs.to(device), as_.to(device), segs, seed,
                          offset, base3)
    rv, rh, ra = v.clone(), hat.clone(), acc.clone()
    rp = R.mix_encode(rv, rh, ra, s, hs, as_, segs, seed, offset, base3)
    return (p, dv, dh, da), (rp, rv, rh, ra)


@pytest.mark.parametrize("base3", [False, True], ids=["2bit", "base3"])
@pytest.mark.parametrize("n", LENGTHS)
def test_mix_encode_matches_reference(native, device, n, base3):
    v, hat, acc = state(n, n + 10)
    for segs in segmentings(n):
        s = seg_scales(segs, n, n + 11)
        hs = s * 0.7
        as_ = hs * 0.25
        for seed, offset in [(5, 0), (2**40 + 1, 3), (11, 2**35 - 7)]:
            got, want = encode_both(native, device, v, hat, acc, s, hs, as_, segs, seed, offset,
                                    base3)
            assert got[0].numel() == ((n + 4) // 5 if base3 else (n + 3) // 4)
            for name, g, w in zip(("packed", "v", "hat", "acc"), got, want):
                same(g, w, f"{name}: n={n} segs={segs} seed={seed} offset={offset}")


@pytest.mark.parametrize("base3", [False, True], ids=["2bit", "base3"])
def test_mix_encode_special_scales(native, device, base3):
    """A zero scale (every code 0), a huge one, an infinite hat scale (0 * inf = NaN in hat,
    as in the reference) and a negative acc scale, segment by segment."""
    n = 203
    v, hat, acc = state(n, 21)
    segs = [50, 50, 50, 53]
    s = torch.tensor([0.0, 1e30, 1.0, 2.0])
    hs = torch.tensor([1.0, 0.5, INF, 0.25])
    as_ = torch.tensor([0.5, -0.25, 1.0, -0.0])
    got, want = encode_both(native, device, v, hat, acc, s, hs, as_, segs, 3, 1, base3)
    for name, g, w in zip(("packed", "v", "hat", "acc"), got, want):
        same(g, w, name)


def test_mix_encode_codes_are_ternarize_int8_of_d(native, device):
    """The codes mix_encode sends are ternarize_int8's codes of d = v - hat (0 where d is not
    finite), and v falls back to hat exactly where d is not finite."""
    n = 4099
    v, hat, acc = state(n, 31)
    segs = [1, 2048, 0, 2050]
    s = seg_scales(segs, n, 32)
    d = codes_of_d(v, hat)
    want_codes = native.ternarize_int8(d.to(device), s.to(device), segs, 77, 9)
    for base3 in (False, True):
        dv, dh, da = (t.to(device, copy=True) for t in (v, hat, acc))
        p = native.mix_encode(dv, dh, da, s.to(device), s.to(device), s.to(device), segs, 77, 9,
                              base3).cpu()
        codes = R.unpack_base3_codes(p, n) if base3 else R.unpack_codes(p, n)
        same(codes, want_codes, f"base3={base3}")
        bad = ~torch.isfinite(v - hat)
        assert int(bad.sum()) >= 4
        same(dv.cpu(), torch.where(bad, hat, v), "v")


# ---------------------------------------------------------------- mix_decode

def payloads(native, device, n, rows, segs, base3, seed):
    """rows payloads: real codes of random data, the last one random bytes (bytes >= 243 for
    base-3, fields 0b11 for 2-bit: both decode by the rules)."""
    out = []
    for w in range(rows):
        if w == rows - 1 and rows > 1:
            nbytes = (n + 4) // 5 if base3 else (n + 3) // 4
            out.append(torch.randint(0, 256, (nbytes,), generator=gen(seed + w), dtype=torch.uint8))
            continue
        x = torch.randn(n, generator=gen(seed + w))
        s = seg_scales(segs, n, seed)
        f = R.ternarize_base3 if base3 else R.ternarize_pack
        out.append(f(x, s, segs, seed + w, 0))
    return out


@pytest.mark.parametrize("base3", [False, True], ids=["2bit", "base3"])
@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("n", [0, 1, 7, 41, 1001, 40_003])
def test_mix_decode_matches_reference(native, device, n, rows, base3):
    v, hat, acc = state(n, n + 40)
    for segs in segmentings(n):
        packed = payloads(native, device, n, rows, segs, base3, n + 41)
        scales = torch.rand(rows, nseg(segs), generator=gen(n + 42)) - 0.25  # some negative
        for gamma in (0.37, 1.0 / 3.0):
            dv, da = v.to(device, copy=True), acc.to(device, copy=True)
            native.mix_decode(dv, hat.to(device), da, [p.to(device) for p in packed],
                              scales.to(device), segs, gamma, base3)
            rv, ra = v.clone(), acc.clone()
            R.mix_decode(rv, hat, ra, packed, scales, segs, gamma, base3)
            same(da, ra, f"acc: n={n} rows={rows} segs={segs}")
            same(dv, rv, f"v: n={n} rows={rows} segs={segs} gamma={gamma}")


@pytest.mark.parametrize("base3", [False, True], ids=["2bit", "base3"])
def test_mix_decode_non_finite_scales(native, device, base3):
    """An infinite or NaN scale poisons exactly the elements the reference poisons (0 * inf is
    NaN, so all of its segment), also where the kernel decodes several bytes at once."""
    n, segs = 1003, [400, 3, 600]
    v, hat, acc = state(n, 48, nonfinite=False)
    packed = payloads(native, device, n, 3, segs, base3, 49)
    scales = torch.tensor([[0.5, 1.0, -INF], [INF, 0.25, 1.0], [1.0, NAN, 0.5]])
    dv, da = v.to(device, copy=True), acc.to(device, copy=True)
    native.mix_decode(dv, hat.to(device), da, [p.to(device) for p in packed], scales.to(device),
                      segs, 0.75, base3)
    rv, ra = v.clone(), acc.clone()
    R.mix_decode(rv, hat, ra, packed, scales, segs, 0.75, base3)
    same(da, ra, "acc")
    same(dv, rv, "v")


def test_mix_decode_takes_flat_scales(native, device):
    """Raw calls may pass the [W, S] scales flat (as unpack_accumulate's); both backends read
    them row by row."""
    n, segs = 203, [100, 3, 100]
    v, hat, acc = state(n, 45)
    packed = payloads(native, device, n, 2, segs, True, 46)
    scales = torch.rand(2, 3, generator=gen(47))
    dv, da = v.to(device, copy=True), acc.to(device, copy=True)
    native.mix_decode(dv, hat.to(device), da, [p.to(device) for p in packed],
                      scales.reshape(-1).to(device), segs, 0.5, True)
    rv, ra = v.clone(), acc.clone()
    R.mix_decode(rv, hat, ra, packed, scales.reshape(-1), segs, 0.5, True)
    same(da, ra, "acc")
    same(dv, rv, "v")


def test_mix_decode_rounds_the_product_before_adding(native, device):
    """v + gamma * (acc - hat) with the product rounded first: inputs where a fused
    multiply-add would give other bits (checked here), so a contracted kernel fails."""
    n = 4096
    g = gen(51)
    v = torch.randn(n, generator=g)  # of the product's size, so that its rounding shows
    hat = torch.randn(n, generator=g)
    acc = torch.randn(n, generator=g)
    gamma = 0.1234567
    gf = torch.tensor(gamma, dtype=torch.float32)
    unfused = v + (acc - hat) * gf
    fused = (v.double() + (acc - hat).double() * gf.double()).float()  # exact product, one rounding
    assert int((unfused != fused).sum()) > n // 10  # the test has teeth
    dv, da = v.to(device, copy=True), acc.to(device, copy=True)
    native.mix_decode(dv, hat.to(device), da, [], torch.zeros(0, 1, device=device), None, gamma,
                      False)
    same(dv, unfused, "v")
    rv, ra = v.clone(), acc.clone()
    R.mix_decode(rv, hat, ra, [], torch.zeros(0, 1), None, gamma, False)
    same(dv, rv, "reference")


def test_mix_decode_wrapper_takes_no_payloads(device):
    """ops.mix_decode with W = 0 (a rank with no neighbour this round): [0, S] scales."""
    n = 10
    v, hat, acc = (torch.randn(n, generator=gen(k)).to(device) for k in (61, 62, 63))
    want_v, want_acc = v.clone(), acc.clone()
    R.mix_decode(want_v, hat, want_acc, [], torch.zeros(0, 2, device=device), [4, 6], 0.5, True)
    out = ops.mix_decode(v, hat, acc, [], torch.zeros(0, 2, device=device), 0.5, segments=[4, 6],
                         base3=True)
    assert out is v
    same(v, want_v, "v")
    same(acc, want_acc, "acc")


def test_mix_encode_then_decode_is_the_choco_step(device):
    """The wrappers end to end: a neighbour's payload decoded with weight w moves acc by
    w * its q, and v by gamma (acc - hat)."""
    n, gamma = 1000, 0.5
    g = gen(71)
    v = torch.randn(n, generator=g).to(device)
    hat = torch.zeros(n, device=device)
    acc = torch.zeros(n, device=device)
    stats = ops.mix_stats(v, hat)
    s = stats[:, 0]
    codes = ops.mix_encode(v, hat, acc, s, s, s * 0.5, seed=3, base3=True)
    q = ops.unpack_base3(codes, n, s)
    same(hat, q, "hat = q")
    same(acc, q * 0.5, "acc = W_ii q")
    v0, acc0 = v.clone(), acc.clone()
    ops.mix_decode(v, hat, acc, [codes], s.reshape(1, 1) * 0.25, gamma, base3=True)
    same(acc, acc0 + q * 0.25, "acc += W_ij q_j")
    same(v, v0 + (acc - hat) * torch.tensor(gamma), "v += gamma (acc - hat)")


# ---------------------------------------------------------------- track_prep

@pytest.mark.parametrize("n", [0, 1, 7, 1001, 40_003])
def test_track_prep_matches_reference(native, device, n):
    g_ = gen(n + 80)
    y, g, gp = (torch.randn(n, generator=g_) for _ in range(3))
    cases = [("finite", g)]
    if n:
        for pos, val in [(0, NAN), (n - 1, INF), (n // 2, -INF)]:
            bad = g.clone()
            bad[pos] = val
            cases.append((f"g[{pos}]={val}", bad))
    for name, gg in cases:
        dy, dgp = y.to(device, copy=True), gp.to(device, copy=True)
        ok = native.track_prep(dy, gg.to(device), dgp)
        ry, rgp = y.clone(), gp.clone()
        rok = R.track_prep(ry, gg, rgp)
        assert ok.dtype == torch.bool and ok.dim() == 0 and ok.device == dy.device, name
        assert bool(ok) == bool(rok) == (name == "finite"), name
        same(dy, ry, f"y: {name}")
        same(dgp, rgp, f"g_prev: {name}")


# ---------------------------------------------------------------- argument checks

def test_native_mixing_ops_check_arguments(native, device):
    n = 10
    v, hat, acc = (torch.randn(n, device=device) for _ in range(3))
    s = torch.ones(1, device=device)
    with pytest.raises(RuntimeError, match="hat must be a float32 tensor"):
        native.mix_stats(v, hat.double(), None)
    with pytest.raises(RuntimeError, match="acc has 9 elements"):
        native.mix_encode(v, hat, acc[:9], s, s, s, None, 0, 0, False)
    with pytest.raises(RuntimeError, match="hat_scales has 2 elements but 1"):
        native.mix_encode(v, hat, acc, s, torch.ones(2, device=device), s, None, 0, 0, True)
    two, three = (torch.zeros(k, dtype=torch.uint8, device=device) for k in (2, 3))
    with pytest.raises(RuntimeError, match=r"packed\[1\] has 3 bytes"):
        native.mix_decode(v, hat, acc, [two, three], torch.ones(2, 1, device=device), None, 0.5,
                          True)
    with pytest.raises(RuntimeError, match="scales has 1 elements but 2"):
        native.mix_decode(v, hat, acc, [torch.zeros(3, dtype=torch.uint8, device=device)] * 2,
                          s, None, 0.5, False)
    with pytest.raises(RuntimeError, match="g_prev must be contiguous"):
        native.track_prep(v, hat, torch.randn(n, 2, device=device).t()[0])
    with pytest.raises(RuntimeError, match=r"needs 3 \(ceil\(numel / 5\)\)"):
        native.unpack_base3(torch.zeros(2, dtype=torch.uint8, device=device), 11, s, None,
                            torch.float32)
    with pytest.raises(RuntimeError, match="segments sum to 9"):
        native.ternarize_base3(v, s, [9], 0, 0)


def test_reference_mixing_ops_check_arguments():
    """The raw reference ops (the fallback backend) refuse the same input."""
    from commcomp.ops import _loader

    v, hat, acc = (torch.randn(10) for _ in range(3))
    s = torch.ones(1)
    with pytest.raises(TypeError, match="hat must be a float32 tensor"):
        _loader._checked_reference("mix_stats")(v, hat.double(), None)
    two, three = (torch.zeros(k, dtype=torch.uint8) for k in (2, 3))
    with pytest.raises(ValueError, match=r"packed\[1\] has 3 bytes"):
        _loader._checked_reference("mix_decode")(v, hat, acc, [two, three], torch.ones(2, 1), None,
                                                 0.5, True)
    with pytest.raises(ValueError, match=r"needs 3 \(ceil\(numel / 5\)\)"):
        _loader._checked_reference("unpack_base3")(torch.zeros(2, dtype=torch.uint8), 11, s, None,
                                                   torch.float32)


# ---------------------------------------------------------------- CPU instruction sets, threads

def _isas():
    if ops.backend("cpu") != "native":
        pytest.skip("no native CPU kernels")
    from commcomp import _C

    return _C, _C._ternary_isas()


def _isa_cases():
    cases = []
    for n in [1, 7, 8, 9, 39, 40, 41, 127, 128, 129, 255, 257, 641, 1031, 2561, 20_011]:
        v, hat, acc = state(n, n + 90)
        for offset in ((0, 3, 8, 125) if n <= 1031 else (0, 5)):
            for segs in segmentings(n)[::2]:
                s = seg_scales(segs, n, n + 91)
                cases.append((v, hat, acc, s, segs, 1000 + n, offset))
    return cases


def _isa_outputs(cases):
    out = []
    for v, hat, acc, s, segs, seed, offset in cases:
        x = codes_of_d(v, hat)
        res = [torch.ops.commcomp.ternarize_base3(x, s, segs, seed, offset),
               torch.ops.commcomp.ternarize_base3(x.half(), s, segs, seed, offset),
               torch.ops.commcomp.ternarize_pack(x, s, segs, seed, offset)]
        for base3 in (False, True):
            sv, sh, sa = v.clone(), hat.clone(), acc.clone()
            p = torch.ops.commcomp.mix_encode(sv, sh, sa, s, s * 0.5, s * 0.25, segs, seed, offset,
                                              base3)
            res += [p, sv, sh, sa]
        out.append(res)
    return out


def test_cpu_isa_paths_give_identical_bytes():
    """Every instruction set this CPU runs (SSE2 baseline, AVX2, AVX-512: draws, codes, the
    fused mix_encode batches and the SIMD packs) gives the reference's bytes."""
    _C, isas = _isas()
    cases = _isa_cases()
    before = _C._ternary_isa()
    try:
        results = {}
        for isa in isas:
            _C._ternary_isa(isa)
            results[isa] = _isa_outputs(cases)
    finally:
        _C._ternary_isa(before)
    for k, (v, hat, acc, s, segs, seed, offset) in enumerate(cases):
        if k % 3:  # the reference on a third of the cases (it is slow); the paths on all
            continue
        x = codes_of_d(v, hat)
        want = [R.ternarize_base3(x, s, segs, seed, offset),
                R.ternarize_base3(x.half(), s, segs, seed, offset),
                R.ternarize_pack(x, s, segs, seed, offset)]
        for base3 in (False, True):
            sv, sh, sa = v.clone(), hat.clone(), acc.clone()
            want += [R.mix_encode(sv, sh, sa, s, s * 0.5, s * 0.25, segs, seed, offset, base3),
                     sv, sh, sa]
        for j, w in enumerate(want):
            same(results[isas[0]][k][j], w, f"{isas[0]} case {k} output {j}")
    for isa in isas[1:]:
        for k in range(len(cases)):
            for j, (got, base) in enumerate(zip(results[isa][k], results[isas[0]][k])):
                same(got, base, f"{isa} case {k} output {j}")


def test_threads_do_not_change_the_bytes():
    """One thread and several write the same bytes (work is cut by the length only)."""
    if ops.backend("cpu") != "native":
        pytest.skip("no native CPU kernels")
    n = 1_000_003
    v, hat, acc = state(n, 101)
    segs = [1, 300_000, 7, 0, 699_995]
    s = seg_scales(segs, n, 102)
    packed = [torch.ops.commcomp.ternarize_pack(torch.randn(n, generator=gen(103)), s, segs, 1, 0)]
    packed3 = [torch.ops.commcomp.ternarize_base3(v.nan_to_num(), s, segs, 2, 0)]
    scales = torch.rand(1, len(segs), generator=gen(104))
    C = torch.ops.commcomp

    def run():
        out = [C.ternarize_base3(v.nan_to_num(), s, segs, 5, 3),
               C.unpack_base3(packed3[0], n, s, segs, torch.bfloat16),
               C.mix_stats(v, hat, segs)]
        for base3, pk in ((False, packed), (True, packed3)):
            sv, sh, sa = v.clone(), hat.clone(), acc.clone()
            out.append(C.mix_encode(sv, sh, sa, s, s, s, segs, 7, 11, base3))
            C.mix_decode(sv, sh, sa, pk, scales, segs, 0.3, base3)
            out += [sv, sh, sa]
        y, gp = v.nan_to_num(), hat.nan_to_num()
        out += [C.track_prep(y, acc, gp), y, gp]
        return out

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(before, 4))
        many = run()
    finally:
        torch.set_num_threads(before)
    for k, (a, b) in enumerate(zip(one, many)):
        same(b, a, f"output {k}")


# ---------------------------------------------------------------- the operator library

def _opcheck_cases(device):
    n = 37
    v, hat, acc = (t.to(device) for t in state(n, 111, nonfinite=False))
    s = torch.ones(1, device=device) * 2
    s2 = torch.ones(2, device=device)
    x = torch.randn(n, device=device)
    p3 = torch.ops.commcomp.ternarize_base3(x, s, None, 1, 0)
    p2 = torch.ops.commcomp.ternarize_pack(x, s, None, 1, 0)
    C = torch.ops.commcomp
    return [
        (C.ternarize_base3.default, (x, s, None, 1, 0)),
        (C.ternarize_base3.default, (x.half(), s2, [30, 7], 1, 5)),
        (C.unpack_base3.default, (p3, n, s, None, torch.float16)),
        (C.mix_stats.default, (v, hat, [30, 7])),
        (C.mix_encode.default, (v.clone(), hat.clone(), acc.clone(), s, s, s, None, 3, 0, False)),
        (C.mix_encode.default,
         (v.clone(), hat.clone(), acc.clone(), s2, s2, s2, [30, 7], 3, 1, True)),
        (C.mix_decode.default,
         (v.clone(), hat, acc.clone(), [p2, p2], torch.ones(2, 1, device=device), None, 0.5,
          False)),
        (C.mix_decode.default, (v.clone(), hat, acc.clone(), [p3], torch.ones(1, 1, device=device),
                                None, 0.5, True)),
        (C.track_prep.default, (v.clone(), hat, acc.clone())),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- CUDA only

def _cuda_native():
    if ops.backend("cuda") != "native":
        pytest.skip("no native CUDA kernels")
    if ops.backend("cpu") != "native":
        pytest.skip("no native CPU kernels")
    return torch.ops.commcomp


@pytest.mark.cuda
def test_cuda_bytes_equal_cpu_bytes_on_a_large_buffer():
    """The claim that matters across machines, over more than one grid of 65535 x 256 threads
    (the grid-stride loops): the GPU writes the CPU kernels' bytes."""
    C = _cuda_native()
    n = 65535 * 256 * 5 + 7
    g = torch.Generator(device="cuda").manual_seed(5)
    v = torch.randn(n, device="cuda", generator=g)
    hat = v + torch.randn(n, device="cuda", generator=g) * 0.1
    acc = torch.randn(n, device="cuda", generator=g)
    v[12345], hat[n - 3] = NAN, INF
    segs = [3, n // 2, 0, n - n // 2 - 3]
    s = torch.tensor([1.0, 0.5, 2.0, 0.25], device="cuda")
    cpu = [t.cpu() for t in (v, hat, acc, s)]
    check_stats(C.mix_stats(v, hat, segs), C.mix_stats(cpu[0], cpu[1], segs), "mix_stats")
    x = v.nan_to_num()
    same(C.ternarize_base3(x, s, segs, 9, 2**34 + 3),
         C.ternarize_base3(x.cpu(), cpu[3], segs, 9, 2**34 + 3), "ternarize_base3")
    for base3 in (False, True):
        gv, gh, ga = v.clone(), hat.clone(), acc.clone()
        cv, ch, ca = (t.clone() for t in cpu[:3])
        gp = C.mix_encode(gv, gh, ga, s, s * 0.5, s * 0.125, segs, 17, 5, base3)
        cp = C.mix_encode(cv, ch, ca, cpu[3], cpu[3] * 0.5, cpu[3] * 0.125, segs, 17, 5, base3)
        for name, a, b in (("packed", gp, cp), ("v", gv, cv), ("hat", gh, ch), ("acc", ga, ca)):
            same(a, b, f"mix_encode base3={base3}: {name}")
        sc = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], device="cuda")
        C.mix_decode(gv, gh, ga, [gp, gp.flip(0)], sc, segs, 0.3, base3)
        C.mix_decode(cv, ch, ca, [cp, cp.flip(0)], sc.cpu(), segs, 0.3, base3)
        same(ga, ca, f"mix_decode base3={base3}: acc")
        same(gv, cv, f"mix_decode base3={base3}: v")
        same(C.unpack_base3(gp, n, s, segs, torch.float16) if base3 else gp,
             C.unpack_base3(cp, n, cpu[3], segs, torch.float16) if base3 else cp, "unpack_base3")
    y, gprev = acc.clone(), hat.nan_to_num()
    cy, cg = y.cpu(), gprev.cpu()
    ok = C.track_prep(y, x, gprev)
    cok = C.track_prep(cy, x.cpu(), cg)
    assert bool(ok) and bool(cok)
    same(y, cy, "track_prep: y")
    same(gprev, cg, "track_prep: g_prev")


@pytest.mark.cuda
def test_cuda_mix_decode_with_many_payloads():
    """More payloads than travel in the kernel's arguments (32): the device table."""
    C = _cuda_native()
    n, rows = 1001, 40
    v, hat, acc = state(n, 121)
    packed = [torch.randint(0, 256, ((n + 3) // 4,), generator=gen(122 + w), dtype=torch.uint8)
              for w in range(rows)]
    scales = torch.rand(rows, 2, generator=gen(163))
    gv, ga = v.cuda(), acc.cuda()
    C.mix_decode(gv, hat.cuda(), ga, [p.cuda() for p in packed], scales.cuda(), [500, 501], 0.25,
                 False)
    R.mix_decode(v, hat, acc, packed, scales, [500, 501], 0.25, False)
    same(ga, acc, "acc")
    same(gv, v, "v")


@pytest.mark.cuda
def test_cuda_mixing_ops_do_not_sync_the_host():
    """The fused ops queue on the current stream without a host sync (track_prep's finite check
    stays on the device); torch raises on a synchronizing call in this mode."""
    C = _cuda_native()
    n = 4099
    v, hat, acc, g = (torch.randn(n, device="cuda") for _ in range(4))
    s = torch.ones(2, device="cuda")
    segs = [2000, 2099]
    C.mix_stats(v, hat, segs)  # first calls stage the segment tables (cached after)
    p = C.mix_encode(v, hat, acc, s, s, s, segs, 1, 0, True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        C.mix_stats(v, hat, segs)
        p = C.mix_encode(v, hat, acc, s, s, s, segs, 1, 0, True)
        C.mix_decode(v, hat, acc, [p, p], torch.ones(2, 2, device="cuda"), segs, 0.5, True)
        ok = C.track_prep(v, g, hat)
        C.ternarize_base3(v, s, segs, 1, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(ok)
