"""The counter-based generator: known answers, and the counter/lane layout."""

import torch

from commcomp.ops import reference

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


def test_random_words_layout_is_offset_consistent():
    whole = reference.random_words(37, seed=9, offset=5)
    for start in range(0, 37, 3):
        part = reference.random_words(37 - start, seed=9, offset=5 + start)
        assert torch.equal(part, whole[start:])


def test_uniform_24_bit_draws_look_uniform():
    u = (reference.random_words(1 << 16, seed=3, offset=0) >> 8).double() / 2**24
    # Mean and variance of U[0, 1) within 6 standard errors.
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = n / 16
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 dof: P(chi2 > 50) ~ 1e-5
