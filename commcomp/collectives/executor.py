"""Deferred collectives, and the ordered executors that run the hooks' exchanges.

A hook returns a torch Future at once; the bucket's whole exchange (share scales, send
payloads, ...) runs as one job on an :class:`OrderedExecutor`: a background thread that runs
jobs one at a time in submission order, waits on each collective, and completes the hook's
future. There is one executor per hook process group (:func:`shared_executor`), shared by the
hook states registered on it and closed when the last of them lets go. No Python callback
ever runs on a backend thread.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

Future = torch.futures.Future
logger = logging.getLogger(__name__)


def new_future(like: torch.Tensor) -> Future:
    """A future that may carry tensors of `like`'s device (CUDA futures record streams)."""
    if like.is_cuda:
        return Future(devices=[like.device])
    return Future()


class Deferred:
    """A collective launched but not yet waited for, and the work to do on its result.

    A lazy value, not a callback chain: nothing runs until :meth:`wait`, which blocks the
    calling thread on the collective and then runs the chained functions on that same thread.
    Unlike ``work.get_future().then(fn)``, no Python code runs on the backend's own threads (a
    gloo thread that still had to take the GIL for a callback when the interpreter shut down
    would abort the process). Jobs on an :class:`OrderedExecutor` wait; blocking is the design.
    """

    __slots__ = ("_wait_fn", "_done", "_value")

    def __init__(self, wait_fn: Callable[[], object]):
        self._wait_fn: Optional[Callable[[], object]] = wait_fn
        self._done = False
        self._value = None

    def wait(self):
        """Wait for the collective, run the chain, return (and keep) the value."""
        if not self._done:
            value = self._wait_fn()
            while isinstance(value, Deferred):  # a chained function launched a further collective
                value = value.wait()
            self._value, self._done, self._wait_fn = value, True, None
        return self._value

    value = wait

    def progress(self) -> None:
        """Wait for the collective and run the chain up to the next collective it launches,
        without waiting for that one (a pipeline's stage; :meth:`wait` finishes the rest)."""
        if not self._done:
            value = self._wait_fn()
            if isinstance(value, Deferred):
                self._wait_fn = value.wait
            else:
                self._value, self._done, self._wait_fn = value, True, None

    def then(self, fn: "Callable[[Deferred], object]") -> "Deferred":
        """The deferred result of ``fn(self)`` (fn reads ``.value()``; it may return a Deferred)."""
        return Deferred(lambda: fn(self._ready()))

    def _ready(self) -> "Deferred":
        self.wait()
        return self


def _launched(work, value: Callable[[], torch.Tensor]) -> Deferred:
    def wait():
        work.wait()
        return value()
    return Deferred(wait)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> Deferred:
    """In-place all-reduce of t; the deferred value is t."""
    work = dist.all_reduce(t, op=op, group=group, async_op=True)
    return _launched(work, lambda: t)


def all_gather(t: torch.Tensor, group=None, out: Optional[torch.Tensor] = None) -> Deferred:
    """Gathers every rank's t into a [world, *t.shape] tensor (the deferred value): ``out``
    (contiguous, world * t.numel() elements of t's dtype) or a new one."""
    world = dist.get_world_size(group)
    flat = t.new_empty(world * t.numel()) if out is None else out.view(-1)  # gloo wants a flat output
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(flat, t.contiguous().reshape(-1), group=group, async_op=True)
    return _launched(work, lambda: flat.view((world,) + tuple(t.shape)))


def all_to_all(t: torch.Tensor, group=None, out: Optional[torch.Tensor] = None) -> Deferred:
    """Equal-split all-to-all of a [world, chunk] tensor: row r goes to rank r; the rows
    received land in ``out`` (same shape and dtype) or a new tensor."""
    out = torch.empty_like(t) if out is None else out
    work = dist.all_to_all_single(out, t, group=group, async_op=True)
    return _launched(work, lambda: out)


class ExecutorClosed(RuntimeError):
    """A job was submitted to an executor that is closing or closed."""


