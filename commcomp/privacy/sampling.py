"""Poisson sampling of records for DP-SGD, from randomness the adversary cannot predict.

What it serves. Record-level DP-SGD accounting (:func:`commcomp.privacy.epsilon` with
``sample_rate=q``; Abadi et al. 2016, Mironov, Talwar, Zhang 2019) analyses the *Poisson
subsampled* Gaussian mechanism: at every step each record joins the batch independently with
probability ``q``, by a private coin flip. The amplification by subsampling -- the reason a small
``q`` buys a small epsilon -- comes entirely from the adversary not knowing whether the target
record was in a given step's batch. Two things break it:

* a batch that is not Poisson (fixed size, shuffled epochs): the accountant's formula is for a
  different mechanism, so the epsilon it prints is not the epsilon you get;
* coins the adversary can replay: if the batches come from a PRNG seeded with a public value
  (``torch.Generator().manual_seed(1_000_003 * seed + rank)``, ``torch.manual_seed(0)`` then the
  global RNG, a seed in a config file or a log), the adversary recomputes every batch, knows in
  which steps the target took part, and only the un-subsampled Gaussian mechanism is left --
  ``steps * q`` releases with noise ``sigma`` each, much weaker than what was reported (in this
  project's ``examples/train_dp.py`` a reported epsilon of 8 was really 22.3).

So :class:`PoissonBatchSampler` draws its coins, by default, from the operating system's CSPRNG
(``os.urandom``: ``getrandom(2)`` on Linux). Nothing about them is derivable from a seed, from
torch's or numpy's global RNG state, from the rank, or from the step number; there is no state
to checkpoint, leak or duplicate on ``fork``. Each coin is a uniform with 53 random bits,
``u = (x >> 11) * 2**-53`` for a uniform 64-bit ``x``, and a record is in when ``u < q``: the
inclusion probability is ``q`` up to 2**-53.

>>> sampler = PoissonBatchSampler(60_000, 256 / 60_000, steps=3)
>>> len(sampler), round(sampler.expected_batch_size)
(3, 256)
>>> batches = list(sampler)          # three lists of sorted, distinct indices, sizes ~ Bin(60000, q)

:func:`dp_data_loader` wraps a map-style dataset in a ``DataLoader`` over that sampler, with a
collate function that turns an empty batch (probability ``(1 - q) ** n``; it must still be a step,
noise only, for the accounting to hold) into correctly shaped empty tensors.

Design notes, from reading Opacus (``opacus/utils/uniform_sampler.py`` at commit
7f408b72f5ea5fb2c160dc9707c3ac5f4ee962b2 and ``opacus/data_loader.py`` at commit
d705fc63180f02ba9ca38b07015134e4d0bbb0d3 in github.com/pytorch/opacus, and the released 1.6.0):

* Opacus draws ``torch.rand(n, generator=self.generator)``; with the default ``generator=None``
  that is torch's *global* RNG, which anyone who calls ``torch.manual_seed(public)`` makes
  replayable (in the 7f408b7 version the "fresh generator" branch even assigned a local variable
  and so never took effect). Secure randomness there needs ``secure_mode`` and torchcsprng. Here
  the secure source is the default and a repeatable one has to be asked for, with a warning.
* Opacus' ``len`` defaulted to ``int(1 / sample_rate)``; here ``steps`` is explicit, because the
  accountant must be told exactly how many subsampled steps ran. Every step yields a batch, an
  empty one included (the distributed Opacus sampler skipped empty batches, so fewer steps ran
  than were accounted for, and the noise-only steps vanished).
* Opacus' ``wrap_collate_with_empty`` (d705fc6) made ``torch.zeros(shape)`` empties, float32
  whatever the data (integer labels came back float); 1.6.0 added dtypes. Here the empty batch is
  modelled on ``collate_fn([dataset[0]])``, so structure, dtypes and trailing shapes all come from
  the real collate function.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Iterator, List, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["PoissonBatchSampler", "dp_data_loader", "expected_batch_size"]

_CHUNK = 1 << 20  # records per os.urandom call: bounds the entropy buffer at 8 MiB
_TWO_M53 = 2.0 ** -53

# DataLoader keywords that would replace or contradict the Poisson batches.
_BATCHING_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


# ----------------------------------------------------------------------------- validation

def _check_int(v, name: str, what: str, hint: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"commcomp: {name} must be an int >= 1 ({what}), got {v!r}. {hint}")
    return int(v)


def _check_num_samples(n) -> int:
    return _check_int(n, "num_samples", "the number of records that can be sampled",
                      "Pass len(dataset) of a non-empty dataset.")


def _check_steps(steps) -> int:
    return _check_int(steps, "steps", "how many Poisson batches to draw, each one accounted step",
                      "Pass the number of optimizer steps you give the privacy accountant, "
                      "e.g. epochs * round(1 / sample_rate).")


def _check_sample_rate(q) -> float:
    ok = isinstance(q, numbers.Real) and not isinstance(q, bool) and math.isfinite(q) and 0.0 < q <= 1.0
    if not ok:
        raise ValueError(
            f"commcomp: sample_rate must be a number in (0, 1] (the probability that each record joins "
            f"a step's batch), got {q!r}. Use expected_batch_size / num_samples, e.g. 256 / 60000.")
    return float(q)


def expected_batch_size(num_samples: int, sample_rate: float) -> float:
    """Mean Poisson batch size, ``num_samples * sample_rate`` (a float: the size is random).

    Batch sizes are Binomial(num_samples, sample_rate): variance ``n q (1 - q)``, and a batch is
    empty with probability ``(1 - q) ** n``. DP-SGD divides the noisy gradient sum by this
    expected size, never by the realised one (which would depend on the private coins).
    """
    return _check_num_samples(num_samples) * _check_sample_rate(sample_rate)


# ----------------------------------------------------------------------------- coin sources

class _OsEntropy:
    """Uniforms in [0, 1) with 53 bits each, from the OS CSPRNG. Stateless: safe across fork."""

    secure = True

    def __call__(self, n: int) -> np.ndarray:
        x = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return (x >> np.uint64(11)).astype(np.float64) * _TWO_M53

    def __repr__(self):
        return "os.urandom"


class _SeededInsecure:
    """numpy PCG64 from an int seed: repeatable, hence replayable by anyone who knows the seed."""

    secure = False

    def __init__(self, seed: int):
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, n: int) -> np.ndarray:
        return self._rng.random(n, dtype=np.float64)  # 53-bit uniforms in [0, 1)

    def __repr__(self):
        return f"INSECURE seed={self.seed}"


class _Duck:
    """Any object with ``uniform(n, device) -> float64 tensor of shape (n,)`` (e.g. a ChaCha20 CSPRNG)."""

    secure = True  # the caller vouches for it

    def __init__(self, gen):
        self.gen = gen

    def __call__(self, n: int) -> np.ndarray:
        u = self.gen.uniform(n, torch.device("cpu"))
        if not (isinstance(u, torch.Tensor) and u.dtype == torch.float64 and tuple(u.shape) == (n,)):
            got = (f"{type(u).__name__} {getattr(u, 'dtype', '')} {tuple(getattr(u, 'shape', ()))}").strip()
            raise ValueError(f"commcomp: generator.uniform({n}, device) must return a float64 tensor of shape "
                             f"({n},), got {got}. Fix the generator's uniform method.")
        u = u.detach().cpu().numpy()
        if n and not (u.min() >= 0.0 and u.max() < 1.0):
            raise ValueError(f"commcomp: generator.uniform must return values in [0, 1), got range "
                             f"[{u.min()}, {u.max()}]. Fix the generator's uniform method.")
        return u

    def __repr__(self):
        return f"{type(self.gen).__name__}.uniform"


_SOURCES = (_OsEntropy, _SeededInsecure, _Duck)


def _make_source(generator, stacklevel: int):
    if generator is None:
        return _OsEntropy()
    if isinstance(generator, _SOURCES):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"commcomp: an int generator (seed) must be >= 0, got {generator!r}. "
                             "Pass generator=None for secure OS randomness.")
        warnings.warn(
            f"commcomp: PoissonBatchSampler(generator={int(generator)}) is INSECURE: batches from a known "
            "seed can be recomputed by anyone who learns the seed, who then knows which steps each record "
            "took part in; the privacy amplification by subsampling is lost and the reported epsilon is "
            "wrong. Use a seed only for debugging and reproducible non-private experiments; pass "
            "generator=None (OS entropy) for any run whose epsilon you report.",
            UserWarning, stacklevel=stacklevel)
        return _SeededInsecure(int(generator))
    if callable(getattr(generator, "uniform", None)):
        return _Duck(generator)
    hint = (" A torch.Generator is a Mersenne Twister whose seed is usually public (and its state "
            "recoverable from its outputs): it is not accepted." if isinstance(generator, torch.Generator) else "")
    raise ValueError(
        f"commcomp: generator must be None (OS CSPRNG, the secure default), an object with a "
        f"uniform(n, device) -> float64 tensor method (a CSPRNG), or an int seed (INSECURE, repeatable); "
        f"got {type(generator).__name__}.{hint} Pass generator=None.")


# ----------------------------------------------------------------------------- sampler

class PoissonBatchSampler(Sampler[List[int]]):
    """Batch sampler for DP-SGD: ``steps`` batches, each record in each batch independently w.p. q.

    Args:
        num_samples: number of records (``len(dataset)``), an int >= 1.
        sample_rate: ``q`` in (0, 1], the probability that a record joins a given step's batch;
            it is the ``sample_rate`` to give the accountant.
        steps: number of batches one pass over this sampler yields (``len(sampler)``), an int
            >= 1. Every batch is a step, including an empty one.
        generator: where the coins come from.

            * ``None`` (default, use this for any run whose epsilon you report): ``os.urandom``,
              the OS CSPRNG. Independent of every seed and of torch/numpy/random global state.
            * an object with ``uniform(n, device) -> torch.float64 tensor`` of shape ``(n,)``,
              values in [0, 1), e.g. a ChaCha20 CSPRNG seeded from OS entropy: called once per
              step with ``device=torch.device("cpu")``. Its security is the object's.
            * an ``int`` seed: numpy PCG64, **INSECURE** -- repeatable, so anyone who knows the
              seed replays every batch and the subsampling amplification is gone. For tests and
              debugging only; it warns (``UserWarning``).

    Each iteration yields ``steps`` lists of sorted, distinct indices in ``[0, num_samples)``;
    sizes are Binomial(num_samples, sample_rate) and a list can be empty. Iterating again draws
    fresh coins (with an int seed the stream continues, it does not restart), so ``k`` passes are
    ``k * steps`` steps for the accountant. Drawing costs 8 bytes of entropy per record per step,
    vectorised (no Python loop over records).
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator=None):
        self.num_samples = _check_num_samples(num_samples)
        self.sample_rate = _check_sample_rate(sample_rate)
        self.steps = _check_steps(steps)
        self._source = _make_source(generator, stacklevel=3)
        self.generator = generator.gen if isinstance(generator, _Duck) else generator

    @property
    def secure(self) -> bool:
        """False only for an int seed; True for the OS CSPRNG and for a caller's ``uniform`` object."""
        return self._source.secure

    @property
    def expected_batch_size(self) -> float:
        """``num_samples * sample_rate``: divide the noisy gradient sum by this, not by ``len(batch)``."""
        return self.num_samples * self.sample_rate

    def __len__(self) -> int:
        return self.steps

    def _draw(self) -> List[int]:
        n, q = self.num_samples, self.sample_rate
        if n <= _CHUNK or not isinstance(self._source, _OsEntropy):
            return np.flatnonzero(self._source(n) < q).tolist()
        parts = [np.flatnonzero(self._source(min(_CHUNK, n - lo)) < q) + lo for lo in range(0, n, _CHUNK)]
        return np.concatenate(parts).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            yield self._draw()

    def __repr__(self):
        return (f"PoissonBatchSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, "
                f"steps={self.steps}, source={self._source!r})")


