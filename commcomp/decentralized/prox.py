"""Proximal operators for the nonsmooth regularizer ``r`` of a composite problem ``f(x) + r(x)``.

Yan, Chen, Hu, Xu, "Compressed Decentralized Proximal Stochastic Gradient Method for Nonconvex
Composite Problems with Heterogeneous Data" (ICML 2023) solve ``min_x (1/n) sum_i f_i(x) + r(x)``
over ``n`` agents: ``f_i`` is agent ``i``'s smooth (nonconvex) loss, ``r`` a closed convex and
possibly nonsmooth regularizer that every agent shares. DProxSGT and its compressed variant
CDProxSGT track the average gradient and, after mixing, take the proximal step

    ``x <- prox_{eta r}(v) = argmin_z  r(z) + ||z - v||^2 / (2 eta)``

with ``eta`` the step size (``v``: the mixed point after the gradient step). This module holds
``r``: one :class:`Prox` per regularizer, which computes ``prox_{eta r}`` (:meth:`Prox.apply_`)
and ``r`` itself (:meth:`Prox.value`, for the composite objective ``f + r``). A regularizer acts
on each parameter tensor separately (``r`` is separable over tensors); ``apply_`` writes the
result into the tensor (a parameter's ``.data``) so the model needs no copy.

=================  ==========================  =====================================================
spec               ``r(x)``                    prox
=================  ==========================  =====================================================
``"l1:1e-4"``      ``lam * ||x||_1``           soft-threshold: ``sign(v) max(|v| - eta lam, 0)``
``"l2:1e-4"``      ``lam / 2 * ||x||^2``       shrink: ``v / (1 + eta lam)`` (weight decay)
``"l2norm:1e-3"``  ``lam * ||x||_2``           block soft-threshold: ``max(1 - eta lam / ||v||, 0) v``
``"box:-1,1"``     0 on ``[lo, hi]``, else inf  clamp to ``[lo, hi]``
a callable         ``f(x, step_size)``          whatever it returns (:class:`FunctionProx`)
=================  ==========================  =====================================================

L1 (sparse weights) and the group-lasso ``l2norm`` (whole tensors switched off) set entries to
exactly zero; :func:`sparsity` measures the result.

>>> prox = make_prox("l1:0.5")
>>> prox(torch.tensor([-2.0, 0.3, 1.0]), step_size=1.0)
tensor([-1.5000,  0.0000,  0.5000])
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Optional, Union

import torch

from ..utils import validate

__all__ = ["Prox", "L1", "L2Squared", "L2Norm", "Box", "FunctionProx", "make_prox", "sparsity", "PROXES"]


def _step(step_size) -> float:
    return validate.positive(step_size, "step_size (eta in prox_{eta r})",
                             hint="pass the learning rate of the step the prox follows")


def _norm64(x: torch.Tensor, ord: float = 2) -> torch.Tensor:
    return torch.linalg.vector_norm(x.detach(), ord, dtype=torch.float64)


class Prox(ABC):
    """``prox_{eta r}`` for one regularizer ``r``, applied to each parameter tensor separately.

    Subclasses implement :meth:`apply_` (in place, under ``torch.no_grad``, so it works on a
    ``Parameter`` or its ``.data``; float32, float64 and bfloat16) and :meth:`value` (``r(x)``,
    a float computed in float64, for logging the composite objective).
    """

    name: str = "prox"  # the key of make_prox's "name:args" strings and of options()["name"]

    @abstractmethod
    def apply_(self, x: torch.Tensor, step_size: float) -> torch.Tensor:
        """Overwrite ``x`` with ``prox_{step_size * r}(x)`` and return ``x``."""

    def __call__(self, x: torch.Tensor, step_size: float) -> torch.Tensor:
        """Out of place: ``prox_{step_size * r}(x)`` as a new tensor (``x`` is left as it is)."""
        return self.apply_(x.detach().clone(), step_size)

    @abstractmethod
    def value(self, x: torch.Tensor) -> float:
        """``r(x)`` as a Python float."""

    def options(self) -> dict:
        """JSON-able hyper-parameters; ``make_prox(p.options())`` rebuilds ``p`` (built-ins only)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "name")
        return f"{type(self).__name__}({opts})"


class _Strength(Prox):
    """A regularizer ``r = lam * (a norm)`` with one strength ``lam >= 0`` (0 turns it off)."""

    def __init__(self, lam: float):
        self.lam = validate.nonneg(lam, "lam", hint="the regularization strength; 0 turns the regularizer off")

    def options(self):
        """``{"name": ..., "lam": lam}``."""
        return {"name": self.name, "lam": self.lam}


