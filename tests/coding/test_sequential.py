"""Sequential gradient coding: parameters, loads, the bursty-model test, job bookkeeping."""

import numpy as np
import pytest

from commcomp.coding.sequential import GC, MSGC, SRSGC, BurstyCondition, DecodingError, make_scheme
from commcomp.coding.stragglers import bursty, follows_bursty_model


def test_loads_and_delays():
    assert GC(256, 3).load == 4 / 256 and GC(256, 3).T == 0
    sr = SRSGC(256, B=2, W=5, lambd=20)            # s = ceil(2*20/6) = 7
    assert sr.s == 7 and sr.load == 8 / 256 and sr.T == 2
    m = MSGC(256, B=2, W=5, lambd=20)
    assert m.T == 5 and m.load == pytest.approx(21 * 6 / (256 * (2 + 4 * 21)))
    assert MSGC(10, B=1, W=3, lambd=10).load == pytest.approx(3 / (10 * 2))
    assert m.load < GC(256, 20).load               # the point of M-SGC


@pytest.mark.parametrize("bad", [dict(name="gc", s=256), dict(name="gc", s=-1), dict(name="srsgc", B=2, W=4, lambd=3),
                                 dict(name="msgc", B=3, W=3, lambd=1), dict(name="msgc", B=1, W=2, lambd=300),
                                 dict(name="nope"), dict(name="gc", B=1)])
def test_errors_say_what_is_allowed(bad):
    name = bad.pop("name")
    with pytest.raises(ValueError, match=r"allowed|must|choose|takes"):
        make_scheme(name, 256, **bad)


def _pat(rows, n=4):
    p = np.zeros((len(rows), n), dtype=bool)
    for r, ws in enumerate(rows):
        p[r, list(ws)] = True
    return p


def test_bursty_condition_accepts_and_rejects():
    # (B=2, W=4, lambd=2)
    assert follows_bursty_model(_pat([{0}, {0}, {}, {}, {}, {0}]), 2, 4, 2)  # next burst W rounds later
    bad = []
    assert not follows_bursty_model(_pat([{0}, {0}, {0}]), 2, 4, 2, bad) and bad == [2]   # burst of 3 > B
    bad = []
    assert not follows_bursty_model(_pat([{0}, {}, {0}]), 2, 4, 2, bad) and bad == [2]    # 2 bursts in a window
    assert not follows_bursty_model(_pat([{0}, {}, {}, {0}]), 2, 4, 2)                    # rounds 0..3: one window
    assert follows_bursty_model(_pat([{0}, {}, {}, {}, {0}]), 2, 4, 2)                    # next window: fine
    bad = []
    assert not follows_bursty_model(_pat([{0}, {1}, {2}]), 2, 4, 2, bad) and bad == [2]   # 3 distinct > lambd
    assert follows_bursty_model(_pat([{0}, {1}, {}, {}, {2}]), 2, 4, 2)                   # 0 left the window
    assert follows_bursty_model(_pat([{0, 1}, {0, 1}]), 2, 4, 2)


def test_condition_history_only_counts_skipped_rounds():
    c = BurstyCondition(4, 1, 3, 1)
    assert c.fits(np.array([1, 0, 0, 0], bool))
    c.record(np.zeros(4, bool))                     # the master waited: nobody straggled
    assert c.fits(np.array([0, 1, 0, 0], bool))


def test_generated_bursty_pattern_fits_its_model():
    rng = np.random.default_rng(1)
    for B, W, lam in [(1, 2, 5), (2, 5, 20), (3, 4, 8)]:
        p = bursty(120, 64, B, W, lam, rng, p_start=0.2)
        assert p.any() and follows_bursty_model(p, B, W, lam)


@pytest.mark.parametrize("scheme", [GC(16, 3), SRSGC(16, 2, 5, 6), SRSGC(16, 1, 3, 9), MSGC(16, 2, 4, 5),
                                    MSGC(16, 1, 2, 15)])
def test_every_job_completed_once_at_job_plus_T(scheme):
    rng = np.random.default_rng(0)
    n, jobs = scheme.n, 30
    if isinstance(scheme, GC):
        pat = rng.random((jobs, n)) < 0.1
        pat[pat.sum(1) > scheme.s] = False
    else:
        pat = bursty(jobs + scheme.T, n, scheme.B, scheme.W, scheme.lambd, rng, p_start=0.3)
    plan, cond, done = scheme.schedule(), scheme.condition(), []
    for r in range(jobs + scheme.T):
        jb, kinds = plan.assign(r)
        assert jb.shape[0] == n and ((jb <= r) & (jb >= -1)).all()
        assert cond.fits(pat[r])
        cond.record(pat[r])
        j = plan.record(r, ~pat[r])
        if j is not None:
            done.append((r, j))
    assert [j for _, j in done] == list(range(jobs)) and all(r == j + scheme.T for r, j in done)


def test_srsgc_repeats_the_missing_tasks():
    sch = SRSGC(8, B=1, W=2, lambd=4)   # s = ceil(4/2) = 2
    plan = sch.schedule()
    plan.assign(0)
    plan.record(0, np.array([0, 0, 0, 0, 1, 1, 1, 1], bool))   # 4 missing > s = 2
    jobs, kinds = plan.assign(1)
    assert jobs[:2, 0].tolist() == [0, 0] and jobs[2:, 0].tolist() == [1] * 6
    assert plan.record(1, np.ones(8, bool)) == 0


def test_decoding_error_when_model_broken():
    sch = GC(8, 1)
    plan = sch.schedule()
    plan.assign(0)
    with pytest.raises(DecodingError):
        plan.record(0, np.array([0, 0, 1, 1, 1, 1, 1, 1], bool))
