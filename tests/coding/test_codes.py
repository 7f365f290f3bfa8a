"""Gradient codes (Tandon et al. 2017): supports, exact decoding from every survivor set of
small codes and random ones of large codes, decoding real gradient vectors, determinism,
the decode cache, descriptions, and the errors for bad inputs."""

import itertools
import random

import numpy as np
import pytest
import torch

from commcomp.coding.codes import (
    CODES,
    GradientCode,
    cyclic_repetition_code,
    decode_vector,
    fractional_repetition_code,
    make_code,
)

SMALL = [(n, s) for n in range(1, 8) for s in range(n)]
SMALL_FR = [(n, s) for n, s in SMALL if n % (s + 1) == 0]
LARGE = [(n, s) for n in (32, 64) for s in (1, 2, 4, 8)]


def small_codes():
    for n, s in SMALL:
        yield cyclic_repetition_code(n, s, seed=n * 10 + s)
    for n, s in SMALL_FR:
        yield fractional_repetition_code(n, s)


def assert_decodes(code, survivors, a):
    """a is zero off the survivors, and a^T B = 1^T within the documented tolerance."""
    a = a.numpy()
    off = np.setdiff1d(np.arange(code.n), list(survivors))
    assert a.dtype == np.float64 and a.shape == (code.n,)
    assert np.all(a[off] == 0)
    terms = a[:, None] * code.B.numpy()
    scale = max(1.0, np.abs(terms).sum(axis=0).max())
    assert np.abs(terms.sum(axis=0) - 1).max() <= 1e-9 * scale


# -- supports


@pytest.mark.parametrize("n,s", SMALL + LARGE)
def test_cyclic_support(n, s):
    code = cyclic_repetition_code(n, s, seed=3)
    assert code.B.dtype == torch.float64 and code.B.shape == (n, n)
    for i in range(n):
        assert code.partitions(i) == sorted((i + k) % n for k in range(s + 1))
        assert torch.equal(code.weights(i), code.B[i, code.partitions(i)])
        assert int((code.B[i] != 0).sum()) == s + 1
        assert int((code.B[:, i] != 0).sum()) == s + 1  # each partition held by s + 1 workers
        assert len(code.holders(i)) == s + 1
    assert code.B[0, 0] == 1.0  # the paper's normalization: first coefficient of each row is 1


@pytest.mark.parametrize("n,s", SMALL_FR + [(64, 7), (32, 3)])
def test_fractional_support(n, s):
    code = fractional_repetition_code(n, s)
    for i in range(n):
        group = i // (s + 1)
        assert code.partitions(i) == list(range(group * (s + 1), (group + 1) * (s + 1)))
        assert code.holders(i) == code.partitions(i)
        assert torch.equal(code.weights(i), torch.ones(s + 1, dtype=torch.float64))
    assert int((code.B != 0).sum()) == n * (s + 1)


def test_zero_stragglers_is_identity():
    for code in (cyclic_repetition_code(5, 0), fractional_repetition_code(5, 0), make_code("cyclic", 1, 0)):
        assert torch.equal(code.B, torch.eye(code.n, dtype=torch.float64))
        assert torch.equal(code.decode(range(code.n)), torch.ones(code.n, dtype=torch.float64))


# -- decoding


def test_every_survivor_set_of_small_codes():
    for code in small_codes():
        n, s = code.n, code.s
        for size in (n - s, min(n, n - s + 1)):
            for S in itertools.combinations(range(n), size):
                assert_decodes(code, S, code.decode(S))


