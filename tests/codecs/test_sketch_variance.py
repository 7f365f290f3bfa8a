"""Per-coordinate variance of the de-sketch ``R^T R g`` over shared seeds, against the exact
formulas of :meth:`commcomp.codecs.sketch.Sketch.coordinate_variance`, and the block effect of
the SRHT: a gradient concentrated in one of ``n / block`` blocks has ``n / block`` times the
``||g||^2 / s`` per coordinate that holds for countsketch and for energy spread over the blocks.

Monte Carlo over ``M`` seeds ``0 .. M-1`` (deterministic). With the mean known (``g``), the
per-coordinate estimate is ``V_j = mean_m e_mj^2``, ``e_m = R_m^T R_m g - g``. Tolerances:

* every coordinate, chi-square: where the error is a sum of many comparable terms (the SRHT
  tests: >= 64 sampled rows per block), it is near-Gaussian and ``V_j ~ var_j chi2_M / M``, so
  ``V_j / var_j`` must lie in the Wilson-Hilferty ``chi2_M / M`` interval at ``Z = 6`` sd, about
  ``1 +- 6 sqrt(2 / M)`` (the measured spread of ``V_j / var_j`` over coordinates is that
  ``sqrt(2 / M)``). The two-sided tail is ~2e-9 per coordinate, < 2e-4 over the 65536
  coordinates of the largest test. The spiky ``g`` of the countsketch / Gaussian tests gives
  heavy-tailed errors (a large ``g_i`` lands in ``j``'s bucket with probability ``1/s``), so
  there ``|V_j - var_j| < Z se_j`` with the measured ``se_j^2 = (mean_m e_mj^4 - V_j^2) / M``,
  the sampling variance of a mean of ``M`` squares (``var_j sqrt(2 / M)`` for a Gaussian error);
* pooled: the per-seed mean of ``e_j^2 / var_j`` over coordinates has expectation exactly 1; its
  mean over seeds must lie within 5 standard errors, the standard error being measured from
  the per-seed values (valid whatever the correlation between coordinates), and that standard
  error must be small (< 1%) so that a wrong formula cannot pass.
"""

import math
from typing import NamedTuple

import pytest
import torch

from commcomp.codecs.sketch import Sketch

Z = 6.0  # per-coordinate bound, in standard deviations of chi2_M / M
POOLED_SE = 5.0  # pooled bound, in measured standard errors


def chi2_interval(m, z=Z):
    """Wilson-Hilferty: (chi2_m / m)^(1/3) ~ N(1 - 2/(9m), 2/(9m)); the interval of chi2_m / m."""
    c = 2.0 / (9.0 * m)
    return (1 - c - z * math.sqrt(c)) ** 3, (1 - c + z * math.sqrt(c)) ** 3


class MonteCarlo(NamedTuple):
    var: torch.Tensor  # the formula, per coordinate
    m1: torch.Tensor  # mean of e = R^T R g - g over seeds, per coordinate
    m2: torch.Tensor  # mean of e^2: the empirical variance V_j
    m4: torch.Tensor  # mean of e^4
    pooled: torch.Tensor  # per seed: mean over live coordinates of e_j^2 / var_j
    seeds: int


def monte_carlo(kind, g, s, seeds, block=None) -> MonteCarlo:
    d = g.numel()
    var = Sketch(kind, d, s, 0, block).coordinate_variance(g)
    gd = g.double()
    live = var > 0
    m1, m2, m4 = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
    pooled = torch.empty(seeds, dtype=torch.float64)
    for seed in range(seeds):
        sk = Sketch(kind, d, s, seed, block)
        e = sk.transpose(sk.sketch(g)).double() - gd
        e2 = e * e
        m1 += e
        m2 += e2
        m4 += e2 * e2
        pooled[seed] = (e2[live] / var[live]).mean()
        assert bool((e[~live] == 0).all()), "a zero-variance coordinate was not recovered exactly"
    return MonteCarlo(var, m1 / seeds, m2 / seeds, m4 / seeds, pooled, seeds)


def check_against_formula(mc: MonteCarlo, gaussian_error=False):
    """The tolerances of the module docstring."""
    var, m1, m2, m4, pooled, seeds = mc
    live = var > 0
    if gaussian_error:
        ratio = m2[live] / var[live]
        lo, hi = chi2_interval(seeds)
        rmin, rmax = float(ratio.min()), float(ratio.max())
        assert lo < rmin and rmax < hi, (rmin, rmax, lo, hi)
    else:
        se = ((m4 - m2 * m2).clamp_min(0) / seeds).sqrt()[live]
        z = ((m2[live] - var[live]).abs() / se).max()
        assert float(z) < Z, float(z)
    pooled_se = float(pooled.std()) / math.sqrt(seeds)
    assert pooled_se < 0.01, pooled_se
    assert abs(float(pooled.mean()) - 1) < POOLED_SE * pooled_se, (float(pooled.mean()), pooled_se)
    # unbiased: each coordinate's mean error within Z standard errors
    zm = (m1[live].abs() / (var[live] / seeds).sqrt()).max()
    assert float(zm) < Z, float(zm)


