"""The ordered executor the hooks' exchanges run on: order across buckets and hooks,
exceptions, closing with queued work, submits after close, sharing per process group."""

import threading
import time

import pytest
import torch

from commcomp.collectives import executor as ex
from commcomp.collectives.executor import Deferred, ExecutorClosed, OrderedExecutor


def test_jobs_run_in_submission_order_across_submitters():
    run = OrderedExecutor("test-order")
    seen, futs = [], []
    lock = threading.Lock()

    def submit_from(name):  # two "hooks" submitting their buckets from two threads
        for i in range(50):
            with lock:  # the submission order is what the lock decides
                futs.append((f"{name}{i}", run.submit(lambda tag=f"{name}{i}": seen.append(tag) or tag,
                                                      torch.zeros(1))))

    threads = [threading.Thread(target=submit_from, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [f.wait() for _, f in futs] == [tag for tag, _ in futs]
    assert seen == [tag for tag, _ in futs]  # one at a time, in submission order
    assert run.close()


def test_an_exception_fails_its_future_and_the_next_job_still_runs():
    run = OrderedExecutor("test-exc")
    bad = run.submit(lambda: 1 / 0, torch.zeros(1))
    good = run.submit(lambda: torch.ones(2), torch.zeros(1))
    with pytest.raises(ZeroDivisionError):
        bad.wait()
    assert torch.equal(good.wait(), torch.ones(2))
    run.close()


def test_close_finishes_queued_jobs_then_refuses_new_ones():
    run = OrderedExecutor("test-close")
    gate = threading.Event()
    first = run.submit(lambda: gate.wait(5) and "first", torch.zeros(1))
    queued = [run.submit(lambda i=i: i, torch.zeros(1)) for i in range(5)]
    closer = threading.Thread(target=run.close, args=(10.0,))
    closer.start()
    time.sleep(0.05)  # close() is now waiting for the queue behind the blocked first job
    late = run.submit(lambda: "late", torch.zeros(1))  # lands after close began: fails at once
    assert late.done()
    with pytest.raises(ExecutorClosed, match="is closed"):
        late.wait()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert first.wait() == "first" and [f.wait() for f in queued] == list(range(5))


def test_submit_racing_close_never_leaves_a_future_pending():
    for _ in range(50):
        run = OrderedExecutor("test-race")
        run.submit(lambda: None, torch.zeros(1))
        futs = []
        t = threading.Thread(target=lambda: futs.extend(run.submit(lambda: 1, torch.zeros(1)) for _ in range(20)))
        t.start()
        run.close(5.0)
        t.join()
        for f in futs:  # each either ran or failed with ExecutorClosed: none waits forever
            deadline = time.monotonic() + 5
            while not f.done() and time.monotonic() < deadline:
                time.sleep(0.001)
            assert f.done()


def test_close_gives_up_on_a_stuck_job_with_a_warning(caplog):
    run = OrderedExecutor("test-stuck")
    gate = threading.Event()
    run.submit(lambda: gate.wait(10), torch.zeros(1))
    assert run.close(timeout=0.1) is False
    assert "still ran a job" in caplog.text
    gate.set()


def test_flush_waits_for_what_was_queued():
    run = OrderedExecutor("test-flush")
    done = []
    run.submit(lambda: time.sleep(0.05) or done.append(1), torch.zeros(1))
    assert run.flush(5) and done == [1]
    run.close()


def test_one_executor_per_group_shared_and_reference_counted():
    group = object()  # any hashable stands in for a process group here
    a = ex.shared_executor(group)
    b = ex.shared_executor(group)
    assert a is b
    assert ex.release_executor(group, a)
    assert not a.closed  # one user left: still running
    assert a.submit(lambda: 3, torch.zeros(1)).wait() == 3
    assert ex.release_executor(group, b)
    assert a.closed
    c = ex.shared_executor(group)  # a fresh one after the last user let go
    assert c is not a and not c.closed
    ex.release_executor(group, c)


def test_deferred_is_lazy_and_chains_on_the_waiting_thread():
    calls = []
    d = Deferred(lambda: calls.append("wait") or 2).then(lambda f: f.value() * 10)
    assert calls == []  # nothing runs before wait()
    assert d.wait() == 20 and d.wait() == 20 and calls == ["wait"]
    nested = Deferred(lambda: 1).then(lambda f: Deferred(lambda: f.value() + 1))
    assert nested.wait() == 2  # a chained function may launch a further deferred step