class OrderedExecutor:
    """Runs jobs one at a time, in submission order, on one background thread.

    Collectives must be issued in the same order on every rank. A multi-stage exchange that
    launched its later stages from completion callbacks would interleave with the next bucket's
    first stage in a different order on each rank: mismatched collectives, wrong sums or a hang
    (the failure of torch's PowerSGD hook on gloo with several buckets). DDP calls hooks in
    bucket order on every rank, so running each bucket's whole exchange here, bucket after
    bucket, gives one order per process group while the backward pass goes on.

    A job's exception goes to its future (DDP re-raises it from ``backward``); the thread goes
    on with the next job. :meth:`close` finishes the queued jobs and stops the thread; a job
    submitted after ``close`` began gets a future that fails at once with
    :class:`ExecutorClosed`, never one that waits forever.
    """

    def __init__(self, name: str = "commcomp-exec"):
        self.name = name
        self._queue: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closing = False
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}

    def _stream(self, device: torch.device) -> "torch.cuda.Stream":
        """This executor's communication stream on ``device`` (created on first use)."""
        device = torch.device(device)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @property
    def closed(self) -> bool:
        return self._closing

    def submit(self, job: Callable[[], object], like: torch.Tensor) -> Future:
        """Queue ``job``; its return value (or exception) completes the returned future.

        CUDA jobs run on this executor's own stream of ``like``'s device, after the work queued
        so far on the submitter's current stream (an event hand-off), so kernels the submitter
        issues after this call (the rest of the backward pass) never queue behind the
        exchange. The future records the job's stream: whoever reads its value waits for it."""
        fut = new_future(like)
        stream = None
        if like.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(like.device))
            stream = (self._stream(like.device), ready)
        with self._lock:
            if self._closing:
                fut.set_exception(ExecutorClosed(
                    f"commcomp: the communication executor {self.name!r} is closed (its hook state "
                    "was closed); register the hook again to go on training"))
                return fut
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put((job, fut, stream))
        return fut

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every job queued so far has run; False on timeout."""
        done = threading.Event()
        with self._lock:
            if self._closing or self._thread is None:
                return not self._busy()
            self._queue.put((done.set, None, None))
        return done.wait(timeout)

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> bool:
        """Finish the queued jobs and stop the thread; True when it stopped within ``timeout``.

        Completing a hook's future releases the GIL while DDP's waiter wakes up; if the main
        thread reached interpreter shutdown before this thread took the GIL back, Python would
        end the thread inside C++ and the process would abort. Closing (at the latest from
        ``atexit``) while the interpreter is whole closes that window. A job stuck on a dead peer
        is given ``timeout`` seconds, then left behind with a warning rather than hang the exit.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
            thread = self._thread
            if first and thread is not None:
                self._queue.put(None)  # after every job already queued; nothing can follow it
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("commcomp: executor %s still ran a job after %.0f s; a peer may have died",
                           self.name, timeout)
            return False
        return True

    def _loop(self) -> None:
        # CUDA jobs whose stream work may still run: their closures (tensors allocated on the
        # submitter's stream and used on ours) are kept until an event after them completes,
        # so the caching allocator cannot hand that memory to the backward pass too early.
        in_flight: "collections.deque" = collections.deque()
        while True:
            item = self._queue.get()
            while in_flight and in_flight[0][0].query():
                in_flight.popleft()
            if item is None:
                for done, _ in in_flight:
                    done.synchronize()
                return
            job, fut, stream = item
            try:
                if fut is None:  # a flush marker
                    job()
                elif stream is not None:  # on our stream, after the submitter's queued work
                    comm, ready = stream
                    with torch.cuda.stream(comm):
                        comm.wait_event(ready)
                        fut.set_result(job())  # records an event on `comm` for the readers
                    done = torch.cuda.Event()
                    done.record(comm)
                    in_flight.append((done, job))
                else:
                    fut.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - re-raised by DDP's backward
                if fut is not None:
                    fut.set_exception(exc)
            # Drop the finished job now, not when the next one arrives: its closure holds the
            # bucket, the hook state and the process group (CUDA jobs: see in_flight).
            del item, job, fut, stream


class _Shared:
    __slots__ = ("executor", "users")

    def __init__(self, executor: OrderedExecutor):
        self.executor, self.users = executor, 0


_SHARED: Dict[int, _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _key(group) -> int:
    return id(group if group is not None else dist.group.WORLD)


def shared_executor(group) -> OrderedExecutor:
    """The executor of process group ``group``, with one more user: every hook state on a
    group shares one executor (one order of its collectives); call :func:`release_executor`
    once per call of this when done (``HookState.close`` does)."""
    with _SHARED_LOCK:
        entry = _SHARED.get(_key(group))
        if entry is None or entry.executor.closed:
            entry = _SHARED[_key(group)] = _Shared(OrderedExecutor(f"commcomp-exec-{len(_SHARED)}"))
        entry.users += 1
        return entry.executor


def release_executor(group, executor: OrderedExecutor, timeout: float = 10.0) -> bool:
    """One user of ``group``'s executor is done; the last one closes it (queued jobs finish
    first). Returns False if the thread did not stop within ``timeout``."""
    with _SHARED_LOCK:
        entry = _SHARED.get(_key(group))
        if entry is None or entry.executor is not executor:
            return executor.close(timeout)  # already replaced: close this old one
        entry.users -= 1
        if entry.users > 0:
            return True
        del _SHARED[_key(group)]
    return executor.close(timeout)


@atexit.register
def _close_all(timeout: float = 10.0) -> None:
    """At interpreter exit: finish and stop every executor still open."""
    with _SHARED_LOCK:
        executors = [e.executor for e in _SHARED.values()]
        _SHARED.clear()
    for executor in executors:
        executor.close(timeout)


__all__ = ["Deferred", "ExecutorClosed", "Future", "OrderedExecutor", "all_gather", "all_reduce", "all_to_all",
           "new_future", "release_executor", "shared_executor"]