class L1(_Strength):
    """``r(x) = lam * ||x||_1``: soft-thresholding ``sign(v) * max(|v| - eta * lam, 0)``.

    Entries with ``|v| <= eta * lam`` (compared in the tensor's precision) become exactly 0, so
    the iterates are sparse. ``lam``: strength, >= 0; start near 1e-5 .. 1e-4 for a network.
    """

    name = "l1"

    def apply_(self, x, step_size):
        """``prox_{eta r}``: soft-threshold every entry of ``x`` by ``eta * lam``, in place."""
        thresh = _step(step_size) * self.lam
        with torch.no_grad():
            mag = x.abs().sub_(thresh).clamp_(min=0)
            return x.sign_().mul_(mag)

    def value(self, x):
        """``r(x) = lam * sum |x_k|``."""
        return self.lam * float(_norm64(x, 1))


class L2Squared(_Strength):
    """``r(x) = lam / 2 * ||x||^2``: ``v / (1 + eta * lam)``, i.e. decoupled weight decay
    applied as a proximal step (stable for any ``eta``). ``lam``: >= 0, e.g. 1e-4."""

    name = "l2"

    def apply_(self, x, step_size):
        """``prox_{eta r}``: shrink ``x`` by ``1 + eta * lam``, in place."""
        denom = 1.0 + _step(step_size) * self.lam
        with torch.no_grad():
            return x.div_(denom)

    def value(self, x):
        """``r(x) = lam / 2 * ||x||_2^2``."""
        return 0.5 * self.lam * float(_norm64(x)) ** 2


class L2Norm(_Strength):
    """``r(x) = lam * ||x||_2`` over the whole tensor (group lasso, one group per parameter):
    ``max(1 - eta * lam / ||v||, 0) * v``. A tensor with ``||v|| <= eta * lam`` becomes exactly 0
    (the whole layer or filter is pruned); ``v = 0`` stays 0. No host synchronisation."""

    name = "l2norm"

    def apply_(self, x, step_size):
        """``prox_{eta r}``: block soft-threshold the whole tensor ``x`` by ``eta * lam``, in place."""
        thresh = _step(step_size) * self.lam
        with torch.no_grad():
            norm = _norm64(x).clamp_min(torch.finfo(torch.float64).tiny)  # v = 0: 0 * finite, not 0/0
            scale = (1.0 - thresh / norm).clamp_min(0.0)
            return x.mul_(scale.to(x.dtype))

    def value(self, x):
        """``r(x) = lam * ||x||_2`` (the tensor's Euclidean norm, not squared)."""
        return self.lam * float(_norm64(x))


class Box(Prox):
    """``r`` = indicator of ``[lo, hi]`` (0 inside, ``inf`` outside): projection by clamping,
    whatever ``eta``. ``lo`` / ``hi`` may be ``-inf`` / ``inf`` for a one-sided bound."""

    name = "box"

    def __init__(self, lo: float, hi: float):
        for v, what in ((lo, "lo"), (hi, "hi")):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ValueError(f"commcomp: Box {what} must be a number, got {v!r}")
        if not lo < hi:
            raise ValueError(f"commcomp: Box needs lo < hi, got lo={lo!r}, hi={hi!r}; swap them, or use "
                             f"lo=-inf / hi=inf for a one-sided bound")
        self.lo, self.hi = float(lo), float(hi)

    def apply_(self, x, step_size):
        """``prox_{eta r}``: the projection onto ``[lo, hi]`` (clamp ``x`` in place; ``eta`` is
        checked but does not matter for an indicator)."""
        _step(step_size)
        with torch.no_grad():
            return x.clamp_(min=self.lo, max=self.hi)

    def value(self, x):
        """``r(x)``: 0 when every entry lies in ``[lo, hi]`` (up to ``x``'s rounding), else ``inf``."""
        # Clamping rounds the bounds to x's precision; allow that much so value(prox(v)) == 0.
        tol = torch.finfo(x.dtype).eps * max([1.0] + [abs(b) for b in (self.lo, self.hi) if math.isfinite(b)]) \
            if x.is_floating_point() else 0.0
        x64 = x.detach().to(torch.float64)
        inside = bool(((x64 >= self.lo - tol) & (x64 <= self.hi + tol)).all())
        return 0.0 if inside else math.inf

    def options(self):
        """``{"name": "box", "lo": lo, "hi": hi}``."""
        return {"name": self.name, "lo": self.lo, "hi": self.hi}


