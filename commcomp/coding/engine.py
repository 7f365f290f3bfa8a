# Long file: one class, the coordinator's and the workers' sides of one protocol; kept together
# so that the message layout (task and result slots) is written and read in one place.
"""A live round engine for sequential gradient coding: train models over rounds on real worker
processes, with real (injected) stragglers.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023:
"concurrently training multiple neural networks", job ``t`` (one gradient of one model) starting
in round ``t`` and decoded by round ``t + T``. One rank is the **coordinator** (the paper's
master; it computes nothing), the other ``n`` ranks are the workers. Per round ``r``:

1. The round rule (:class:`~commcomp.coding.master.Master`, the simulator's own) may skip the
   round (SR-SGC's tail); otherwise its schedule assigns each worker its tasks: slots of
   ``(job, kind)``, partitions of one or more jobs with their coded weights
   (:class:`~commcomp.coding.jobs.JobLayout`).
2. The coordinator sends each worker one message: the round, its injected delay for the round,
   and per slot the job, the task and the parameters the job's model had when the job started.
3. Each worker computes its tasks (one weighted backward per slot), waits out its injected delay
   (a trace or a straggler model says how long this worker takes in this round) and sends the
   results back with a (round, job, task) header per slot.
4. The coordinator waits for the fastest worker, then ``fastest x (1 + mu)``; the workers still
   missing are the round's stragglers. If they fit the scheme's straggler model the round ends
   there, otherwise it waits for all (a *wait*). Results that arrive after their round ended are
   dropped by their header.
5. The job due this round (``r - T``) is decoded exactly (float64) and applied to its model.

**Concurrent models** (:class:`ConcurrentModels`): job ``t`` is a gradient of model ``t mod M``.
With ``M >= T + 1`` a model's next job starts only after its previous one was applied, so no
model ever trains on a stale gradient and each model's parameters equal an uncoded run's
(:func:`reference_params`). ``M < T + 1`` (e.g. one model) is allowed with ``stale=True``: then
job ``t`` computes at the parameters of round ``t`` and is applied ``T`` rounds later, a
``T``-step delayed gradient, which :func:`reference_params` reproduces too.

**Workers behave like the paper's Lambda invocations**: a worker that receives a newer task
while still busy with an older one (the round it straggled in is over) drops the old one and
starts the new one; a worker whose messages pile up (a frozen process) gets no new task until its
backlog drains below ``max_backlog`` and counts as a straggler meanwhile; a worker whose
connection fails is a permanent straggler. A pattern outside the scheme's tolerance stops the run
with an explanation, on every rank. Every wait has a deadline (``timeout``).

**The coordinator is a single point of failure**: it holds the round, the models and the
results; if it dies the workers stop with an error after ``timeout``. It computes nothing, so it
is never a straggler itself. Transports: torch.distributed P2P (gloo) or MPI (``"mpi"``, through
mpi4py; MPI aborts the job when a process dies, so no dead-worker tolerance there, and MPI
completes small sends at once, so back-pressure engages only for messages past its eager limit).

Example (on every rank of a gloo group of ``n + 1`` ranks)::

    models = digits_sweep(models=4, lrs=(0.05, 0.1, 0.2, 0.4))   # MNIST MLPs
    d = engine_delays(durations, "msgc", {"B": 1, "W": 3, "lambd": 2}, time_scale=0.1)
    res = RoundEngine(models, "msgc", {"B": 1, "W": 3, "lambd": 2}, n_jobs=20, delays=d).run()
    if res is not None:          # the coordinator's rank
        print(res.wall_s, res.num_waits)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .concurrent import (  # noqa: F401 - part of this module's surface (the engine's inputs)
    ConcurrentModels,
    apply_grad,
    digits_sweep,
    engine_delays,
    flat_params,
    grad_sum,
    reference_params,
)
from .jobs import JobLayout
from .master import Master
from .schedules import D1, D2, IDLE, DecodingError
from .sequential import make_scheme
from .transport import ABORT, NORMAL, STOP, PeerSender, StreamReceiver, make_transport
from .transport import pack_stream as _msg

__all__ = ["ConcurrentModels", "EngineResult", "RoundEngine", "check_engine_params", "digits_sweep", "engine_delays",
           "reference_params"]

log = logging.getLogger(__name__)

ENGINE_SCHEMES = ("uncoded", "gc", "srsgc", "msgc")


# --------------------------------------------------------------------------- result
@dataclass
class EngineResult:
    """What the coordinator measured. ``round_durations``: seconds per round (0 for a skipped
    round); ``missing[r]``: the workers whose round-``r`` results did not count; ``wall_s``: the
    whole run; ``params``: each model's final parameters (flat float64)."""

    scheme: str
    params: Dict[str, int]
    n_jobs: int
    T: int
    load: float
    wall_s: float
    round_durations: np.ndarray
    num_waits: int
    missing: np.ndarray
    skipped: List[int]
    late_dropped: int
    not_sent: int
    dead: Dict[int, str]
    model_params: List[torch.Tensor] = field(repr=False)
    bytes_sent: int = 0

    @property
    def runtime(self) -> float:
        """Sum of the round durations (the simulator's ``runtime``; ``wall_s`` adds set-up)."""
        return float(self.round_durations.sum())

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "params": dict(self.params), "n_jobs": self.n_jobs, "T": self.T,
                "load": self.load, "runtime": self.runtime, "wall_s": self.wall_s, "num_waits": self.num_waits,
                "round_durations": [float(x) for x in self.round_durations], "skipped": list(self.skipped),
                "stragglers_per_round": [int(x) for x in self.missing.sum(axis=1)],
                "late_dropped": self.late_dropped, "not_sent": self.not_sent,
                "dead": {str(k): v for k, v in self.dead.items()}, "bytes_sent": self.bytes_sent}


