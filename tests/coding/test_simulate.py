"""The simulator: golden values from the authors' round logic, and properties."""

import json
from pathlib import Path

import numpy as np
import pytest

from commcomp.coding import stragglers as st
from commcomp.coding.simulate import search, simulate

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_authors.json").read_text())
FULL = st.FULL_DIR


def _golden_durations(case):
    if "durations" in case:
        return np.asarray(case["durations"])
    return st.load_trace(st.SHIPPED_DIR / case["trace"]).durations


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['trace'][:6]}-{c['scheme']}-{c['params']}")
def test_matches_authors_final_simulator_to_the_round(case):
    """The golden values come from the authors' own files at their final commit (fab1280), run
    by tests/coding/data/make_golden_authors.py."""
    d = _golden_durations(case)
    kw = dict(n_jobs=case["n_jobs"], mu=case["mu"], base_comp=case["base_comp"], trace_load=case["trace_load"])
    r = simulate(d, case["scheme"], case["params"], **kw)
    np.testing.assert_allclose(r.round_durations, case["round_durations"], rtol=1e-9, atol=0)
    assert r.runtime == pytest.approx(case["runtime"], rel=1e-9)
    assert (r.num_waits, r.T) == (case["num_waits"], case["T"])
    assert r.load == pytest.approx(case["load"], rel=1e-12)
    if "authors_runtime" in case:  # their code as is, GC's "< s" included
        a = simulate(d, case["scheme"], case["params"], authors=True, **kw)
        np.testing.assert_allclose(a.round_durations, case["authors_round_durations"], rtol=1e-9, atol=0)
        assert a.num_waits == case["authors_num_waits"]
    if "without_exemption_runtime" in case:  # the SR-SGC exemption switched off on both sides
        x = simulate(d, case["scheme"], case["params"], srsgc_exemption=False, **kw)
        assert x.runtime == pytest.approx(case["without_exemption_runtime"], rel=1e-9)


def test_golden_cases_exercise_the_srsgc_exemption_and_tail_skip():
    ex = [c for c in GOLDEN["cases"] if "without_exemption_runtime" in c
          and abs(c["without_exemption_runtime"] - c["runtime"]) > 1e-9]
    assert len(ex) >= 8
    skipped = [c for c in GOLDEN["cases"] if c["scheme"] == "srsgc" and 0.0 in c["round_durations"]]
    assert len(skipped) >= 8
    assert GOLDEN["commit"].startswith("fab1280")


def test_srsgc_exempt_rounds_do_not_count_towards_the_window():
    """n=4, B=1, W=3, lambd=2 (s=1): worker 0 straggles alone in round 0 (at most s, no repeats:
    exempt), then workers 1 and 2 straggle in round 1. Without the exemption, round 1 sees 3
    distinct stragglers in the window (> lambd) and waits; with it, round 1 fits."""
    d = np.ones((8, 4))
    d[0, 0] = 5.0
    d[1, 1] = d[1, 2] = 5.0
    kw = dict(n_jobs=6, mu=1.0)
    with_ex = simulate(d, "srsgc", {"B": 1, "W": 3, "lambd": 2}, **kw)
    without = simulate(d, "srsgc", {"B": 1, "W": 3, "lambd": 2}, srsgc_exemption=False, **kw)
    assert with_ex.num_waits == 0 and without.num_waits == 1
    assert with_ex.round_durations[1] == 2.0 and without.round_durations[1] == 5.0


def test_srsgc_exemption_needs_a_round_without_repeats():
    """A round with at most s stragglers is exempt only if nobody repeated an older job in it.
    n=3, B=1, W=3, lambd=3 (s=1): round 0 has 2 stragglers, so in round 1 worker 0 repeats job 0;
    round 1 has one straggler (worker 1) but holds that repeat, so it is not exempt; in round 2
    worker 1 straggles again, which the temporal test forbids (a straggler of rounds r-W+1..r-B)
    unless round 1 were exempt. The authors' code (fab1280) gives [2, 2, 3] with 1 wait; without
    the no-repeat clause it would be [2, 2, 2] and no wait."""
    d = np.array([[3.0, 1.0, 3.0], [1.0, 3.0, 1.0], [1.0, 3.0, 1.0]])
    r = simulate(d, "srsgc", {"B": 1, "W": 3, "lambd": 3}, n_jobs=2, mu=1.0)
    assert list(r.round_durations) == [2.0, 2.0, 3.0] and r.num_waits == 1


def test_srsgc_search_grid_is_the_authors_final_one():
    from commcomp.coding.simulate import param_grid

    got = {(p["B"], p["W"]) for p in param_grid("srsgc", 8, n_jobs=5, max_delay=3, lambds=[1])}
    # fab1280: for B in 1..max_delay, for W in range(B + 1, n_jobs + 1, B)
    assert got == {(B, W) for B in range(1, 4) for W in range(B + 1, 6, B)}
    assert (2, 5) in got and (1, 5) in got


def test_srsgc_skips_tail_rounds_whose_job_already_decodes():
    d = np.ones((12, 6))
    r = simulate(d, "srsgc", {"B": 2, "W": 3, "lambd": 2}, n_jobs=10, mu=1.0)
    assert list(r.round_durations[10:]) == [0.0, 0.0] and r.runtime == 10.0
    full = simulate(d, "srsgc", {"B": 2, "W": 3, "lambd": 2}, n_jobs=10, mu=1.0, srsgc_skip_tail=False)
    assert full.runtime == 12.0


