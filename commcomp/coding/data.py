"""Which samples each worker trains on under a gradient code, and the loss whose gradient
is the worker's coded message (Tandon et al., ICML 2017; see :mod:`commcomp.coding.codes`).

Per step, on every rank:

1. :class:`CodedSampler` cuts a global batch of ``n * partition_size`` samples from a
   permutation that every rank draws from the same ``(seed, epoch)``; partition ``j`` is the
   ``j``-th slice of ``partition_size`` samples.
2. Rank ``i`` loads its ``s + 1`` partitions, ``code.partitions(i)``, concatenated in that
   order: ``(s + 1) * partition_size`` samples.
3. The training loop computes one loss per sample and :func:`coded_loss` weighs them with
   :meth:`CodedSampler.sample_weights`: ``B[i, j] / partition_size`` for the samples of
   partition ``j``. ONE backward pass then gives the coded gradient
   ``g~_i = sum_j B[i, j] * grad(mean loss over partition j)``.

**Normalization.** Decoding the survivors ``S`` with ``a = code.decode(S)`` gives
``sum_{i in S} a_i g~_i = sum_j grad(mean loss over partition j)`` -- a SUM over the ``n``
partitions. Divide it by ``n`` to get exactly what uncoded DDP computes when worker ``j``
trains on partition ``j`` with a mean loss (DDP averages over its ``n`` ranks): the mean loss
over the global batch. The identity code (``s = 0``) makes :class:`CodedSampler` that uncoded
baseline: rank ``j`` gets partition ``j`` and the weights ``1 / partition_size``.

**Why the weights are per sample, not per step.** ``B``'s row and the order of a rank's
partitions do not change between steps; only which samples fill them does. So
:meth:`CodedSampler.sample_weights` is one constant tensor per rank, and it stays right with
``DataLoader`` workers that prefetch batches ahead of the training loop.

Example::

    >>> code = make_code("cyclic", n=world, s=1)
    >>> sampler = CodedSampler(len(dataset), code, rank, partition_size=32, seed=0)
    >>> loader = DataLoader(dataset, batch_sampler=sampler)
    >>> weights = sampler.sample_weights(device=device)
    >>> for epoch in range(epochs):
    ...     sampler.set_epoch(epoch)
    ...     for x, y in loader:
    ...         losses = F.cross_entropy(model(x), y, reduction="none")
    ...         coded_loss(losses, weights).backward()   # p.grad holds g~_rank
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from commcomp.coding.codes import GradientCode, _as_int

__all__ = ["CodedSampler", "coded_loss", "uncoded_partition", "epoch_permutation"]


def epoch_permutation(dataset_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """The order of the dataset in ``epoch``: a permutation drawn from a ``torch.Generator``
    seeded with ``seed + epoch`` (as ``DistributedSampler`` does; the global RNG is untouched),
    identical on every rank; ``arange`` without ``shuffle``."""
    if not shuffle:
        return torch.arange(dataset_size)
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(dataset_size, generator=gen)


def _check_sizes(dataset_size, n: int, partition_size) -> tuple:
    dataset_size = _as_int(dataset_size, "dataset_size")
    partition_size = _as_int(partition_size, "partition_size")
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1 samples, got {partition_size}")
    if dataset_size < n * partition_size:
        raise ValueError(
            f"a step needs a global batch of n * partition_size = {n} * {partition_size} = "
            f"{n * partition_size} samples, but the dataset has {dataset_size}; use a smaller "
            "partition_size"
        )
    return dataset_size, partition_size


def _check_step(step, steps: int) -> int:
    step = _as_int(step, "step")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in 0..{steps - 1} ({steps} steps per epoch), got {step}")
    return step


def uncoded_partition(dataset_size: int, n: int, partition_size: int, step: int, partition: int,
                      epoch: int = 0, seed: int = 0, shuffle: bool = True) -> List[int]:
    """The dataset indices of ``partition`` (``0..n-1``) at ``step`` of ``epoch``: the same
    samples :class:`CodedSampler` puts in that partition. Feed them to a model with a mean
    loss to get the uncoded per-partition gradient (what uncoded DDP's rank ``partition``
    computes)."""
    n = _as_int(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1 workers, got {n}")
    dataset_size, partition_size = _check_sizes(dataset_size, n, partition_size)
    step = _check_step(step, dataset_size // (n * partition_size))
    partition = _as_int(partition, "partition")
    if not 0 <= partition < n:
        raise ValueError(f"partition must be in 0..{n - 1}, got {partition}")
    start = (step * n + partition) * partition_size
    return epoch_permutation(dataset_size, epoch, seed, shuffle)[start:start + partition_size].tolist()


class CodedSampler(Sampler[List[int]]):
    """Batch sampler for gradient coding: rank ``rank`` gets its ``s + 1`` partitions of each
    global batch. Use it as ``DataLoader(dataset, batch_sampler=sampler)``.

    Args:
        dataset_size: number of samples in the dataset.
        code: the :class:`~commcomp.coding.codes.GradientCode` all ranks use; ``code.n`` is the
            number of workers and of partitions per step.
        rank: this worker, ``0..code.n-1``.
        partition_size: samples per partition. A step consumes ``n * partition_size`` samples
            of the dataset (the incomplete last global batch is dropped) and this rank loads
            ``(s + 1) * partition_size`` of them -- ``s + 1`` times an uncoded worker's batch.
        seed: seeds the per-epoch permutation; must be the same on every rank.
        shuffle: permute the dataset every epoch (``False``: steps take it in order).

    Call :meth:`set_epoch` at the start of each epoch (like ``DistributedSampler``), on
    every rank, or every epoch repeats the same order.
    """

    def __init__(self, dataset_size: int, code: GradientCode, rank: int, partition_size: int,
                 seed: int = 0, shuffle: bool = True):
        if not isinstance(code, GradientCode):
            raise ValueError(f"code must be a GradientCode (see commcomp.coding.codes.make_code), got {code!r}")
        self.code = code
        self.rank = _as_int(rank, "rank")
        if not 0 <= self.rank < code.n:
            raise ValueError(f"rank must be in 0..{code.n - 1} for {code!r}, got {self.rank}")
        self.dataset_size, self.partition_size = _check_sizes(dataset_size, code.n, partition_size)
        self.seed = _as_int(seed, "seed")
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._perm: Optional[torch.Tensor] = None
        self._weights = torch.repeat_interleave(code.weights(self.rank) / self.partition_size,
                                                self.partition_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (all ranks must pass the same ``epoch``)."""
        self.epoch = _as_int(epoch, "epoch")
        self._perm = None

    def __len__(self) -> int:
        """Steps per epoch: complete global batches of ``n * partition_size`` samples."""
        return self.dataset_size // (self.code.n * self.partition_size)

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            self._perm = epoch_permutation(self.dataset_size, self.epoch, self.seed, self.shuffle)
        return self._perm

    def _slice(self, step: int, partition: int) -> torch.Tensor:
        start = (step * self.code.n + partition) * self.partition_size
        return self._permutation()[start:start + self.partition_size]

    @property
    def partitions(self) -> List[int]:
        """The partitions this rank holds, in the order its batches concatenate them."""
        return self.code.partitions(self.rank)

    def partition(self, step: int, j: int) -> List[int]:
        """Indices of partition ``j`` at ``step`` of the current epoch (any ``j``, not only
        this rank's: the uncoded baseline on the same data)."""
        step = _check_step(step, len(self))
        j = _as_int(j, "partition")
        if not 0 <= j < self.code.n:
            raise ValueError(f"partition must be in 0..{self.code.n - 1}, got {j}")
        return self._slice(step, j).tolist()

    def global_batch(self, step: int) -> List[int]:
        """All ``n * partition_size`` indices of ``step``, partition 0 first."""
        step = _check_step(step, len(self))
        size = self.code.n * self.partition_size
        return self._permutation()[step * size:(step + 1) * size].tolist()

    def batch(self, step: int) -> List[int]:
        """This rank's indices at ``step``: its partitions, concatenated in :attr:`partitions` order."""
        step = _check_step(step, len(self))
        return torch.cat([self._slice(step, j) for j in self.partitions]).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(len(self)):
            yield self.batch(step)

    def sample_weights(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Per-sample loss weights for :func:`coded_loss`, aligned with every batch this sampler
        yields: ``B[rank, j] / partition_size`` for each sample of partition ``j``. The same for
        every step (see the module docstring); length ``(s + 1) * partition_size``."""
        return self._weights.to(dtype=dtype, device=device, copy=True)

    def __repr__(self) -> str:
        return (f"CodedSampler({self.code!r}, rank={self.rank}, partition_size={self.partition_size}, "
                f"steps={len(self)}, epoch={self.epoch})")


def coded_loss(per_sample_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * per_sample_losses)``: its gradient is this rank's coded gradient
    ``sum_j B[rank, j] * grad(mean loss over partition j)`` when ``weights`` come from
    :meth:`CodedSampler.sample_weights`.

    ``per_sample_losses``: 1-D, one loss per sample of the batch, in the batch's order (e.g.
    ``reduction="none"``; reduce per-token losses to one per sample first). ``weights`` is
    moved to the losses' device and dtype.
    """
    if per_sample_losses.dim() != 1 or weights.dim() != 1 or per_sample_losses.shape != weights.shape:
        raise ValueError(
            f"coded_loss needs one loss per sample, matching the weights: got losses of shape "
            f"{tuple(per_sample_losses.shape)} and weights of shape {tuple(weights.shape)}; compute "
            "the loss with reduction='none' (and average any per-token dimension per sample)"
        )
    return (weights.to(device=per_sample_losses.device, dtype=per_sample_losses.dtype) * per_sample_losses).sum()
