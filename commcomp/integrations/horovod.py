"""commcomp's ternary codes and linear sketches as Horovod compressors.

    import horovod.torch as hvd
    from commcomp.integrations.horovod import Compression

    hvd.init()
    comp = Compression.sketch(ratio=0.1)                      # or Compression.ternary()
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
    avg = hvd.allreduce(grad, compression=Compression.ternary())
    comp.metrics      # {"bytes_sent": ..., "bytes_sent_fp32_allreduce": ...}

**How Horovod uses a compressor** (``horovod/torch/mpi_ops.py`` ``allreduce``, and
``optimizer.py`` for ``DistributedOptimizer``): every rank calls ``compress(tensor) ->
(compressed, ctx)``, Horovod **sums** (``op=hvd.Sum``) or **averages** (``hvd.Average``, the
default) the ``compressed`` tensors elementwise, and every rank calls ``decompress(result,
ctx)`` with its own ``ctx``. Horovod calls the two as ``compression.compress(t)``, so a class
with static methods (Horovod's own ``Compression.fp16``) and an object with state (these) both
work. A compressor is correct only if ``decompress`` of the sum is the sum of what each rank
meant -- ``decompress`` must be linear, with the same ``ctx`` on every rank:

1. **Ternary** (TernGrad, Wen et al. 2017): each rank takes ``s_r = max |x_r|``
   (or ``min(max |x_r|, clip_factor * std)``), and one small extra MAX all-reduce per tensor (32
   bytes: scale, NaN flag, size check) gives every rank the shared ``s = max_r s_r``. Each rank draws
   stochastic ternary codes ``k_r`` (``sign(x)`` with probability ``|x| / s``, else 0;
   :func:`commcomp.ops.ternarize_int8`, a Philox stream per rank and call); ``s * sum_r k_r``
   is an unbiased estimate of ``sum_r x_r``. Horovod's torch binding all-reduces only int32,
   int64, float16, float32 and float64 (no int8), averages integers by truncating, and float16
   sums are exact only up to 2048. So the codes are **packed**: ``m`` codes per float32 as the
   balanced base-``B`` number ``sum_j k_j B^j`` with ``B = 2 n + 1`` (``n`` ranks). Packing is
   linear over the integers, so the float32 sum of packed values is the packed digit-wise sum
   (each digit sum lies in ``[-n, n]``) as long as it stays below ``2^20`` (exact float32
   integers, with room for Average's rounding): ``m`` is the largest with ``B^m <= 2^21``: 9
   codes per float32 for 2 ranks (up to 9x fewer bytes than fp32), 6 for 4, 5 for 8, 2 up to
   723 ranks (the limit; the packing is :mod:`commcomp.integrations.packing`). ``decompress``
   undoes Average's ``1/n``, rounds, and reads the digits back. Two sentinels (each rank sends
   a tag ``t`` and ``rank + 1``) tell a Sum from an Average and refuse Max, Min or Adasum.

2. **Sketch** (Song et al. 2022; :mod:`commcomp.codecs.sketch`): ``R x`` with a countsketch or
   SRHT ``R`` drawn from a seed every rank derives from ``(seed, calls)``, so every rank uses
   the same ``R`` for the same tensor. ``R`` is linear, so the all-reduced sketches are the
   sketch of the summed gradient, and ``decompress`` (``R^T``) gives ``R^T R sum_r x_r``,
   unbiased; bytes are ``ratio`` of fp32. The same two sentinels ride along, derived from the
   seed, so ranks whose seeds drifted apart (say, a checkpoint loaded on one rank only) get an
   error instead of a silently wrong gradient.
   No differential-privacy noise here: use the ``"sketch_dp"`` DDP hook for that.

Requirements, as for Horovod's own unnamed all-reduces: every rank compresses the same tensors
in the same order (``calls`` keys the seeds; ternary's scale all-reduces match by order). True
for ``DistributedOptimizer`` on the same model and graph; a parameter whose gradient is missing
on some step is all-reduced from ``synchronize()`` in set order, which may differ across ranks
(the size check and the sentinels catch most such mismatches). Tensors with fewer than
``min_numel`` elements (biases), and integer or sparse ones, go through uncompressed.
``decompress`` reads the sentinels on the host (one sync per tensor, after Horovod's own wait).
Horovod itself is imported on first use, so this module loads without it; build it with
``bash launch/install_horovod.sh``.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple, Optional

import torch

from commcomp import ops
from commcomp.codecs import sketch as sketches
from commcomp.codecs.base import FLOAT_DTYPES
from commcomp.utils import ByteCounter, mix_seed, ring_allreduce_bytes, validate
from commcomp.utils.metrics import FP32

from .packing import MAX_TERNARY_RANKS, PACK_LIMIT, codes_per_float, pack_codes, unpack_sums  # noqa: F401

INSTALL_HINT = ("run `bash launch/install_horovod.sh` (builds Horovod 0.28.1 against the installed torch; "
                "`pip install horovod` does not build against current torch)")
SKETCH_KINDS = ("countsketch", "srht")


def horovod():
    """``horovod.torch``, or an ImportError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(f"commcomp.integrations.horovod needs horovod.torch, which failed to import "
                          f"({exc}); {INSTALL_HINT}") from exc
    return hvd


