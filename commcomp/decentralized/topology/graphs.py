"""Graphs and weight rules that build a :class:`~commcomp.decentralized.topology.matrix.Topology`:
ring, 2-D torus, exponential, one-peer exponential, complete, any undirected graph
(:func:`from_adjacency`), with Metropolis-Hastings or max-degree ``"uniform"`` weights, and
:func:`make_topology` for a name or a matrix.
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch

from .matrix import Topology, _as_matrix, _check_n

WEIGHT_RULES = ("metropolis", "uniform")


# ------------------------------------------------------------------ weight rules
def _check_adjacency(adj) -> torch.Tensor:
    a = _as_matrix(adj, "adjacency")
    if not bool(((a == 0) | (a == 1)).all()):
        i, j = torch.nonzero((a != 0) & (a != 1))[0].tolist()
        raise ValueError(f"commcomp: an adjacency matrix holds only 0 and 1, but [{i}, {j}] = {float(a[i, j])}; "
                         f"pass weighted matrices to Topology(W) instead")
    if bool(a.diagonal().any()):
        i = int(torch.nonzero(a.diagonal())[0])
        raise ValueError(f"commcomp: an adjacency matrix has a zero diagonal (self-weights are added by the "
                         f"weight rule), but [{i}, {i}] = 1; set the diagonal to 0")
    if not torch.equal(a, a.T):
        i, j = torch.nonzero(a != a.T)[0].tolist()
        raise ValueError(f"commcomp: an adjacency matrix must be symmetric (undirected edges), but "
                         f"[{i}, {j}] = {int(a[i, j])} and [{j}, {i}] = {int(a[j, i])}; use a | a.T")
    return a


def metropolis_hastings(adj) -> torch.Tensor:
    """Metropolis-Hastings weights on an undirected graph: ``W_ij = 1 / (1 + max(d_i, d_j))`` on
    edges, ``W_ii = 1 - sum_j W_ij``. Symmetric and doubly stochastic on any graph, and only needs
    each node's and its neighbours' degrees (Xiao & Boyd 2004).

    Args:
        adj: symmetric 0/1 ``[n, n]`` adjacency with a zero diagonal.
    """
    a = _check_adjacency(adj)
    deg = a.sum(dim=1)
    w = a / (1.0 + torch.maximum(deg[:, None], deg[None, :]))
    w.diagonal().copy_(1.0 - w.sum(dim=1))
    return w


def uniform_weights(adj) -> torch.Tensor:
    """Max-degree weights: ``W_ij = 1 / (d_max + 1)`` on edges, ``W_ii = 1 - d_i / (d_max + 1)``.

    Symmetric and doubly stochastic on any graph; on a regular graph every nonzero entry is
    exactly ``1 / (d + 1)`` (e.g. :func:`complete` gives ``W = J``).
    """
    a = _check_adjacency(adj)
    deg = a.sum(dim=1)
    denom = float(deg.max()) + 1.0
    w = a / denom
    w.diagonal().copy_((denom - deg) / denom)  # integer numerator: exact on regular graphs
    return w


_RULES = {"metropolis": metropolis_hastings, "uniform": uniform_weights}


def _rule(weights: str):
    if weights not in _RULES:
        raise ValueError(f"commcomp: weights must be one of {WEIGHT_RULES} (the rule that turns a graph into "
                         f"mixing weights), got {weights!r}")
    return _RULES[weights]


def from_adjacency(adj, weights: str = "metropolis", name: str = "custom") -> Topology:
    """A static undirected topology from a symmetric 0/1 adjacency matrix (zero diagonal).

    Args:
        adj: ``[n, n]`` array-like; ``adj[i, j] = 1`` when ``i`` and ``j`` exchange models.
        weights: ``"metropolis"`` (default, :func:`metropolis_hastings`) or ``"uniform"``
            (:func:`uniform_weights`).
        name: label for :meth:`Topology.describe`.
    """
    return Topology(_rule(weights)(adj), name=name)


def _graph(n: int, edges) -> torch.Tensor:
    adj = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        if i != j:  # wrap-arounds on tiny graphs would add self-loops; the rule adds self-weights
            adj[i, j] = adj[j, i] = 1.0
    return adj


def ring(n: int, weights: str = "metropolis") -> Topology:
    """Each node talks to ``i - 1`` and ``i + 1`` (mod ``n``). Cheapest, slowest to mix:
    gap ``~ 4 pi^2 / (3 n^2)`` with Metropolis weights. ``n = 1`` is trivial, ``n = 2`` one edge."""
    n = _check_n(n)
    return Topology(_rule(weights)(_graph(n, ((i, (i + 1) % n) for i in range(n)))), name="ring")


def torus(n: int, rows: Optional[int] = None, weights: str = "metropolis") -> Topology:
    """2-D torus of ``rows x (n // rows)`` nodes; node ``r * cols + c`` talks to its 4 grid
    neighbours with wrap-around (fewer where ``rows`` or ``cols`` is 1 or 2). ``rows`` defaults to
    the largest divisor of ``n`` that is <= ``sqrt(n)`` (a prime ``n`` gives a ring)."""
    n = _check_n(n)
    if rows is None:
        rows = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1 or n % rows:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"commcomp: torus rows must divide n={n} (one of {divisors}), got {rows!r}; "
                         f"or leave rows=None for the squarest grid")
    rows, cols = int(rows), n // int(rows)
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges += [(i, ((r + 1) % rows) * cols + c), (i, r * cols + (c + 1) % cols)]
    return Topology(_rule(weights)(_graph(n, edges)), name="torus")


def exponential(n: int, weights: str = "metropolis") -> Topology:
    """Static exponential graph: ``i ~ i +- 2^k (mod n)`` for ``k = 0 .. ceil(log2 n) - 1``.
    Degree ``O(log n)``, gap bounded away from 0 as ``n`` grows (Ying et al., NeurIPS 2021)."""
    n = _check_n(n)
    edges = [(i, (i + (1 << k)) % n) for i in range(n) for k in range((n - 1).bit_length())]
    return Topology(_rule(weights)(_graph(n, edges)), name="exponential")


def one_peer_exponential(n: int) -> Topology:
    """Time-varying one-peer exponential graph (Ying et al., NeurIPS 2021): at step ``t`` with
    ``k = t mod ceil(log2 n)``, ``x_i <- (x_i + x_{(i + 2^k) mod n}) / 2``, i.e.
    ``W_t = (I + P_k) / 2``. One message per node per step; directed (receive from
    ``i + 2^k``, send to ``i - 2^k``). For ``n`` a power of 2 one period averages exactly
    (the product is ``J``, gap 1)."""
    n = _check_n(n)
    period = max(1, (n - 1).bit_length())
    mats = []
    for k in range(period):
        w = torch.eye(n, dtype=torch.float64)
        if n > 1:
            w *= 0.5
            idx = torch.arange(n)
            w[idx, (idx + (1 << k)) % n] = 0.5
        mats.append(w)
    return Topology(mats, name="one_peer_exponential", directed=True)


def complete(n: int, weights: str = "metropolis") -> Topology:
    """Everyone talks to everyone: ``W = J`` (exact average, gap 1) with ``"uniform"``; the same
    up to rounding with ``"metropolis"``. Costs ``n - 1`` messages per node per step."""
    n = _check_n(n)
    return Topology(_rule(weights)(_graph(n, ((i, j) for i in range(n) for j in range(i + 1, n)))),
                    name="complete")


_NAMED = {"ring": ring, "torus": torus, "exponential": exponential,
          "one_peer_exponential": one_peer_exponential, "complete": complete}
TOPOLOGIES = tuple(_NAMED)


def make_topology(spec, n: int) -> Topology:
    """The topology for ``n`` ranks from ``spec``: a :class:`Topology` (checked against ``n``),
    a name in :data:`TOPOLOGIES` (default weights), or an ``[n, n]`` weight matrix (tensor,
    ndarray, nested lists; a list of them for a time-varying topology)."""
    n = _check_n(n)
    if isinstance(spec, Topology):
        spec.validate(world_size=n)
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in _NAMED:
            raise ValueError(f"commcomp: unknown topology {spec!r}; use one of {TOPOLOGIES}, a Topology, "
                             f"or an [n, n] doubly stochastic weight matrix")
        return _NAMED[key](n)
    if isinstance(spec, (torch.Tensor, np.ndarray, list, tuple)):
        topo = Topology(spec)
        topo.validate(world_size=n)
        return topo
    raise ValueError(f"commcomp: topology must be a Topology, one of {TOPOLOGIES}, or an [n, n] weight "
                     f"matrix (tensor, ndarray or nested lists), got {type(spec).__name__}: {spec!r}")


__all__ = ["TOPOLOGIES", "WEIGHT_RULES", "complete", "exponential", "from_adjacency", "make_topology",
           "metropolis_hastings", "one_peer_exponential", "ring", "torus", "uniform_weights"]
