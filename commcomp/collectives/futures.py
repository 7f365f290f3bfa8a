"""Collectives as pending values, and the communication thread that runs every hook's exchange.

A hook returns a torch Future at once; the bucket's exchange runs as a job on one background
thread (one global order of collectives on every rank), which waits on each collective and
completes the hook's future. No Python callback ever runs on a backend thread.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

Future = torch.futures.Future
logger = logging.getLogger(__name__)


def new_future(like: torch.Tensor) -> Future:
    """A future that may carry tensors of `like`'s device (CUDA futures record streams)."""
    if like.is_cuda:
        return Future(devices=[like.device])
    return Future()


class Pending:
    """A collective launched but not yet awaited, with work to do on its result.

    ``wait()`` blocks the calling thread on the collective, then runs the chained functions
    on that same thread. Unlike ``work.get_future().then(fn)``, no Python code runs on the
    backend's own threads: a gloo thread that still had to take the GIL for a callback when the
    interpreter shut down would abort the process ("terminate called without an active
    exception"). The collectives run on commcomp's communication thread, where blocking is
    the design.
    """

    __slots__ = ("_wait_fn", "_done", "_value")

    def __init__(self, wait_fn: Callable[[], object]):
        self._wait_fn: Optional[Callable[[], object]] = wait_fn
        self._done = False
        self._value = None

    def wait(self):
        if not self._done:
            value = self._wait_fn()
            while isinstance(value, Pending):  # a chained function launched a further collective
                value = value.wait()
            self._value, self._done, self._wait_fn = value, True, None
        return self._value

    value = wait

    def then(self, fn: "Callable[[Pending], object]") -> "Pending":
        """The pending result of ``fn(self)`` (fn reads ``.value()``; it may return a Pending)."""
        return Pending(lambda: fn(self._ready()))

    def _ready(self) -> "Pending":
        self.wait()
        return self


def then(pending: Pending, fn: Callable[[Pending], object], like: Optional[torch.Tensor] = None) -> Pending:
    """``pending.then(fn)``; kept as a function for call sites that read better that way."""
    return pending.then(fn)


def _launched(work, value: Callable[[], torch.Tensor]) -> Pending:
    def wait():
        work.wait()
        return value()
    return Pending(wait)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> Pending:
    """In-place all-reduce of t; the pending value is t."""
    work = dist.all_reduce(t, op=op, group=group, async_op=True)
    return _launched(work, lambda: t)


def all_gather(t: torch.Tensor, group=None) -> Pending:
    """Gathers every rank's t into a new [world, *t.shape] tensor (the pending value)."""
    world = dist.get_world_size(group)
    flat = t.new_empty(world * t.numel())  # gloo wants a flat output of world * numel
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(flat, t.contiguous().reshape(-1), group=group, async_op=True)
    return _launched(work, lambda: flat.view((world,) + tuple(t.shape)))


def all_to_all(t: torch.Tensor, group=None) -> Pending:
    """Equal-split all-to-all of a [world, chunk] tensor: row r goes to rank r."""
    out = torch.empty_like(t)
    work = dist.all_to_all_single(out, t, group=group, async_op=True)
    return _launched(work, lambda: out)


class CommThread:
    """Runs communication jobs one at a time, in submission order, on a background thread.

    Collectives must be issued in the same order on every rank. A multi-stage exchange
    (share scales, then send payloads) that launched its later stages from completion
    callbacks would interleave with the next bucket's first stage in a different order on each
    rank: mismatched collectives, wrong sums or a hang (the failure of torch's PowerSGD hook on
    gloo with several buckets). DDP calls hooks in bucket order on every rank, so running each
    bucket's whole exchange here, bucket after bucket, gives one global order, while the
    backward pass goes on computing. Blocking waits are fine on this thread.
    """

    def __init__(self):
        self._queue: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._atexit_registered = False

    def submit(self, job: Callable[[], torch.Tensor], like: torch.Tensor) -> Future:
        fut = new_future(like)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="commcomp-comm", daemon=True)
                self._thread.start()
                if not self._atexit_registered:
                    atexit.register(self.shutdown)
                    self._atexit_registered = True
        self._queue.put((job, fut, torch.cuda.current_stream() if like.is_cuda else None))
        return fut

    def shutdown(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs and stop the thread (registered with ``atexit``).

        Completing a hook's future releases the GIL while DDP's waiter wakes up; if the main
        thread then reached interpreter shutdown before this thread took the GIL back, Python
        would end the thread inside C++ and the process would abort. Joining it at exit, while
        the interpreter is still whole, closes that window. A job stuck on a dead peer is given
        ``timeout`` seconds, then left behind (with a warning) rather than hanging the exit.
        """
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("commcomp: a communication job was still running at exit after %.0f s; "
                           "a peer may have died", timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fut, stream = item
            try:
                if stream is not None:  # run on the submitter's stream, after its queued work
                    with torch.cuda.stream(stream):
                        fut.set_result(job())
                else:
                    fut.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - re-raised by DDP's backward
                fut.set_exception(exc)
            # Drop the finished job now, not when the next one arrives: its closure holds the
            # bucket, the hook state and the process group.
            del item, job, fut, stream


_COMM_THREAD = CommThread()


def comm_thread() -> CommThread:
    """The process-wide communication thread (one, so that every hook shares one order)."""
    return _COMM_THREAD