class _Raw:
    """ctx of a tensor sent as it is."""


RAW = _Raw()


class Sentinels(NamedTuple):
    """Each rank appends ``[tag, rank + 1]`` to its compressed tensor. After a Sum they read
    ``[n t, n (n + 1) / 2]`` (integers, exact in float32), after an Average ``[t, (n + 1) / 2]``;
    Max, Min, Adasum or ranks with different tags give something else."""

    tag: float
    world: int

    def values(self, rank: int) -> list:
        """What rank ``rank`` appends: ``[tag, rank + 1]``."""
        return [self.tag, float(rank + 1)]

    def read(self, got: torch.Tensor, what: str) -> float:
        """``1.0`` after a Sum, ``1 / n`` after an Average; raises otherwise."""
        a, b = (float(v) for v in got.tolist())
        n = self.world
        for factor in (1.0, 1.0 / n):
            if math.isclose(a, n * self.tag * factor, rel_tol=1e-5) and math.isclose(
                    b, n * (n + 1) / 2 * factor, rel_tol=1e-5):
                return factor
        raise RuntimeError(
            f"commcomp: {what}: the sentinels read {[a, b]} after the all-reduce, not a Sum "
            f"({[n * self.tag, n * (n + 1) / 2]}) or an Average ({[self.tag, (n + 1) / 2]}) "
            f"over {n} ranks. Only op=hvd.Sum and hvd.Average are linear (not Max, Min or Adasum), and every rank "
            "must compress the same tensors in the same order with the same seed and calls counter (load the "
            "same checkpoint everywhere).")


