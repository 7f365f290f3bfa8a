"""Gradient coding against stragglers as a DDP communication hook (Tandon, Lei, Dimakis,
Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed Learning", ICML 2017).

The data of a step is cut into n partitions; worker i holds the s + 1 partitions of row i of
an n x n encoding matrix B and back-propagates ``sum_j B[i, j] * loss_j`` (one backward; see
:class:`commcomp.coding.CodedSampler` and :func:`commcomp.coding.coded_loss`). Its gradient is
then a coded combination, and the full gradient is decodable from **any n - s** workers:

1. each rank sends its coded bucket to the coordinator (point to point, without waiting);
2. the coordinator takes the first n - s coded buckets of the round, solves aᵀB_S = 1ᵀ
   (cached per survivor set), and forms (1/n) Σ a_i g̃_i in float64;
3. it sends that average back to every rank; late buckets are recognised by their round and
   dropped; a rank whose connection fails is a permanent straggler.

Every replica applies the same decoded tensor, so the models stay identical, and the update is
the uncoded data-parallel one (rank j training on partition j), up to float rounding.

>>> model = DDP(net, broadcast_buffers=False)
>>> state = commcomp.register(model, "gradient_coding", s=1, code="cyclic")
>>> sampler = commcomp.coding.CodedSampler(len(ds), state.code, rank, partition_size=32)
>>> ...  # loss = coded_loss(per_sample_losses, weights); loss.backward(); opt.step()
>>> state.close()  # before destroy_process_group: delivers results to late ranks

Constraints: every rank of the group is a worker (n = world size) and rank ``coordinator``
also decodes; the coordinator is a single point of failure. DDP must be built with
``broadcast_buffers=False`` (a buffer broadcast is a collective, which waits for stragglers),
and DDP's first step (bucket rebuild) is collective too: stragglers are tolerated from the
second step on. ``state.reduce_(params)`` does the same for loops without DDP.
"""

import collections
import time
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from commcomp.coding import codes as _codes
from commcomp.coding.coordinator import CodedAggregator
from commcomp.core import HookState, Option, write_flat_grads_
from commcomp.utils import validate


def _is_world(group) -> bool:
    """Whether ``group`` holds every rank in world order (MPI numbers ranks by COMM_WORLD)."""
    return group is None or dist.get_process_group_ranks(group) == list(range(dist.get_world_size()))


def _code_name(code) -> str:
    return code.name


def _code_digest(code) -> str:
    return code.digest()


