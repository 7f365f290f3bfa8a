"""The gradient-tracking half of DProxSGT / CDProxSGT as a DDP communication hook.

Yan et al., ICML 2023, "Compressed Decentralized Proximal Stochastic Gradient Method for
Nonconvex Composite Problems with Heterogeneous Data". Per bucket, on every rank:

1. ``y_i^{t-1/2} = y_i^{t-1} + g_i^t - g_i^{t-1}`` (``g_i`` = the bucket's local gradient);
2. mix ``y^{t-1/2}`` with this rank's neighbours on ``topology`` (exact, or compressed
   differences with ``compressor``), one point-to-point message per neighbour; no all-reduce;
3. return ``y_i^t``, the tracked direction, as the bucket's gradient.

The hook does not average models: DDP's replicas differ from the first step on, and the
model mixing and the proximal step belong to
:class:`commcomp.decentralized.GradientTracking`, which registers this hook itself when given
a DDP model (or takes the state ``commcomp.register`` returns as ``tracker=``). Used alone with
a plain optimizer, the ranks' models would drift apart.

Example::

    >>> gt = commcomp.decentralized.GradientTracking(ddp_model, 0.05, topology="ring", compressor="topk:0.01")
    >>> # or: state = commcomp.register(ddp_model, "gradient_tracking", topology="ring")
    >>> #     gt = GradientTracking(ddp_model, 0.05, tracker=state)
"""

from typing import Optional

import torch
import torch.distributed as dist

from commcomp.core import HookState, Option
from commcomp.utils import validate

from .exchange import NeighbourExchange
from .mixing import check_gamma, default_gamma, make_mixing_compressor
from .topology import make_topology
from .tracking import Tracker


def _describe(topology):
    return topology.describe()


def _name(compressor):
    return compressor.name


def _compressor_options(compressor):
    return compressor.options()


class GradientTrackingState(HookState):
    """Options and buffers of :func:`gradient_tracking_hook`.

    Args:
        process_group: the ranks that form the graph (default: the DDP model's); node i is group rank i.
        topology: ``"ring"`` (default), ``"torus"``, ``"exponential"``, ``"one_peer_exponential"``,
            ``"complete"``, a :class:`~commcomp.decentralized.Topology`, or an ``[n, n]`` mixing
            matrix (symmetric, doubly stochastic, connected).
        compressor: ``None``/``"identity"`` (exact, DProxSGT), ``"ternary"``, ``"topk:0.01"``,
            ``"randomk:0.05"`` or a :class:`~commcomp.codecs.Compressor` (CDProxSGT).
        gamma_y: consensus step size of the tracker's mixing (default
            :func:`~commcomp.decentralized.mixing.default_gamma`: 1 exact, 0.2 ternary,
            ``min(0.5, 2.5 * ratio)`` top-k / random-k, 0.1 other compressors).
        tracking: ``False`` sends nothing and returns the local gradient (decentralized SGD).
        seed: base of the compressor's random streams; the same on every rank.
        model_options: set by :class:`GradientTracking`: its model-side options, so that the
            cross-rank options check covers them too.
    """

    name = "gradient_tracking"
    OPTIONS = (
        Option("topology", record=_describe),
        Option("compressor", record=_name),
        Option("compressor_options", attr="compressor", record=_compressor_options),
        Option("gamma_y", check_gamma),
        Option("tracking", validate.boolean),
        Option("seed", validate.seed),
        Option("model_options"),
    )

    def __init__(self, process_group=None, topology="ring", compressor=None, gamma_y: Optional[float] = None,
                 tracking: bool = True, seed: int = 0, model_options: Optional[dict] = None):
        super().__init__(process_group)
        compressor = make_mixing_compressor(compressor)
        self._set_options(topology=make_topology(topology, self.world_size), compressor=compressor,
                          gamma_y=default_gamma(compressor) if gamma_y is None else gamma_y,
                          tracking=tracking, seed=seed, model_options=model_options)
        self.exchange = NeighbourExchange(self.topology, self.process_group)
        self.tracker = Tracker(self.exchange, self.compressor, self.gamma_y, self.tracking, self.seed,
                               counter=self.metrics)

    def _extra_state(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])

    def names_of(self, params) -> list:
        names = [self.param_key(p) for p in params]
        if not all(isinstance(n, str) for n in names):
            raise RuntimeError(
                "commcomp: the gradient_tracking state does not know the model's parameter names; "
                "register it with commcomp.register(model, 'gradient_tracking', ...)")
        return names


def gradient_tracking_hook(state: GradientTrackingState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` here: DDP checks these annotations at runtime)
    """DDP communication hook: replace the bucket's gradient by the tracked direction ``y_i``."""
    state.require_registered(bucket)
    buf = bucket.buffer()
    params = bucket.parameters()
    names = state.names_of(params)
    lengths = [p.numel() for p in params]
    step, last = state.step, bucket.is_last()
    started = state.tracker.start(buf, names, lengths, step, bucket.index(), last)  # sends now
    state.metrics.fp32_allreduce(buf.numel(), state.world_size)
    if last:
        state.step += 1

    def job() -> torch.Tensor:
        buf.copy_(state.tracker.finish(started, step))
        return buf

    return state.submit(job, buf)


__all__ = ["GradientTrackingState", "gradient_tracking_hook"]