# ----------------------------------------------------------------------------- empty batches

def _map_batch(x, on_tensor, on_leaves=None):
    """``x`` (a collated batch: tensors in mappings, lists, tuples, namedtuples) rebuilt with
    ``on_tensor`` applied to each tensor; ``on_leaves`` (if given) replaces a list or tuple that
    holds no tensor or container (per-sample leaves such as strings)."""
    if isinstance(x, torch.Tensor):
        return on_tensor(x)
    if isinstance(x, Mapping):
        try:
            return type(x)({k: _map_batch(v, on_tensor, on_leaves) for k, v in x.items()})
        except TypeError:
            return {k: _map_batch(v, on_tensor, on_leaves) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if on_leaves is not None and not any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in x):
            return on_leaves(x)
        items = [_map_batch(v, on_tensor, on_leaves) for v in x]
        if hasattr(x, "_fields"):  # namedtuple
            return type(x)(*items)
        return type(x)(items) if type(x) in (list, tuple) else items
    return x  # a non-batched leaf from a custom collate_fn: kept as is


def _to_empty(x):
    """The empty-batch version of a one-sample collated batch (batch dimension first)."""
    return _map_batch(x, lambda t: t.new_empty((0, *t.shape[1:])),
                      on_leaves=lambda leaves: type(leaves)() if type(leaves) in (list, tuple) else [])