class HorovodCompressor(abc.ABC):
    """What both compressors share: the lazily imported ``hvd``, the call counter that keys
    seeds, the sentinels, byte metrics and checkpoints.

    Args:
        seed: base seed (``0 <= seed < 2**63``), the same on every rank.
        min_numel: tensors with fewer elements go uncompressed (default 1024).
        hvd: the Horovod module to use (default: ``horovod.torch``, imported on first use);
            tests pass a stand-in.
        process_set: a Horovod process set for the compressor's own all-reduce (ternary's
            scales), ranks and byte counts; ``None``: the global one. Pass the same one to
            Horovod.
    """

    name = ""

    def __init__(self, seed: int = 0, min_numel: int = 1024, hvd=None, process_set=None):
        self.seed = validate.seed(seed, "seed")
        self.min_numel = validate.integer(min_numel, "min_numel", low=0, hint="smaller tensors go uncompressed")
        self._hvd, self.process_set = hvd, process_set
        self.calls = 0
        # bytes_sent: what this rank's share of the ring all-reduces sends; bytes_sent_fp32_allreduce:
        # what fp32 all-reduces of the same tensors would have sent
        self.metrics = ByteCounter()

    @property
    def hvd(self):
        """The Horovod module (``horovod.torch`` unless one was given), imported on first use."""
        if self._hvd is None:
            self._hvd = horovod()
        return self._hvd

    def world(self) -> int:
        """Ranks in the process set (or Horovod's world)."""
        return (self.process_set or self.hvd).size()

    def rank(self) -> int:
        """This rank in the process set (or Horovod's world)."""
        return (self.process_set or self.hvd).rank()

    def options(self) -> dict:
        """The hyper-parameters, as the constructor takes them (saved and checked in checkpoints)."""
        return {"seed": self.seed, "min_numel": self.min_numel}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    # -- Horovod's interface
    def compress(self, tensor: torch.Tensor):
        """``(compressed, ctx)`` for Horovod to all-reduce; see the module docstring."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"commcomp: compress takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.is_sparse or not tensor.is_floating_point() or tensor.numel() < max(self.min_numel, 1):
            self._count(tensor.numel() * tensor.element_size(), tensor.numel() * tensor.element_size())
            return tensor, RAW
        call, self.calls = self.calls, self.calls + 1
        return self._compress(tensor, call)

    def decompress(self, tensor: torch.Tensor, ctx):
        """The summed or averaged tensor (as Horovod's op says) in its original shape and dtype."""
        return tensor if isinstance(ctx, _Raw) else self._decompress(tensor, ctx)

    @abc.abstractmethod
    def _compress(self, tensor, call):
        """(compressed tensor, ctx) for call number `call` of this compressor."""

    @abc.abstractmethod
    def _decompress(self, tensor, ctx):
        """The reduced tensor in `ctx`'s shape and dtype."""

    def _sentinels(self, call: int, world: int) -> Sentinels:
        return Sentinels(float(mix_seed(self.seed, call, 0x5E) % 1021 + 1), world)  # exact in float32

    # -- bytes and checkpoints
    def _count(self, sent: int, fp32: int) -> None:
        world = self.world()
        self.metrics.sent(ring_allreduce_bytes(sent, world))
        self.metrics.add(ring_allreduce_bytes(fp32, world), FP32)

    def compression_ratio(self) -> float:
        """fp32 all-reduce bytes over bytes sent (nan before anything was sent)."""
        return self.metrics.ratio()

    def state_dict(self) -> dict:
        """Options (to check on load), the call counter that keys the seeds, and the byte counts."""
        return {"compressor": self.name, "options": self.options(), "calls": self.calls,
                "metrics": self.metrics.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (same options required): the next call draws the seeds
        the saved compressor would have drawn, on every rank that loads the same checkpoint."""
        if state.get("compressor") != self.name or state.get("options") != self.options():
            raise ValueError(f"commcomp: checkpoint is for {state.get('compressor')!r} with options "
                             f"{state.get('options')}, this is {self.name!r} with {self.options()}; create the "
                             "compressor with the saved options to resume")
        metrics = ByteCounter()
        metrics.load_state_dict(state["metrics"])  # checked before anything changes
        self.calls, self.metrics = int(state["calls"]), metrics


# -- ternary codes, packed in balanced base 2n + 1 (commcomp.integrations.packing)


class TernaryCtx(NamedTuple):
    """What :meth:`TernaryCompressor.decompress` needs besides the reduced tensor."""

    shape: torch.Size
    dtype: torch.dtype
    scale: float  # shared by every rank; NaN when some rank's tensor was not finite
    sentinels: Sentinels


class TernaryCompressor(HorovodCompressor):
    """TernGrad codes with a scale shared through one small MAX all-reduce, packed ``m`` to a
    float32 so that Horovod's Sum or Average of them is exact (module docstring).

    Args:
        clip_factor: ``None`` (default: unbiased) or ``c``: each rank clips its scale to ``c``
            standard deviations before the MAX (TernGrad: 2.5; biased, lower variance).
        seed, min_numel, hvd, process_set: see :class:`HorovodCompressor`.

    A NaN/Inf on any rank makes the result NaN on every rank (as a plain all-reduce would).
    At most 723 ranks. With ``DistributedOptimizer(gradient_predivide_factor=f)``, ``f`` must
    keep the packed sums exact (powers of two do); a rounding check raises otherwise.
    """

    name = "ternary"

    def __init__(self, clip_factor: Optional[float] = None, seed: int = 0, min_numel: int = 1024,
                 hvd=None, process_set=None):
        super().__init__(seed, min_numel, hvd, process_set)
        self.clip_factor = validate.positive(clip_factor, "clip_factor", allow_none=True,
                                             hint="None: scale = max |x|; TernGrad uses 2.5")

    def options(self) -> dict:
        """The base options and ``clip_factor``."""
        return dict(super().options(), clip_factor=self.clip_factor)

    def _shared_scale(self, x: torch.Tensor, call: int) -> float:
        absmax, std = ops.segment_stats(x)
        local = absmax if self.clip_factor is None else torch.where(
            std > 0, torch.minimum(absmax, self.clip_factor * std), absmax)
        bad = ~torch.isfinite(absmax)
        n = float(x.numel())
        msg = torch.cat([torch.where(bad, torch.zeros_like(local), local).double(), bad.double(),
                         torch.tensor([n, -n], dtype=torch.float64, device=x.device)])
        kwargs = {} if self.process_set is None else {"process_set": self.process_set}
        # One name for every call: the call is blocking and all ranks make them in the same order,
        # and a fixed name stays in Horovod's response cache instead of evicting the gradients'.
        shared = self.hvd.allreduce(msg, op=self.hvd.Max, name="commcomp.ternary.scale", **kwargs)
        scale, any_bad, most, neg_least = shared.tolist()
        if most != -neg_least:
            raise RuntimeError(
                f"commcomp: ternary compress call {call}: the ranks compressed tensors of different sizes "
                f"({int(-neg_least)} to {int(most)} elements; this rank {int(n)}). Every rank must compress "
                "the same tensors in the same order (a gradient missing on some ranks breaks that).")
        return math.nan if any_bad else scale

    def _compress(self, tensor, call):
        world = self.world()
        if world > MAX_TERNARY_RANKS:
            raise ValueError(f"commcomp: the Horovod ternary compressor packs codes for at most {MAX_TERNARY_RANKS} "
                             f"ranks, this job has {world}; use Compression.sketch or hvd.Compression.fp16")
        x = tensor.detach().reshape(-1)
        x = (x if x.dtype in FLOAT_DTYPES else x.float()).contiguous()
        scale = self._shared_scale(x, call)
        if math.isfinite(scale) and scale > 0:  # the shared max >= this rank's |x|: no clipping
            s = torch.tensor([scale], dtype=torch.float32, device=x.device)
            k = ops.ternarize_int8(x, s, mix_seed(self.seed, self.rank(), call), validate=False)
        else:  # all zero, or some rank is not finite (the NaN scale spreads in decompress)
            k = torch.zeros(x.numel(), dtype=torch.int8, device=x.device)
        sentinels = self._sentinels(call, world)
        packed = pack_codes(k, world)
        out = torch.cat([packed, packed.new_tensor(sentinels.values(self.rank()))])
        self._count(4 * out.numel() + 32, 4 * x.numel())
        return out, TernaryCtx(tensor.shape, tensor.dtype, scale, sentinels)

    def _decompress(self, tensor, ctx: TernaryCtx):
        factor = ctx.sentinels.read(tensor[-2:], "ternary decompress")
        sums = tensor[:-2].to(torch.float64) / factor  # the packed sum over ranks, integer-valued
        off = float((sums - sums.round()).abs().max()) if sums.numel() else 0.0
        if not off < 0.25:
            raise RuntimeError(f"commcomp: ternary decompress: packed code sums are {off:.3f} off an integer after "
                               "the all-reduce; keep gradient_predivide_factor at 1 (or a power of two)")
        k = unpack_sums(sums, math.prod(ctx.shape), ctx.sentinels.world)
        work = torch.float64 if ctx.dtype == torch.float64 else torch.float32
        return (k.to(work) * (ctx.scale * factor)).to(ctx.dtype).reshape(ctx.shape)


# -- sketches


class SketchCtx(NamedTuple):
    """What :meth:`SketchCompressor.decompress` needs besides the reduced tensor (``R`` itself)."""

    sketch: sketches.Sketch
    shape: torch.Size
    dtype: torch.dtype
    sentinels: Sentinels


class SketchCompressor(HorovodCompressor):
    """A linear sketch ``R x`` (countsketch or SRHT) keyed by ``(seed, calls)``; Horovod sums the
    sketches and ``decompress`` applies ``R^T`` (module docstring).

    Args:
        ratio: sketch size / tensor size in ``(0, 1]`` (default 0.01: 100x fewer bytes, an
            unbiased but ~``1/ratio`` times noisier gradient; see :mod:`commcomp.codecs.sketch`).
        kind: ``"countsketch"`` (default, O(d)) or ``"srht"`` (O(d log block)).
        block: SRHT block length (a power of two; default ``commcomp.ops.default_block``).
        check: read the sentinels after the all-reduce (one host sync per tensor).
        seed, min_numel, hvd, process_set: see :class:`HorovodCompressor`.

    Sketches are float32 (``ceil(ratio * d) + 2`` values per tensor) and differentiable.
    """

    name = "sketch"

    def __init__(self, ratio: float = 0.01, kind: str = "countsketch", seed: int = 0, block: Optional[int] = None,
                 min_numel: int = 1024, check: bool = True, hvd=None, process_set=None):
        super().__init__(seed, min_numel, hvd, process_set)
        self.ratio = sketches.check_ratio(ratio)
        self.kind = validate.choice(kind, "kind", SKETCH_KINDS)
        self.block = validate.power_of_two(block, "block", allow_none=True)
        self.check = bool(check)

    def options(self) -> dict:
        """The base options and ``ratio``, ``kind``, ``block``."""
        return dict(super().options(), ratio=self.ratio, kind=self.kind, block=self.block)

    def sketch_for(self, numel: int, call: int) -> sketches.Sketch:
        """The ``R`` every rank uses for its ``call``-th compressed tensor."""
        size = sketches.sketch_size(self.kind, numel, self.ratio, self.block)
        return sketches.Sketch(self.kind, numel, size, mix_seed(self.seed, call), self.block)

    def _compress(self, tensor, call):
        sk = self.sketch_for(tensor.numel(), call)
        x = tensor.reshape(-1)
        y = sk.sketch(x if x.dtype in FLOAT_DTYPES else x.float())
        sentinels = self._sentinels(call, self.world())
        self._count(4 * (y.numel() + 2), 4 * tensor.numel())
        return torch.cat([y, y.new_tensor(sentinels.values(self.rank()))]), SketchCtx(
            sk, tensor.shape, tensor.dtype, sentinels)

    def _decompress(self, tensor, ctx: SketchCtx):
        if self.check:
            ctx.sentinels.read(tensor[-2:].detach(), "sketch decompress")
        return ctx.sketch.transpose(tensor[:-2]).to(ctx.dtype).reshape(ctx.shape)


class Compression:
    """Factories of Horovod compressors, beside ``horovod.torch.Compression`` (whose ``none`` and
    ``fp16`` still serve as baselines). Each call returns a new compressor with its own state:
    use one per ``DistributedOptimizer`` / stream of all-reduces, the same on every rank."""

    @staticmethod
    def ternary(clip_factor: Optional[float] = None, seed: int = 0, min_numel: int = 1024,
                **kwargs) -> TernaryCompressor:
        """TernGrad codes with a shared scale, packed (:class:`TernaryCompressor`)."""
        return TernaryCompressor(clip_factor, seed, min_numel, **kwargs)

    @staticmethod
    def sketch(ratio: float = 0.01, kind: str = "countsketch", seed: int = 0, block: Optional[int] = None,
               min_numel: int = 1024, **kwargs) -> SketchCompressor:
        """A countsketch / SRHT sketch with a shared seed (:class:`SketchCompressor`)."""
        return SketchCompressor(ratio, kind, seed, block, min_numel, **kwargs)


__all__ = ["Compression", "HorovodCompressor", "SketchCompressor", "TernaryCompressor", "codes_per_float",
           "horovod", "pack_codes", "unpack_sums"]