def _traces():
    return [st.load_trace(p).durations for p in sorted(st.SHIPPED_DIR.glob("*.npz"))]


def test_gc_s0_is_uncoded_and_rounds_never_beat_the_fastest():
    for d in _traces():
        u = simulate(d, "uncoded", n_jobs=5, mu=1.0)
        g = simulate(d, "gc", {"s": 0}, n_jobs=5, mu=1.0)
        np.testing.assert_array_equal(u.round_durations, g.round_durations)
        for sc, p in [("gc", {"s": 10}), ("srsgc", {"B": 1, "W": 2, "lambd": 40}),
                      ("msgc", {"B": 1, "W": 3, "lambd": 40}), ("ignore", {"s": 30})]:
            r = simulate(d, sc, p, n_jobs=5, mu=1.0)
            run = r.round_durations > 0  # SR-SGC skips tail rounds whose job already decodes
            assert (r.round_durations[run] >= d[: len(r.round_durations)].min(axis=1)[run]).all()
            assert (r.round_durations <= d[: len(r.round_durations)].max(axis=1)).all()


def test_monotone_where_it_must_be():
    d = _traces()[0]
    # more time per unit load never makes wait-for-all faster (for coded schemes it can: a uniform
    # shift raises the wait threshold fastest x (1 + mu) faster than the fastest, so fewer stragglers)
    rs = [simulate(d, "uncoded", n_jobs=8, mu=1.0, base_comp=c).runtime for c in (0.0, 0.5, 2.0)]
    assert rs == sorted(rs)
    # ignore: dropping more workers is never slower
    rs = [simulate(d, "ignore", {"s": s}, n_jobs=8).runtime for s in (0, 5, 50, 200)]
    assert rs == sorted(rs, reverse=True)
    # a larger GC tolerance never waits more often (load-free)
    w = [simulate(d, "gc", {"s": s}, n_jobs=8, mu=1.0).num_waits for s in (0, 2, 8, 64)]
    assert w == sorted(w, reverse=True)
    eq = st.no_stragglers(12, 16, base=2.0)
    assert simulate(eq, "msgc", {"B": 1, "W": 2, "lambd": 3}, n_jobs=10, mu=0.0).runtime == pytest.approx(2.0 * 11)


def test_bursty_model_msgc_never_waits_and_beats_gc_on_load():
    rng = np.random.default_rng(0)
    pat = st.bursty(60, 64, 2, 5, 8, rng, p_start=0.1)
    d = st.pattern_to_durations(pat, rng, slow=5.0)
    m = simulate(d, "msgc", {"B": 2, "W": 5, "lambd": 8}, n_jobs=50, mu=1.0, base_comp=20.0)
    g = simulate(d, "gc", {"s": 8}, n_jobs=50, mu=1.0, base_comp=20.0)
    sr = simulate(d, "srsgc", {"B": 2, "W": 5, "lambd": 8}, n_jobs=50, mu=1.0, base_comp=20.0)
    assert m.num_waits == 0 and sr.num_waits == 0
    assert m.runtime < g.runtime


def test_errors_are_actionable():
    d = _traces()[0]
    with pytest.raises(ValueError, match="need .* rounds"):
        simulate(d, "msgc", {"B": 5, "W": 9, "lambd": 3}, n_jobs=15)
    with pytest.raises(ValueError, match="takes parameters"):
        simulate(d, "gc", {"B": 1})
    with pytest.raises(ValueError, match="non-positive"):
        simulate(d, "uncoded", n_jobs=5, base_comp=100.0, trace_load=1.0)


def test_tiny_search_picks_the_minimum():
    d = _traces()[0][:, :32]
    best = search(d, ("gc", "msgc"), n_jobs=10, mu=1.0, lambds=range(1, 9), s_values=range(0, 9), progress=False)
    for sc in ("gc", "msgc"):
        grid = [simulate(d, sc, {"s": s}, n_jobs=10, mu=1.0).runtime for s in range(9)] if sc == "gc" else None
        if grid:
            assert best[sc].runtime == pytest.approx(min(grid))
    assert best["msgc"].T >= 0


def test_extend_trace_resamples_whole_rounds():
    d = _traces()[0]
    e = st.extend_trace(d, 200, np.random.default_rng(0), block=3)
    assert e.shape == (200, d.shape[1])
    rows = {r.tobytes() for r in d}
    assert all(r.tobytes() in rows for r in e)


@pytest.mark.skipif(not FULL.is_dir(), reason=f"full trace set not found at {FULL} (only in a dev checkout)")
def test_full_trace_set_loads():
    files = sorted(FULL.glob("*.npz"))
    assert len(files) >= 40
    for f in files[:5]:
        t = st.load_trace(f)
        assert t.workers == 256 and t.rounds >= 10


def test_synthetic_models_are_seeded():
    for f in (lambda g: st.bernoulli(5, 8, 0.3, g), lambda g: st.shifted_exponential(5, 8, 1.0, 2.0, g),
              lambda g: st.gilbert_elliott(5, 8, 0.1, 0.5, g)):
        np.testing.assert_array_equal(f(np.random.default_rng(3)), f(np.random.default_rng(3)))
