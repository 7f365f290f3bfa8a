"""Gradient inversion against sketched (and noised) gradients: what the DP noise is for.

A sketch ``y = R g`` is a linear map whose matrix every party can rebuild from the shared
seed, so it hides nothing from whoever sees the message: Song et al. 2022 ("Sketching for
First Order Method: Efficient Algorithm for Low-Bandwidth Channel and Vulnerability") show
that a training example can be reconstructed from its sketched gradient. This module is the
attack harness that checks it, DLG (Zhu et al. 2019, "Deep Leakage from Gradients") with
iDLG's label inference (Zhao et al. 2020), adapted to the sketch:

1. Build the observed message exactly as :class:`commcomp.hooks.SketchDPState` does
   (:func:`message_for`): the gradient ``g`` of the loss of one example (or a small batch),
   clipped to ``clip_norm``, plus N(0, (sigma * clip_norm)^2) noise, then sketched --
   ``y = R(clip(g) + noise)``; or ``clip(R g) + noise`` with ``noise_placement="sketch"``.
2. Infer the label (iDLG, one example): with cross-entropy and non-negative features
   entering the last linear layer (sigmoid activations), the gradient row of the true class
   is the only one that is non-positive; the attacker reads it from ``R^T y``, an unbiased
   estimate of the gradient. With several examples, DLG's soft labels are optimized instead.
3. Optimize a dummy input ``x'`` (from N(0, 1), a private generator) so that the noiseless
   mechanism applied to its gradient matches the observation:
   ``min_x' ||M(g(x')) - y||^2 (+ tv_weight * TV(x'))``, with L-BFGS (as DLG) or Adam.
   The attacker knows the model's weights, ``R`` (the shared seed) and ``clip_norm``.

The attack succeeds against noiseless sketches (the sketch keeps ``s`` linear measurements
of a gradient that is a very redundant function of the input) and fails against the DP
noise, whose per-coordinate standard deviation ``sigma * clip_norm`` is far above the
clipped gradient's ``~clip_norm / sqrt(d)``. See ``examples/leakage_attack.py`` and
``docs/privacy.md`` for measured numbers.

The attack model is :class:`~commcomp.privacy.lenet.LeNet` (in :mod:`commcomp.privacy.lenet`,
also importable from here), DLG's small CNN with **sigmoid** activations: smooth, twice
differentiable and with non-negative features, which is what DLG and iDLG rely on (ReLU
networks are much harder to invert this way).

Simplification: the hook sketches each DDP bucket with its own seed; here the whole
gradient (``model.parameters()`` order) is one bucket with one sketch. Per-bucket sketches
only give the attacker more structure.

Example::

    >>> model = make_attack_model(seed=0)
    >>> sk = Sketch("countsketch", num_params(model), num_params(model) // 10, seed=7)
    >>> y = message_for(model, image, label, sk)                 # what leaves the client
    >>> res = invert_gradient(model, y, sk, image.shape, num_classes=10, seed=1)
    >>> reconstruction_mse(res.input, image), res.label
"""

from __future__ import annotations

import logging
import math
import numbers
import secrets
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import validate
from .lenet import LeNet, make_attack_model, num_params  # noqa: F401 - the attack's model, importable from here
from .mechanisms import clip_coefficient

LOG = logging.getLogger(__name__)

PLACEMENTS = ("gradient", "sketch")
OPTIMIZERS = ("lbfgs", "adam")


# -- validation ------------------------------------------------------------------------

def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_mechanism(clip_norm, noise_multiplier, noise_placement) -> tuple:
    clip = validate.positive(clip_norm, "clip_norm", allow_none=True, hint="None: no clipping")
    sigma = validate.nonneg(noise_multiplier, "noise_multiplier")
    validate.choice(noise_placement, "noise_placement", PLACEMENTS)
    if sigma > 0 and clip is None:
        raise ValueError(
            f"commcomp: noise_multiplier={sigma} needs clip_norm: the noise std is "
            "noise_multiplier * clip_norm, as in the sketch_dp hook")
    return clip, sigma


