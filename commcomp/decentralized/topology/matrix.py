"""A communication topology as a checked mixing matrix: :class:`Topology`.

In DProxSGT / CDProxSGT (Yan et al., ICML 2023) every worker ``i`` mixes its model with its
neighbours' through a doubly stochastic ``W``: ``x_i <- sum_j W[i, j] x_j``. A
:class:`Topology` holds ``W`` (float64), or a list of matrices used round robin (time-varying),
checks that it mixes (nonnegative, rows and columns summing to 1, symmetric unless
``directed=True``, connected, a positive spectral gap ``1 - ||W - J||_2``) and answers who
each node's neighbours are. The graphs and weight rules that build one are in
:mod:`commcomp.decentralized.topology.graphs`.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

#: Rows and columns must sum to 1 within this (absolute) tolerance.
SUM_TOL = 1e-9
#: ``|W[i, j] - W[j, i]|`` allowed for an undirected topology.
SYM_TOL = 1e-9
#: A spectral gap at or below this means the topology does not mix.
GAP_TOL = 1e-12
_MAX_LISTED = 16


def _fmt_nodes(nodes: Sequence[int]) -> str:
    nodes = list(nodes)
    if len(nodes) <= _MAX_LISTED:
        return str(nodes)
    return f"[{', '.join(map(str, nodes[:_MAX_LISTED]))}, ...] ({len(nodes)} nodes)"


def _as_matrix(w, what: str) -> torch.Tensor:
    try:
        t = w.detach().to("cpu", torch.float64) if isinstance(w, torch.Tensor) else \
            torch.as_tensor(np.asarray(w, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"commcomp: {what} must be a numeric [n, n] array, got {type(w).__name__}: {exc}") from exc
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise ValueError(f"commcomp: {what} must be a square [n, n] matrix with n >= 1, "
                         f"got shape {tuple(t.shape)}")
    return t.clone().contiguous()


def _is_matrix_like(w) -> bool:
    if isinstance(w, torch.Tensor):
        return w.dim() == 2
    try:
        return np.ndim(w) == 2
    except ValueError:  # ragged nesting
        return False


def _split_period(weights) -> List:
    """One matrix, a list of matrices, or a 3-D stack -> a list of matrices."""
    if isinstance(weights, torch.Tensor) and weights.dim() == 3:
        return list(weights.unbind(0))
    if isinstance(weights, np.ndarray) and weights.ndim == 3:
        return list(weights)
    if isinstance(weights, (list, tuple)) and weights and all(_is_matrix_like(w) for w in weights):
        return list(weights)
    return [weights]


def _check_n(n, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"commcomp: {what} must be an int >= 1 (the number of nodes), got {n!r}")
    return int(n)


def _components(adj: torch.Tensor) -> List[List[int]]:
    """Connected components of the undirected graph ``adj != 0`` (diagonal ignored), sorted."""
    n = adj.shape[0]
    nbrs = [torch.nonzero(adj[i]).flatten().tolist() for i in range(n)]
    seen, comps = [False] * n, []
    for start in range(n):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in nbrs[i]:
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


class Topology:
    """A (possibly time-varying) doubly stochastic mixing matrix ``W`` over ``n`` nodes.

    Args:
        weights: an ``[n, n]`` array-like (tensor, ndarray, nested lists), or a list of them
            (or a ``[period, n, n]`` stack) for a time-varying topology used round robin: step
            ``t`` mixes with ``weights[t % period]``. Copied and kept in float64.
        name: a label for logs and :meth:`describe` (``"ring"``, ``"torus"``, ...).
        directed: ``False`` (default) requires every ``W`` to be symmetric, so a node receives
            from exactly the nodes it sends to. ``True`` allows doubly stochastic but asymmetric
            ``W`` (e.g. :func:`one_peer_exponential`): receive from :meth:`in_neighbours`, send
            to :meth:`out_neighbours`.

    Raises:
        ValueError: from :meth:`validate` when the weights do not make a mixing topology.

    >>> Topology([[0.5, 0.5], [0.5, 0.5]], name="pair").spectral_gap()
    1.0
    """

    def __init__(self, weights, name: str = "custom", *, directed: bool = False):
        mats = _split_period(weights)
        if not mats:
            raise ValueError("commcomp: weights is an empty list; give one [n, n] matrix or a list of them")
        self._weights = tuple(_as_matrix(w, "weights" if len(mats) == 1 else f"weights[{k}]")
                              for k, w in enumerate(mats))
        self.n = int(self._weights[0].shape[0])
        self.name = str(name)
        self.period = len(self._weights)
        self.directed = bool(directed)
        self._gap: Optional[float] = None
        self.validate()

    # ------------------------------------------------------------------ access
    def _step_index(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"commcomp: step must be an int >= 0, got {step!r}")
        return int(step) % self.period

    def _check_rank(self, rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < self.n:
            raise ValueError(f"commcomp: rank must be an int in [0, {self.n}) for this {self.n}-node "
                             f"topology, got {rank!r}")
        return int(rank)

    def weights(self, step: int = 0) -> torch.Tensor:
        """``W`` used at ``step`` (``[n, n]`` float64); a copy, safe to modify."""
        return self._weights[self._step_index(step)].clone()

    def in_neighbours(self, rank: int, step: int = 0) -> List[Tuple[int, float]]:
        """``(j, W[rank, j])`` for every ``j != rank`` that ``rank`` receives from, sorted by ``j``."""
        rank, w = self._check_rank(rank), self._weights[self._step_index(step)]
        row = w[rank]
        return [(j, float(row[j])) for j in torch.nonzero(row).flatten().tolist() if j != rank]

    def out_neighbours(self, rank: int, step: int = 0) -> List[int]:
        """Every ``j != rank`` that needs ``rank``'s value (``W[j, rank] != 0``), sorted."""
        rank, w = self._check_rank(rank), self._weights[self._step_index(step)]
        return [j for j in torch.nonzero(w[:, rank]).flatten().tolist() if j != rank]

    def self_weight(self, rank: int, step: int = 0) -> float:
        """``W[rank, rank]`` at ``step``: how much of its own value a node keeps."""
        return float(self._weights[self._step_index(step)][self._check_rank(rank), rank])

    def degree(self) -> int:
        """The most in-neighbours any node has at any step (messages received per step, at most)."""
        eye = torch.eye(self.n, dtype=torch.bool)
        return max(int(((w != 0) & ~eye).sum(dim=1).max()) for w in self._weights)

    def spectral_gap(self) -> float:
        """``1 - ||W - J||_2``; for a time-varying topology ``1 - ||W_{p-1}...W_0 - J||_2^(1/p)``.

        In ``(0, 1]`` for a valid topology; 1 means exact averaging in one step (one period).
        """
        if self._gap is None:
            self._gap = self._compute_gap()
        return self._gap

    def _compute_gap(self) -> float:
        prod = torch.eye(self.n, dtype=torch.float64)
        for w in self._weights:
            prod = w @ prod  # x_{t+1} = W_t x_t, so later matrices multiply from the left
        dev = prod - torch.full_like(prod, 1.0 / self.n)
        norm = float(torch.linalg.matrix_norm(dev, ord=2)) ** (1.0 / self.period)
        return min(1.0, max(0.0, 1.0 - norm))

    # -------------------------------------------------------------- validation
    def validate(self, world_size: Optional[int] = None) -> None:
        """Check that this topology mixes, and (if given) that it fits ``world_size`` ranks.

        Raises ``ValueError`` naming the offending entries when an entry is non-finite or
        negative, a row or column does not sum to 1 (within :data:`SUM_TOL`), ``W`` is not
        symmetric while ``directed=False`` (within :data:`SYM_TOL`), the communication graph
        (union over the period) is disconnected, or the spectral gap is <= :data:`GAP_TOL`.
        """
        if world_size is not None:
            world_size = _check_n(world_size, "world_size")
            if world_size != self.n:
                raise ValueError(
                    f"commcomp: the topology has n={self.n} nodes but the process group has {world_size} "
                    f"ranks; build it with n=world_size (e.g. ring(dist.get_world_size())) or run on "
                    f"{self.n} ranks")
        if self._gap is not None:  # weights are private copies: checked once in __init__
            return
        for k, w in enumerate(self._weights):
            where = "W" if self.period == 1 else f"weights[{k}] (used at steps t with t % {self.period} == {k})"
            if w.shape != (self.n, self.n):
                raise ValueError(f"commcomp: every matrix of a time-varying topology must be [{self.n}, {self.n}] "
                                 f"like weights[0], but {where} has shape {tuple(w.shape)}")
            self._check_entries(w, where)
            self._check_sums(w, where)
            if not self.directed:
                self._check_symmetric(w, where)
        self._check_connected()
        gap = self._compute_gap()
        if gap <= GAP_TOL:
            raise ValueError(
                f"commcomp: topology {self.name!r} does not mix: spectral gap 1 - ||W - J||_2 = {gap:.3g} "
                f"<= {GAP_TOL:g}, so the models never reach consensus (typical cause: a bipartite or "
                f"periodic graph with zero self-weights). Give every node a positive self-weight, "
                f"e.g. use (I + W) / 2, or use Metropolis-Hastings weights (from_adjacency)")
        self._gap = gap

    @staticmethod
    def _check_entries(w: torch.Tensor, where: str) -> None:
        bad = torch.nonzero(~torch.isfinite(w)).tolist()
        if bad:
            i, j = bad[0]
            raise ValueError(f"commcomp: {where} has {len(bad)} non-finite entries, e.g. [{i}, {j}] = "
                             f"{float(w[i, j])}; every weight must be a finite number in [0, 1]")
        neg = torch.nonzero(w < 0).tolist()
        if neg:
            i, j = neg[0]
            raise ValueError(f"commcomp: {where} has {len(neg)} negative entries, e.g. [{i}, {j}] = "
                             f"{float(w[i, j]):.6g}; mixing weights must be >= 0 (a negative weight "
                             f"can blow consensus up). Use metropolis_hastings(adj) for valid weights")

    @staticmethod
    def _check_sums(w: torch.Tensor, where: str) -> None:
        for axis, kind in ((1, "rows"), (0, "columns")):
            sums = w.sum(dim=axis)
            bad = torch.nonzero((sums - 1).abs() > SUM_TOL).flatten().tolist()
            if bad:
                shown = ", ".join(f"{i}: {float(sums[i]):.12g}" for i in bad[:_MAX_LISTED])
                raise ValueError(
                    f"commcomp: {where} must be doubly stochastic (every row and column sums to 1 within "
                    f"{SUM_TOL:g}), but {kind} {_fmt_nodes(bad)} sum to {{{shown}}}. Rows that do not sum "
                    f"to 1 shrink or grow the models; columns that do not sum to 1 bias the average. "
                    f"Build W with metropolis_hastings(adj) or uniform_weights(adj)")

    @staticmethod
    def _check_symmetric(w: torch.Tensor, where: str) -> None:
        asym = (w - w.T).abs()
        worst = float(asym.max())
        if worst > SYM_TOL:
            i, j = divmod(int(asym.argmax()), w.shape[0])
            raise ValueError(
                f"commcomp: {where} is not symmetric: the largest asymmetry is |W[{i}, {j}] - W[{j}, {i}]| = "
                f"{worst:.6g} ({float(w[i, j]):.6g} vs {float(w[j, i]):.6g}; tolerance {SYM_TOL:g}). "
                f"Symmetrize it ((W + W.T) / 2 stays doubly stochastic), or pass directed=True if the "
                f"asymmetry is intended")

    def _check_connected(self) -> None:
        union = torch.zeros(self.n, self.n, dtype=torch.bool)
        for w in self._weights:
            union |= (w != 0) | (w.T != 0)
        union.fill_diagonal_(False)
        comps = _components(union)
        if len(comps) > 1:
            rest = sorted(i for c in comps[1:] for i in c)
            listing = "" if len(comps) == 2 else \
                f" (components: {', '.join(_fmt_nodes(c) for c in comps[:_MAX_LISTED])})"
            raise ValueError(
                f"commcomp: topology {self.name!r} is not connected: it splits into {len(comps)} groups"
                f"{listing} and nodes {_fmt_nodes(comps[0])} cannot reach nodes {_fmt_nodes(rest)}, so "
                f"their models never agree. Add edges between the groups (a ring or exponential graph is "
                f"always connected)")

    # ------------------------------------------------------------------ report
    def describe(self) -> dict:
        """A JSON-able summary; ``digest`` (sha256 of ``n``, period and the float64 weights) lets
        ranks or a checkpoint confirm they use the same topology."""
        h = hashlib.sha256(f"n={self.n};period={self.period};".encode())
        for w in self._weights:
            h.update((w + 0.0).numpy().tobytes())  # + 0.0 turns -0.0 into 0.0
        return {"name": self.name, "n": self.n, "period": self.period, "directed": self.directed,
                "degree": self.degree(), "spectral_gap": self.spectral_gap(), "digest": h.hexdigest()}

    def __repr__(self) -> str:
        return (f"Topology(name={self.name!r}, n={self.n}, period={self.period}, directed={self.directed}, "
                f"degree={self.degree()}, spectral_gap={self.spectral_gap():.6g})")


__all__ = ["GAP_TOL", "SUM_TOL", "SYM_TOL", "Topology"]
