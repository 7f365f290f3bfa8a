"""The hook-state contract every commcomp hook follows.

A state is created by :func:`commcomp.register` (or, for the step functions, directly) and:

* declares its options once (``OPTIONS``; :class:`~commcomp.core.options.Configurable`);
* counts its bytes in ``metrics``, a :class:`~commcomp.utils.ByteCounter` (``bytes_sent``
  and ``bytes_sent_fp32_allreduce``, thread-safe, saved in checkpoints);
* checks its options across ranks exactly once, in :meth:`HookState.check_options` (called by
  ``register`` at registration, or by a step function at its first call);
* runs its exchanges on the ordered executor of its process group (:meth:`HookState.submit`),
  which it shares with the other states on that group and lets go of in :meth:`HookState.close`;
* saves and restores itself with ``state_dict()`` / ``load_state_dict()``: step, metrics,
  options (a checkpoint made with other options is refused before anything changes) and
  what ``_extra_state`` / ``_load_extra_state`` add.

Writing a new hook is writing its algorithm; see docs/writing_a_hook.md.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from commcomp.collectives.executor import (ExecutorClosed, OrderedExecutor, new_future, release_executor,
                                           shared_executor)
from commcomp.utils.metrics import ByteCounter

from .options import Configurable


class HookState(Configurable):
    """Base of every hook state: group, rank, world size, step, byte metrics, options check,
    executor, checkpoints.

    Subclasses set ``name`` (the registry's name), ``OPTIONS``, and may override:

    * :meth:`attach` (registration: learn the model, refuse DDP modes the hook cannot serve;
      call ``super().attach(model)``);
    * ``_extra_state()`` / ``_load_extra_state(state)``: what a checkpoint holds beyond step,
      metrics and options (buffers, ledgers); ``_load_extra_state`` runs after the options
      were found equal;
    * ``_shared_extra()``: further values all ranks must agree on.

    ``metrics["bytes_sent"]`` counts what this rank sent (payloads and side channels);
    ``metrics["bytes_sent_fp32_allreduce"]`` what a ring fp32 all-reduce of the same buckets
    would have sent. ``state_dict()`` leaves the process group out.
    """

    name = "base"
    what = "hook state"

    def __init__(self, process_group=None, byte_counters: Iterable[str] = ()):
        if not dist.is_initialized():
            raise RuntimeError("commcomp: initialize torch.distributed before creating a hook state")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.step = 0
        self.metrics = ByteCounter(byte_counters)
        self.registered = False  # set by commcomp.register once its checks passed
        self._options_checked = False
        self._executor: Optional[OrderedExecutor] = None
        self.closed = False
        self._param_names: Dict[torch.Tensor, str] = {}
        self._param_order: Dict[torch.Tensor, int] = {}

    # -- registration
    def attach(self, model) -> None:
        """Learn the model's parameter names, so per-parameter buffers survive DDP's bucket
        rebuilds and are checkpointed by name (``commcomp.register`` calls this; a subclass
        refuses here the DDP modes it cannot serve, before the model gets the hook)."""
        self._param_names = {p: name for name, p in model.named_parameters()}
        self._param_order = {p: i for i, (_, p) in enumerate(model.named_parameters())}

    def param_key(self, param: torch.Tensor):
        return self._param_names.get(param, param)

    def param_index(self, param: torch.Tensor) -> int:
        """The parameter's position in the model (the same on every rank)."""
        if param not in self._param_order:
            raise RuntimeError(f"commcomp {self.name}: a parameter the registered model does not have; "
                               "register the hook on the model being trained")
        return self._param_order[param]

    def check_options(self, device) -> None:
        """Once: all ranks must run this state with the same options (one small all-gather on
        its group; a collective, so every rank calls it at the same point)."""
        if not self._options_checked:
            self.check_across_ranks(self.process_group, device, hook=self.name, world_size=self.world_size)
            self._options_checked = True

    def require_registered(self, bucket=None) -> None:
        """Hooks call this first: a closed state sends nothing more, and a state given to
        ``ddp.register_comm_hook`` directly would skip the options check and share DDP's
        process group (see :func:`commcomp.register`). With ``bucket``: refuse DDP's Python
        reducer, which calls hooks with one ``(grad, param)`` at a time and drops their result."""
        if isinstance(bucket, tuple):
            raise RuntimeError(
                f"commcomp {self.name}: DDP called the hook with one parameter's gradient, as its Python reducer does "
                "(torch._dynamo.config.optimize_ddp='python_reducer', which compiled autograd needs); it ignores "
                f"what the hook returns. The {self.name} hook works on whole buckets: compile without compiled "
                "autograd (torch.compile(ddp_model) keeps DDP's C++ reducer and its buckets), or use the "
                "'terngrad' hook, which serves the Python reducer too")
        if self.closed:
            raise ExecutorClosed(f"commcomp {self.name}: this hook state was closed; register the hook "
                                 "again (on a new DDP model) to go on training")
        if not self.registered:
            raise RuntimeError(
                f"commcomp {self.name}: register the hook with commcomp.register(ddp_model, "
                f"{self.name!r}, ...), not ddp_model.register_comm_hook: registration gives the "
                "hook a process group of its own (DDP's collectives cannot interleave with it), "
                "refuses DDP modes the hook cannot serve and checks the options across ranks")

    # -- the executor
    def submit(self, job, like: torch.Tensor) -> torch.futures.Future:
        """Run ``job()`` on this group's ordered executor; its result completes the future
        (which fails at once with :class:`~commcomp.collectives.ExecutorClosed` after
        :meth:`close`)."""
        if self.closed:
            fut = new_future(like)
            fut.set_exception(ExecutorClosed(
                f"commcomp {self.name}: this hook state was closed; register the hook again (on a new "
                "DDP model) to go on training"))
            return fut
        if self._executor is None:
            self._executor = shared_executor(self.process_group)
        return self._executor.submit(job, like)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until the exchanges queued so far have run (False on timeout)."""
        return self._executor.flush(timeout) if self._executor is not None else True

    def close(self, timeout: float = 10.0) -> bool:
        """Finish this state's queued exchanges and let go of the executor (the last state on
        a group stops its thread). Other states on the group keep theirs running. A closed
        state sends nothing more."""
        self.closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return True
        done = executor.flush(timeout)
        return release_executor(self.process_group, executor, timeout) and done

    # -- metrics
    def compression_ratio(self) -> float:
        """fp32 all-reduce bytes over bytes sent (above 1: fewer bytes than DDP's default)."""
        return self.metrics.ratio()

    # -- checkpoints
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"hook": self.name, "options": self.options(), "step": self.step,
                "metrics": self.metrics.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore step, metrics and extras; refused, before anything changes, if the
        checkpoint is of another hook or was made with other options."""
        if state.get("hook") != self.name:
            raise ValueError(f"commcomp: checkpoint is for hook {state.get('hook')!r}, not {self.name!r}")
        self._check_saved_options(state.get("options", {}))
        self.metrics.load_state_dict(state["metrics"])
        self.step = int(state["step"])
        self._load_extra_state(state)


__all__ = ["HookState"]
