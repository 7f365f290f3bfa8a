"""Mixing one variable with the neighbours, exactly or from compressed differences.

Exact mixing (DProxSGT): ``out_i = v_i + gamma * (sum_j W_ij v_j - v_i)``; each rank sends ``v_i``.

Compressed mixing (CDProxSGT, Yan et al. 2023, Algorithm 2; the CHOCO-style estimate of
Koloskova et al. 2019): every rank keeps ``hat_i`` (the estimate of ``v_i`` its neighbours
share) and ``acc_i = sum_j W_ij hat_j`` (its weighted sum of its own and its neighbours'
estimates). One round:

1. ``q_i = Q(v_i - hat_i)``; only ``q_i`` is sent;
2. ``hat_i += q_i`` and ``acc_i += W_ii q_i + sum_j W_ij q_j`` (the received ``q_j``);
3. ``out_i = v_i + gamma * (acc_i - hat_i)``.

Because ``W`` is doubly stochastic, ``sum_i (acc_i - hat_i) = 0``: mixing never changes the
average of ``v`` over ranks, whatever the compressor does. Both sides decode the same payload,
so every rank's copy of ``hat_j`` stays identical to rank ``j``'s. State is two flat tensors
per variable (``hat`` and ``acc``), kept per parameter name so DDP's bucket rebuilds and
checkpoints do not disturb it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from commcomp import ops
from commcomp.codecs import Compressor, Identity, RandomK, Ternary, TopK, make_compressor
from commcomp.codecs.base import as_bytes, view_as
from commcomp.utils import validate
from commcomp.utils.metrics import ByteCounter

from .exchange import Inflight, NeighbourExchange

def make_mixing_compressor(spec) -> Compressor:
    """:func:`commcomp.codecs.make_compressor`, except that ``"ternary"`` means the contractive
    ternary codec with base-3 packing (``Ternary(contractive=True, packing="base3")``, 1.6 bits
    per element): compressed gossip feeds each message's error
    back into the next, and an unbiased ternary codec's error (``omega`` of 2-3 on typical
    layers) exceeds the signal, so the estimates would diverge. Other non-contractive
    compressors get a warning."""
    if isinstance(spec, str) and spec.strip().lower() == "ternary":
        return Ternary(contractive=True, packing="base3")
    comp = make_compressor(spec)
    if not comp.contractive:
        warnings.warn(f"commcomp: {comp!r} is not contractive; compressed mixing may diverge with it "
                      "(use Ternary(contractive=True), TopK, or RandomK without rescale)", stacklevel=3)
    return comp


def default_gamma(compressor) -> float:
    """Consensus step size when none is given: 1 for exact mixing (plain gossip); 0.2 for the
    contractive ternary codec; for top-k / random-k, 2.5x the kept fraction, capped at 0.5 (0.05
    at 2%); 0.1 for other compressors. Compressed gossip needs gamma of the order of the
    compressor's contraction: larger values let the estimates' errors grow faster than mixing
    removes them and the ranks' models drift apart (measured in docs/decentralized.md). Tune it
    for your compressor and graph."""
    if isinstance(compressor, Identity):
        return 1.0
    if isinstance(compressor, Ternary):
        return 0.2
    if isinstance(compressor, (TopK, RandomK)) and getattr(compressor, "k", None) is None:
        return min(0.5, 2.5 * compressor.ratio)
    return 0.1


def check_gamma(gamma, name: str) -> float:
    """A consensus step size in (0, 1]."""
    return validate.fraction(gamma, name, hint="1 is plain gossip, smaller values damp compression error "
                                               "(try 0.2-0.8 with a compressor)")


def check_static(compressor: Compressor, topology) -> None:
    """Compressed mixing keeps the neighbours' estimates, so it needs a fixed neighbour set."""
    if not isinstance(compressor, Identity) and topology.period != 1:
        raise ValueError(
            f"commcomp: compressed mixing needs a static topology, got {topology.name!r} with "
            f"period {topology.period}: every rank keeps its neighbours' estimates, which a "
            "changing neighbour set would leave stale. Use a static topology (ring, torus, exponential) "
            "or compressor='identity'"
        )


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype state and sums are kept in: float64 for float64 values, else float32 (running sums in
    bfloat16/float16 would round at every update and break the invariants)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