def check_engine_params(scheme: str, params: Optional[dict], n: int, n_jobs: int, models: int,
                        stale: bool = False):
    """Check a run's parameters before any process starts; returns the scheme object. Raises
    ``ValueError`` saying what is allowed: the scheme must be one the engine runs, SR-SGC's B must
    divide W - 1, lambd < n, T <= n_jobs, and models >= T + 1 unless ``stale``."""
    if scheme not in ENGINE_SCHEMES:
        raise ValueError(f"the round engine runs {', '.join(ENGINE_SCHEMES)}; got {scheme!r} "
                         "(ignore drops gradients, so its jobs cannot be decoded exactly)")
    if n < 1:
        raise ValueError("the round engine needs a coordinator and at least one worker: world size >= 2")
    sch = make_scheme(scheme, n, **dict(params or {}))
    if scheme in ("srsgc", "msgc") and sch.lambd >= n:
        raise ValueError(f"{sch!r}: lambd={sch.lambd} must be < n={n} workers. lambd = n lets every worker straggle "
                         "in one window (the paper's all-repetition corner of M-SGC, where nothing is coded); the "
                         "simulator accepts it, the live engine does not; lower lambd")
    if int(n_jobs) != n_jobs or n_jobs < 1:
        raise ValueError(f"n_jobs={n_jobs!r} must be an integer >= 1")
    if sch.T > n_jobs:
        raise ValueError(f"{sch!r}: its delay T={sch.T} is larger than n_jobs={n_jobs}: the run would spend more "
                         "rounds draining than computing; run more jobs or choose a scheme with a smaller T")
    if models < sch.T + 1 and not stale:
        raise ValueError(f"{sch!r} has delay T={sch.T}: it needs at least T + 1 = {sch.T + 1} concurrent models "
                         f"so that no model trains on a stale gradient (got models={models}); add models "
                         "(--models on the command line), or pass stale=True to RoundEngine for a T-step delayed "
                         "gradient")
    return sch


class _Stopped(RuntimeError):
    """The coordinator stopped the run (its error, sent to every worker)."""