class GradientCodingState(HookState):
    """Options of the gradient-coding hook, and its coordinator.

    Args:
        s: stragglers tolerated per round (0 <= s < n). Each rank computes s + 1 partitions.
        code: ``"cyclic"`` (cyclic repetition, any s) or ``"fractional"`` (fractional
            repetition, (s + 1) must divide n; decoding is a plain sum), or a ``GradientCode``.
        n: number of workers; must equal the group's world size (given to make scripts explicit).
        code_seed: seed of the cyclic code's random coefficients (the same on every rank).
        coordinator: the rank that decodes (default 0).
        timeout: seconds any wait may take before a clear ``TimeoutError`` (never a hang).
        transport: ``"torch"`` (torch.distributed P2P: gloo or NCCL) or ``"mpi"`` (mpi4py).
        max_backlog: results the coordinator lets pile up for one slow rank before it waits for
            it (back-pressure; bounds memory; default 64). This rank's own setting, like timeout.
    """

    name = "gradient_coding"
    OPTIONS = (
        Option("s", partial(validate.integer, low=0)),
        Option("code", record=_code_name),
        Option("code_seed", validate.seed),
        Option("code_digest", attr="code", record=_code_digest),
        Option("coordinator", partial(validate.integer, low=0)),
        Option("transport", partial(validate.choice, allowed=("torch", "mpi"))),
    )

    def __init__(self, process_group=None, s: Optional[int] = None, code="cyclic", n: Optional[int] = None,
                 code_seed: int = 0, coordinator: int = 0, timeout: float = 300.0, transport: str = "torch",
                 max_backlog: int = 64):
        super().__init__(process_group)
        if n is not None and n != self.world_size:
            raise ValueError(f"commcomp: gradient_coding got n={n!r} but the group has {self.world_size} ranks; "
                             "every rank is one worker of the code: pass n = world size (or leave it out)")
        if transport == "mpi" and not _is_world(process_group):
            raise ValueError("commcomp: transport='mpi' numbers ranks by MPI.COMM_WORLD; it cannot follow a torch "
                             "process group of other ranks: use the whole world, or transport='torch'")
        if isinstance(code, str):
            code = _codes.make_code(code, self.world_size, 1 if s is None else validate.integer(s, "s", low=0),
                                    seed=validate.seed(code_seed, "code_seed"))
        elif code.n != self.world_size or (s is not None and code.s != s):
            raise ValueError(f"commcomp: the given code has (n={code.n}, s={code.s}); this group needs "
                             f"n={self.world_size}" + ("" if s is None else f" and s={s}"))
        self.timeout = validate.positive(timeout, "timeout", hint="seconds any wait may take")  # this rank's own
        self._set_options(s=code.s, code=code, code_seed=code_seed, coordinator=coordinator, transport=transport)
        # seconds from this rank's first bucket to its last result, for the last 1000 steps
        self.round_times: collections.deque = collections.deque(maxlen=1000)
        self._round_start: Optional[float] = None
        self._started = False  # a bucket was sent: a checkpoint can no longer be loaded
        # validates transport and coordinator now, on every rank; counts its sends in metrics
        self.aggregator = CodedAggregator(self.code, self.process_group, self.coordinator, self.timeout,
                                          self.transport, counter=self.metrics,
                                          max_backlog=validate.integer(max_backlog, "max_backlog", low=1))

    @property
    def dead_ranks(self) -> Dict[int, str]:
        """Ranks the coordinator has given up on (crashed), with the reason."""
        return {r: self.aggregator.dead[r] for r in self.aggregator.dead_set()}

    def _extra_state(self) -> dict:
        return {"code": self.code.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore step and metrics into a **fresh** state (before its first step: messages of
        a running state's rounds may still be in flight, and would be taken for the restored
        rounds). Checked before anything changes."""
        if self._started:
            raise RuntimeError("commcomp: load a gradient-coding checkpoint into a fresh state (before its first "
                               "step): messages of this state's rounds may still be in flight")
        saved = state.get("code")
        if saved is not None and saved != self.code.to_dict():
            raise ValueError(f"commcomp: checkpoint was made with code {saved}, this state has {self.code.to_dict()}")
        super().load_state_dict(state)

    def _start(self, key, coded: torch.Tensor):
        if key[1] == 0:
            self._round_start = time.monotonic()
        self._started = True
        started = self.aggregator.start(key, coded)
        self.metrics.fp32_allreduce(coded.numel(), self.world_size)
        return started

    def _finish(self, started, last: bool) -> torch.Tensor:
        out = self.aggregator.finish(started)
        if last and self._round_start is not None:
            self.round_times.append(time.monotonic() - self._round_start)
        return out

    def reduce_(self, params: Sequence[torch.Tensor]) -> None:
        """Non-DDP step function: replace each ``p.grad`` (the coded gradient) by the decoded
        average over the n partitions. Call it on every rank after ``backward()``."""
        params = [p for p in params if p.grad is not None]
        if not params:
            raise ValueError("commcomp: reduce_ got no parameter with a gradient; call it after backward()")
        self.check_options(params[0].grad.device)
        flat = torch.cat([p.grad.detach().reshape(-1) for p in params])
        write_flat_grads_(params, self._finish(self._start((self.step, 0), flat), last=True))
        self.step += 1

    def close(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is in flight and stop the coordinator's threads (every rank, before
        ``destroy_process_group``). False if peers never caught up within ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        queued = super().close(timeout)  # this state's queued buckets first
        return self.aggregator.close(timeout) and queued

    def metrics_summary(self) -> dict:
        """``metrics`` plus the coordinator's view: rounds decoded, late buckets dropped,
        seconds waited for survivors, survivor-set sizes, dead ranks, backlog per peer."""
        agg = self.aggregator
        return {**self.metrics, **agg.metrics, "survivor_counts": dict(agg.survivor_counts),
                "dead_ranks": sorted(agg.dead_set()), "lag": agg.lag()}


def gradient_coding_hook(state: GradientCodingState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` here: DDP checks these annotations at runtime)
    """DDP communication hook: decode the bucket's average from the first n - s coded buckets."""
    state.require_registered(bucket)
    buf = bucket.buffer()
    key, last = (state.step, bucket.index()), bucket.is_last()
    started = state._start(key, buf)  # sends now, from the backward pass: no waiting
    if last:
        state.step += 1

    def job() -> torch.Tensor:
        buf.copy_(state._finish(started, last))
        return buf

    return state.submit(job, buf)


__all__ = ["GradientCodingState", "gradient_coding_hook"]