Init = Callable[[str, int, int, torch.Tensor], torch.Tensor]  # (name, var, length, like) -> 1-D


class FlatStore:
    """Per-parameter state kept as flat tensors per layout (a tuple of parameter names).

    DDP hands a hook flat buckets whose composition can change once (the rebuild after the
    first step); a layout seen for the first time is assembled from the slices the store
    already holds, or from ``init``. ``to_dict`` is per parameter name, so checkpoints do not
    depend on the layout.
    """

    def __init__(self, nvars: int, init: Init):
        self.nvars = nvars
        self._init = init
        self._flats: Dict[Tuple[str, ...], List[torch.Tensor]] = {}
        self._where: Dict[str, Tuple[Tuple[str, ...], int, int]] = {}
        self._loaded: Dict[str, List[torch.Tensor]] = {}

    def get(self, names: Sequence[str], lengths: Sequence[int], like: torch.Tensor) -> List[torch.Tensor]:
        key = tuple(names)
        flats = self._flats.get(key)
        if flats is not None:
            return flats
        flats = []
        for var in range(self.nvars):
            parts = [self._current(name, var, n, like) for name, n in zip(key, lengths)]
            flats.append(torch.cat(parts) if parts else like.new_zeros(0))
        self._flats[key] = flats
        offset = 0
        for name, n in zip(key, lengths):
            self._where[name] = (key, offset, n)
            offset += n
            self._loaded.pop(name, None)
        live = {k for k, _, _ in self._where.values()}
        for old in [k for k in self._flats if k not in live]:
            del self._flats[old]
        return flats

    def _current(self, name: str, var: int, n: int, like: torch.Tensor) -> torch.Tensor:
        if name in self._where:
            key, off, length = self._where[name]
            if length != n:
                raise RuntimeError(f"commcomp: parameter {name!r} changed size ({length} -> {n}) mid-run")
            return self._flats[key][var][off:off + n]
        if name in self._loaded:
            t = self._loaded[name][var]
            if t.numel() != n:
                raise ValueError(f"commcomp: checkpointed state for {name!r} has {t.numel()} elements, "
                                 f"the parameter has {n}; load a checkpoint of the same model")
            return t.to(device=like.device, dtype=like.dtype).reshape(-1)
        return self._init(name, var, n, like)

    def value(self, name: str, var: int) -> Optional[torch.Tensor]:
        if name in self._where:
            key, off, n = self._where[name]
            return self._flats[key][var][off:off + n]
        if name in self._loaded:
            return self._loaded[name][var]
        return None

    def names(self) -> List[str]:
        return list(self._where) + [n for n in self._loaded if n not in self._where]

    def to_dict(self) -> Dict[str, List[torch.Tensor]]:
        return {name: [self.value(name, v).detach().clone().cpu() for v in range(self.nvars)]
                for name in self.names()}

    def load(self, state: Dict[str, List[torch.Tensor]]) -> None:
        for name, tensors in state.items():
            if len(tensors) != self.nvars:
                raise ValueError(f"commcomp: checkpointed state for {name!r} has {len(tensors)} tensors, "
                                 f"expected {self.nvars}")
        self._flats, self._where = {}, {}
        self._loaded = {name: [t.detach().clone() for t in ts] for name, ts in state.items()}


class _Round:
    """One mixing round in flight."""

    def __init__(self, inflight: Inflight, v, flats, ctx, lengths=None):
        self.inflight, self.v, self.flats, self.ctx, self.lengths = inflight, v, flats, ctx, lengths
        self.mixer: Optional["Mixer"] = None  # the mixer that started it (set by Mixer)


def fusable(compressor: Compressor) -> bool:
    """Whether compressed mixing with `compressor` runs on the fused native ops
    (:func:`commcomp.ops.mix_encode` / :func:`~commcomp.ops.mix_decode`): the contractive,
    unclipped ternary codec (2-bit or base-3 packing), on float32 state."""
    return isinstance(compressor, Ternary) and compressor.contractive and compressor.clip_factor is None


