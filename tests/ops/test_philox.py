"""The counter-based generator: known answers, and the counter/lane layout."""

import torch

from commcomp.ops import reference
from tests.ops._spec import philox_words

# Random123's known-answer vectors for philox4x32_10, also produced by ATen's
# at::Philox4_32 (key = seed, counter = (lo, hi, 0, 0)).
KAT = [
    (0, 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (12345, 7, [0x9EFE59E8, 0x4387863A, 0x1500E50F, 0x9AA4B8E0]),
]


def test_known_answers():
    for seed, ctr, words in KAT:
        got = reference.philox4x32_10(torch.tensor([ctr]), seed)[0].tolist()
        assert got == words


def test_full_counter_and_key_known_answer():
    # Random123 KAT with all-ones counter and key; our counter words 2, 3 are fixed at 0,
    # so check the round function itself through the words-2/3-zero path of the same vector
    # by comparing against a direct evaluation with independent 64-bit Python arithmetic.
    def philox_py(c, k):
        m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
        k0, k1 = k
        for _ in range(10):
            p0, p1 = m0 * c[0], m1 * c[2]
            c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
            k0, k1 = (k0 + w0) & 0xFFFFFFFF, (k1 + w1) & 0xFFFFFFFF
        return c

    assert philox_py([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD
    ]
    for ctr in [0, 1, 2**32 - 1, 2**32, 2**40 + 12345]:
        for seed in [0, 1, 2**32 + 5, 2**63 - 1]:
            want = philox_py([ctr & 0xFFFFFFFF, ctr >> 32, 0, 0], (seed & 0xFFFFFFFF, seed >> 32))
            assert reference.philox4x32_10(torch.tensor([ctr]), seed)[0].tolist() == want


def test_draws16_layout_is_offset_consistent():
    whole = reference.random_draws16(37, seed=9, offset=5)
    for start in range(0, 37, 3):
        part = reference.random_draws16(37 - start, seed=9, offset=5 + start)
        assert torch.equal(part, whole[start:])


def test_draws16_follow_the_spec_v2_mapping():
    """Global index g draws half g & 1 (low first) of word (g >> 1) & 3 of counter g >> 3:
    checked index by index against the round function in plain Python (not the torch one)."""
    for seed, offset, n in [(0, 0, 16), (12345, 13, 16), (2**40 + 3, 2**35 - 5, 21), (2**63 - 1, 7, 3)]:
        got = reference.random_draws16(n, seed=seed, offset=offset).tolist()
        want = []
        for g in range(offset, offset + n):
            r = philox_words(g >> 3, seed)[(g >> 1) & 3]
            want.append((r >> 16) if g & 1 else (r & 0xFFFF))
        assert got == want


def test_uniform_16_bit_draws_look_uniform():
    h = reference.random_draws16(1 << 16, seed=3, offset=0)
    assert int(h.min()) >= 0 and int(h.max()) < 2**16
    u = h.double() / 2**16
    # Mean and variance of U[0, 1) within 6 standard errors.
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = n / 16
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 dof: P(chi2 > 50) ~ 1e-5
    # The low and high halves of a word are separate draws: no correlation between them.
    lo, hi = u[0::2] - 0.5, u[1::2] - 0.5
    corr = (lo * hi).mean().item() / (1 / 12)
    assert abs(corr) < 6 / (n / 2) ** 0.5
