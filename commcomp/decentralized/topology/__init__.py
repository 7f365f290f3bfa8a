"""Communication topologies for decentralized training: who talks to whom, with which weight.

In DProxSGT / CDProxSGT (Yan et al., ICML 2023, "Compressed Decentralized Proximal Stochastic
Gradient Method for Nonconvex Composite Problems with Heterogeneous Data") every worker ``i``
keeps its own model ``x_i`` and, once per step,

1. mixes with its neighbours through a doubly stochastic matrix ``W``:
   ``x_i <- sum_j W[i, j] x_j`` (row ``i`` of ``W`` is node ``i``'s new value);
2. takes a proximal step for the regularizer (see :mod:`commcomp.decentralized.prox`).

A :class:`Topology` holds ``W`` (float64), or a list of matrices used round robin for a
time-varying topology (step ``t`` uses ``weights[t % period]``), and checks at construction that
it mixes: nonnegative, rows and columns summing to 1, symmetric unless ``directed=True``, a
connected communication graph, and a positive spectral gap ``1 - ||W - J||_2`` (``J = 11^T / n``).
The gap sets how fast the models agree: consensus error shrinks like ``(1 - gap)^t``.

Constructors: :func:`ring`, :func:`torus`, :func:`exponential`, :func:`complete` (static, with
Metropolis-Hastings or max-degree ``"uniform"`` weights), :func:`one_peer_exponential`
(time-varying, one peer per step) and :func:`from_adjacency` for any undirected graph;
:func:`make_topology` turns a name or a matrix into a topology for ``n`` ranks.

>>> topo = ring(8)
>>> topo.in_neighbours(0)
[(1, 0.3333333333333333), (7, 0.3333333333333333)]
>>> round(topo.spectral_gap(), 4)
0.1953

The package: :mod:`.matrix` (:class:`Topology`, the checks) and :mod:`.graphs` (the
constructors and weight rules).
"""

from .graphs import (
    TOPOLOGIES,
    WEIGHT_RULES,
    complete,
    exponential,
    from_adjacency,
    make_topology,
    metropolis_hastings,
    one_peer_exponential,
    ring,
    torus,
    uniform_weights,
)
from .matrix import GAP_TOL, SUM_TOL, SYM_TOL, Topology

__all__ = [
    "Topology", "metropolis_hastings", "uniform_weights", "ring", "torus", "exponential",
    "one_peer_exponential", "complete", "from_adjacency", "make_topology", "TOPOLOGIES",
    "WEIGHT_RULES", "SUM_TOL", "SYM_TOL", "GAP_TOL",
]
