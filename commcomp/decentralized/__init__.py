"""Decentralized training without all-reduce: topologies, mixing, neighbour exchange, and
gradient tracking with compression and a proximal step (DProxSGT / CDProxSGT, Yan et al. 2023).

* :mod:`~commcomp.decentralized.topology`: graphs and doubly stochastic mixing matrices (ring,
  2-D torus, exponential, one-peer exponential, complete, your own), checked and with their
  spectral gap.
* :mod:`~commcomp.decentralized.exchange`: one point-to-point message per neighbour
  (``batch_isend_irecv``; gloo and NCCL).
* :mod:`~commcomp.decentralized.mixing`: exact and compressed-difference mixing.
* :mod:`~commcomp.decentralized.tracking`: the gradient tracker ``y_i``.
* :mod:`~commcomp.decentralized.prox`: proximal operators (l1, l2, group l2, box, your own).
* :class:`GradientTracking`: the whole method around a model (or a DDP model, through the
  ``gradient_tracking`` hook).

>>> gt = commcomp.decentralized.GradientTracking(model, 0.05, topology="ring", compressor="topk:0.01",
...                                              prox=commcomp.decentralized.L1(1e-4))
"""

from .exchange import NeighbourExchange
from .gradient_tracking import GradientTracking
from .hook import GradientTrackingState, gradient_tracking_hook
from .mixing import Mixer
from .prox import L1, Box, FunctionProx, L2Norm, L2Squared, Prox, make_prox, sparsity
from .topology import (TOPOLOGIES, Topology, complete, exponential, from_adjacency, make_topology,
                       metropolis_hastings, one_peer_exponential, ring, torus, uniform_weights)
from .tracking import Tracker

__all__ = ["TOPOLOGIES", "Box", "FunctionProx", "GradientTracking", "GradientTrackingState", "L1", "L2Norm", "L2Squared", "Mixer",
           "NeighbourExchange", "Prox", "Topology", "Tracker", "complete", "exponential", "from_adjacency",
           "make_prox", "make_topology", "metropolis_hastings", "one_peer_exponential", "ring", "sparsity",
           "torus", "uniform_weights", "gradient_tracking_hook"]