def contractive_scales(stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """From :func:`commcomp.ops.mix_stats` rows: the codes' scale ``s = max |d|`` and the scale
    sent, ``s / tau`` with ``tau = s ||d||_1 / ||d||_2^2`` (:meth:`Ternary._tau`; 1 for an
    all-zero segment)."""
    s, l1, l2 = stats[:, 0], stats[:, 1], stats[:, 2]
    tau = torch.where(l2 > 0, s * l1 / l2.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(s))
    return s, s / tau


class Mixer:
    """Mixes one variable (``"x"``, ``"y"``) with this rank's neighbours; see the module docstring.

    Args:
        exchange: the :class:`NeighbourExchange` (topology and group).
        compressor: a :class:`commcomp.codecs.Compressor`; :class:`Identity` means exact mixing
            (no state, the values themselves travel).
        gamma: consensus step size in ``(0, 1]``; 1 is plain gossip (the exact method's
            default). Compressed mixing needs ``gamma < 1`` to damp compression error.
        init: the estimates' starting value per parameter (``hat_i = acc_i = init``); every rank
            must start from values its neighbours can reproduce (zeros, or an initial model all
            ranks share).
        counter: the :class:`~commcomp.utils.ByteCounter` its messages are counted in (default:
            its own, ``self.bytes``); ``label``: a further counter of ``counter`` they also go to.
    """

    def __init__(self, exchange: NeighbourExchange, compressor: Compressor, gamma: float,
                 init: Optional[Callable[[str, int], torch.Tensor]] = None,
                 counter: Optional[ByteCounter] = None, label: Optional[str] = None):
        self.exchange = exchange
        self.compressor = compressor
        self.gamma = float(gamma)
        self.exact = isinstance(compressor, Identity)
        check_static(compressor, exchange.topology)

        def first(name, var, n, like):
            if init is None:
                return like.new_zeros(n)
            return init(name, n).to(device=like.device, dtype=like.dtype).reshape(-1).clone()

        self.store = FlatStore(2, first)  # var 0: hat_i, var 1: acc_i
        self.bytes = counter if counter is not None else ByteCounter()
        self._labels = (label,) if label else ()
        self.fused = fusable(compressor)
        self.nonfinite = None  # per round on the fused path: how many entries of v were not finite

    def start(self, v: torch.Tensor, names: Sequence[str], lengths: Sequence[int], step: int, seed: int,
              inplace: bool = False) -> _Round:
        """Compress and send this rank's message for ``v`` (1-D); receive the neighbours'.

        With ``inplace=True`` and a fused compressor (:func:`fusable`) on float32 ``v``, the
        round works on ``v`` itself and :meth:`finish` returns it mixed; a non-finite entry of
        ``v`` is then replaced by the estimate ``hat_i`` its neighbours hold (and counted in
        :attr:`nonfinite`)."""
        if self.fused and v.dtype == torch.float32:
            rnd = self._start_fused(v if inplace else v.clone(), names, lengths, step, seed)
        else:
            rnd = self._start(v, names, lengths, step, seed)
        rnd.mixer = self
        return rnd

    def _start_fused(self, v, names, lengths, step, seed) -> _Round:
        ex = self.exchange
        hat, acc = self.store.get(names, lengths, v)
        stats = ops.mix_stats(v, hat, segments=lengths)
        s, sent = contractive_scales(stats)
        self_w = torch.tensor(ex.topology.self_weight(ex.rank, step), dtype=torch.float32, device=v.device)
        codes = ops.mix_encode(v, hat, acc, s, sent, sent * self_w, seed, segments=lengths,
                               base3=self.compressor.packing == "base3")
        bad = stats[:, 3].sum()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        payload = torch.cat([as_bytes(sent), codes])
        inflight = ex.start(payload, payload.numel(), step)
        self.bytes.sent(payload.numel() * ex.fan_out(step), *self._labels)
        return _Round(inflight, v, (hat, acc), None, list(lengths))

    def _finish_fused(self, rnd: _Round, inflight) -> torch.Tensor:
        hat, acc = rnd.flats
        nseg = len(rnd.lengths)
        head = 4 * nseg
        packed, scales = [], []
        for j, w in inflight.weights:
            msg = inflight.received[j]
            scales.append(view_as(msg[:head], torch.float32) * torch.tensor(w, dtype=torch.float32))
            packed.append(msg[head:])
        scales = torch.stack(scales) if scales else torch.zeros(0, nseg, device=acc.device)
        return ops.mix_decode(rnd.v, hat, acc, packed, scales, self.gamma, segments=rnd.lengths,
                              base3=self.compressor.packing == "base3")

    def _start(self, v, names, lengths, step, seed) -> _Round:
        ex = self.exchange
        if self.exact:
            payload, ctx = self.compressor.compress(v, segments=lengths)
            inflight = ex.start(payload, payload.numel(), step)
            self.bytes.sent(payload.numel() * ex.fan_out(step), *self._labels)
            return _Round(inflight, v, None, ctx)
        vw = v.to(wide(v.dtype))
        hat, acc = self.store.get(names, lengths, vw)
        diff = vw - hat
        if diff.dtype == torch.float64:  # codecs take float32/16/bf16; the estimates stay float64
            diff = diff.float()
        payload, ctx = self.compressor.compress(diff, seed=seed, segments=lengths)
        inflight = ex.start(payload, payload.numel(), step)
        self.bytes.sent(payload.numel() * ex.fan_out(step), *self._labels)
        q = self.compressor.decompress(payload, ctx).to(hat.dtype)  # what the neighbours decode
        hat.add_(q)
        acc.add_(q, alpha=ex.topology.self_weight(ex.rank, step))
        return _Round(inflight, vw, (hat, acc), ctx)

    def suspend(self, rnd: _Round) -> dict:
        """Wait for a round's messages and return them, to checkpoint a round in flight (its
        send side already changed the estimates, which the store's checkpoint holds)."""
        inflight = rnd.inflight.wait()
        return {"received": {int(j): m.detach().cpu().clone() for j, m in inflight.received.items()}}

    def resume(self, state: dict, v: torch.Tensor, names: Sequence[str], lengths: Sequence[int],
               step: int, inplace: bool = False) -> _Round:
        """The round :meth:`suspend` saved, for ``v`` (the value it was started with): its
        :meth:`finish` decodes the saved messages."""
        ex = self.exchange
        weights = ex.topology.in_neighbours(ex.rank, step)
        missing = [j for j, _ in weights if j not in state["received"]]
        if missing:
            raise ValueError(f"commcomp: the checkpointed round lacks the messages of in-neighbour(s) {missing}")
        received = {j: state["received"][j].to(v.device) for j, _ in weights}
        inflight = Inflight([], received, weights, None)
        if self.fused and v.dtype == torch.float32:
            rnd = _Round(inflight, v if inplace else v.clone(), tuple(self.store.get(names, lengths, v)), None,
                         list(lengths))
        elif self.exact:
            rnd = _Round(inflight, v, None, self.compressor.context(v, segments=list(lengths)))
        else:
            vw = v.to(wide(v.dtype))
            flats = tuple(self.store.get(names, lengths, vw))
            ctx = self.compressor.context(vw.numel(), torch.float32 if vw.dtype == torch.float64 else vw.dtype,
                                          segments=list(lengths))
            rnd = _Round(inflight, vw, flats, ctx)
        rnd.mixer = self
        return rnd

    def finish(self, rnd: _Round, step: int) -> torch.Tensor:
        """Wait for the neighbours' messages and return the mixed value (a new tensor; float32 or
        float64 on the compressed path, ``v``'s dtype on the exact one)."""
        inflight = rnd.inflight.wait()
        if rnd.lengths is not None:
            return self._finish_fused(rnd, inflight)
        ex, v = self.exchange, rnd.v
        if self.exact:
            wide = torch.float64 if v.dtype == torch.float64 else torch.float32  # sum half types in fp32
            mixed = v.to(wide) * ex.topology.self_weight(ex.rank, step)
            for j, w in inflight.weights:
                mixed.add_(self.compressor.decompress(inflight.received[j], rnd.ctx).to(wide), alpha=w)
            if self.gamma != 1.0:
                mixed = v.to(wide) + self.gamma * (mixed - v.to(wide))
            return mixed.to(v.dtype)
        hat, acc = rnd.flats
        for j, w in inflight.weights:
            acc.add_(self.compressor.decompress(inflight.received[j], rnd.ctx).to(acc.dtype), alpha=w)
        out = torch.sub(acc, hat)  # v + gamma (acc - hat), one temporary, in the state's dtype
        return out.mul_(self.gamma).add_(v)


__all__ = ["FlatStore", "Mixer", "check_gamma", "contractive_scales", "default_gamma", "fusable"]
