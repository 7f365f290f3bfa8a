"""Gradient coding against stragglers: codes, coded data assignment, the straggler-tolerant
coordinator, sequential gradient coding, straggler models and a simulator.

* :mod:`~commcomp.coding.codes` -- cyclic and fractional repetition codes, decoding vectors
  (Tandon et al. 2017);
* :mod:`~commcomp.coding.data` -- which partitions each rank computes, and the coded loss (one
  backward gives the coded gradient);
* :mod:`~commcomp.coding.coordinator` -- first-(n - s) aggregation (the paper's master), used
  by the ``"gradient_coding"`` DDP hook;
* :mod:`~commcomp.coding.transport` -- how coded gradients travel: point-to-point messages over
  torch.distributed or MPI, their wire format, and the per-peer threads;
* :mod:`~commcomp.coding.sequential` -- SR-SGC and M-SGC (Krishnan et al. 2023), with their
  per-round task schedules in :mod:`~commcomp.coding.schedules`;
* :mod:`~commcomp.coding.master` -- the round rule of sequential coding (the authors' final
  simulator's), shared by the simulator and the live engine;
* :mod:`~commcomp.coding.stragglers`, :mod:`~commcomp.coding.simulate` -- straggler models
  (incl. replay of real AWS Lambda traces) and the round-level simulator behind
  ``commcomp stragglers simulate``;
* :mod:`~commcomp.coding.jobs`, :mod:`~commcomp.coding.engine`, :mod:`~commcomp.coding.live` --
  the live round engine behind ``commcomp stragglers run``: concurrent models trained on worker
  processes with injected stragglers, a dedicated coordinator, every job decoded exactly.
"""

from commcomp.coding.codes import (
    CODES,
    GradientCode,
    cyclic_repetition_code,
    decode_vector,
    fractional_repetition_code,
    make_code,
)
from commcomp.coding.coordinator import CodedAggregator
from commcomp.coding.transport import MPITransport, TorchTransport
from commcomp.coding.data import CodedSampler, coded_loss, uncoded_partition
from commcomp.coding import sequential, simulate, stragglers
from commcomp.coding.sequential import GC, MSGC, SRSGC, make_scheme
from commcomp.coding.simulate import Result, search
from commcomp.coding.master import Master
from commcomp.coding.engine import ConcurrentModels, RoundEngine

__all__ = ["CODES", "GC", "MSGC", "SRSGC", "CodedAggregator", "ConcurrentModels", "Master", "RoundEngine", "CodedSampler", "GradientCode", "MPITransport",
           "Result", "TorchTransport", "make_scheme", "search", "sequential", "simulate", "stragglers",
           "coded_loss", "cyclic_repetition_code", "decode_vector", "fractional_repetition_code", "make_code",
           "uncoded_partition"]
