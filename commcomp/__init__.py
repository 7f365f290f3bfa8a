"""commcomp: communication compression for PyTorch distributed training.

The packages form layers, each importing only from those below it: :mod:`commcomp.utils`
(validators, byte counter, seeds) -> :mod:`commcomp.ops` (kernels) -> :mod:`commcomp.codecs`
-> :mod:`commcomp.collectives` (how payloads cross ranks) -> :mod:`commcomp.perfmodel` ->
:mod:`commcomp.core` (the hook-state contract and registration) -> the algorithms
(:mod:`commcomp.privacy`, :mod:`commcomp.coding`, :mod:`commcomp.decentralized`) ->
:mod:`commcomp.hooks` (the registry) -> :mod:`commcomp.integrations` -> the command line. The DDP
communication hooks register in one line::

    state = commcomp.register(ddp_model, "terngrad")
    state = commcomp.register(ddp_model, "sketch_dp", sketch_ratio=0.01, noise_multiplier=1.0, clip_norm=1.0)
    state = commcomp.register(ddp_model, "gradient_coding", s=1, code="cyclic")

:mod:`commcomp.codecs` holds the stateless codecs (sketches); :mod:`commcomp.privacy` the DP
clipping, noise and accounting; :mod:`commcomp.coding` the gradient codes, the straggler-tolerant
coordinator and the straggler simulator (``commcomp stragglers simulate``);
:mod:`commcomp.decentralized` neighbour-only training with gradient tracking, compression and a
proximal step (DProxSGT / CDProxSGT)::

    gt = commcomp.decentralized.GradientTracking(model, 0.05, topology="ring", compressor="ternary")
"""

import importlib

__version__ = "0.1.0"

# Subpackages load on first use (PEP 562), so ``import commcomp.utils`` loads only the layers
# below it: tests/test_layering.py checks each subpackage imports nothing above its layer.
SUBPACKAGES = ("checkpoint", "codecs", "coding", "collectives", "core", "decentralized", "hooks", "integrations",
               "ops", "perfmodel", "privacy", "utils")


def __getattr__(name):
    if name in SUBPACKAGES:
        return importlib.import_module(f"commcomp.{name}")
    if name == "register":
        return importlib.import_module("commcomp.hooks").register
    raise AttributeError(f"module 'commcomp' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(SUBPACKAGES) + ["register"])


__all__ = ["checkpoint", "codecs", "coding", "collectives", "core", "decentralized", "hooks", "ops", "perfmodel",
           "privacy", "register", "utils", "__version__"]
