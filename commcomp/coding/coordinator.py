"""Straggler-tolerant aggregation of coded gradients: the master of gradient coding.

In the terms of Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers
in Distributed Learning" (ICML 2017): the data of a step is cut into ``n`` partitions with
gradients ``g_1 .. g_n``; worker ``i`` sends one coded gradient ``g~_i = sum_j B[i, j] g_j``
(``B``: the code's ``n x n`` encoding matrix, :mod:`commcomp.coding.codes`); the master waits
for the first ``n - s`` workers ``S`` only and decodes with a vector ``a``, zero outside ``S``,
that satisfies ``a^T B_S = 1^T``: ``sum_{i in S} a_i g~_i = sum_j g_j`` exactly. Here one rank
of the group, the **coordinator**, plays the master and is also a worker.

Per step and DDP bucket (a round):

1. every worker sends its ``g~_i`` to the coordinator (one message per bucket per round);
2. the coordinator takes the **first n - s** messages of that round, solves for ``a``
   (:meth:`GradientCode.decode <commcomp.coding.codes.GradientCode.decode>`), forms the sum in
   float64 and divides by ``n`` (the average over partitions, what uncoded DDP computes when
   rank ``j`` trains on partition ``j``);
3. it sends that result back to every worker, and drops whatever arrives late. Nobody waits
   for the slowest ``s`` workers; every replica applies the same decoded gradient, bit for bit.

How it avoids blocking on a straggler (:mod:`commcomp.coding.transport` has the pieces):

* per peer, a receiver thread blocks on that peer's next message and puts it in one inbox; a
  round takes messages from the inbox until it holds ``n - s`` of its own; a message of an
  earlier round (a straggler catching up) is dropped; one of a later bucket is kept for it;
* sends are never waited on by the caller: a sender thread per peer waits on them in order;
* messages carry a header (round, bucket, sender): late ones are recognised, and a peer that
  broke the protocol is reported, not silently mixed in;
* a peer whose connection fails (a crashed process) is a permanent straggler: decoding goes
  on while at most ``s`` are gone, and fails with an explanation when more are;
* every wait has a deadline (``timeout``): a clear ``TimeoutError`` instead of a hang.

A rank that is *permanently* slower than the others falls further behind every round; the
coordinator lets at most ``max_backlog`` of its results pile up and then waits for it
(back-pressure), so memory stays bounded: from then on the coordinator, and so every rank, runs
at the slow rank's pace (at most ``max_backlog`` messages behind it). A permanently slow rank
therefore cancels what gradient coding gains; restart without it. Back-pressure counts sends
not yet completed, which is what gloo and NCCL report for a peer that has not received; under
MPI small messages complete at once (eager protocol), so there it does not engage.

The coordinator is a single point of failure (it holds the round); a slow coordinator slows
its rounds. It also computes (every DDP rank is a worker); the sequential-coding round engine
(:mod:`commcomp.coding.engine`) has a dedicated coordinator rank that computes nothing. Transports: torch.distributed P2P (gloo, NCCL) or MPI through mpi4py
(:class:`~commcomp.coding.transport.MPITransport`, no crash tolerance: MPI aborts the job when
a process dies).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Dict, Optional

import torch

from ..utils import ByteCounter
from .transport import (  # noqa: F401 - the transports and wire format were importable from here
    HEADER_BYTES,
    MAGIC,
    TAG,
    Key,
    MPITransport,
    PeerReceiver,
    PeerSender,
    TorchTransport,
    make_transport,
    pack,
    unpack,
)

logger = logging.getLogger(__name__)


class CodedAggregator:
    """Coordinator/worker protocol for one gradient code over one group of ranks.

    Worker ``i`` of the code (row ``i`` of ``B``) is rank ``i`` of the group, so ``code.n`` must
    be the group's size. Per bucket, call :meth:`start` as soon as the coded gradient ``g~_i``
    is ready (it sends without blocking) and then :meth:`finish`, which blocks until the decoded
    average ``(1/n) sum_j g_j`` is back.

    Args:
        code: a :class:`~commcomp.coding.codes.GradientCode` (``n`` workers, ``s`` stragglers).
        group: the torch.distributed group (the ``"torch"`` transport).
        coordinator: the rank that plays the master and decodes (default 0).
        timeout: seconds any wait may take before a ``TimeoutError`` (default 300).
        transport: ``"torch"``, ``"mpi"``, or an object with ``isend``/``irecv``/``rank``/
            ``world_size`` (see :func:`~commcomp.coding.transport.make_transport`).
        device: where receive buffers go when a bucket gives none (default CPU).
        counter: a :class:`~commcomp.utils.ByteCounter` to count this rank's sends in (the hook
            passes its own ``metrics``); default a counter of this aggregator's own.
        max_backlog: messages the coordinator lets pile up for one peer (results it has not
            received yet) before it waits for that peer: a permanently slow rank is then waited
            for, which bounds memory and holds every rank to its pace (default 64, e.g. 8 rounds
            of 8 buckets; a transient straggler never reaches it).

    Attributes:
        metrics: ``rounds`` decoded (coordinator), ``late_dropped`` straggler messages that came
            after their round was decoded, ``wait_s`` seconds waited for the ``n - s``,
            ``backpressure_waits`` / ``backpressure_s`` times and seconds the coordinator waited
            for a peer ``max_backlog`` messages behind.
        survivor_counts: per ``|S|``, how many rounds were decoded from that many workers.
        dead: rank -> reason, for peers whose connection failed (permanent stragglers).
        counter: the byte counter (``bytes_sent``: headers and payloads this rank sent).
    """

    def __init__(self, code, group=None, coordinator: int = 0, timeout: float = 300.0,
                 transport="torch", device=None, counter: Optional[ByteCounter] = None, max_backlog: int = 64):
        self.code = code
        self.transport = make_transport(transport, group)
        self.rank, self.world_size = self.transport.rank, self.transport.world_size
        if code.n != self.world_size:
            raise ValueError(f"commcomp: the code has n={code.n} workers but the group has {self.world_size} ranks; "
                             "build the code with n = world size")
        if not 0 <= coordinator < self.world_size:
            raise ValueError(f"commcomp: coordinator={coordinator} is not a rank of the group "
                             f"(0..{self.world_size - 1})")
        if isinstance(max_backlog, bool) or int(max_backlog) != max_backlog or max_backlog < 1:
            raise ValueError(f"commcomp: max_backlog={max_backlog!r} must be an integer >= 1 (messages per peer)")
        self.max_backlog = int(max_backlog)
        self.coordinator, self.timeout = coordinator, float(timeout)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.is_coordinator = self.rank == coordinator
        self.inbox: "queue.Queue" = queue.Queue()
        self.dead: Dict[int, str] = {}
        self._early: Dict[Key, Dict[int, torch.Tensor]] = {}
        self._broken: Optional[BaseException] = None
        self.counter = counter if counter is not None else ByteCounter()
        self.metrics: Dict[str, float] = {"rounds": 0, "late_dropped": 0, "wait_s": 0.0, "backpressure_waits": 0,
                                          "backpressure_s": 0.0}
        self.survivor_counts: Dict[int, int] = {}
        self._amp_checked: set = set()
        peers = [r for r in range(self.world_size) if r != self.rank] if self.is_coordinator else [coordinator]
        self._dead_lock = threading.Lock()
        self._receivers = {p: PeerReceiver(self.transport, p, self.inbox, self.device, self._mark_dead)
                           for p in peers}
        self._senders = {p: PeerSender(self.transport, p, self._mark_dead) for p in peers}
        for t in list(self._receivers.values()) + list(self._senders.values()):
            t.start()
        self._closed = False

    # -- one bucket of one round
    def start(self, key: Key, coded: torch.Tensor):
        """Hand this rank's coded gradient ``g~_i`` for ``key`` = (round, bucket) over; returns
        what :meth:`finish` needs. A worker sends it to the coordinator; the coordinator keeps
        a copy and posts the receives of the round."""
        self._check_open()
        self._check_healthy()
        coded = coded.detach().reshape(-1)
        nbytes = coded.numel() * coded.element_size()
        if self.is_coordinator:
            dead = self._dead_set()
            for peer, rx in self._receivers.items():
                if peer not in dead:
                    rx.expect(key, nbytes, coded.dtype, coded.device)
            return (key, coded.clone())  # DDP may reuse the bucket buffer: keep our own copy
        msg = pack(key, self.rank, coded)
        self._senders[self.coordinator].send(msg)
        self.counter.sent(msg.numel())
        self._receivers[self.coordinator].expect(key, nbytes, coded.dtype, coded.device)
        return (key, None)

    def finish(self, started) -> torch.Tensor:
        """Block until the decoded average ``(1/n) sum_j g_j`` for the started bucket is known;
        return it.

        Any failure (timeout, lost coordinator, more than ``s`` dead workers, a protocol
        violation) leaves this aggregator unusable: later calls raise at once instead of pairing
        results with the wrong rounds. Restart from a checkpoint with a new state.
        """
        self._check_healthy()
        key, own = started
        try:
            if self.is_coordinator:
                return self._decode_round(key, own)
            return self._await_result(key)
        except BaseException as exc:
            self._broken = exc
            raise

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank put on the wire (headers and payloads), as counted in :attr:`counter`
        (which includes what a restored checkpoint counted, where the counter is the hook's)."""
        return self.counter["bytes_sent"]

    def _check_healthy(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"commcomp: an earlier gradient-coding round failed ({str(self._broken).splitlines()[0][:300]}); "
                "rounds can no longer be matched with their results on this state: restart from a checkpoint "
                "with a new state") from self._broken

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    # -- the coordinator's round: gather n - s, decode, send back
    def _decode_round(self, key: Key, own: torch.Tensor) -> torch.Tensor:
        got = self._gather(key, own)
        survivors = sorted(got)
        result = self._decode(survivors, got, own)
        msg = pack(key, self.rank, result)
        dead = self._dead_set()
        for peer, tx in self._senders.items():
            if peer not in dead:
                self._bound_backlog(peer, tx, key)
                tx.send(msg)
                self.counter.sent(msg.numel())
        self.metrics["rounds"] += 1
        self.survivor_counts[len(survivors)] = self.survivor_counts.get(len(survivors), 0) + 1
        return result

    def _bound_backlog(self, peer: int, tx, key: Key) -> None:
        """Back-pressure: wait while ``peer`` has ``max_backlog`` results not yet received (a
        permanently slow rank), so the queue stays bounded."""
        if tx.pending < self.max_backlog:
            return
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        while tx.pending >= self.max_backlog and tx.failed is None and peer not in self._dead_set():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"commcomp: gradient coding round {key[0]}: rank {peer} has {tx.pending} results it has not "
                    f"received (max_backlog={self.max_backlog}) and did not catch up within timeout="
                    f"{self.timeout:g} s; it is stalled: restart without it, or raise max_backlog/timeout")
            time.sleep(0.001)
        self.metrics["backpressure_waits"] += 1
        self.metrics["backpressure_s"] += time.monotonic() - t0

    def _gather(self, key: Key, own: torch.Tensor) -> Dict[int, torch.Tensor]:
        """The first ``n - s`` coded gradients of round ``key`` (the survivor set ``S``): this
        rank's own, those that came early, then the inbox until enough are in."""
        need = self.code.n - self.code.s
        got: Dict[int, torch.Tensor] = {self.rank: own}
        for w, payload in self._early.pop(key, {}).items():
            if len(got) < need:
                got[w] = payload
            else:
                self.metrics["late_dropped"] += 1
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        while len(got) < need:
            self._check_decodable(key, got, need)
            kind, peer, k, payload = self._next_message(key, got, need, deadline)
            if kind == "protocol":
                raise payload
            if kind == "dead":
                self._mark_dead(peer, payload)
            elif k == key:
                if len(got) < need:
                    got[peer] = payload
            elif k < key:
                self.metrics["late_dropped"] += 1  # a straggler's bucket for a round already decoded
            else:
                self._early.setdefault(k, {})[peer] = payload
        self.metrics["wait_s"] += time.monotonic() - t0
        return got

    def _check_decodable(self, key: Key, got: Dict[int, torch.Tensor], need: int) -> None:
        """Raise when the live workers can no longer make up ``n - s`` (more than ``s`` are gone)."""
        n, dead = self.code.n, self._dead_set()
        if len(got) + sum(1 for w in range(n) if w not in got and w not in dead) < need:
            raise RuntimeError(
                f"commcomp: gradient coding round {key[0]} cannot be decoded: {len(dead)} workers are "
                f"gone ({self._dead_text()}) but the code tolerates s={self.code.s}; restart the job from a "
                "checkpoint (with fewer ranks, or a code with a larger s)")

    def _next_message(self, key: Key, got: Dict[int, torch.Tensor], need: int, deadline: float):
        try:
            return self.inbox.get(timeout=self._remaining(deadline))
        except queue.Empty:
            missing = sorted(set(range(self.code.n)) - set(got) - self._dead_set())
            raise TimeoutError(
                f"commcomp: gradient coding round {key[0]} bucket {key[1]}: only {len(got)} of the {need} "
                f"needed coded gradients arrived within timeout={self.timeout:g} s (waiting on ranks "
                f"{missing}; gone: {self._dead_text()}); raise `timeout` if steps are this slow") from None

    def _decode(self, survivors, got: Dict[int, torch.Tensor], own: torch.Tensor) -> torch.Tensor:
        """``(1/n) sum_{i in S} a_i g~_i`` with ``a^T B_S = 1^T``, summed in float64."""
        a = self.code.decode(survivors)
        self._warn_amplification(survivors, own.dtype)
        acc = torch.zeros(own.numel(), dtype=torch.float64, device=own.device)
        for w in survivors:
            acc.add_(got[w].to(torch.float64), alpha=float(a[w]))
        return (acc / self.code.n).to(own.dtype)

    # -- a worker's round: wait for the coordinator's result
    def _await_result(self, key: Key) -> torch.Tensor:
        rx = self._receivers[self.coordinator]
        deadline = time.monotonic() + self.timeout
        while True:
            if isinstance(rx.failed, RuntimeError) and str(rx.failed).startswith("commcomp: rank"):
                raise rx.failed  # a protocol violation
            if rx.failed is not None and self.inbox.empty():
                raise RuntimeError(f"commcomp: lost the gradient-coding coordinator (rank {self.coordinator}): "
                                   f"{rx.failed}; the coordinator is a single point of failure") from rx.failed
            try:
                kind, peer, k, payload = self.inbox.get(timeout=self._remaining(deadline))
            except queue.Empty:
                raise TimeoutError(
                    f"commcomp: no decoded gradient for round {key[0]} bucket {key[1]} from the coordinator "
                    f"(rank {self.coordinator}) within timeout={self.timeout:g} s: more than s={self.code.s} "
                    "workers may be stalled, or the coordinator is; raise `timeout` if steps are this slow") from None
            if kind in ("dead", "protocol"):
                continue  # raised above, once the inbox holds nothing older
            if k == key:
                return payload.clone()
            raise RuntimeError(f"commcomp: the coordinator answered round/bucket {k} where {key} was due: "
                               "the ranks disagree on the bucket layout or the step count")

    # -- bookkeeping
    def lag(self) -> Dict[int, int]:
        """Per peer: messages still to be exchanged with it (a straggler's backlog)."""
        return {p: self._receivers[p].pending + self._senders[p].pending for p in self._receivers}

    def _warn_amplification(self, survivors, dtype: torch.dtype) -> None:
        """Once per survivor-set size: warn when decoding magnifies the payloads' rounding
        (random cyclic codes: a_i B_ij terms up to 1e2..1e5 x the result) past 1e-3."""
        if dtype == torch.float64 or len(survivors) in self._amp_checked:
            return
        self._amp_checked.add(len(survivors))
        amp = self.code.amplification(survivors)
        eps = torch.finfo(dtype).eps
        if amp > 8 and amp * eps > 1e-3:  # notably worse than the dtype itself
            logger.warning(
                "commcomp: gradient coding: decoding this %s code from %d survivors magnifies %s rounding "
                "%.0fx (relative error up to ~%.1e); prefer code='fractional' (exact 0/1 coefficients) where "
                "(s + 1) divides n, or float32 gradients over half precision", self.code.name, len(survivors),
                dtype, amp, amp * eps)

    # -- bookkeeping (dead peers)
    def _mark_dead(self, peer: int, exc) -> None:
        """A peer's connection failed (called from its receiver or sender thread)."""
        with self._dead_lock:
            if peer in self.dead:
                return
            self.dead[peer] = str(exc).splitlines()[0][:200] if exc is not None else "gone"
        logger.warning("commcomp: gradient coding: rank %d is gone and now counts as a permanent straggler "
                       "(%s)", peer, self.dead[peer])

    def dead_set(self) -> set:
        """The ranks whose connection failed: permanent stragglers, counted among the ``s``."""
        with self._dead_lock:
            return set(self.dead)

    _dead_set = dead_set  # the name the gradient-coding hook reads

    def _dead_text(self) -> str:
        return ", ".join(f"rank {r}" for r in sorted(self._dead_set())) or "none"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("commcomp: this gradient-coding state was closed; create a new one")

    def close(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is in flight (results to stragglers, their late messages) and stop the
        threads. Call it on every rank before ``destroy_process_group``. Returns False if it
        gave up after ``timeout`` seconds (peers that never caught up): threads still blocked
        on such a peer are left behind, and destroying the process group under them may abort
        the process -- exit with ``os._exit`` in that case, or wait for the peers.

        A slow rank keeps up to ``max_backlog`` result messages queued here (and as many
        expected messages at its receiver); past that the coordinator waits for it (back-
        pressure). ``lag()`` says how far behind each rank is."""
        if self._closed:
            return True
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        threads = list(self._receivers.values()) + list(self._senders.values())
        while any(t.pending > 0 and t.failed is None and t.is_alive() for t in threads):
            if time.monotonic() > deadline:
                logger.warning("commcomp: gradient coding close(): peers still had messages in flight after "
                               "the timeout; leaving them")
                break
            time.sleep(0.005)
        else:
            deadline = None
        for t in threads:
            t.stop()
        for t in threads:  # idle threads exit at once; one stuck on a dead peer is left behind
            t.join(0.5)
        self._closed = True
        return deadline is None


__all__ = ["CodedAggregator", "MPITransport", "TorchTransport", "make_transport", "pack", "unpack"]