def _fresh(x):
    """A new copy of the template, so callers may mutate what they get."""
    return _map_batch(x, torch.Tensor.clone)


class _CollateWithEmpty:
    """``collate_fn`` for non-empty batches; for ``[]``, empty tensors shaped like a real batch.

    The template is ``collate_fn([dataset[0]])`` with its batch dimension cut to 0: same nesting,
    same dtypes, same trailing shapes. A module-level class so it pickles into worker processes.
    """

    def __init__(self, collate_fn, example):
        self.collate_fn = collate_fn
        self.template = _to_empty(collate_fn([example]))

    def __call__(self, batch):
        if len(batch) == 0:
            return _fresh(self.template)
        return self.collate_fn(batch)


# ----------------------------------------------------------------------------- loader

def dp_data_loader(dataset, sample_rate: float, steps: int, *, generator=None, **loader_kwargs) -> DataLoader:
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset`` (see :class:`PoissonBatchSampler`).

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``), non-empty. ``dataset[0]``
            is read once, at construction, to learn the shape of an empty batch.
        sample_rate, steps, generator: as for :class:`PoissonBatchSampler` (``generator=None``,
            the OS CSPRNG, is the secure default; an int seed is INSECURE and warns).
        **loader_kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``,
            ``collate_fn``, ...). ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler`` and
            ``drop_last`` are refused: they would replace or thin out the Poisson batches.

    The loader yields ``steps`` batches per pass. An empty batch comes out as empty tensors with
    the right dtypes and trailing shapes (the collate function must put the batch dimension
    first), so the training step still runs and releases a noise-only update, as the accountant
    assumes. ``loader.batch_sampler`` is the sampler (``.expected_batch_size``, ``.sample_rate``).

    The ``DataLoader``'s own ``generator`` (it seeds worker processes; it does not choose
    batches) is a private ``torch.Generator`` seeded from OS entropy (from the seed in int mode),
    so iterating the loader neither reads nor advances torch's global RNG.
    """
    bad = [k for k in _BATCHING_KWARGS if k in loader_kwargs]
    if bad:
        raise ValueError(f"commcomp: dp_data_loader chooses the batches itself (Poisson, sample_rate={sample_rate!r}); "
                         f"got {', '.join(f'{k}=' + repr(loader_kwargs[k]) for k in bad)}. Remove "
                         f"{'them' if len(bad) > 1 else 'it'}; set the mean batch size with sample_rate.")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"commcomp: dataset must be map-style (__len__ and __getitem__) for Poisson sampling, "
                         f"got {type(dataset).__name__}. Materialise it, e.g. as a TensorDataset.")
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"commcomp: dataset must have a length for Poisson sampling, got "
                         f"{type(dataset).__name__} without __len__. Wrap it in a map-style Dataset.") from None
    if isinstance(n, numbers.Integral) and n == 0:
        raise ValueError("commcomp: dataset is empty (num_samples=0): nothing to sample. Pass a dataset "
                         "with at least one record.")
    source = _make_source(generator, stacklevel=3)  # the INSECURE warning points at the caller
    sampler = PoissonBatchSampler(n, sample_rate, steps, generator=source)
    sampler.generator = generator
    collate = _CollateWithEmpty(loader_kwargs.pop("collate_fn", None) or default_collate, dataset[0])
    loader_gen = torch.Generator()
    if isinstance(source, _SeededInsecure):
        loader_gen.manual_seed(source.seed)
    else:
        loader_gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=loader_gen, **loader_kwargs)