@pytest.fixture(autouse=True)
def one_thread():
    """The kernels on one thread: the loops are short, and on a busy machine a 2-thread
    parallel_for waits on the slower thread at every call (10x slower measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_vector(d, seed):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def old_claim(g, s):
    """The README's ``~||g||^2 / s`` per coordinate."""
    return float(g.double().pow(2).sum()) / s


D, BLOCK = 16 * 4096, 4096  # n / block = 16 at the default block


def test_default_block_is_4096_here():
    sk = Sketch("srht", D, 1024, 0)
    assert sk.block == BLOCK and D // sk.block == 16


def test_srht_spread_energy_matches_the_formula_and_the_old_claim():
    """Energy spread over the 16 blocks: the formula is ``(||g||^2 - g_j^2) / s`` up to the
    blocks' energy fluctuations (each block's ||g_B||^2 / mean is 1 +- sqrt(2 / 4096) = 2.2%)."""
    s, seeds = 1024, 400
    g = gaussian_vector(D, 1)
    mc = monte_carlo("srht", g, s, seeds)
    check_against_formula(mc, gaussian_error=True)
    var, emp = mc.var, mc.m2
    gd = g.double()
    countsketch_like = (gd.pow(2).sum() - gd.pow(2)) / s
    assert float((var / countsketch_like - 1).abs().max()) < 0.1  # 16 blocks, < 5 sd of 2.2%
    assert abs(float(emp.mean()) / old_claim(g, s) - 1) < 0.03
    # the total is (d - 1) ||g||^2 / s for any g when block divides d
    assert math.isclose(float(var.sum()), (D - 1) * old_claim(g, s), rel_tol=1e-9)


def test_srht_concentrated_in_one_block_is_n_over_block_times_the_old_claim():
    """All the energy in block 5 of 16: inside it the variance is ``(16 ||g||^2 - g_j^2) / s``,
    16x the README's ``||g||^2 / s``; outside it the estimate is exactly 0 (= g) for every seed."""
    s, seeds = 1024, 800
    g = torch.zeros(D)
    blk = slice(5 * BLOCK, 6 * BLOCK)
    g[blk] = gaussian_vector(BLOCK, 2)
    mc = monte_carlo("srht", g, s, seeds)
    check_against_formula(mc, gaussian_error=True)
    var, emp = mc.var, mc.m2
    assert int((var > 0).sum()) == BLOCK  # monte_carlo checked the rest is recovered exactly
    old = old_claim(g, s)
    formula_factor = float(var[blk].mean()) / old
    assert math.isclose(formula_factor, 16 - 1 / BLOCK, rel_tol=1e-9)
    empirical_factor = float(emp[blk].mean()) / old
    se = float(mc.pooled.std()) / math.sqrt(seeds) * formula_factor
    gap = abs(empirical_factor - formula_factor)
    assert gap < POOLED_SE * se, (empirical_factor, formula_factor, se)
    assert empirical_factor > 12, empirical_factor  # the old claim is off by ~n / block
    # the total is unchanged: the blocks only move the variance to where the energy is
    assert math.isclose(float(var.sum()), (D - 1) * old, rel_tol=1e-9)


def test_srht_padding():
    """d = 3.5 blocks, padded to n = 4 blocks: with spread energy a full block's coordinates
    get ~(n / d) ||g||^2 / s = 8/7 of the old claim, the half block's ~4/7."""
    d, block, s, seeds = 896, 256, 64, 3000
    g = gaussian_vector(d, 3)
    mc = monte_carlo("srht", g, s, seeds, block=block)
    check_against_formula(mc, gaussian_error=True)
    var, emp = mc.var, mc.m2
    old = old_claim(g, s)
    for part, lo, hi in ((slice(0, 768), 1.0, 1.3), (slice(768, d), 0.4, 0.75)):
        assert lo < float(var[part].mean()) / old < hi
        # pooled standard error here is 0.4%: 3% is > 5 of them
        assert abs(float(emp[part].mean() / var[part].mean()) - 1) < 0.03


def test_srht_with_all_rows_has_no_variance():
    d, block = 1000, 256
    g = gaussian_vector(d, 4)
    sk = Sketch("srht", d, 1024, 9, block)
    assert bool((sk.coordinate_variance(g) == 0).all())
    torch.testing.assert_close(sk.transpose(sk.sketch(g)), g, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,sign", [("countsketch", -1), ("gaussian", +1)])
def test_countsketch_and_gaussian(kind, sign):
    """``(||g||^2 -+ g_j^2) / s``; one large coordinate (g_0^2 ~ ||g||^2 / 2) makes the
    ``g_j^2`` term visible: its variance is ~half (countsketch) or ~1.5x (Gaussian) the rest's."""
    d, s, seeds = (4096, 64, 2000) if kind == "countsketch" else (256, 32, 2000)
    g = gaussian_vector(d, 5)
    g[0] = math.sqrt(d)
    mc = monte_carlo(kind, g, s, seeds)
    check_against_formula(mc)
    var, emp = mc.var, mc.m2
    gd = g.double()
    torch.testing.assert_close(var, (gd.pow(2).sum() + sign * gd.pow(2)) / s, rtol=1e-12, atol=0)
    rest = float(emp[1:].mean())
    assert (emp[0] / rest < 0.6) if sign < 0 else (emp[0] / rest > 1.3), float(emp[0] / rest)
