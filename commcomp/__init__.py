"""commcomp: communication compression for PyTorch distributed training.

The kernels (:mod:`commcomp.ops`) come first; the DDP communication hooks build on them.
"""

from commcomp import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
