"""What a job of sequential gradient coding is made of: its samples, each task's weighted share
of them, and how the master decodes a job from the tasks it received.

Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for Straggler Mitigation", ICLR 2023.
A **job** is one gradient: the sum of a loss over a minibatch of ``N`` samples (divided by ``N``
after decoding, so it is the gradient of the mean loss). Each scheme cuts the minibatch its own
way (:class:`JobLayout`):

- uncoded, GC, SR-SGC (Tandon et al. 2017): ``n`` partitions of ``unit`` samples; worker ``i``'s
  task is the coded combination ``sum_j B[i, j] g_j`` (uncoded: ``B = I``), and SR-SGC's repeat
  is the same task again. Any ``n - s`` distinct workers decode the sum ``sum_j g_j``.
- M-SGC: a part ``D1`` of ``n (W - 1)`` chunks of ``(lambd + 1) unit`` samples, worker ``i``
  computing its own ``W - 1`` chunks uncoded, one per D1 minitask; and a part ``D2`` of ``B``
  groups of ``n`` partitions of ``unit`` samples, each group coded with an ``(n, n - lambd)``
  gradient code. The chunk sizes make every minitask the same work (``(lambd + 1) unit``
  samples), which is what gives M-SGC its load (:attr:`~commcomp.coding.sequential.MSGC.load`).
  A job decodes from all D1 chunks plus any ``n - lambd`` results of each D2 group.

Codes are fractional repetition (exact 0/1 coefficients) where ``s + 1`` divides ``n``, cyclic
otherwise; decoding sums in float64.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .codes import make_code
from .schedules import CODED, D1, D2, IDLE, REPEAT
from .sequential import make_scheme

__all__ = ["JobLayout", "code_for"]


def code_for(n: int, s: int, seed: int = 0):
    """The gradient code the engine uses for ``s`` stragglers of ``n``: fractional repetition
    where ``(s + 1) | n`` (0/1 coefficients, exact decoding), else cyclic repetition."""
    return make_code("fractional" if n % (s + 1) == 0 else "cyclic", n, s, seed)


class JobLayout:
    """How one job's ``N`` samples are shared among ``n`` workers' tasks for ``scheme``.

    ``unit``: samples per partition (the smallest share). Attributes: ``N`` (samples per job),
    ``scheme`` (the :mod:`~commcomp.coding.sequential` object), ``code`` (GC / SR-SGC / uncoded)
    or ``d2_code`` (M-SGC's per-group code; None when ``lambd = n``: no D2 part).
    """

    def __init__(self, scheme: str, n: int, params: dict, unit: int = 1, seed: int = 0):
        self.scheme = make_scheme(scheme, n, **(params or {}))
        if self.scheme.name == "ignore":
            raise ValueError("ignore drops the stragglers' gradients, so its jobs cannot be decoded exactly; "
                             "use uncoded, gc, srsgc or msgc")
        if int(unit) != unit or unit < 1:
            raise ValueError(f"unit={unit!r} (samples per partition) must be an integer >= 1")
        self.n, self.unit = n, int(unit)
        name = self.scheme.name
        self.code = self.d2_code = None
        if name == "msgc":
            B, W, lam = self.scheme.B, self.scheme.W, self.scheme.lambd
            self.chunk = (lam + 1) * self.unit if lam < n else self.unit
            self.d1_size = n * (W - 1) * self.chunk
            self.d2_code = code_for(n, lam, seed) if lam < n else None
            self.N = self.d1_size + (B * n * self.unit if lam < n else 0)
        else:
            s = self.scheme.s if name in ("gc", "srsgc") else 0
            self.code = code_for(n, s, seed)
            self.N = n * self.unit

    def task(self, kind: int, worker: int, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(positions, weights)``: which of the job's samples (0..N-1) the task sums, with which
        float64 weights. ``index``: M-SGC's D1 chunk (0..W-2) or D2 group (0..B-1); else 0."""
        if kind == IDLE:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        if kind in (CODED, REPEAT):
            return self._coded(self.code, worker, 0)
        if kind == D1:
            start = (worker * (self.scheme.W - 1) + index) * self.chunk
            return torch.arange(start, start + self.chunk), torch.ones(self.chunk, dtype=torch.float64)
        if kind == D2:
            if self.d2_code is None:
                return self.task(IDLE, worker, 0)
            return self._coded(self.d2_code, worker, self.d1_size + index * self.n * self.unit)
        raise ValueError(f"unknown task kind {kind}")

    def _coded(self, code, worker: int, base: int):
        row = code.B[worker].to(torch.float64)
        parts = [j for j in range(self.n) if row[j] != 0]
        pos = torch.cat([torch.arange(base + j * self.unit, base + (j + 1) * self.unit) for j in parts])
        w = torch.cat([row[j].repeat(self.unit) for j in parts])
        return pos, w

    def decode(self, results: Dict[Tuple[int, int, int], torch.Tensor]) -> torch.Tensor:
        """The job's gradient sum (float64) from ``results[(kind, worker, index)] = vector``;
        raises ``ValueError`` naming what is missing when it cannot."""
        if self.scheme.name == "msgc":
            return self._decode_msgc(results)
        got = {w: v for (k, w, _i), v in results.items() if k in (CODED, REPEAT)}
        return self._combine(self.code, got, "")

    def _combine(self, code, got: Dict[int, torch.Tensor], what: str) -> torch.Tensor:
        need = self.n - code.s
        if len(got) < need:
            raise ValueError(f"{what}only {len(got)} of the {need} coded results needed (workers {sorted(got)})")
        a = code.decode(sorted(got))
        acc = None
        for w in sorted(got):
            if float(a[w]) == 0.0:
                continue
            term = got[w].to(torch.float64) * float(a[w])
            acc = term if acc is None else acc.add_(term)
        return acc

    def _decode_msgc(self, results) -> torch.Tensor:
        W, B = self.scheme.W, self.scheme.B
        acc = None
        for w in range(self.n):
            for c in range(W - 1):
                v = results.get((D1, w, c))
                if v is None:
                    raise ValueError(f"worker {w}'s D1 chunk {c} never arrived (M-SGC's D1 part is uncoded: "
                                     "a worker that straggles for longer than B rounds cannot be decoded around)")
                acc = v.to(torch.float64).clone() if acc is None else acc.add_(v.to(torch.float64))
        if self.d2_code is not None:
            for g in range(B):
                got = {w: v for (k, w, i), v in results.items() if k == D2 and i == g}
                acc.add_(self._combine(self.d2_code, got, f"D2 group {g}: "))
        return acc

    def kinds_needed(self) -> List[int]:
        """The task kinds this layout uses (for messages and checks)."""
        return [D1, D2] if self.scheme.name == "msgc" else [CODED, REPEAT]