@pytest.mark.parametrize("n,s", LARGE)
def test_random_survivor_sets_of_large_codes(n, s):
    rng = random.Random(n * 100 + s)
    code = cyclic_repetition_code(n, s, seed=1)
    sets = [rng.sample(range(n), n - s) for _ in range(12)] + [rng.sample(range(n), n - s // 2) for _ in range(3)]
    for S in sets:
        assert_decodes(code, S, code.decode(S))
    if n % (s + 1) == 0:
        fr = fractional_repetition_code(n, s)
        for S in sets:
            a = fr.decode(S)
            assert_decodes(fr, S, a)
            assert set(a.unique().tolist()) <= {0.0, 1.0}  # one survivor per group, exactly
            assert torch.equal(a @ fr.B, torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("name,n,s", [("cyclic", 7, 3), ("cyclic", 32, 4), ("cyclic", 64, 8),
                                      ("fractional", 12, 2), ("fractional", 64, 7)])
def test_decoding_gradient_vectors(name, n, s):
    """sum_{i in S} a_i (B g)_i == sum_j g_j for random partition gradients g."""
    code = make_code(name, n, s, seed=5)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, 100, generator=gen, dtype=torch.float64)
    coded = code.B @ g  # what worker i sends: sum_j B[i, j] g_j
    rng = random.Random(0)
    for _ in range(6):
        S = sorted(rng.sample(range(n), n - s))
        a = code.decode(S)
        decoded = sum(a[i] * coded[i] for i in S)
        err = (decoded - g.sum(0)).abs().max()
        # float64 rounding grows with the cancellation in the decoding (amplification).
        assert err <= 1e-12 * code.amplification(S) * g.abs().max() * n
        assert err <= 1e-9 * g.sum(0).abs().max()


def test_amplification():
    assert fractional_repetition_code(12, 3).amplification(range(9)) == 1.0
    assert cyclic_repetition_code(12, 3, seed=0).amplification(range(9)) >= 1.0


def test_decode_vector_matches_method_and_infers_s():
    code = cyclic_repetition_code(6, 2, seed=4)
    S = [5, 0, 3, 1]
    assert torch.equal(decode_vector(code.B, S), code.decode(S))
    assert torch.equal(decode_vector(code.B.tolist(), np.array(S), s=2), code.decode(S))
    with pytest.raises(ValueError, match="at least n-s=4 survivors"):
        decode_vector(code.B, [0, 1, 2])  # s read off B: 3 non-zeros per row -> s = 2


def test_non_code_fails_the_residual_check():
    # Workers 0 and 1 hold the same two partitions: without worker 2 nothing covers partition 2.
    B = torch.tensor([[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot decode this code"):
        decode_vector(B, [0, 1], s=1)
    code = GradientCode(B, s=1)
    with pytest.raises(ValueError, match="misses 1\\^T by"):
        code.decode([1, 0])


# -- determinism, cache, description


def test_same_seed_same_code():
    assert torch.equal(cyclic_repetition_code(9, 3, seed=7).B, cyclic_repetition_code(9, 3, seed=7).B)
    assert not torch.equal(cyclic_repetition_code(9, 3, seed=7).B, cyclic_repetition_code(9, 3, seed=8).B)
    before = torch.get_rng_state()
    cyclic_repetition_code(9, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched


def test_decode_cache():
    code = cyclic_repetition_code(8, 2, seed=0)
    a = code.decode([0, 1, 2, 3, 4, 5])
    assert code.decode((5, 4, 3, 2, 1, 0)) is a  # any order, same tensor
    assert code.decode(iter(range(6))) is a
    assert code.decode(torch.arange(6)) is a
    assert code.cache_len() == 1
    small = GradientCode(code.B, s=2, name="cyclic", cache_size=2)
    first = small.decode(range(6))
    small.decode(range(1, 7))
    small.decode(range(2, 8))  # evicts the least recently used set
    assert small.cache_len() == 2
    again = small.decode(range(6))
    assert again is not first and torch.equal(again, first)
    assert GradientCode(code.B, s=2, cache_size=0).decode(range(6)).equal(a)


def test_read_only():
    code = fractional_repetition_code(4, 1)
    with pytest.raises(AttributeError, match="read-only"):
        code.s = 2


def test_description_round_trip():
    for code in (cyclic_repetition_code(10, 3, seed=11), fractional_repetition_code(10, 4), make_code("cyclic", 4, 0)):
        d = code.to_dict()
        assert set(d) == {"name", "n", "s", "seed", "digest"}
        back = GradientCode.from_dict(d)
        assert torch.equal(back.B, code.B) and back.to_dict() == d
        assert repr(back) == repr(code)
    assert repr(cyclic_repetition_code(10, 3, seed=11)) == "GradientCode(name='cyclic', n=10, s=3, seed=11)"
    d = cyclic_repetition_code(10, 3, seed=11).to_dict()
    with pytest.raises(ValueError, match="digest"):
        GradientCode.from_dict(dict(d, digest="0" * 16))
    assert GradientCode.from_dict(dict(d, digest="0" * 16), strict=False).n == 10
    with pytest.raises(ValueError, match="lacks"):
        GradientCode.from_dict({"name": "cyclic", "n": 3})


def test_registry():
    assert sorted(CODES) == ["cyclic", "fractional"]
    assert torch.equal(make_code("fractional", 6, 2, seed=3).B, fractional_repetition_code(6, 2).B)
    assert torch.equal(make_code("cyclic", 6, 2, seed=3).B, cyclic_repetition_code(6, 2, seed=3).B)


# -- errors


@pytest.mark.parametrize("n,s,match", [
    (0, 0, "n >= 1"),
    (4, -1, "s in 0..3"),
    (4, 4, "s in 0..3"),
    (4.0, 1, "must be an integer"),
    (4, True, "must be an integer"),
])
def test_impossible_parameters(n, s, match):
    for build in (cyclic_repetition_code, fractional_repetition_code):
        with pytest.raises(ValueError, match=match):
            build(n, s)


def test_fractional_needs_divisibility():
    with pytest.raises(ValueError, match=r"valid s for n=6: \[0, 1, 2, 5\]"):
        fractional_repetition_code(6, 3)
    with pytest.raises(ValueError, match="unknown gradient code 'mds'"):
        make_code("mds", 6, 1)


@pytest.mark.parametrize("survivors,match", [
    ([0, 1, 2], "at least n-s=4 survivors"),
    ([0, 1, 2, 2], "distinct ranks; \\[2\\] appear more than once"),
    ([0, 1, 2, 6], "ranks in 0..5 .*out-of-range \\[6\\]"),
    ([0, 1, 2, -1], "out-of-range \\[-1\\]"),
    ([0, 1, 2, 3.5], "must be an integer"),
    (5, "iterable of worker ranks"),
])
def test_bad_survivors(survivors, match):
    code = cyclic_repetition_code(6, 2)
    with pytest.raises(ValueError, match=match):
        code.decode(survivors)


def test_bad_custom_matrix():
    with pytest.raises(ValueError, match="square"):
        GradientCode(torch.ones(2, 3), s=1)
    with pytest.raises(ValueError, match="exactly s\\+1=2 non-zeros"):
        GradientCode(torch.eye(3), s=1)
    with pytest.raises(ValueError, match="worker must be in 0..2"):
        cyclic_repetition_code(3, 1).partitions(3)