def _check_sketch(sketch, model: nn.Module) -> int:
    """The message length; the sketch must take the model's flat gradient."""
    d = num_params(model)
    if sketch is None:
        return d
    if not all(hasattr(sketch, a) for a in ("sketch", "transpose", "numel", "sketch_size")):
        raise ValueError(f"commcomp: sketch must be a commcomp.codecs.Sketch or None, "
                         f"got {type(sketch).__name__}")
    if sketch.numel != d:
        raise ValueError(
            f"commcomp: the sketch takes {sketch.numel} inputs but the model has {d} parameters; "
            f"build it as Sketch(kind, num_params(model), size, seed)")
    return sketch.sketch_size


# -- the mechanism (same steps as SketchDPState.release) ---------------------------------

def flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              create_graph: bool = False) -> torch.Tensor:
    """The flat float32 gradient (``model.parameters()`` order) of the mean cross-entropy of
    ``model(x)`` against ``y`` (class indices ``[B]`` or probabilities ``[B, C]``)."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([g.reshape(-1) for g in grads]).float()


def _release(g: torch.Tensor, sketch, clip_norm: Optional[float], noise_multiplier: float,
             noise_placement: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Clip, noise, sketch one flat gradient (differentiable when there is no noise)."""
    sk = (lambda v: v) if sketch is None else sketch.sketch
    std = noise_multiplier * (clip_norm or 0.0)

    def noise(n: int) -> torch.Tensor:  # as NoiseSource.gaussian: randn from the generator, * std
        return torch.randn(n, generator=generator, device=g.device).mul_(std)

    if noise_placement == "gradient":
        if clip_norm is not None:
            g = g * clip_coefficient(g.norm(), clip_norm)
        if noise_multiplier > 0:
            g = g + noise(g.numel())
        return sk(g)
    y = sk(g)
    if clip_norm is not None:
        y = y * clip_coefficient(y.norm(), clip_norm)
    if noise_multiplier > 0:
        y = y + noise(y.numel())
    return y


def message_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sketch=None,
                clip_norm: Optional[float] = None, noise_multiplier: float = 0.0,
                noise_placement: str = "gradient",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What a client sends for the batch ``(x, y)``, built like the ``sketch_dp`` hook.

    Args:
        model: the shared model (its weights are what the attacker knows).
        x, y: the client's batch and class labels ``[B]``; the loss is their mean
            cross-entropy.
        sketch: a :class:`commcomp.codecs.Sketch` over ``num_params(model)`` inputs, or None
            (the gradient itself is sent: plain DDP).
        clip_norm: L2 bound of the gradient (or of the sketch with ``"sketch"``); None: none.
        noise_multiplier: sigma; the noise std per coordinate is ``sigma * clip_norm``.
        noise_placement: ``"gradient"`` (``R(clip(g) + noise)``) or ``"sketch"``
            (``clip(R g) + noise``).
        generator: the source of the noise (never the global RNG). None: a fresh one
            seeded from the OS's entropy, as a real client would.

    Returns the detached float32 message, ``[sketch.sketch_size]`` (or ``[d]``).
    """
    clip, sigma = _check_mechanism(clip_norm, noise_multiplier, noise_placement)
    _check_sketch(sketch, model)
    if sigma > 0 and generator is None:
        generator = torch.Generator(device=x.device).manual_seed(secrets.randbits(63))
    g = flat_grad(model, x, y)
    return _release(g, sketch, clip, sigma, noise_placement, generator).detach()


# -- the attack ------------------------------------------------------------------------

@dataclass
class AttackResult:
    """What :func:`invert_gradient` found.

    Attributes:
        input: the reconstructed batch (shape ``input_shape``), detached.
        label: the labels used or found ``[B]`` (int64).
        history: the matching loss after each outer step (finite values only).
        loss: the lowest matching loss reached (the returned input is the one that reached it).
    """

    input: torch.Tensor
    label: torch.Tensor
    history: List[float] = field(default_factory=list)
    loss: float = math.inf


def _last_linear_weight(model: nn.Module) -> tuple:
    """(offset in the flat gradient, [C, H] shape) of the last ``nn.Linear``'s weight."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("commcomp: iDLG label inference needs a final nn.Linear layer; "
                         "give label=")
    target, offset = linear[-1].weight, 0
    for p in model.parameters():
        if p is target:
            return offset, tuple(p.shape)
        offset += p.numel()
    raise ValueError("commcomp: the last nn.Linear's weight is not among model.parameters()")


