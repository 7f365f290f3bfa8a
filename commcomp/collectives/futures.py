"""Chaining collectives without blocking: a hook returns one future, completed by a chain of
callbacks that each launch the next collective (no ``wait()`` in any callback)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch
import torch.distributed as dist

Future = torch.futures.Future


def new_future(like: torch.Tensor) -> Future:
    """A future that may carry tensors of `like`'s device (CUDA futures record streams)."""
    if like.is_cuda:
        return Future(devices=[like.device])
    return Future()


def then(fut: Future, fn: Callable[[Future], object], like: torch.Tensor) -> Future:
    """The future of ``fn(fut)``, where fn may return a value or a further future.

    Exceptions raised by fn, or by any future in the chain, complete the result with that
    exception, so DDP's backward re-raises it instead of hanging.
    """
    result = new_future(like)

    def forward(inner: Future) -> None:
        try:
            result.set_result(inner.value())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting side
            result.set_exception(exc)

    def on_done(done: Future) -> None:
        try:
            out = fn(done)
        except BaseException as exc:  # noqa: BLE001
            result.set_exception(exc)
            return
        if isinstance(out, torch._C.Future):  # .then() returns the C++ base class
            out.then(forward)
        else:
            result.set_result(out)

    fut.then(on_done)
    return result


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> Future:
    """In-place all-reduce of t; the future's value is t."""
    work = dist.all_reduce(t, op=op, group=group, async_op=True)
    return work.get_future().then(lambda _: t)


def all_gather(t: torch.Tensor, group=None) -> Future:
    """Gathers every rank's t into a new [world, *t.shape] tensor (the future's value).

    Reads the output buffer itself: on gloo the work's future holds a list, not the tensor.
    """
    world = dist.get_world_size(group)
    flat = t.new_empty(world * t.numel())  # gloo wants a flat output of world * numel
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(flat, t.contiguous().reshape(-1), group=group, async_op=True)
    return work.get_future().then(lambda _: flat.view((world,) + tuple(t.shape)))


def all_to_all(t: torch.Tensor, group=None) -> Future:
    """Equal-split all-to-all of a [world, chunk] tensor: row r goes to rank r."""
    out = torch.empty_like(t)
    work = dist.all_to_all_single(out, t, group=group, async_op=True)
    return work.get_future().then(lambda _: out)


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

    def submit(self, job: Callable[[], torch.Tensor], like: torch.Tensor) -> Future:
        fut = new_future(like)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="commcomp-comm", daemon=True)
                self._thread.start()
        self._queue.put((job, fut, torch.cuda.current_stream() if like.is_cuda else None))
        return fut

    def _loop(self) -> None:
        while True:
            job, fut, stream = self._queue.get()
            try:
                if stream is not None:  # run on the submitter's stream, after its queued work
                    with torch.cuda.stream(stream):
                        fut.set_result(job())
                else:
                    fut.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - re-raised by DDP's backward
                fut.set_exception(exc)


_COMM_THREAD = CommThread()


def comm_thread() -> CommThread:
    """The process-wide communication thread (one, so that every hook shares one order)."""
    return _COMM_THREAD
