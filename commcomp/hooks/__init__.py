"""DDP communication hooks, one module per algorithm, and one registry for all of them.

>>> state = commcomp.register(ddp_model, "terngrad", clip_factor=2.5)
>>> state = commcomp.register(ddp_model, "sketch_dp", sketch_ratio=0.01, noise_multiplier=1.0,
...                           clip_norm=1.0)
>>> state = commcomp.register(ddp_model, "gradient_coding", s=1, code="cyclic")
>>> gt = commcomp.decentralized.GradientTracking(ddp_model, 0.05, topology="ring")  # registers "gradient_tracking"

The gradient-tracking hook lives with its algorithm in :mod:`commcomp.decentralized.hook`;
every hook follows the contract of :class:`commcomp.core.HookState` (docs/writing_a_hook.md).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

import torch

from commcomp import core
from commcomp.core import HookState
from commcomp.decentralized.hook import GradientTrackingState, gradient_tracking_hook

from .gradient_coding import GradientCodingState, gradient_coding_hook
from .sketch_dp import SketchDPState, sketch_dp_hook
from .terngrad import TernGradState, terngrad_hook
from .terngrad_fsdp import TernGradFSDPState, fsdp_available, is_fsdp_model

HOOKS: Dict[str, Tuple[Type[HookState], Callable]] = {
    "terngrad": (TernGradState, terngrad_hook),
    "sketch_dp": (SketchDPState, sketch_dp_hook),
    "gradient_coding": (GradientCodingState, gradient_coding_hook),
    "gradient_tracking": (GradientTrackingState, gradient_tracking_hook),
}


FSDP_HOOKS: Dict[str, Type[HookState]] = {"terngrad": TernGradFSDPState}


def register(model, name: str, **options) -> HookState:
    """Register the hook called `name` on a DistributedDataParallel model, or on an FSDP2
    (``fully_shard``) model for the hooks in ``FSDP_HOOKS`` (TernGrad's compressed
    reduce-scatter, :mod:`commcomp.hooks.terngrad_fsdp`); returns its state.

    Options go to the hook's state class (e.g. :class:`TernGradState`). The hook's collectives
    run on a process group of its own with the same ranks as ``process_group`` (default: the
    model's), created at the first registration on that group: DDP's own collectives
    (``find_unused_parameters``, buffer broadcasts) cannot interleave with them. Registration
    is a collective: every rank of the group registers, with the same options (checked here;
    a mismatch raises on every rank and the model keeps no hook).
    """
    if name not in HOOKS:
        raise ValueError(f"commcomp: unknown hook {name!r}; available: {sorted(HOOKS)}")
    if is_fsdp_model(model):
        if name not in FSDP_HOOKS:
            raise ValueError(f"commcomp: the {name!r} hook works with DistributedDataParallel only; on an FSDP2 "
                             f"(fully_shard) model commcomp offers {sorted(FSDP_HOOKS)}")
        if not fsdp_available():
            raise RuntimeError(f"commcomp: torch {torch.__version__}'s FSDP2 has no set_custom_reduce_scatter, which "
                               "the compressed reduce-scatter needs; upgrade torch (tested with 2.13)")
        return core.register_fsdp(model, FSDP_HOOKS[name], **options)
    state_cls, hook = HOOKS[name]
    return core.register(model, state_cls, hook, **options)


__all__ = ["FSDP_HOOKS", "HOOKS", "TernGradFSDPState", "GradientCodingState", "GradientTrackingState", "HookState", "SketchDPState",
           "TernGradState", "gradient_coding_hook", "gradient_tracking_hook", "register", "sketch_dp_hook",
           "terngrad_hook"]