def infer_label(model: nn.Module, observed: torch.Tensor, sketch=None) -> int:
    """iDLG's label of a single example from its (sketched) gradient.

    The gradient of the last linear layer's row ``i`` is ``(p_i - [i == y]) h`` with
    features ``h >= 0`` (after a sigmoid), so only the true class's row sums to a negative
    number. From a sketch, the attacker uses the unbiased estimate ``R^T y`` of the gradient;
    noise can make the inference wrong, which is part of what the DP noise buys.
    """
    est = observed.float() if sketch is None else sketch.transpose(observed.float())
    offset, shape = _last_linear_weight(model)
    rows = est[offset:offset + shape[0] * shape[1]].reshape(shape)
    return int(rows.sum(1).argmin())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a batch ``[B, C, H, W]``, averaged per pixel pair."""
    rows = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return rows + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _labels(label, batch: int, num_classes: int) -> Optional[torch.Tensor]:
    if label is None:
        return None
    t = torch.as_tensor(label).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() != batch:
        raise ValueError(f"commcomp: label must be None or {batch} int class index(es), "
                         f"got {label!r}")
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        raise ValueError(f"commcomp: labels must lie in [0, {num_classes}), got {t.tolist()}")
    return t.to(torch.int64)


def _check_attack_args(input_shape, num_classes, steps, lr, optimizer, tv_weight) -> tuple:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    positive = (isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in shape or ())
    if not shape or not all(positive):
        raise ValueError(f"commcomp: input_shape must be a tuple of positive ints with the batch "
                         f"first, e.g. (1, 1, 28, 28); got {input_shape!r}")
    num_classes = validate.integer(num_classes, "num_classes", low=2)
    steps = validate.integer(steps, "steps", low=1)
    lr = validate.positive(lr, "lr")
    validate.choice(optimizer, "optimizer", OPTIMIZERS)
    tv = validate.nonneg(tv_weight, "tv_weight")
    return tuple(int(n) for n in shape), num_classes, steps, lr, tv


def invert_gradient(model: nn.Module, observed: torch.Tensor, sketch, input_shape: Sequence[int],
                    num_classes: int, *, steps: int = 30, lr: float = 1.0, seed: int = 0,
                    label: Union[None, int, Sequence[int], torch.Tensor] = None,
                    clip_norm: Optional[float] = None, noise_placement: str = "gradient",
                    optimizer: str = "lbfgs", tv_weight: float = 0.0) -> AttackResult:
    """Reconstruct the input whose (sketched) gradient is ``observed`` (DLG / iDLG).

    Args:
        model: the model with the weights the message was computed at.
        observed: the message, from :func:`message_for` (or a hook).
        sketch: the :class:`commcomp.codecs.Sketch` that made it (known from the shared
            seed), or None for an unsketched gradient.
        input_shape: the batch shape, e.g. ``(1, 1, 28, 28)``.
        num_classes: classes of the model's output.
        steps: outer optimizer steps (L-BFGS: each runs up to 20 evaluations; 30 is enough
            for one 28 x 28 image; Adam: one evaluation each, use a few hundred).
        lr: step size (1.0 for L-BFGS as in DLG; ~0.1 for Adam).
        seed: seed of the dummy input (and soft labels); the result is deterministic in it.
        label: the true label(s) if known; None infers one example's label (iDLG,
            :func:`infer_label`) or optimizes soft labels for a batch (DLG).
        clip_norm, noise_placement: the mechanism's clipping, which the attacker mirrors on
            the dummy gradient (public hyper-parameters). The noise cannot be mirrored.
        optimizer: ``"lbfgs"`` (default, DLG; strong-Wolfe line search) or ``"adam"``.
        tv_weight: weight of a total-variation prior on the dummy input (0: DLG as published).

    Returns an :class:`AttackResult`; the input is the one with the lowest matching loss.
    """
    shape, num_classes, steps, lr, tv = _check_attack_args(
        input_shape, num_classes, steps, lr, optimizer, tv_weight)
    clip, _ = _check_mechanism(clip_norm, 0.0, noise_placement)
    n = _check_sketch(sketch, model)
    _check_fits(model, shape, num_classes)
    if not isinstance(observed, torch.Tensor) or observed.numel() != n:
        got = _describe(observed)
        raise ValueError(f"commcomp: observed must be a tensor of {n} values (the message for this "
                         f"model and sketch), got {got}")
    target = observed.detach().reshape(-1).float()
    labels = _labels(label, shape[0], num_classes)
    if labels is None and shape[0] == 1:
        labels = torch.tensor([infer_label(model, target, sketch)])
    gen = torch.Generator(device=target.device).manual_seed(validate.seed(seed, "seed"))
    dummy = torch.randn(shape, generator=gen, device=target.device).requires_grad_(True)
    variables = [dummy]
    soft = None
    if labels is None:  # DLG: a batch's labels are optimized as logits
        soft = torch.randn(shape[0], num_classes, generator=gen, device=target.device)
        soft.requires_grad_(True)
        variables.append(soft)

    def objective() -> torch.Tensor:
        y = labels if soft is None else soft.softmax(-1)
        g = flat_grad(model, dummy, y, create_graph=True)
        loss = (_release(g, sketch, clip, 0.0, noise_placement, None) - target).pow(2).sum()
        return loss + tv * total_variation(dummy) if tv > 0 and dummy.dim() == 4 else loss

    history, best = _optimize(objective, variables, optimizer, steps, lr)
    found = labels if soft is None else best[1].argmax(-1)
    return AttackResult(best[0], found, history, min(history) if history else math.inf)


def _check_fits(model: nn.Module, shape: tuple, num_classes: int) -> None:
    """One forward pass of zeros: the shape must fit the model, the output ``num_classes``."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except RuntimeError as exc:
        raise ValueError(f"commcomp: input_shape {shape} does not fit the model ({exc}); give "
                         "the shape of the attacked batch, batch first") from exc
    if out.dim() != 2 or out.shape != (shape[0], num_classes):
        raise ValueError(f"commcomp: the model maps input_shape {shape} to {tuple(out.shape)}, "
                         f"not [batch, num_classes] = [{shape[0]}, {num_classes}]")


def _optimize(objective, variables: List[torch.Tensor], optimizer: str, steps: int,
              lr: float) -> tuple:
    """Minimize ``objective`` over ``variables``; returns (losses per step, best variables).
    Stops early on a non-finite loss (noisy targets can make L-BFGS diverge)."""
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(variables, lr=lr, max_iter=20, history_size=100,
                                line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam(variables, lr=lr)

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    history: List[float] = []
    best, best_loss = [v.detach().clone() for v in variables], math.inf
    for step in range(steps):
        opt.step(closure)
        loss = float(objective().detach())  # after the step (closure gives the one before)
        if not math.isfinite(loss) or not all(torch.isfinite(v).all() for v in variables):
            LOG.debug("gradient inversion stopped at step %d: non-finite loss or input", step)
            break
        history.append(loss)
        if loss < best_loss:
            best, best_loss = [v.detach().clone() for v in variables], loss
    return history, best


def reconstruction_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between a reconstruction and the original (same shape)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        raise ValueError(f"commcomp: reconstruction_mse needs two tensors of one shape, "
                         f"got {_describe(a)} and {_describe(b)}")
    return float((a.detach().float() - b.detach().float()).pow(2).mean())
