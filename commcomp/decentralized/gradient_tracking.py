# Long file: one class, GradientTracking: the DProxSGT / CDProxSGT step (Yan et al. 2023, Algorithms
# 1-2) with its options, checkpoints and the diagnostics that check its invariant; its pieces
# (Tracker, Mixer, NeighbourExchange, Prox, Topology) already live in their own modules.
"""DProxSGT and CDProxSGT: decentralized proximal SGD with gradient tracking, optionally compressed.

Yan, Chen, Chen, Cui, Lu, Xu, ICML 2023, "Compressed Decentralized Proximal Stochastic Gradient
Method for Nonconvex Composite Problems with Heterogeneous Data". The problem is
``min_x (1/n) sum_i f_i(x) + r(x)`` with ``f_i`` seen only by rank ``i`` (non-IID data allowed)
and ``r`` non-smooth (l1, a box, ...). There is no all-reduce and no server: rank ``i`` keeps
its own model ``x_i`` and a tracker ``y_i`` of the average gradient. Step ``t`` on rank ``i``:

1. ``g_i^t`` = stochastic gradient at ``x_i^t`` (one mini-batch: O(1) samples per step);
2. ``y_i^t = mix(y^{t-1} + g^t - g^{t-1})_i`` (:class:`~commcomp.decentralized.tracking.Tracker`);
3. ``x_i^{t+1/2} = prox_{lr r}(x_i^t - lr * y_i^t)``;
4. ``x_i^{t+1} = mix(x^{t+1/2})_i``.

``mix`` is ``sum_j W_ij v_j`` with exact messages (DProxSGT), or the compressed-difference
update of CDProxSGT (``hat_i += Q(v_i - hat_i)``, ``v_i + gamma (sum_j W_ij hat_j - hat_i)``,
:class:`~commcomp.decentralized.mixing.Mixer`). Each step has two rounds of one message per
neighbour (``y``, then ``x``); step 4 needs step 3, step 2 of the next step needs step 4.

``tracking=False`` gives decentralized (proximal) SGD without tracking (Lian et al. 2017):
``x_i^{t+1} = mix(prox(x_i^t - lr g_i^t))``, one round per step; it drifts on non-IID data.

Example::

    >>> model = Net()                       # the same initial weights on every rank (broadcast here)
    >>> gt = GradientTracking(model, 0.05, topology="ring", compressor="ternary", prox=L1(1e-4))
    >>> for x, y in loader:                 # this rank's own (non-IID) data
    ...     gt.zero_grad()
    ...     loss_fn(model(x), y).backward()
    ...     gt.step()
    >>> gt.measure()                        # consensus error, tracker error (one all-reduce)
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from commcomp.core import Configurable, Option, register
from commcomp.utils import mix_seed, validate
from commcomp.utils.metrics import ByteCounter, ring_allreduce_bytes

from .exchange import NeighbourExchange
from .flat import FlatParameters
from .flat import eligible as flat_eligible
from .hook import GradientTrackingState, _compressor_options, _describe, _name, gradient_tracking_hook
from .mixing import Mixer, check_gamma, check_static, default_gamma, make_mixing_compressor, wide
from .prox import make_prox
from .topology import make_topology
from .tracking import Tracker

X_MIXING = ("after", "before")


def _prox_record(prox):
    return None if prox is None else {"name": prox.name, **prox.options()}


class GradientTracking(Configurable):
    """Decentralized proximal SGD with gradient tracking (DProxSGT / CDProxSGT) around a model.

    Args:
        model: an ``nn.Module`` (its own tracker is created) or a
            ``DistributedDataParallel`` model (the ``gradient_tracking`` hook is registered on
            it, or the state given as ``tracker`` is used). Under DDP, buffers (BatchNorm
            statistics) are still broadcast from rank 0 at each forward unless you build it with
            ``broadcast_buffers=False``; and with ``find_unused_parameters=True`` a parameter no
            rank used in a step gets no ``.grad`` from DDP, so it takes no descent step then
            (its tracker value is kept and it is still mixed).
        optimizer_or_lr: a learning rate (plain proximal SGD: ``x - lr * y``) or a
            ``torch.optim.Optimizer`` over the model's parameters that is stepped with ``y``
            as the gradient (momentum, schedules; beyond the paper's analysis). The proximal
            step then uses each parameter group's ``lr``.
        topology: ``"ring"`` (default), ``"torus"``, ``"exponential"``,
            ``"one_peer_exponential"``, ``"complete"``, a :class:`Topology`, or a mixing matrix.
        compressor: ``None`` (exact: DProxSGT), ``"ternary"``, ``"topk:0.01"``,
            ``"randomk:0.05"`` or a :class:`commcomp.codecs.Compressor` (CDProxSGT); the same
            for ``x`` and ``y`` unless ``compressor_x`` is given.
        compressor_x: the compressor of the model mixing, if different.
        prox: the regularizer ``r``: a :class:`Prox` (``L1(1e-4)``, ``L2Squared``, ``L2Norm``,
            ``Box``), ``"l1:1e-4"``, a callable ``f(x, step_size) -> x``, or ``None``.
        prox_params: names of the parameters ``r`` applies to, or a predicate on names
            (default: all; e.g. ``lambda n: n.endswith("weight")`` leaves biases alone).
        gamma_x, gamma_y: consensus step sizes in ``(0, 1]`` (default
            :func:`~commcomp.decentralized.mixing.default_gamma`: 1 exact, 0.2 ternary,
            ``min(0.5, 2.5 * ratio)`` top-k / random-k).
        tracking: ``False`` for decentralized SGD without gradient tracking (the baseline).
        process_group: the ranks forming the graph (node i = group rank i).
        seed: base of the compressors' random streams; the same on every rank.
        sync_init: broadcast rank 0's parameters first (the method needs one starting point);
            skipped for DDP models, which already did.
        tracker: a :class:`commcomp.hooks.GradientTrackingState` already registered on the DDP model.
        metrics_every: run :meth:`measure` every this many steps (0: only when called). It
            all-reduces x, y and g in float64, counted in ``metrics["bytes_diagnostic"]``.
        x_mixing: ``"after"`` (default, the paper's order): mix ``x^{t+1/2}`` after the proximal
            step, a second round after the tracker's. ``"before"``: mix ``x^t`` in a round that
            starts at the end of the previous step and travels while the next gradient is
            computed, then ``x^{t+1} = prox(mix(x^t) - lr * y^t)`` (the order of DIGing-style
            gradient tracking): one round on the critical path instead of two; its accuracy cost
            is measured in docs/decentralized.md. Needs a non-DDP model with one dtype and device.
    """

    what = "GradientTracking"
    OPTIONS = (
        Option("topology", record=_describe),
        Option("compressor_y", record=_name),
        Option("compressor_y_options", attr="compressor_y", record=_compressor_options),
        Option("compressor_x", record=_name),
        Option("compressor_x_options", attr="compressor_x", record=_compressor_options),
        Option("gamma_x", check_gamma),
        Option("gamma_y", check_gamma),
        Option("tracking", validate.boolean),
        Option("seed", validate.seed),
        Option("prox", record=_prox_record),
        Option("prox_params", attr="_prox_names", record=sorted),
        Option("world_size"),
        Option("x_mixing", lambda v, name: validate.choice(v, name, X_MIXING, hint=(
            "'after' mixes x^{t+1/2} (the paper's order, two rounds per step); 'before' mixes x^t "
            "while the gradient is computed (one round after backward)"))),
    )

    def __init__(self, model: torch.nn.Module, optimizer_or_lr: Union[float, torch.optim.Optimizer], *,
                 topology="ring", compressor=None, compressor_x=None, prox=None, prox_params=None,
                 gamma_x: Optional[float] = None, gamma_y: Optional[float] = None, tracking: bool = True,
                 process_group=None, seed: int = 0, sync_init: bool = True, tracker=None,
                 metrics_every: int = 0, x_mixing: str = "after"):
        if not dist.is_initialized():
            raise RuntimeError("commcomp: initialize torch.distributed before creating GradientTracking")
        # Validate everything before touching the model, the group or the DDP hook.
        self.model = model
        self.ddp = isinstance(model, DistributedDataParallel)
        if self.ddp and process_group is None:
            process_group = model.process_group
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("commcomp: the model has no trainable parameters")
        self.optimizer, self.lr = self._descent(optimizer_or_lr)
        topo = make_topology(topology, dist.get_world_size(process_group))
        if tracker is not None:  # the y side comes from the registered hook state
            self._check_tracker(tracker, topo)
            compressor_y, gamma_y, tracking, seed = tracker.compressor, tracker.gamma_y, tracker.tracking, tracker.seed
            if compressor_x is None and compressor is None:
                compressor_x = compressor_y  # the hook's messages are compressed: the model's too
        else:
            compressor_y = make_mixing_compressor(compressor)
            gamma_y = default_gamma(compressor_y) if gamma_y is None else gamma_y
        compressor_x = make_mixing_compressor(compressor if compressor_x is None else compressor_x)
        self._set_options(
            topology=topo, compressor_y=compressor_y, compressor_x=compressor_x,
            gamma_x=default_gamma(compressor_x) if gamma_x is None else gamma_x, gamma_y=gamma_y,
            tracking=tracking, seed=seed, prox=make_prox(prox), world_size=dist.get_world_size(process_group),
            x_mixing=x_mixing)
        if self.x_mixing == "before" and (self.ddp or flat_eligible(self._named) is not None):
            why = "the model is DistributedDataParallel" if self.ddp else flat_eligible(self._named)
            raise ValueError(f"commcomp: x_mixing='before' needs the parameters in one flat buffer, but {why}; "
                             "use x_mixing='after', or a plain nn.Module with one dtype and device")
        self.metrics_every = validate.integer(metrics_every, "metrics_every", low=0)  # this rank's own
        self._prox_names = self._select(prox_params)
        for comp in (self.compressor_x, self.compressor_y):
            check_static(comp, topo)
        if not self.ddp or tracker is not None:  # (a hook state registered here checks these with its own)
            self.check_across_ranks(tracker.process_group if tracker is not None else process_group,
                                    self._named[0][1].device, hook="GradientTracking")
        self._names = [n for n, _ in self._named]
        self._lengths = [p.numel() for _, p in self._named]
        self.bytes = ByteCounter(("bytes_x", "bytes_y", "bytes_diagnostic"))
        # parameters and gradients as views into flat buffers (no DDP: DDP owns its gradients)
        self.flat = None if self.ddp or flat_eligible(self._named) is not None else FlatParameters(self._named)
        self.hook_state = self._y_side(model, tracker, process_group)
        self._x_side(sync_init)
        self.step_count = 0
        self._pending_x = None  # x_mixing="before": the round of x^t, started at the end of the last step
        self._exact_since: Optional[int] = None  # exact_mixing(): the step from which both rounds are exact
        self._bad_x = None
        self._prox_zeros = None
        self.diagnostics: Dict[str, float] = {}

    def _check_tracker(self, tracker, topo) -> None:
        if not self.ddp:
            raise ValueError("commcomp: tracker= is the hook state of a DDP model; this model is not "
                             "DistributedDataParallel (leave tracker out and one is created)")
        if not isinstance(tracker, GradientTrackingState):
            raise TypeError(f"commcomp: tracker must be a GradientTrackingState, got {type(tracker).__name__}")
        if tracker.topology.describe() != topo.describe():
            raise ValueError("commcomp: the tracker's topology differs from this GradientTracking's "
                             f"({tracker.topology!r} vs {topo!r}); give both the same")

    def _y_side(self, model, tracker, process_group) -> Optional[GradientTrackingState]:
        """The gradient tracker: the DDP hook's (registered here unless given), or its own."""
        if tracker is None and self.ddp:
            tracker = register(model, GradientTrackingState, gradient_tracking_hook, process_group=process_group,
                               topology=self.topology, compressor=self.compressor_y, gamma_y=self.gamma_y,
                               tracking=self.tracking, seed=self.seed, model_options=self.options())
        if tracker is not None:
            self.exchange, self.tracker = tracker.exchange, tracker.tracker
            return tracker
        self.exchange = NeighbourExchange(self.topology, process_group)
        self.tracker = Tracker(self.exchange, self.compressor_y, self.gamma_y, self.tracking, self.seed,
                               counter=self.bytes, label="bytes_y")
        return None

    def _x_side(self, sync_init: bool) -> None:
        """The model mixer, after the shared starting point (rank 0's parameters)."""
        if sync_init and not self.ddp:
            with torch.no_grad():
                group = self.process_group
                src = dist.get_global_rank(group, 0) if group else 0
                if self.flat is not None:
                    dist.broadcast(self.flat.params(), src, group=group)  # one message, into the views
                else:
                    for _, p in self._named:
                        dist.broadcast(p.data, src, group=group)
        by_name = dict(self._named)
        # hat_i = acc_i = x^0: the shared starting model, which every rank can reproduce
        self.mixer_x = Mixer(self.exchange, self.compressor_x, self.gamma_x,
                             init=lambda name, n: by_name[name].detach().reshape(-1),
                             counter=self.bytes, label="bytes_x")
        self.mixer_x.store.get(self._names, self._lengths, self._flat_params().to(wide(self._named[0][1].dtype)))

    # -- construction helpers
    def _descent(self, optimizer_or_lr):
        if isinstance(optimizer_or_lr, torch.optim.Optimizer):
            covered = {id(p) for group in optimizer_or_lr.param_groups for p in group["params"]}
            missing = [n for n, p in self._named if id(p) not in covered]
            if missing:
                raise ValueError(f"commcomp: the optimizer does not hold the trainable parameters {missing[:6]}"
                                 f"{' ...' if len(missing) > 6 else ''}; they would never move. Give it all of "
                                 "model.parameters() (or freeze those with requires_grad_(False))")
            return optimizer_or_lr, None
        return None, validate.positive(optimizer_or_lr, "the second argument (learning rate)",
                                       hint="give a learning rate > 0 or a torch.optim optimizer")

    def _select(self, prox_params) -> set:
        names = [n for n, _ in self._named]
        if prox_params is None:
            return set(names)
        if callable(prox_params):
            return {n for n in names if prox_params(n)}
        chosen = set(prox_params)
        unknown = sorted(chosen - set(names))
        if unknown:
            raise ValueError(f"commcomp: prox_params names {unknown} are not trainable parameters of the model; "
                             f"known: {names[:8]}{' ...' if len(names) > 8 else ''}")
        return chosen

    def _flat_params(self) -> torch.Tensor:
        """The parameters as one flat tensor: the flat buffer itself when they live in one
        (do not modify it), else a concatenated copy."""
        if self.flat is not None:
            return self.flat.params()
        return torch.cat([p.detach().reshape(-1) for _, p in self._named])

    def _flat_grads(self) -> torch.Tensor:
        if self.flat is not None:
            return self.flat.grads()
        return torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for _, p in self._named])

    def _write(self, flat: torch.Tensor, grads: bool) -> None:
        pos = 0
        for _, p in self._named:
            n = p.numel()
            piece = flat[pos:pos + n].view_as(p)
            if grads:
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
            else:
                p.data.copy_(piece)
            pos += n

    # -- the optimizer surface
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients. When the parameters live in a flat buffer (any model but a DDP
        one, with one dtype and device) the gradient buffer is zeroed in place and
        ``set_to_none`` is ignored: the ``.grad`` views stay, and backward adds into them."""
        if self.flat is not None:
            self.flat.zero_grad()
            return
        for _, p in self._named:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """One DProxSGT / CDProxSGT step (call after ``backward()`` on every rank)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.step_count
        if getattr(self, "_closed", False):
            raise RuntimeError("commcomp: this GradientTracking was closed (its last model round was dropped); "
                               "create a new one, or load a checkpoint into a new one, to train on")
        if self.hook_state is not None and self.hook_state.step != t + 1:
            raise RuntimeError(
                f"commcomp: GradientTracking.step() is at step {t} but the DDP hook has run "
                f"{self.hook_state.step} step(s); call backward() through the DDP model exactly once "
                "before each step()"
            )
        if self.flat is not None:
            self._flat_step(t)
        else:
            self._copying_step(t)
        self.step_count = t + 1
        if self.metrics_every and self.step_count % self.metrics_every == 0:
            self.measure()
        return loss

    def _descend(self, y: Optional[torch.Tensor]) -> None:
        """3. ``x^{t+1/2} = prox(x - lr * y)``, with ``y`` the flat tracker (flat path) or the
        parameters' ``.grad`` (which then hold ``y``)."""
        if self.optimizer is not None:
            if y is not None:
                # a copy: optimizers may change .grad in place (nesterov momentum's foreach path,
                # hooks that clip), which must not touch the tracker's y
                if getattr(self, "_y_grad", None) is None:
                    self._y_grad = torch.empty_like(self.flat.x)
                self._y_grad.copy_(y)
                with self.flat.grads_as(self._y_grad):
                    self.optimizer.step()
            else:
                self.optimizer.step()
            lrs = {p: group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        elif y is not None:
            self.flat.params().add_(y.to(self.flat.x.dtype), alpha=-self.lr)
            lrs = None
        else:
            for _, p in self._named:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)
            lrs = None
        if self.prox is not None:
            for n, p in self._named:
                if n in self._prox_names:
                    self.prox.apply_(p.data, lrs[p] if lrs is not None else self.lr)
            # zeros the prox left in x^{t+1/2} (read by measure(); no sync here)
            proxed = [p for n, p in self._named if n in self._prox_names]
            self._prox_zeros = (sum((p == 0).sum() for p in proxed), sum(p.numel() for p in proxed))

    def _count_bad_x(self, bad: torch.Tensor) -> None:
        bad = bad.to(torch.int64)
        self._bad_x = bad if self._bad_x is None else self._bad_x + bad

    def _flat_step(self, t: int) -> None:
        """A step on the flat buffers: no concatenation, no write-back; with the fused ternary
        mixing every round is three native passes and the model is mixed in place."""
        x = self.flat.params()
        mixer = self.mixer_x
        fused = mixer.fused and x.dtype == torch.float32
        if not fused:  # x^t, where a non-finite x^{t+1/2} falls back to (a buffer kept across steps)
            if getattr(self, "_x_prev", None) is None:
                self._x_prev = torch.empty_like(x)
            self._x_prev.copy_(x)
        before = self.x_mixing == "before"
        if before and self._pending_x is None:  # the first step (or a resume without a round in flight)
            self._pending_x = self._start_x(x, t, fused)
        started = self.tracker.start(self.flat.grads(), self._names, self._lengths, t, 0, True)
        y = self.tracker.finish(started, t)  # the kept y^t itself when its dtype is the model's
        if before:  # x^{t+1} = prox(mix(x^t) - lr y^t)
            self._finish_x(x, t, fused)
            self._descend(y)
            if not fused:
                x.copy_(self._finite_or_previous(x, self._x_prev))
            self._pending_x = self._start_x(x, t + 1, fused)  # travels during the next forward/backward
            return
        self._descend(y)  # x^{t+1} = mix(prox(x^t - lr y^t))
        if not fused:
            x.copy_(self._finite_or_previous(x, self._x_prev))
        self._pending_x = self._start_x(x, t, fused)
        self._finish_x(x, t, fused)

    def _start_x(self, x: torch.Tensor, t: int, fused: bool):
        seed = mix_seed(self.seed, self.rank, t, 1)
        before = self.mixer_x.nonfinite
        rnd = self.mixer_x.start(x, self._names, self._lengths, t, seed, inplace=True)
        if fused:  # a non-finite entry of x took the estimate hat_i its neighbours hold: count the step
            self._count_bad_x(self.mixer_x.nonfinite - (before if before is not None else 0) > 0)
        return rnd

    def _finish_x(self, x: torch.Tensor, t: int, fused: bool) -> None:
        rnd, self._pending_x = self._pending_x, None
        mixed = rnd.mixer.finish(rnd, t)  # (the mixer that started it: exact_mixing() may have come since)
        if mixed is not x:
            x.copy_(mixed)

    def _finite_or_previous(self, v: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        # A non-finite x^{t+1/2} (an overflowing optimizer step) keeps x^t in those entries, without a
        # host sync: the neighbours still get a consistent message and nobody is poisoned.
        finite = torch.isfinite(v)
        self._count_bad_x(~finite.all())
        return torch.where(finite, v, x_prev)

    def _copying_step(self, t: int) -> None:
        """A step on concatenated copies (DDP models, mixed dtypes or devices)."""
        x_prev = self._flat_params()  # x^t: where a non-finite x^{t+1/2} falls back to
        if self.hook_state is None:
            g = self._flat_grads()
            started = self.tracker.start(g, self._names, self._lengths, t, 0, True)
            self._write(self.tracker.finish(started, t), grads=True)
        self._descend(None)
        v = self._finite_or_previous(self._flat_params(), x_prev)
        seed = mix_seed(self.seed, self.rank, t, 1)
        mixed = self.mixer_x.finish(self.mixer_x.start(v, self._names, self._lengths, t, seed), t)
        self._write(mixed, grads=False)

    @property
    def metrics(self) -> Dict[str, float]:
        """Bytes this rank sent (``bytes_x`` model mixing, ``bytes_y`` tracker, ``bytes_sent``
        both), what a ring fp32 all-reduce of the gradients would have sent, ``bytes_diagnostic``
        (:meth:`measure`), ``steps``, ``nonfinite_steps`` (gradients replaced by the previous
        ones) and the last :meth:`measure`'s results."""
        m = dict(self.bytes)
        if self.hook_state is not None:  # the tracker counts in the DDP hook state's metrics
            m["bytes_y"] = self.hook_state.metrics["bytes_sent"]
        m["bytes_sent"] = m["bytes_x"] + m["bytes_y"]
        m["bytes_sent_fp32_allreduce"] = self.step_count * ring_allreduce_bytes(4 * sum(self._lengths),
                                                                                 self.world_size)
        m.update(steps=self.step_count, nonfinite_steps=self.tracker.nonfinite_steps, **self.diagnostics)
        return m

    @torch.no_grad()
    def exact_mixing(self) -> None:
        """From the next :meth:`step` on, mix both ``x`` and ``y`` with exact messages and
        ``gamma = 1`` (DProxSGT), e.g. for the last ~20 steps of a compressed run with an l1
        prox, to get exactly sparse models.

        Compressed gossip leaves every rank's model a dense disagreement with the average
        (a median 20x the proximal threshold ``lr * lambda`` in docs/decentralized.md's l1 run),
        so the prox zeroes almost nothing. Exact mixing contracts the disagreement by about
        ``1 - spectral gap`` per step and the prox's zeros come back (about ``4 / gap`` steps:
        20 on an 8-rank ring; measured there). Both variables must be exact: either one alone
        is not enough. Both invariants hold (exact mixing with a doubly stochastic W keeps the
        means of ``x`` and ``y``); the compressed estimates are dropped, so there is no going
        back. Each exact step sends ``2 x 4`` bytes per parameter per neighbour (float32).
        Idempotent; every rank must call it before the same step. With
        ``x_mixing="before"`` the model round already in flight finishes compressed."""
        if self._exact_since is not None:
            return
        exact = make_mixing_compressor(None)
        self.mixer_x = Mixer(self.exchange, exact, 1.0, counter=self.bytes, label="bytes_x")
        old = self.tracker.mixer
        if old is not None:  # (tracking=False has no y messages)
            self.tracker.mixer = Mixer(self.exchange, exact, 1.0, counter=old.bytes,
                                       label=old._labels[0] if old._labels else None)
        self._exact_since = self.step_count

    def compression_ratio(self) -> float:
        """fp32 all-reduce bytes over the bytes this rank sent (above 1: fewer bytes than DDP)."""
        m = self.metrics
        return m["bytes_sent_fp32_allreduce"] / m["bytes_sent"] if m["bytes_sent"] else float("nan")

    @torch.no_grad()
    def tracked(self) -> torch.Tensor:
        """This rank's tracker ``y_i`` (its estimate of the average gradient after the last
        step), flat in parameter order, float32 or float64 (a copy). The parameters' ``.grad``
        hold the local gradients, except on a DDP model, whose hook writes ``y_i`` there."""
        return self._tracked(0).to(wide(self._named[0][1].dtype))

    # -- diagnostics
    def _tracked(self, var: int) -> torch.Tensor:
        parts = []
        for (n, p) in self._named:
            t = self.tracker.value(n, var)
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if t is None
                         else t.to(device=p.device, dtype=torch.float64).reshape(-1))
        return torch.cat(parts)

    @torch.no_grad()
    def measure(self) -> Dict[str, float]:
        """Consensus error ``(1/n) sum_i ||x_i - mean x||^2``, tracker spread
        ``(1/n) sum_i ||y_i - mean y||^2``, tracking residual ``||mean y - mean g||`` (0 up to
        rounding: the invariant), ``||mean x||^2`` for scale, and with a prox the fraction of
        exact zeros this rank's last proximal step left (``prox_sparsity``), and how many steps
        had a non-finite model entry replaced (by its previous value; on the fused ternary path
        by the estimate ``hat_i`` its neighbours hold). Two all-reduces (the float64
        means of x, y and g, 24 bytes per parameter; then the spreads, so small errors do not
        cancel); every rank must call it at the same step. Results also go to ``metrics``."""
        x = self._flat_params().to(torch.float64)
        y, g = self._tracked(0), self._tracked(1)
        d, n = x.numel(), self.world_size
        means = torch.cat([x, y, g])
        dist.all_reduce(means, group=self.process_group)  # 1: the means (x, y, g)
        means /= n
        mx, my, mg = means[:d], means[d:2 * d], means[2 * d:]
        spread = torch.stack([(x - mx).square().sum(), (y - my).square().sum()])
        dist.all_reduce(spread, group=self.process_group)  # 2: the spreads, without cancellation
        self.bytes.add(ring_allreduce_bytes(means.numel() * 8, n) + ring_allreduce_bytes(16, n), "bytes_diagnostic")
        out = {"consensus_error": float(spread[0]) / n, "tracker_error": float(spread[1]) / n,
               "tracking_residual": float((my - mg).norm()), "mean_model_sqnorm": float(mx.dot(mx)),
               "nonfinite_model_steps": 0 if self._bad_x is None else int(self._bad_x)}
        if self._prox_zeros is not None:  # on this rank, after its last proximal step
            out["prox_sparsity"] = float(self._prox_zeros[0]) / max(self._prox_zeros[1], 1)
        self.diagnostics = out
        return out

    @torch.no_grad()
    def average_parameters(self) -> Dict[str, torch.Tensor]:
        """The average model over ranks, by parameter name (one all-reduce; for evaluation)."""
        flat = self._flat_params().to(torch.float64)
        dist.all_reduce(flat, group=self.process_group)
        self.bytes.add(ring_allreduce_bytes(flat.numel() * 8, self.world_size), "bytes_diagnostic")
        flat /= self.world_size
        out, pos = {}, 0
        for n, p in self._named:
            out[n] = flat[pos:pos + p.numel()].view_as(p).to(p.dtype)
            pos += p.numel()
        return out

    # -- checkpoints
    def state_dict(self) -> dict:
        """Step, byte counts, the tracker (``y_i``, the last gradient, the estimates of
        compressed mixing) and the model-mixing estimates. The model and the optimizer are saved
        by you (``model.state_dict()``, ``optimizer.state_dict()``)."""
        pending = None
        if self._pending_x is not None:  # x_mixing="before": the round of x^t is in flight; keep its messages
            if self._pending_x.mixer is not self.mixer_x:
                raise RuntimeError(
                    "commcomp: cannot checkpoint between exact_mixing() and the next step() with "
                    "x_mixing='before' (the compressed model round in flight would need the estimates "
                    "exact_mixing() dropped); take the checkpoint after the next step()")
            pending = self.mixer_x.suspend(self._pending_x)
        return {"algorithm": "gradient_tracking", "options": self.options(), "step": self.step_count,
                "bytes": self.bytes.state_dict(), "diagnostics": dict(self.diagnostics),
                "mixer_x": self.mixer_x.store.to_dict(), "pending_x": pending, "exact_since": self._exact_since,
                "tracker": self.hook_state.state_dict() if self.hook_state is not None else self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; refused, before anything changes, if it is not a
        GradientTracking checkpoint or was made with other options."""
        if state.get("algorithm") != "gradient_tracking":
            raise ValueError(f"commcomp: not a GradientTracking checkpoint (algorithm={state.get('algorithm')!r})")
        if state.get("exact_since") is None and self._exact_since is not None:
            raise ValueError("commcomp: this GradientTracking already mixes exactly (exact_mixing() was called) but "
                             "the checkpoint was taken before the switch; load it into a fresh GradientTracking")
        saved = dict(state.get("options", {}))
        saved.setdefault("x_mixing", "after")  # checkpoints from before the option mixed x after the prox
        self._check_saved_options(saved)
        old = state.get("metrics", {})  # (checkpoints before the byte counter kept them there)
        counts = state.get("bytes") or {k: old[k] for k in self.bytes if k in old}
        unknown = sorted(set(counts) - set(self.bytes))
        if unknown:
            raise ValueError(f"commcomp: the checkpoint counts bytes as {unknown}, unknown here")
        if self.hook_state is not None:
            self.hook_state.load_state_dict(state["tracker"])
        else:
            self.tracker.load_state_dict(state["tracker"])
        if self._pending_x is not None:  # a round this instance started: let it finish on the wire first
            self._pending_x.inflight.wait()
            self._pending_x = None
        if state.get("exact_since") is not None:
            self.exact_mixing()
            self._exact_since = int(state["exact_since"])
        self.mixer_x.store.load(state["mixer_x"])
        x = self._flat_params()
        self.mixer_x.store.get(self._names, self._lengths, x.to(wide(x.dtype)))
        if state.get("pending_x") is not None:
            self._pending_x = self.mixer_x.resume(state["pending_x"], x, self._names, self._lengths,
                                                  int(state["step"]), inplace=True)
        self.bytes.load_state_dict(counts)
        self.diagnostics = dict(state.get("diagnostics", {}))
        self.step_count = int(state["step"])

    def close(self, timeout: float = 10.0) -> bool:
        """Wait for a model-mixing round still in flight (``x_mixing="before"``) and close the DDP
        hook state this registered (its queued exchanges finish first)."""
        if self._pending_x is not None:
            self._pending_x.inflight.wait()
            self._pending_x = None
        self._closed = True
        return self.hook_state.close(timeout) if self.hook_state is not None else True

    def __repr__(self) -> str:
        kind = "DProxSGT" if self.compressor_x.name == "identity" and self.compressor_y.name == "identity" \
            else "CDProxSGT"
        if not self.tracking:
            kind = "decentralized SGD (no tracking)"
        return (f"GradientTracking({kind}, topology={self.topology.name}, n={self.world_size}, "
                f"compressor_y={self.compressor_y.name}, compressor_x={self.compressor_x.name}, "
                f"gamma=({self.gamma_x}, {self.gamma_y}), prox={None if self.prox is None else self.prox.name})")


__all__ = ["GradientTracking"]
