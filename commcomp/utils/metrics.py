"""Byte accounting shared by every hook state, the coding aggregator, the tracker and the
mixers: one thread-safe, checkpointable counter, and the bytes of a ring all-reduce."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Dict, Iterable, Iterator

SENT = "bytes_sent"
FP32 = "bytes_sent_fp32_allreduce"


def ring_allreduce_bytes(nbytes: float, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather:
    ``2 (world - 1) / world`` of the buffer), rounded down."""
    return int(2 * (world - 1) * nbytes // world)


class ByteCounter(Mapping):
    """Named byte counters that several threads may add to (DDP's autograd thread sends, the
    executor thread sends the rest), read like a dict and saved in checkpoints.

    Read it like a dict (``dict(counter)`` for a plain one, e.g. for ``json``); it pickles.
    ``counter["bytes_sent"]`` is what this rank put on the wire (payloads and side channels);
    ``counter["bytes_sent_fp32_allreduce"]`` what a ring fp32 all-reduce of the same gradients
    would have sent: their ratio is the compression ratio. Further names (e.g. ``bytes_x``)
    may be declared for a breakdown; ``add`` refuses names not declared, so a typo cannot start
    a counter nobody reads.
    """

    def __init__(self, extra: Iterable[str] = ()):
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = {SENT: 0, FP32: 0}
        self._counts.update({k: 0 for k in extra})

    def add(self, n: int, name: str = SENT) -> None:
        if name not in self._counts:
            raise KeyError(f"commcomp: no byte counter {name!r}; declared: {sorted(self._counts)}")
        with self._lock:
            self._counts[name] += int(n)

    def sent(self, n: int, *also: str) -> None:
        """``n`` bytes went on the wire (counted in ``bytes_sent`` and in each of ``also``)."""
        with self._lock:
            for name in (SENT,) + also:
                if name not in self._counts:
                    raise KeyError(f"commcomp: no byte counter {name!r}; declared: {sorted(self._counts)}")
                self._counts[name] += int(n)

    def fp32_allreduce(self, numel: int, world: int) -> None:
        """What a ring fp32 all-reduce of ``numel`` gradient elements would have sent."""
        self.add(ring_allreduce_bytes(4 * int(numel), world), FP32)

    def ratio(self) -> float:
        """fp32 all-reduce bytes over bytes sent (nan before anything was sent)."""
        with self._lock:
            sent = self._counts[SENT]
            return self._counts[FP32] / sent if sent else float("nan")

    # -- Mapping (read-only view) and checkpoints
    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._counts))

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"ByteCounter({self.state_dict()})"

    def state_dict(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __getstate__(self) -> Dict[str, int]:  # pickle and deepcopy: the counts, not the lock
        return self.state_dict()

    def __setstate__(self, counts: Dict[str, int]) -> None:
        self._lock = threading.Lock()
        self._counts = dict(counts)

    def load_state_dict(self, counts: Dict[str, int]) -> None:
        """Restore saved counts; a counter the save lacks restarts at 0 (names this counter
        does not declare are refused first)."""
        unknown = sorted(set(counts) - set(self._counts))
        if unknown:
            raise ValueError(f"commcomp: saved byte counters {unknown} are not declared here "
                             f"({sorted(self._counts)}); the checkpoint is of another kind of state")
        with self._lock:
            self._counts = {k: int(counts.get(k, 0)) for k in self._counts}


__all__ = ["FP32", "SENT", "ByteCounter", "ring_allreduce_bytes"]
