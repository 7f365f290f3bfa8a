"""A model's trainable parameters and gradients as views into two flat buffers, allocated once.

Decentralized methods read and write the whole model every step (mixing, tracking, the
proximal step). Concatenating the parameters into a flat tensor and writing the result back
costs two full copies of the model per variable and step; on a 45 MB model that is most of
the step's CPU time (issue 16). :class:`FlatParameters` instead moves every parameter's
storage into one contiguous buffer (``p.data`` becomes a view of it, the values unchanged)
and gives every parameter a ``.grad`` that is a view of a second buffer, so the flat vectors
the algorithm needs are there for free, as with DDP's ``gradient_as_bucket_view``.

The views survive ``model.load_state_dict`` and in-place updates. When something replaces a
tensor behind our back (``optimizer.zero_grad()`` sets ``.grad`` to ``None`` and autograd then
allocates a fresh one; ``p.data = ...``), :meth:`params` / :meth:`grads` notice it (an
address comparison per parameter), copy the new values into the buffer and re-attach the
views; correct, at the price of one copy that step. A parameter whose dtype, device or shape
changed (``model.double()``, ``model.to("cuda")`` after construction) is an error: convert and
move the model before building the wrapper. :meth:`zero_grad` zeroes
the gradient buffer in place, which keeps the views (``set_to_none`` is not honoured: a fresh
45 MB gradient costs page faults on every step).

Eligible models: every trainable parameter dense, of one dtype, on one device
(:func:`eligible` says why not otherwise; the caller falls back to concatenation).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch


def eligible(named: Sequence[Tuple[str, torch.nn.Parameter]]) -> Optional[str]:
    """``None`` if the parameters can live in one flat buffer, else the reason they cannot."""
    dtypes = {p.dtype for _, p in named}
    devices = {p.device for _, p in named}
    if len(dtypes) > 1:
        return f"the trainable parameters have several dtypes ({sorted(map(str, dtypes))})"
    if len(devices) > 1:
        return f"the trainable parameters are on several devices ({sorted(map(str, devices))})"
    for n, p in named:
        if p.layout != torch.strided or p.is_sparse:
            return f"parameter {n!r} is not a dense strided tensor"
        if not p.dtype.is_floating_point:
            return f"parameter {n!r} is not floating point ({p.dtype})"
    return None


class FlatParameters:
    """Parameters and gradients of ``named`` as views into flat buffers (see the module docstring).

    Args:
        named: ``(name, parameter)`` pairs, all eligible (:func:`eligible`).
    """

    def __init__(self, named: Sequence[Tuple[str, torch.nn.Parameter]]):
        reason = eligible(named)
        if reason is not None:
            raise ValueError(f"commcomp: cannot keep the parameters flat: {reason}")
        self.params_list = [p for _, p in named]
        self.lengths = [p.numel() for p in self.params_list]
        first = self.params_list[0]
        total = sum(self.lengths)
        self.x = torch.empty(total, dtype=first.dtype, device=first.device)
        self.g = torch.zeros(total, dtype=first.dtype, device=first.device)
        self._x_views = self._views(self.x)
        self._g_views = self._views(self.g)
        # addresses of the views, compared by value: `param.grad.data = t` (Module._apply, e.g.
        # model.double()) re-points our own view objects, so comparing with them proves nothing
        self._x_ptrs = [v.data_ptr() for v in self._x_views]
        self._g_ptrs = [v.data_ptr() for v in self._g_views]
        with torch.no_grad():
            for p, xv in zip(self.params_list, self._x_views):
                xv.copy_(p.detach())
                p.data = xv
            for p, gv in zip(self.params_list, self._g_views):
                if p.grad is not None:
                    gv.copy_(p.grad.detach())
                p.grad = gv
        self.readopted = 0  # how many times a replaced tensor had to be copied back (a diagnostic)

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        out, pos = [], 0
        for p, n in zip(self.params_list, self.lengths):
            out.append(flat[pos:pos + n].view(p.shape))
            pos += n
        return out

    def params(self) -> torch.Tensor:
        """The flat parameters (re-attached first if a parameter's storage was replaced)."""
        for k, p in enumerate(self.params_list):
            if p.data.data_ptr() != self._x_ptrs[k] or p.dtype != self.x.dtype or p.data.shape != self._x_views[k].shape:
                self._readopt(k, grad=False)
        return self.x

    def grads(self) -> torch.Tensor:
        """The flat gradients; a parameter without ``.grad`` contributes zeros."""
        for k, p in enumerate(self.params_list):
            grad = p.grad
            if grad is None:
                self._fresh_view(k, grad=True).zero_()
                p.grad = self._g_views[k]
            elif grad.data_ptr() != self._g_ptrs[k] or grad.dtype != self.g.dtype or grad.shape != self._g_views[k].shape:
                self._readopt(k, grad=True)
        return self.g

    def _fresh_view(self, k: int, grad: bool) -> torch.Tensor:
        """Parameter k's view of the flat buffer, made anew (the old view object may have been
        re-pointed elsewhere by ``.data = ...``)."""
        flat, views = (self.g, self._g_views) if grad else (self.x, self._x_views)
        start = sum(self.lengths[:k])
        views[k] = flat[start:start + self.lengths[k]].view(views[k].shape)
        return views[k]

    def _readopt(self, k: int, grad: bool) -> None:
        p = self.params_list[k]
        src = p.grad if grad else p.data
        view = self._fresh_view(k, grad)
        if src.shape != view.shape or src.device != view.device or src.dtype != view.dtype:
            raise RuntimeError(
                f"commcomp: a parameter changed shape, dtype or device ({tuple(view.shape)} {view.dtype} on "
                f"{view.device} -> {tuple(src.shape)} {src.dtype} on {src.device}) after GradientTracking was "
                "built around the model; build the model fully (convert and move it) first")
        with torch.no_grad():
            view.copy_(src.detach())
        if grad:
            p.grad = view
        else:
            p.data = view
        self.readopted += 1

    def zero_grad(self) -> None:
        self.grads()
        self.g.zero_()

    @contextlib.contextmanager
    def grads_as(self, flat: torch.Tensor):
        """Temporarily make every ``.grad`` a view of ``flat`` (e.g. the tracker ``y``, for an
        optimizer step); the gradient views are restored afterwards."""
        views = self._views(flat)
        for p, v in zip(self.params_list, views):
            p.grad = v
        try:
            yield
        finally:
            for k, p in enumerate(self.params_list):
                p.grad = self._fresh_view(k, grad=True)


__all__ = ["FlatParameters", "eligible"]
