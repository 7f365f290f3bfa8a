"""Work buffers that live across steps.

A bucket's exchange needs the same temporaries at every step (packed payloads, receive
buffers, chunk sums). Allocating them afresh costs more than using them: a fresh
multi-megabyte CPU tensor comes from ``mmap`` and is paid for again in page faults on first
touch (measured on the development machine: 22 ms to clone 45 MB against 4 ms to copy into a
buffer that exists; docs/benchmarks.md, "TernGrad's hot path"). A :class:`BufferPool` hands
out the same tensor for the same name, size, dtype and device, step after step.

One pool per hook state. A buffer may be reused once the job that used it has finished: DDP
calls a bucket's hook of step t + 1 only after every future of step t has completed.
:meth:`BufferPool.sweep` drops the buffers not asked for since the last sweep (e.g. those of
buckets that DDP's rebuild after the first step made obsolete).
"""

from __future__ import annotations

import threading
from typing import Dict, Hashable, Optional, Tuple

import torch

_Key = Tuple[Hashable, str]


class BufferPool:
    """Named tensors reused across calls (see the module docstring).

    >>> pool = BufferPool()
    >>> a = pool.get((0, "packed"), 100, torch.uint8)
    >>> a.data_ptr() == pool.get((0, "packed"), 100, torch.uint8).data_ptr()
    True
    """

    def __init__(self) -> None:
        self._buffers: Dict[_Key, torch.Tensor] = {}
        self._used: set = set()
        self._lock = threading.Lock()  # the hook (autograd thread) and its job may both ask

    def get(self, key: Hashable, numel: int, dtype: torch.dtype, device=None, zero: bool = False) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements kept under ``key`` (new when the size, dtype or
        device differs from last time); zero-filled if ``zero``, otherwise holding old data."""
        device = _device(device)
        with self._lock:
            t = self._buffers.get(key)
            if t is None or t.numel() != numel or t.dtype != dtype or t.device != device:
                t = torch.empty(numel, dtype=dtype, device=device)
                self._buffers[key] = t
            self._used.add(key)
        if zero:
            t.zero_()
        return t

    def sweep(self) -> None:
        """Drop every buffer not asked for since the last sweep."""
        with self._lock:
            self._buffers = {k: t for k, t in self._buffers.items() if k in self._used}
            self._used = set()

    def scope(self, prefix: Hashable) -> "Scratch":
        """The buffers whose keys start with ``prefix`` (e.g. one bucket's)."""
        return Scratch(self, prefix)

    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._used.clear()

    def __len__(self) -> int:
        return len(self._buffers)


def _device(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:  # "cuda" and cuda:0 are one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Scratch:
    """A pool's buffers under one prefix; ``Scratch(None)`` allocates afresh on every call."""

    __slots__ = ("pool", "prefix")

    def __init__(self, pool: Optional[BufferPool], prefix: Hashable = None):
        self.pool, self.prefix = pool, prefix

    def child(self, key: Hashable) -> "Scratch":
        """The buffers of a part (e.g. one piece of a pipelined bucket)."""
        return Scratch(self.pool, (self.prefix, key))

    def get(self, name: str, numel: int, dtype: torch.dtype, device=None, zero: bool = False) -> torch.Tensor:
        if self.pool is None:
            maker = torch.zeros if zero else torch.empty
            return maker(numel, dtype=dtype, device=device)
        return self.pool.get((self.prefix, name), numel, dtype, device, zero)


FRESH = Scratch(None)  # no reuse: every buffer is new

__all__ = ["BufferPool", "FRESH", "Scratch"]
