"""commcomp: communication compression for PyTorch distributed training.

The kernels (:mod:`commcomp.ops`) come first; collectives (:mod:`commcomp.collectives`) move
their payloads; the DDP communication hooks (:mod:`commcomp.hooks`) build on both::

    state = commcomp.register(ddp_model, "terngrad")
"""

from commcomp import collectives, hooks, ops
from commcomp.hooks import register

__version__ = "0.1.0"

__all__ = ["collectives", "hooks", "ops", "register", "__version__"]
