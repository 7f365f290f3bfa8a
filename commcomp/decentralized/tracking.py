"""The gradient tracker: each rank's running estimate ``y_i`` of the average gradient.

Yan et al. 2023, DProxSGT (Algorithm 1) and CDProxSGT (Algorithm 2), the ``y`` half of step t:

1. ``y_i^{t-1/2} = y_i^{t-1} + g_i^t - g_i^{t-1}`` (``g`` = this rank's stochastic gradient; ``y^{-1} = g^{-1} = 0``);
2. ``y_i^t = mix(y^{t-1/2})_i`` (exact or compressed, :class:`~commcomp.decentralized.mixing.Mixer`).

Since mixing keeps averages, ``mean_i y_i^t = mean_i g_i^t`` at every step (the tracking
invariant): each ``y_i`` follows the *global* gradient, which is what lets the method cope with
non-IID data. With ``tracking=False`` the tracker passes ``g_i`` through untouched and sends
nothing (decentralized SGD, Lian et al. 2017, the baseline).

A rank whose gradient holds NaN/Inf uses its previous gradient instead, without a host sync
(``torch.where``); the invariant then holds with that rank's previous gradient, no neighbour's
state is poisoned, and the event is counted in ``nonfinite_steps``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from commcomp import ops
from commcomp.codecs import Compressor
from commcomp.utils import mix_seed
from commcomp.utils.metrics import ByteCounter

from .exchange import NeighbourExchange
from .mixing import FlatStore, Mixer, wide


def _zeros(name, var, n, like):
    return like.new_zeros(n)


class _Started:
    def __init__(self, rnd, y, dtype):
        self.rnd, self.y, self.dtype = rnd, y, dtype


class Tracker:
    """Tracks the average gradient over ranks, per flat layout of parameters.

    Args:
        exchange: the :class:`NeighbourExchange`.
        compressor: what ``y`` travels as; identity means exact mixing (DProxSGT).
        gamma: consensus step size of the ``y`` mixing.
        tracking: ``False`` for decentralized SGD without tracking (nothing is sent for ``y``).
        seed: base of the compressor's random streams (per rank, step and bucket).
        counter, label: where its messages are counted (see :class:`Mixer`).
    """

    def __init__(self, exchange: NeighbourExchange, compressor: Compressor, gamma: float,
                 tracking: bool = True, seed: int = 0, counter: Optional[ByteCounter] = None,
                 label: Optional[str] = None):
        self.exchange = exchange
        self.tracking = bool(tracking)
        self.seed = int(seed)
        self.mixer = Mixer(exchange, compressor, gamma, counter=counter, label=label) if self.tracking else None
        self.store = FlatStore(2, _zeros)  # var 0: y_i, var 1: the previous gradient g_i
        self._nonfinite = None
        self._step_bad = None

    @property
    def nonfinite_steps(self) -> int:
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def start(self, g: torch.Tensor, names: Sequence[str], lengths: Sequence[int], step: int, key: int,
              last: bool = True) -> _Started:
        """Form ``y^{t-1/2}`` from the flat gradient `g` and launch its mixing. `last` marks the
        step's last bucket (the non-finite count advances once per step)."""
        gw = g.to(wide(g.dtype))
        y, g_prev = self.store.get(names, lengths, gw)
        if self.tracking and self.mixer.fused and y.dtype == torch.float32:
            # y^{t-1/2} formed in place in y (one native pass), then mixed in place
            ok = ops.track_prep(y, gw, g_prev)
            self._count(~ok, last)
            seed = mix_seed(self.seed, self.exchange.rank, step, 0, key)
            return _Started(self.mixer.start(y, names, lengths, step, seed, inplace=True), y, g.dtype)
        ok = torch.isfinite(gw).all()
        g_used = torch.where(ok, gw, g_prev)
        self._count(~ok, last)
        if not self.tracking:
            g_prev.copy_(g_used)
            y.copy_(g_used)
            return _Started(None, y, g.dtype)
        y_half = y + g_used - g_prev
        g_prev.copy_(g_used)
        seed = mix_seed(self.seed, self.exchange.rank, step, 0, key)
        return _Started(self.mixer.start(y_half, names, lengths, step, seed), y, g.dtype)

    def _count(self, bad: torch.Tensor, last: bool) -> None:
        """Count a step with a non-finite gradient in any bucket, once per step, without a sync."""
        self._step_bad = bad if self._step_bad is None else self._step_bad | bad
        if last:
            n = self._step_bad.to(torch.int64)
            self._nonfinite = n if self._nonfinite is None else self._nonfinite + n
            self._step_bad = None

    def finish(self, started: _Started, step: int) -> torch.Tensor:
        """Wait for the neighbours and return ``y_i^t`` in the gradient's dtype (kept, in float32
        or float64, for the next step; the kept tensor itself when the dtypes agree)."""
        if started.rnd is not None:
            mixed = self.mixer.finish(started.rnd, step)
            if mixed is not started.y:
                started.y.copy_(mixed)
        return started.y.to(started.dtype)

    def value(self, name: str, var: int):
        return self.store.value(name, var)

    def state_dict(self) -> dict:
        out = {"tracked": self.store.to_dict(), "nonfinite_steps": self.nonfinite_steps}
        if self.mixer is not None:
            out["mixer"] = self.mixer.store.to_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.store.load(state["tracked"])
        self._nonfinite = torch.tensor(int(state.get("nonfinite_steps", 0)))
        if self.mixer is not None:
            self.mixer.store.load(state.get("mixer", {}))


__all__ = ["Tracker"]
