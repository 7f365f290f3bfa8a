"""Sparsifiers: send ``k`` of the ``d`` elements, zeros elsewhere.

* :class:`TopK` keeps the ``k`` largest ``|x_i|`` (Aji & Heafield 2017; Stich, Cordonnier &
  Jaggi 2018, "Sparsified SGD with Memory"). Payload ``[k float32 values][k int32 indices]``:
  8 bytes per kept element, ``8 * ratio`` bytes per element (``1 / (2 ratio)`` times smaller
  than float32). Biased; deterministically contractive:
  ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``.
* :class:`RandomK` keeps ``k`` indices drawn uniformly without replacement from ``seed``
  (Stich et al. 2018; Wangni et al. 2018). Payload ``[int64 seed][k float32 values]``: the
  receiver regenerates the indices from the seed, so it costs ``4 * ratio`` bytes per
  element plus 8. Without rescaling ``E||C(x) - x||^2 = (1 - k/d) ||x||^2`` (contractive in
  expectation, biased: ``E[C(x)] = (k/d) x``); with ``rescale=True`` the values are
  multiplied by ``d/k``, so ``E[C(x)] = x`` (unbiased) with
  ``E||C(x) - x||^2 = (d/k - 1) ||x||^2`` (not contractive).

``k = max(1, ceil(ratio * d))``, or a fixed ``k``; either is capped at ``d``. Values travel
as float32 whatever the input dtype (float16/bfloat16 convert exactly); NaN/Inf are sent as
they are (no host sync in compress).

Example::

    >>> comp = RandomK(ratio=0.01)                     # 4 bytes per 100 elements, plus 8
    >>> payload, ctx = comp.compress(diff, seed=step)  # fresh seed per message
    >>> approx = RandomK(ratio=0.01).decompress(payload, comp.context(diff))  # any receiver
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from commcomp.utils import validate
from .base import Compressor, Ctx, as_bytes, check_k, check_ratio, view_as

INDEX_LIMIT = 2**31  # TopK's indices are int32
RANDPERM_MAX = 1 << 16  # up to this many elements, or k above d / 4, RandomK uses randperm


class _Sparse(Compressor):
    def __init__(self, ratio: float = 0.01, k: Optional[int] = None):
        self.ratio, self.k = check_ratio(ratio), check_k(k)

    def options(self) -> dict:
        return {"ratio": self.ratio, "k": self.k}

    def kept(self, numel: int) -> int:
        """How many elements a tensor of ``numel`` keeps."""
        k = max(1, math.ceil(self.ratio * numel)) if self.k is None else self.k
        return min(k, numel)


class TopK(_Sparse):
    """Keep the ``k`` largest-magnitude elements (see the module docstring).

    Args:
        ratio: fraction kept, in ``(0, 1]`` (default 0.01); ``k = max(1, ceil(ratio * d))``.
        k: a fixed count instead (capped at ``d``); overrides ``ratio``.
    """

    name = "topk"
    unbiased = False
    contractive = True

    def kept(self, numel: int) -> int:
        if numel >= INDEX_LIMIT:
            raise ValueError(
                f"commcomp: topk sends int32 indices, so tensors must have < 2**31 elements, got "
                f"{numel}; compress it in chunks (e.g. per layer)"
            )
        return super().kept(numel)

    def payload_nbytes(self, ctx: Ctx) -> int:
        return 8 * self.kept(ctx.numel)

    def compress(self, tensor, *, seed: int = 0, segments=None):
        ctx = self.context(tensor, segments=segments)
        flat = tensor.detach().reshape(-1)
        k = self.kept(ctx.numel)
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        values = flat[idx].to(torch.float32)
        return torch.cat([as_bytes(values), as_bytes(idx.to(torch.int32))]), ctx

    def decompress(self, payload, ctx):
        flat = self._check_payload(payload, ctx)
        k = self.kept(ctx.numel)
        values = view_as(flat[: 4 * k], torch.float32)
        idx = view_as(flat[4 * k:], torch.int32).to(torch.int64)
        out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=flat.device)
        out[idx] = values.to(ctx.dtype)
        return out.reshape(ctx.shape)


def random_indices(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct indices in ``[0, numel)``, a uniform random subset, sorted, int64 on CPU.

    A function of ``(numel, k, seed)`` only, computed on CPU with a private generator, so the
    sender and every receiver get the same indices (same torch version). Small tensors or
    large ``k`` take ``randperm(numel)[:k]``; otherwise i.i.d. draws keep their first ``k``
    distinct values (O(k log k) instead of O(d) for a 1% sample of a large tensor).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if numel <= RANDPERM_MAX or 4 * k > numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    # expected draws for k distinct values: d ln(d / (d - k)); 5% and 64 spare make one
    # round almost always enough
    draws = math.ceil(1.05 * numel * math.log(numel / (numel - k))) + 64
    cand = torch.randint(numel, (draws,), generator=gen)
    while True:
        vals, order = torch.sort(cand, stable=True)
        first = torch.ones_like(vals, dtype=torch.bool)
        first[1:] = vals[1:] != vals[:-1]
        pos = order[first].sort().values  # positions of each value's first draw, in draw order
        if pos.numel() >= k:
            return cand[pos[:k]].sort().values
        more = torch.randint(numel, (2 * (k - pos.numel()) + 64,), generator=gen)
        cand = torch.cat([cand, more])


class RandomK(_Sparse):
    """Keep ``k`` elements at indices drawn from ``seed`` (see the module docstring).

    Args:
        ratio: fraction kept, in ``(0, 1]`` (default 0.01); ``k = max(1, ceil(ratio * d))``.
        k: a fixed count instead (capped at ``d``); overrides ``ratio``.
        rescale: multiply the kept values by ``d / k`` (unbiased, not contractive); default
            False (contractive with ``delta = k / d``, biased).

    The indices are generated on CPU (:func:`random_indices`) on both sides and copied to the
    device; ``seed`` must differ between messages that should sample different elements.
    """

    name = "randomk"

    def __init__(self, ratio: float = 0.01, k: Optional[int] = None, rescale: bool = False):
        super().__init__(ratio, k)
        if not isinstance(rescale, bool):
            raise ValueError(f"commcomp: rescale must be True or False, got {rescale!r}")
        self.rescale = rescale
        self.unbiased, self.contractive = rescale, not rescale

    def options(self) -> dict:
        return {**super().options(), "rescale": self.rescale}

    def payload_nbytes(self, ctx: Ctx) -> int:
        return 8 + 4 * self.kept(ctx.numel)

    def compress(self, tensor, *, seed: int = 0, segments=None):
        ctx = self.context(tensor, segments=segments)
        seed = validate.seed(seed)
        flat = tensor.detach().reshape(-1)
        k = self.kept(ctx.numel)
        idx = random_indices(ctx.numel, k, seed).to(flat.device)
        values = flat[idx].to(torch.float32)
        if self.rescale and k:
            values = values * (ctx.numel / k)
        header = as_bytes(torch.tensor([seed], dtype=torch.int64)).to(flat.device)
        return torch.cat([header, as_bytes(values)]), ctx

    def decompress(self, payload, ctx):
        flat = self._check_payload(payload, ctx)
        seed = int(view_as(flat[:8], torch.int64).cpu()[0])  # one host read, needed for the indices
        if seed < 0:
            raise ValueError(f"commcomp: randomk payload carries seed {seed}, outside [0, 2**63): corrupt payload")
        k = self.kept(ctx.numel)
        idx = random_indices(ctx.numel, k, seed).to(flat.device)
        values = view_as(flat[8:], torch.float32)
        out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=flat.device)
        out[idx] = values.to(ctx.dtype)
        return out.reshape(ctx.shape)
