"""The secure noise generator: ChaCha20 against RFC 8439's vectors on both backends, the
PyTorch twin against OpenSSL, the Gaussian transform against a hand-written reference,
statistics of the output, nonce discipline, key hygiene, and the seed flaw it replaces."""

import copy
import math
import os
import pickle
import secrets
import threading
import warnings

import pytest
import torch
from scipy import stats

from commcomp.privacy import chacha20, csprng
from commcomp.privacy.csprng import SecureGenerator, chacha20_keystream

needs_crypto = pytest.mark.skipif(not csprng.cryptography_available(),
                                  reason="the 'cryptography' package is not installed")
BACKENDS = [pytest.param("cryptography", marks=needs_crypto), "torch"]
RFC_KEY = bytes(range(32))


def unhex(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def as_bytes(t: torch.Tensor) -> bytes:
    assert t.dtype == torch.uint8 and t.dim() == 1
    return bytes(t.cpu().tolist())


# --- ChaCha20 against RFC 8439 ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc8439_2_3_2_block_function(backend):
    nonce = unhex("000000090000004a00000000")
    expected = unhex("""
        10 f1 e7 e4 d1 3b 59 15 50 0f dd 1f a3 20 71 c4
        c7 d1 f4 c7 33 c0 68 03 04 22 aa 9a c3 d4 6c 4e
        d2 82 64 46 07 9f aa 09 14 c2 d7 05 d9 8b 02 a2
        b5 12 9c d1 de 16 4e b9 cb d0 83 e8 a2 50 3c 4e
    """)
    assert as_bytes(chacha20_keystream(RFC_KEY, nonce, 64, counter=1, backend=backend)) == expected


def test_rfc8439_2_3_2_state_words_of_the_twin():
    """The same vector as 32-bit words (RFC 8439 sec. 2.3.2, state after adding the input)."""
    words = chacha20.chacha20_words(RFC_KEY, unhex("000000090000004a00000000"), 1, 1, torch.device("cpu"))
    expected = [0xe4e7f110, 0x15593bd1, 0x1fdd0f50, 0xc47120a3, 0xc7f4d1c7, 0x0368c033,
                0x9aaa2204, 0x4e6cd4c3, 0x466482d2, 0x09aa9f07, 0x05d7c214, 0xa2028bd9,
                0xd19c12b5, 0xb94e16de, 0xe883d0cb, 0x4e3c50a2]
    assert words[:, 0].tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc8439_2_4_2_keystream_encrypts_sunscreen(backend):
    nonce = unhex("000000000000004a00000000")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
                 b"the future, sunscreen would be it.")
    ciphertext = unhex("""
        6e 2e 35 9a 25 68 f9 80 41 ba 07 28 dd 0d 69 81
        e9 7e 7a ec 1d 43 60 c2 0a 27 af cc fd 9f ae 0b
        f9 1b 65 c5 52 47 33 ab 8f 59 3d ab cd 62 b3 57
        16 39 d6 24 e6 51 52 ab 8f 53 0c 35 9f 08 61 d8
        07 ca 0d bf 50 0d 6a 61 56 a3 8e 08 8a 22 b6 5e
        52 bc 51 4d 16 cc f8 06 81 8c e9 1a b7 79 37 36
        5a f9 0b bf 74 a3 5b e6 b4 0b 8e ed f2 78 5e 42
        87 4d
    """)
    ks = as_bytes(chacha20_keystream(RFC_KEY, nonce, len(plaintext), counter=1, backend=backend))
    assert len(ks) == 114
    assert ks[:4] == unhex("224f51f3")  # the keystream as printed in sec. 2.4.2
    assert bytes(p ^ k for p, k in zip(plaintext, ks)) == ciphertext


@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc8439_a1_zero_key_block_0(backend):
    expected = unhex("""
        76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28
        bd d2 19 b8 a0 8d ed 1a a8 36 ef cc 8b 77 0d c7
        da 41 59 7c 51 57 48 8d 77 24 e0 3f b8 d8 4a 37
        6a 43 b8 f4 15 18 a1 1c c3 87 b6 69 b2 ee 65 86
    """)
    assert as_bytes(chacha20_keystream(bytes(32), bytes(12), 64, backend=backend)) == expected


