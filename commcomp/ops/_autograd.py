"""Gradients of the sketch ops, so that losses can backpropagate through a sketch.

Each sketch is a fixed linear map R (chosen by the seed), so the gradient of ``R x`` is
``R^T grad`` and the gradient of ``R^T y`` is ``R grad``: every op's backward is its twin.
Gradients come back in the input's dtype and shape. The codec ops stay non-differentiable.
"""

from __future__ import annotations

import torch

from . import reference


def _save(ctx, inputs, output):
    t = inputs[0]
    ctx.shape, ctx.dtype, ctx.numel = t.shape, t.dtype, t.numel()
    ctx.args = inputs[1:]


def _as_input(ctx, g):
    return g.reshape(ctx.shape).to(ctx.dtype)


def _countsketch_backward(ctx, grad):
    _, seed = ctx.args
    g = torch.ops.commcomp.countsketch_transpose(grad.contiguous(), ctx.numel, seed)
    return _as_input(ctx, g), None, None


def _countsketch_transpose_backward(ctx, grad):
    _, seed = ctx.args
    if grad.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        g = reference.countsketch(grad, ctx.numel, seed)  # as commcomp.ops.countsketch does
    else:
        g = torch.ops.commcomp.countsketch(grad.contiguous(), ctx.numel, seed)
    return _as_input(ctx, g), None, None


def _srht_backward(ctx, grad):
    _, block, seed = ctx.args
    g = torch.ops.commcomp.srht_transpose(grad.contiguous(), ctx.numel, block, seed)
    return _as_input(ctx, g), None, None, None


def _srht_transpose_backward(ctx, grad):
    _, block, seed = ctx.args
    g = torch.ops.commcomp.srht(grad.contiguous(), ctx.numel, block, seed)
    return _as_input(ctx, g), None, None, None


def register() -> None:
    for name, backward in (
        ("countsketch", _countsketch_backward),
        ("countsketch_transpose", _countsketch_transpose_backward),
        ("srht", _srht_backward),
        ("srht_transpose", _srht_transpose_backward),
    ):
        torch.library.register_autograd(f"commcomp::{name}", backward, setup_context=_save)
