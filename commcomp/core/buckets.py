"""Reading and writing the flat gradient buffers hooks and step functions work on."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def bucket_lengths(bucket: dist.GradBucket) -> List[int]:
    """Per-parameter segment lengths of a DDP bucket's flat buffer (one segment if the
    layout cannot be read off the bucket)."""
    lengths = [g.numel() for g in bucket.gradients()]
    if sum(lengths) != bucket.buffer().numel():
        return [bucket.buffer().numel()]
    return lengths


def write_flat_grads_(params, flat: torch.Tensor) -> None:
    """Copy consecutive slices of `flat` into each ``p.grad`` (the inverse of concatenating
    the flattened gradients in the same order): the step functions' unflatten."""
    pos = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[pos:pos + n].view_as(p.grad))
        pos += n


__all__ = ["bucket_lengths", "write_flat_grads_"]