class FunctionProx(Prox):
    """A user-supplied prox: ``fn(x, step_size) -> tensor`` (same shape as ``x``).

    ``fn`` may modify ``x`` in place and return it, or return a new tensor, which is copied into
    ``x``. ``value_fn(x) -> float`` gives ``r(x)``; without it :meth:`value` returns ``nan``.
    """

    name = "function"

    def __init__(self, fn: Callable[[torch.Tensor, float], torch.Tensor],
                 value_fn: Optional[Callable[[torch.Tensor], float]] = None):
        if not callable(fn):
            raise ValueError(f"commcomp: FunctionProx needs a callable fn(x, step_size) -> tensor, got {fn!r}")
        if value_fn is not None and not callable(value_fn):
            raise ValueError(f"commcomp: value_fn must be a callable value_fn(x) -> float or None, got {value_fn!r}")
        self.fn, self.value_fn = fn, value_fn

    def apply_(self, x, step_size):
        """``prox_{eta r}`` as ``fn(x, eta)`` computes it, written into ``x``."""
        step_size = _step(step_size)
        with torch.no_grad():
            out = self.fn(x, step_size)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"commcomp: the prox function {self._fn_name()} must return a tensor of x's "
                                 f"shape {tuple(x.shape)}, got {got}")
            if out is not x:
                x.copy_(out)
        return x

    def value(self, x):
        """``r(x)`` from ``value_fn``; ``nan`` without one."""
        return float("nan") if self.value_fn is None else float(self.value_fn(x))

    def _fn_name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)

    def options(self):
        """``{"name": "function", "fn": <its qualified name>}``: for logs; ``make_prox`` cannot
        rebuild a function from it."""
        return {"name": self.name, "fn": self._fn_name()}


_NAMED = {"l1": L1, "l2": L2Squared, "l2norm": L2Norm, "box": Box}
#: Names ``make_prox`` accepts in ``"name:args"`` strings.
PROXES = tuple(_NAMED)
_ALLOWED = ("None, a Prox, a callable f(x, step_size) -> tensor, a dict from Prox.options(), or one of "
            "'l1:LAM', 'l2:LAM' (lam/2 ||x||^2), 'l2norm:LAM', 'box:LO,HI' (e.g. 'l1:1e-4', 'box:-1,1')")


def _from_string(spec: str) -> Optional[Prox]:
    name, _, args = spec.strip().partition(":")
    name = name.strip().lower()
    if name in ("", "none"):
        return None
    if name not in _NAMED:
        raise ValueError(f"commcomp: unknown prox {spec!r}; allowed: {_ALLOWED}")
    try:
        nums = [float(a) for a in args.split(",")] if args.strip() else []
    except ValueError:
        raise ValueError(f"commcomp: cannot read the numbers in prox {spec!r}; allowed: {_ALLOWED}") from None
    want = 2 if name == "box" else 1
    if len(nums) != want:
        raise ValueError(f"commcomp: prox {name!r} takes {want} number(s) after ':', got {spec!r}; "
                         f"allowed: {_ALLOWED}")
    return _NAMED[name](*nums)


def make_prox(spec) -> Optional[Prox]:
    """A :class:`Prox` from ``spec``: ``None`` (or ``"none"``) -> ``None`` (no regularizer); a
    :class:`Prox` as is; a callable -> :class:`FunctionProx`; a string ``"l1:1e-4"``,
    ``"l2:1e-4"`` (:class:`L2Squared`), ``"l2norm:1e-3"``, ``"box:-1,1"``; or the dict of a
    built-in's :meth:`Prox.options`."""
    if spec is None or isinstance(spec, Prox):
        return spec
    if isinstance(spec, str):
        return _from_string(spec)
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("name", None)
        if name not in _NAMED:
            raise ValueError(f"commcomp: a prox dict needs 'name' in {PROXES}, got {spec!r}; allowed: {_ALLOWED}")
        try:
            return _NAMED[name](**opts)
        except TypeError as exc:
            raise ValueError(f"commcomp: bad options for prox {name!r}: {spec!r} ({exc})") from None
    if callable(spec):
        return FunctionProx(spec)
    raise ValueError(f"commcomp: cannot make a prox from {type(spec).__name__} {spec!r}; allowed: {_ALLOWED}")


def sparsity(tensors: Union[torch.Tensor, Iterable[torch.Tensor]]) -> float:
    """Fraction of entries that are exactly zero over ``tensors`` (e.g. ``model.parameters()``);
    0.0 when there are no entries."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    zeros = total = 0
    for t in tensors:
        zeros += int(t.numel() - torch.count_nonzero(t.detach()))
        total += t.numel()
    return zeros / total if total else 0.0