def _text_payload(text: str, nfloats: int) -> torch.Tensor:
    """``text`` (UTF-8, cut to fit) in a float64 payload of ``nfloats`` (an ABORT's reason)."""
    raw = torch.zeros(8 * nfloats, dtype=torch.uint8)
    data = text.encode(errors="replace")[: min(8 * nfloats, 4096) - 1]
    raw[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return raw.view(torch.float64)


def _text(payload: torch.Tensor) -> str:
    raw = bytes(payload.contiguous().view(torch.uint8)[:4096].tolist())
    return raw.split(b"\0", 1)[0].decode(errors="replace") or "no reason given"


@dataclass
class _Run:
    """The coordinator's state during one run."""

    master: Master
    mods: list
    opts: list
    inbox: "queue.Queue"
    rx: dict
    tx: dict
    durations: np.ndarray
    missing: np.ndarray
    snaps: Dict[int, torch.Tensor] = field(default_factory=dict)    # job -> its model's parameters at its start
    results: Dict[int, dict] = field(default_factory=dict)          # job -> {(kind, worker, index): vector}
    d1_done: Dict[tuple, int] = field(default_factory=dict)         # (worker, job) -> D1 chunks returned
    skipped: List[int] = field(default_factory=list)
    late: int = 0
    not_sent: int = 0


# --------------------------------------------------------------------------- the engine
class RoundEngine:
    """Run ``n_jobs`` jobs of ``scheme`` (``uncoded``, ``gc``, ``srsgc``, ``msgc``) with ``params``
    over the ranks of ``group``: rank ``coordinator`` is the master, the others the ``n`` workers.
    Call :meth:`run` on every rank; it returns an :class:`EngineResult` on the coordinator and
    None on the workers.

    Args:
        models: the :class:`ConcurrentModels` (every rank builds the same one).
        delays: ``(rounds >= n_jobs + T, n)`` seconds each worker takes in each round
            (:func:`engine_delays`); None: no injected delay.
        mu: the coordinator waits ``fastest x (1 + mu)`` (default 1.0, the paper's).
        unit: samples per partition (:class:`~commcomp.coding.jobs.JobLayout`).
        stale: allow ``models < T + 1`` (a ``T``-step delayed gradient).
        max_backlog: sends to one worker that may be in flight before it gets no new tasks.
        timeout: seconds any wait may take before a clear error.
        transport: ``"torch"`` (gloo P2P) or ``"mpi"``.
        progress: a tqdm bar on the coordinator.
        die_at: ``{worker: round}``: that worker's process exits when it receives that round's
            task (to test a killed worker; see the tests).
    """

    def __init__(self, models: ConcurrentModels, scheme: str, params: Optional[dict] = None, *, n_jobs: int,
                 delays=None, mu: float = 1.0, unit: int = 1, stale: bool = False, max_backlog: int = 4,
                 timeout: float = 120.0, transport="torch", group=None, coordinator: int = 0,
                 progress: bool = False, die_at: Optional[Dict[int, int]] = None, seed: int = 0):
        self.transport = make_transport(transport, group)
        self.rank, world = self.transport.rank, self.transport.world_size
        if not 0 <= coordinator < world:
            raise ValueError(f"coordinator={coordinator} is not a rank of the group (0..{world - 1})")
        self.coordinator = coordinator
        self.worker_ranks = [r for r in range(world) if r != coordinator]
        self.n = n = len(self.worker_ranks)
        params = dict(params or {})
        sch = check_engine_params(scheme, params, n, n_jobs, models.models, stale)
        self.layout = JobLayout(scheme, n, params, unit=unit, seed=seed)
        if isinstance(max_backlog, bool) or int(max_backlog) != max_backlog or max_backlog < 1:
            raise ValueError(f"max_backlog={max_backlog!r} must be an integer >= 1 (sends in flight to one worker)")
        self.models, self.n_jobs, self.mu = models, int(n_jobs), float(mu)
        if self.mu < 0:
            raise ValueError(f"mu={mu} must be >= 0")
        rounds = self.n_jobs + sch.T
        if delays is None:
            delays = np.zeros((rounds, n))
        delays = np.asarray(delays, dtype=np.float64)
        if delays.ndim != 2 or delays.shape[1] != n or delays.shape[0] < rounds:
            raise ValueError(f"delays must be (rounds >= {rounds}, n={n} workers); got shape {delays.shape}")
        if not np.isfinite(delays).all() or (delays < 0).any():
            raise ValueError("delays must be finite and >= 0 seconds")
        self.delays = delays
        self.scheme_name, self.params = scheme, params
        self.max_backlog, self.timeout = int(max_backlog), float(timeout)
        self.progress, self.die_at = progress, dict(die_at or {})
        self.slots = 1 if sch.name != "msgc" else sch.W - 1 + sch.B
        self.P = sum(p.numel() for p in models.make_model(0).parameters())
        self.task_floats = 1 + 3 * self.slots + self.slots * self.P
        self.result_floats = 3 * self.slots + self.slots * self.P
        self.bytes_sent = 0
        self.dead: Dict[int, str] = {}  # worker -> why, for workers whose connection failed

    # -- entry
    def run(self) -> Optional[EngineResult]:
        """Run the whole schedule; the coordinator's :class:`EngineResult`, None on a worker."""
        if self.rank == self.coordinator:
            res = self._coordinate()
        else:
            self._work()
            res = None
        if getattr(self.transport, "name", "") == "mpi":
            # leave together, so that no rank finalizes MPI while a peer still exchanges its last
            # messages. Three CLI runs under MPI once ended with "terminate called without an
            # active exception" on 1-2 ranks at exit (after correct results); 12 later runs, with
            # and without this barrier, did not: the cause is not established.
            self.transport.comm.Barrier()
        return res

    # -- coordinator
    def _coordinate(self) -> EngineResult:
        run = self._start_coordinator()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=run.master.rounds, desc=f"{self.scheme_name} rounds", unit="round", leave=False)
        t_start = time.monotonic()
        error: Optional[BaseException] = None
        try:
            for r in range(run.master.rounds):
                if bar is not None:
                    bar.update(1)
                self._round(run, r)
        except BaseException as exc:  # noqa: BLE001 - the workers must learn it, then it is re-raised
            error = exc
        finally:
            if bar is not None:
                bar.close()
            self._stop_workers(run.tx, run.rx, error)
        if error is not None:
            raise error
        while True:  # a worker that failed after the last round it was waited for still fails the run
            try:
                kind, peer, head, payload, _t = run.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "msg" and head[2] == ABORT:
                raise self._stopped(self.worker_ranks.index(peer), peer, head, payload, run.master.rounds - 1)
        sch = run.master.scheme
        return EngineResult(sch.name, sch.params, self.n_jobs, sch.T, sch.load, time.monotonic() - t_start,
                            run.durations, run.master.num_waits, run.missing, run.skipped, run.late,
                            run.not_sent, dict(self.dead), [flat_params(m) for m in run.mods], self.bytes_sent)

    def _start_coordinator(self) -> "_Run":
        """The coordinator's state for one run, with a receiver and a sender thread per worker."""
        master = Master(self.scheme_name, self.n, self.params, n_jobs=self.n_jobs)
        mods, opts = self.models.build()
        inbox: "queue.Queue" = queue.Queue()
        self.dead: Dict[int, str] = {}
        lock = threading.Lock()

        def on_dead(peer, exc):
            with lock:
                w = self.worker_ranks.index(peer)
                self.dead.setdefault(w, str(exc).splitlines()[0][:200] if exc is not None else "gone")

        rx = {w: StreamReceiver(self.transport, p, 8 * self.result_floats, inbox, on_dead)
              for w, p in enumerate(self.worker_ranks)}
        tx = {w: PeerSender(self.transport, p, on_dead) for w, p in enumerate(self.worker_ranks)}
        for t in list(rx.values()) + list(tx.values()):
            t.start()
        return _Run(master, mods, opts, inbox, rx, tx, np.zeros(master.rounds),
                    np.zeros((master.rounds, self.n), dtype=bool))

    def _round(self, run: "_Run", r: int) -> None:
        """One round: assign, send, collect by the round rule, record, decode the job due."""
        T = run.master.scheme.T
        if run.master.skip(r):
            run.skipped.append(r)
            self._decode_due(r - T, run, r)
            run.snaps.pop(r - T, None)
            return
        if r < self.n_jobs:
            run.snaps[r] = flat_params(run.mods[r % self.models.models]).clone()
        # back-pressure: a worker with max_backlog sends in flight (a frozen process) gets nothing new
        stuck = {w for w in range(self.n) if w in self.dead or run.tx[w].pending >= self.max_backlog}
        jobs, kinds = run.master.assign(r, avoid=stuck)
        slots = self._slots(jobs, kinds, run.d1_done)
        t0 = time.monotonic()
        sent = set()
        for w in range(self.n):
            if w in stuck:
                run.not_sent += w not in self.dead
                continue
            msg = self._task_msg(r, w, slots[w], run.snaps)
            run.tx[w].send(msg)
            self.bytes_sent += msg.numel()
            sent.add(w)
        arrived, waited, t_end, late = self._collect(r, sent, t0, run.inbox, run.master)
        run.late += late
        run.durations[r] = t_end - t0
        missing = np.ones(self.n, dtype=bool)
        missing[list(arrived)] = False
        run.missing[r] = missing
        for w, payload in arrived.items():
            self._store(r, w, slots[w], payload, run.results, run.d1_done)
        try:
            job = run.master.end_round(r, missing, waited)
        except DecodingError as exc:
            raise DecodingError(self._explain(r, exc, missing)) from exc
        if job is not None:
            self._decode_due(job, run, r, missing)
            run.snaps.pop(job, None)

    def _slots(self, jobs, kinds, d1_done) -> List[List[tuple]]:
        """Per worker, its slots as ``(job, kind, index)``; jobs past ``n_jobs`` are idle."""
        out = []
        W1 = self.layout.scheme.W - 1 if self.layout.scheme.name == "msgc" else 0
        for w in range(self.n):
            row = []
            for m in range(self.slots):
                job, kind = int(jobs[w, m]), int(kinds[w, m])
                if job < 0 or job >= self.n_jobs or kind == IDLE:
                    row.append((-1, IDLE, 0))
                elif kind == D1:
                    row.append((job, D1, d1_done.get((w, job), 0)))
                elif kind == D2:
                    row.append((job, D2, m - W1))
                else:
                    row.append((job, kind, 0))
            out.append(row)
        return out

    def _task_msg(self, r, w, slots, snaps) -> torch.Tensor:
        meta = [float(self.delays[r, w])]
        thetas = []
        for job, kind, index in slots:
            meta += [job, kind, index]
            thetas.append(snaps[job] if job >= 0 else torch.zeros(self.P, dtype=torch.float64))
        payload = torch.cat([torch.tensor(meta, dtype=torch.float64)] + thetas)
        return _msg(r, NORMAL, self.coordinator, payload)

    def _collect(self, r, sent, t0, inbox, master):
        """Gather round ``r``'s results by the round rule; ``(arrived, waited, t_end, late)``.

        The deadline is ``t0 + (first arrival - t0) x (1 + mu)``. At the deadline every message
        already in the inbox is read first, and a result counts when it *arrived* by the deadline
        (a busy coordinator must not turn an on-time worker into a straggler); if the missing
        workers fit the scheme's model the round ends, else it waits for all."""
        arrived: Dict[int, tuple] = {}   # worker -> (payload, arrival time)
        late = [0]
        deadline = None
        waited = False
        hard = t0 + self.timeout
        while True:
            pending = [w for w in sent if w not in arrived and w not in self.dead]
            now = time.monotonic()
            if not pending and (deadline is None or now < deadline):
                break  # everyone answered before the deadline (or the round waits for all)
            if deadline is not None and now >= deadline:
                while True:  # what is already here counts by its arrival time
                    try:
                        self._take(inbox.get_nowait(), r, arrived, late)
                    except queue.Empty:
                        break
                on_time = [w for w, (_p, t) in arrived.items() if t <= deadline]
                missing = np.ones(self.n, dtype=bool)
                missing[on_time] = False
                if master.fits(missing):
                    late[0] += len(arrived) - len(on_time)  # arrived after the deadline: dropped
                    arrived = {w: arrived[w] for w in on_time}
                    break
                waited, deadline = True, None  # the pattern does not fit the model: wait for all
                continue
            limit = (deadline if deadline is not None else hard) - now
            try:
                item = inbox.get(timeout=max(limit, 0.0))
            except queue.Empty:
                if deadline is not None:
                    continue
                raise TimeoutError(
                    f"commcomp: round {r}: workers {sorted(pending)} sent nothing within timeout={self.timeout:g} s "
                    f"(gone: {sorted(self.dead) or 'none'}); raise `timeout` if rounds are this slow") from None
            self._take(item, r, arrived, late)
            if deadline is None and not master.waits_always and not waited and len(arrived) == 1:
                t_first = next(iter(arrived.values()))[1]
                deadline = t0 + (t_first - t0) * (1.0 + self.mu)
        return {w: p for w, (p, _t) in arrived.items()}, waited, time.monotonic(), late[0]

    @staticmethod
    def _stopped(w, peer, head, payload, r) -> RuntimeError:
        why = _text(payload) if head[2] == ABORT else "it left before the run ended"
        when = head[1] if head[2] == ABORT and head[1] >= 0 else r
        return RuntimeError(f"commcomp: worker {w} (rank {peer}) stopped in round {when}: {why}")

    def _take(self, item, r, arrived, late) -> None:
        """One inbox item: a round-``r`` result goes into ``arrived``; an older one is counted late."""
        kind, peer, head, payload, t_arr = item
        w = self.worker_ranks.index(peer)
        if kind == "dead":
            return
        if kind == "protocol":
            raise payload
        if head[2] != NORMAL:
            raise self._stopped(w, peer, head, payload, r)
        if head[1] != r:
            late[0] += 1  # a straggler's result for a round already over
            return
        arrived[w] = (payload, t_arr)

    def _store(self, r, w, slots, payload, results, d1_done) -> None:
        meta = payload[:3 * self.slots].tolist()
        for m, (job, kind, index) in enumerate(slots):
            if job < 0:
                continue
            got = tuple(int(x) for x in meta[3 * m:3 * m + 3])
            if got != (job, kind, index):
                raise RuntimeError(f"commcomp: worker {w} answered round {r} slot {m} with (job, kind, task) {got} "
                                   f"where {(job, kind, index)} was due: the ranks run different versions")
            vec = payload[3 * self.slots + m * self.P: 3 * self.slots + (m + 1) * self.P].clone()
            results.setdefault(job, {})[(kind, w, index)] = vec
            if kind == D1:
                d1_done[(w, job)] = d1_done.get((w, job), 0) + 1

    def _decode_due(self, job, run: "_Run", r: Optional[int] = None, missing=None) -> None:
        if not 0 <= job < self.n_jobs:
            return
        got = run.results.pop(job, {})
        for w in range(self.n):
            run.d1_done.pop((w, job), None)
        try:
            total = self.layout.decode(got)
        except ValueError as exc:
            raise DecodingError(self._explain(job if r is None else r, exc, missing)) from exc
        m = job % self.models.models
        apply_grad(run.mods[m], run.opts[m], total / self.layout.N)

    def _explain(self, r, exc, missing) -> str:
        dead = sorted(self.dead)
        sch = self.layout.scheme
        late = "none known" if missing is None else np.flatnonzero(missing).tolist()
        return (f"commcomp: {sch!r}: a job due in round {r} cannot be decoded; stragglers this round: {late}, "
                f"workers gone for good: {dead or 'none'}. The pattern is beyond what the scheme tolerates"
                + (" (M-SGC's D1 part is uncoded: a dead worker is beyond it; GC and SR-SGC survive up to s dead "
                   "workers)" if sch.name == "msgc" else "")
                + f"; run again with the dead workers left out, or with a scheme that tolerates more. ({exc})")

    def _stop_workers(self, tx, rx, error) -> None:
        flag = ABORT if error is not None else STOP
        note = _text_payload(f"{type(error).__name__}: {error}" if error is not None else "", self.task_floats)
        for w, s in tx.items():
            if w not in self.dead:
                s.send(_msg(-1, flag, self.coordinator, note))
        deadline = time.monotonic() + min(self.timeout, 30.0)
        for t in list(rx.values()):
            t.join(max(0.0, deadline - time.monotonic()))
        for s in tx.values():
            s.stop()
        for s in tx.values():
            s.join(max(0.0, deadline - time.monotonic()))

    # -- worker
    def _work(self) -> None:
        w = self.worker_ranks.index(self.rank)
        inbox: "queue.Queue" = queue.Queue()
        gone = []
        rx = StreamReceiver(self.transport, self.coordinator, 8 * self.task_floats, inbox,
                            lambda p, e: gone.append(e))
        tx = PeerSender(self.transport, self.coordinator, lambda p, e: gone.append(e))
        rx.start()
        tx.start()
        try:
            self._serve(w, inbox, tx)
        except _Stopped:
            raise
        except BaseException as exc:  # noqa: BLE001 - tell the coordinator why, then fail here too
            why = _text_payload(f"{type(exc).__name__}: {exc}", self.result_floats)
            tx.send(_msg(self._round_now, ABORT, self.rank, why))
            raise
        finally:
            tx.stop()
            tx.join(min(self.timeout, 30.0))

    def _serve(self, w: int, inbox, tx) -> None:
        """The worker's loop: newest task, compute, sleep the injected delay, answer; until STOP."""
        mods: Dict[int, nn.Module] = {}
        bye = _msg(-1, STOP, self.rank, torch.zeros(self.result_floats, dtype=torch.float64))
        item = None
        self._round_now = -1  # the round being worked on, for an ABORT's header
        while True:
            if item is None:
                item = self._next_task(inbox)
            while not inbox.empty():  # resynchronise: only the newest task matters
                item = inbox.get_nowait()
            kind, _peer, head, payload, t_recv = item
            item = None
            if kind == "dead":
                raise RuntimeError(f"commcomp: worker {w} lost the coordinator (rank {self.coordinator}), a single "
                                   f"point of failure: {payload}")
            if kind == "protocol":
                raise payload
            r, flag = head[1], head[2]
            if flag == ABORT:
                tx.send(bye)
                raise _Stopped(f"commcomp: the coordinator (rank {self.coordinator}) stopped the run: "
                               f"{_text(payload)}")
            if flag == STOP:
                tx.send(bye)
                return
            self._round_now = r
            if self.die_at.get(w) == r:
                import os
                os._exit(17)  # a crashed worker, for the tests
            out = self._compute(payload, mods, self.models)
            newer = self._sleep_until(inbox, t_recv + float(payload[0]))
            if newer is not None:  # the round is over: drop this task, start the newer one
                item = newer
                continue
            msg = _msg(r, NORMAL, self.rank, out)
            tx.send(msg)
            self.bytes_sent += msg.numel()

    def _next_task(self, inbox):
        try:
            return inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"commcomp: no task from the coordinator (rank {self.coordinator}) within "
                               f"timeout={self.timeout:g} s; it may be gone (a single point of failure)") from None

    @staticmethod
    def _sleep_until(inbox, until):
        """Wait until ``until``; a newer task arriving first (or already there) is returned."""
        try:
            return inbox.get(timeout=max(0.0, until - time.monotonic())) if until > time.monotonic() \
                else inbox.get_nowait()
        except queue.Empty:
            return None

    def _compute(self, payload, mods, cm) -> torch.Tensor:
        S, P = self.slots, self.P
        meta = payload[1:1 + 3 * S].tolist()
        out = torch.zeros(self.result_floats, dtype=torch.float64)
        out[:3 * S] = payload[1:1 + 3 * S]
        w = self.worker_ranks.index(self.rank)
        for m in range(S):
            job, kind, index = (int(x) for x in meta[3 * m:3 * m + 3])
            if job < 0 or kind == IDLE:
                continue
            pos, wts = self.layout.task(kind, w, index)
            if pos.numel() == 0:
                continue
            model = job % cm.models
            if model not in mods:
                mods[model] = cm.make_model(model)
            theta = payload[1 + 3 * S + m * P: 1 + 3 * S + (m + 1) * P]
            idx = cm.samples(job, self.layout.N)[pos]
            out[3 * S + m * P: 3 * S + (m + 1) * P] = grad_sum(cm, mods[model], theta, idx, wts)
        return out