@needs_crypto
@pytest.mark.parametrize("nbytes", [1, 63, 65, 200, 64 * 37 + 5])
def test_twin_equals_cryptography_on_random_inputs(nbytes):
    for _ in range(3):
        key, nonce = secrets.token_bytes(32), secrets.token_bytes(12)
        near_end = secrets.randbelow(2)  # sometimes right below the last block
        counter = secrets.randbelow(1 << 32) - 40 if near_end else secrets.randbelow(1000)
        counter = max(0, min(counter, (1 << 32) - (nbytes + 63) // 64))
        a = chacha20_keystream(key, nonce, nbytes, counter=counter, backend="cryptography")
        b = chacha20_keystream(key, nonce, nbytes, counter=counter, backend="torch")
        assert a.shape == (nbytes,) and torch.equal(a, b), (key.hex(), nonce.hex(), counter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_counter_never_wraps(backend):
    last = (1 << 32) - 1
    ok = chacha20_keystream(RFC_KEY, bytes(12), 64, counter=last, backend=backend)  # the last block
    assert ok.numel() == 64
    with pytest.raises(ValueError, match="32-bit block counter"):
        chacha20_keystream(RFC_KEY, bytes(12), 65, counter=last, backend=backend)
    with pytest.raises(ValueError, match="counter"):
        chacha20_keystream(RFC_KEY, bytes(12), 1, counter=1 << 32, backend=backend)


def test_keystream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="32 bytes"):
        chacha20_keystream(bytes(16), bytes(12), 8)
    with pytest.raises(ValueError, match="12 bytes"):
        chacha20_keystream(bytes(32), bytes(16), 8)
    with pytest.raises(ValueError, match="backend"):
        chacha20_keystream(bytes(32), bytes(12), 8, backend="openssl")
    assert chacha20_keystream(bytes(32), bytes(12), 0).numel() == 0


# --- the generator's randomness, bit for bit ------------------------------------------------
def nonce_of(draw: int, segment: int = 0) -> bytes:
    return draw.to_bytes(8, "little") + segment.to_bytes(4, "little")


def word53(ks: bytes, i: int) -> int:
    """The top 53 bits of the i-th little-endian 64-bit word of a keystream."""
    return int.from_bytes(ks[8 * i: 8 * i + 8], "little") >> 11


def reference_normals(key: bytes, draw: int, n: int):
    """Draw ``draw`` of ``normal(n)`` in plain Python from the RFC-checked keystream."""
    blocks = (n + 1) // 2
    ks = as_bytes(chacha20_keystream(key, nonce_of(draw), 64 * blocks))
    out = []
    for j in range(blocks):
        m = [word53(ks, 8 * j + k) for k in range(8)]
        r = [math.sqrt(-2 * math.log((m[k] + 1) / 2**53)) for k in range(4)]
        t = [2 * math.pi * m[4 + k] / 2**53 for k in range(4)]
        out += [sum(r[k] * math.cos(t[k]) for k in range(4)) / 2,
                sum(r[k] * math.sin(t[k]) for k in range(4)) / 2]
    return out[:n]


@pytest.mark.parametrize("backend", BACKENDS)
def test_normal_matches_a_plain_python_reference(backend):
    key = secrets.token_bytes(32)
    gen = SecureGenerator(key, backend=backend)
    gen.uniform(3)  # draw 0
    got = gen.normal(37, dtype=torch.float64)  # draw 1, an odd length
    assert got.tolist() == pytest.approx(reference_normals(key, 1, 37), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_and_bernoulli_match_the_keystream(backend):
    key = secrets.token_bytes(32)
    gen = SecureGenerator(key, backend=backend)
    u = gen.uniform(13)
    ks = as_bytes(chacha20_keystream(key, nonce_of(0), 13 * 8))
    expected = [word53(ks, i) / 2**53 for i in range(13)]
    assert u.dtype == torch.float64 and u.tolist() == expected
    first = word53(as_bytes(chacha20_keystream(key, nonce_of(1), 8)), 0) / 2**53
    assert gen.bernoulli(first) is False  # draw 1: its coin is u < p with u = first
    again = SecureGenerator(key, backend=backend)
    again.uniform(0)
    assert again.bernoulli(math.nextafter(first, 2)) is True
    assert gen.draws == 2 and again.draws == 2


def test_the_four_sum_is_applied(monkeypatch):
    """Radii 0, 0, 0 and sqrt(-2 ln 1/4) at angle 0: one normal would give 1.665, the 4-sum half."""
    m = torch.tensor([[2**53 - 1] * 3 + [2**51 - 1] + [0] * 4], dtype=torch.int64)
    monkeypatch.setattr(SecureGenerator, "_mantissas", lambda self, *a, **k: m)
    z = SecureGenerator().normal(2, dtype=torch.float64)
    assert z.tolist() == pytest.approx([math.sqrt(-2 * math.log(0.25)) / 2, 0.0], abs=1e-15)
    assert csprng._SUMMANDS == 4


@needs_crypto
def test_backends_give_identical_draws():
    key = secrets.token_bytes(32)
    a, b = SecureGenerator(key, backend="cryptography"), SecureGenerator(key, backend="torch")
    assert torch.equal(a.normal(1001, dtype=torch.float64), b.normal(1001, dtype=torch.float64))
    assert torch.equal(a.uniform(77), b.uniform(77))
    assert a.bernoulli(0.5) == b.bernoulli(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pieces_do_not_change_the_result(monkeypatch, backend):
    key = secrets.token_bytes(32)
    whole = SecureGenerator(key, backend=backend).normal(1001)
    for name in ("_CPU_PIECE_BLOCKS", "_TWIN_CPU_PIECE_BLOCKS", "_DEVICE_PIECE_BLOCKS"):
        monkeypatch.setattr(csprng, name, 7)
    assert torch.equal(SecureGenerator(key, backend=backend).normal(1001), whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_draw_moves_to_a_fresh_nonce_instead_of_wrapping(monkeypatch, backend):
    """With 3 blocks per nonce, block 3 of draw 0 is block 0 of nonce (0, segment 1)."""
    monkeypatch.setattr(csprng, "_BLOCKS_PER_NONCE", 3)
    key = secrets.token_bytes(32)
    u = SecureGenerator(key, backend=backend).uniform(8 * 7)  # blocks in segments 0,0,0,1,1,1,2
    expected = []
    for seg, blocks in ((0, 3), (1, 3), (2, 1)):
        ks = as_bytes(chacha20_keystream(key, nonce_of(0, seg), 64 * blocks))
        expected += [word53(ks, i) / 2**53 for i in range(8 * blocks)]
    assert u.tolist() == expected
    assert len(set(expected)) == len(expected)  # no block repeated


def test_missing_cryptography_falls_back_to_the_twin_with_one_warning(monkeypatch):
    key = secrets.token_bytes(32)
    expected = SecureGenerator(key).normal(100)
    monkeypatch.setattr(chacha20, "_CRYPTOGRAPHY_OK", False)
    monkeypatch.setattr(chacha20, "_fallback_warned", False)
    gen = SecureGenerator(key)
    with pytest.warns(RuntimeWarning, match="cryptography"):
        got = gen.normal(100)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen.normal(10)  # warned once only
    with pytest.raises(ImportError, match="pip install"):
        SecureGenerator(key, backend="cryptography")


# --- statistics -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def million():
    return SecureGenerator.from_seed(20240601).normal(1_000_000, dtype=torch.float64)


def test_normal_mean_and_std(million):
    n = million.numel()
    assert abs(million.mean().item()) < 5 / math.sqrt(n)
    assert abs(million.std().item() - 1) < 5 / math.sqrt(2 * n)


def test_normal_kolmogorov_smirnov(million):
    assert stats.kstest(million[:200_000].numpy(), "norm").pvalue > 1e-3
    # and the test has teeth: a 2% scale error is rejected at this size
    assert stats.kstest((million[:200_000] * 1.02).numpy(), "norm").pvalue < 1e-3


def test_normal_tails(million):
    beyond = int((million.abs() > 4).sum())
    expected = million.numel() * 2 * stats.norm.sf(4)  # 63.3
    assert stats.poisson.cdf(beyond, expected) > 1e-4
    assert stats.poisson.sf(beyond - 1, expected) > 1e-4
    assert million.abs().max().item() < 7  # P(any |z| > 7 among 1e6) ~ 3e-6


def test_uniform_statistics():
    u = SecureGenerator.from_seed(7).uniform(200_000)
    assert u.min().item() >= 0 and u.max().item() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(u * 2**53, (u * 2**53).floor())  # on the 2^-53 grid


def test_bernoulli_frequency_and_edges():
    gen = SecureGenerator.from_seed(3)
    heads = sum(gen.bernoulli(0.3) for _ in range(2000))
    assert stats.binom.cdf(heads, 2000, 0.3) > 1e-4
    assert stats.binom.sf(heads - 1, 2000, 0.3) > 1e-4
    assert not any(gen.bernoulli(0.0) for _ in range(50))
    assert all(gen.bernoulli(1) for _ in range(50))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            gen.bernoulli(bad)
    with pytest.raises(TypeError, match="probability"):
        gen.bernoulli("half")


# --- API: dtype, device, sizes --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_normal_dtype_is_a_cast_of_the_float64_sample(dtype):
    key = secrets.token_bytes(32)
    z = SecureGenerator(key).normal(64, device=torch.device("cpu"), dtype=dtype)
    assert z.dtype == dtype and z.device.type == "cpu" and z.shape == (64,)
    assert torch.equal(z, SecureGenerator(key).normal(64, dtype=torch.float64).to(dtype))


def test_sizes_and_bad_arguments():
    gen = SecureGenerator()
    assert gen.normal(0).shape == (0,) and gen.uniform(0).shape == (0,)
    assert gen.draws == 2  # an empty draw still uses up its nonce
    assert gen.normal(1).shape == (1,)
    with pytest.raises(TypeError, match=r"int\(1000000.0\)"):
        gen.normal(1e6)
    with pytest.raises(ValueError, match=">= 0"):
        gen.normal(-1)
    with pytest.raises(TypeError, match="floating"):
        gen.normal(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="32 bytes"):
        SecureGenerator(b"short")
    with pytest.raises(TypeError, match="32 bytes"):
        SecureGenerator("a" * 32)
    with pytest.raises(ValueError, match="backend"):
        SecureGenerator(backend="numpy")


def test_odd_length_is_a_prefix_of_the_next_even_length():
    key = secrets.token_bytes(32)
    assert torch.equal(SecureGenerator(key).normal(9), SecureGenerator(key).normal(10)[:9])


@pytest.mark.cuda
def test_cuda_twin_matches_cpu():
    key = secrets.token_bytes(32)
    ks = chacha20_keystream(key, bytes(12), 1000, counter=5, device="cuda")
    assert ks.device.type == "cuda"
    assert torch.equal(ks.cpu(), chacha20_keystream(key, bytes(12), 1000, counter=5))
    z = SecureGenerator(key).normal(10_001, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(z.cpu(), SecureGenerator(key).normal(10_001, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


# --- keys, nonces, copies -------------------------------------------------------------------
def test_fresh_generators_differ_and_draws_never_repeat():
    a, b = SecureGenerator(), SecureGenerator()
    assert not torch.equal(a.normal(16), b.normal(16))
    first, second = a.normal(16), a.normal(16)
    assert not torch.equal(first, second)  # a fresh nonce per draw
    assert a.draws == 3


def test_from_seed_repeats_and_separates_contexts():
    twice = [SecureGenerator.from_seed(5, 1).normal(32) for _ in range(2)]
    assert torch.equal(*twice)
    outs = [SecureGenerator.from_seed(*args).uniform(4) for args in
            [(5,), (5, 0), (5, 1), (-5,), (0x0102,), (1, 2), (1 << 100,)]]
    assert len({tuple(o.tolist()) for o in outs}) == len(outs)  # 0x0102 != (1, 2): length-prefixed
    with pytest.raises(TypeError, match="ints"):
        SecureGenerator.from_seed(1.5)


def test_repr_does_not_leak_the_key():
    key = secrets.token_bytes(32)
    gen = SecureGenerator(key)
    text = repr(gen) + str(gen)
    assert "secret" in text
    for leak in (key.hex(), repr(key), key.hex()[:8], str(list(key))[:20]):
        assert leak not in text


def test_copies_and_forks_are_refused(monkeypatch):
    gen = SecureGenerator()
    for attempt in (lambda: pickle.dumps(gen), lambda: copy.copy(gen), lambda: copy.deepcopy(gen)):
        with pytest.raises(TypeError, match="same noise"):
            attempt()
    monkeypatch.setattr(os, "getpid", lambda: gen._pid + 1)
    with pytest.raises(RuntimeError, match="fork"):
        gen.normal(1)


def test_threads_get_distinct_draws():
    key = secrets.token_bytes(32)
    shared, results = SecureGenerator(key, backend="torch"), []

    def work():
        for _ in range(25):
            results.append(tuple(shared.uniform(2).tolist()))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replay = SecureGenerator(key)
    assert shared.draws == 200
    assert sorted(results) == sorted(tuple(replay.uniform(2).tolist()) for _ in range(200))


# --- the flaw this replaces -----------------------------------------------------------------
def test_torch_seeds_collide_but_secure_seeds_do_not():
    s = 0x1234_5678_9ABC_DEF0
    mt = [torch.randn(64, generator=torch.Generator().manual_seed(v)) for v in (s, s & 0xFFFFFFFF)]
    assert torch.equal(mt[0], mt[1])  # torch's CPU generator keeps 32 bits of the seed: 2^32 to try
    ours = [SecureGenerator.from_seed(v).normal(64) for v in (s, s & 0xFFFFFFFF)]
    assert not torch.equal(ours[0], ours[1])
