"""Poisson sampling for DP-SGD: batch sizes are Binomial(n, q), every record is equally likely,
the coins come from OS entropy (not from any seed or global RNG), the seeded mode repeats and
warns, empty batches keep their shapes through a DataLoader, and bad arguments are refused."""

import math
import pickle
import random
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from commcomp.privacy import sampling
from commcomp.privacy.sampling import PoissonBatchSampler, dp_data_loader, expected_batch_size

Z = 5.0  # tolerance in standard errors: a correct sampler fails a check with probability < 1e-6


def _chi2_bounds(df, z=Z):
    """Two-sided chi-square quantiles by Wilson-Hilferty (accurate for df in the hundreds)."""
    a = 2.0 / (9.0 * df)
    return tuple(df * (1 - a + s * z * math.sqrt(a)) ** 3 for s in (-1, 1))


# ----------------------------------------------------------------------------- distribution

def test_batch_sizes_are_binomial():
    n, q, steps = 200, 0.1, 5000
    sizes = np.array([len(b) for b in PoissonBatchSampler(n, q, steps)], dtype=np.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < Z * math.sqrt(var / steps)
    # a fixed-size (shuffled) batch has variance 0; a sample variance's s.e. is ~ var * sqrt(2 / steps)
    assert abs(sizes.var(ddof=1) - var) < Z * var * math.sqrt(2 / (steps - 1))


def test_every_record_equally_likely_chi_square():
    n, q, steps = 300, 0.2, 2000
    counts = np.zeros(n)
    for batch in PoissonBatchSampler(n, q, steps):
        counts[batch] += 1
    # each count ~ Binomial(steps, q), independent: the standardised sum of squares is chi-square(n)
    stat = float((((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum())
    lo, hi = _chi2_bounds(n)
    assert lo < stat < hi, (lo, stat, hi)  # too low would mean too even (e.g. epoch shuffling)


def test_indices_in_range_sorted_unique_and_len():
    s = PoissonBatchSampler(50, 0.5, steps=40)
    assert len(s) == 40
    batches = list(s)
    assert len(batches) == 40
    for b in batches:
        assert isinstance(b, list) and all(type(i) is int for i in b)
        assert b == sorted(set(b))
        assert all(0 <= i < 50 for i in b)
    assert s.expected_batch_size == pytest.approx(25.0) == expected_batch_size(50, 0.5)


def test_large_datasets_are_drawn_in_chunks(monkeypatch):
    monkeypatch.setattr(sampling, "_CHUNK", 64)
    calls = []
    real = sampling.os.urandom
    monkeypatch.setattr(sampling.os, "urandom", lambda k: calls.append(k) or real(k))
    b = next(iter(PoissonBatchSampler(1000, 1.0, steps=1)))
    assert b == list(range(1000))  # offsets of every chunk are right
    assert sum(calls) == 8 * 1000 and max(calls) == 8 * 64
    sizes = [len(b) for b in PoissonBatchSampler(1000, 0.3, steps=200)]
    assert abs(np.mean(sizes) - 300) < Z * math.sqrt(210 / 200)


def test_sample_rate_one_gives_every_index():
    assert list(PoissonBatchSampler(7, 1.0, steps=3)) == [list(range(7))] * 3
    x = torch.arange(7.0).reshape(7, 1)
    loader = dp_data_loader(TensorDataset(x, torch.arange(7)), 1.0, steps=2)
    for xb, yb in loader:
        assert torch.equal(xb, x) and torch.equal(yb, torch.arange(7))


# ----------------------------------------------------------------------------- unpredictability

def test_two_samplers_with_identical_arguments_differ():
    a = list(PoissonBatchSampler(1000, 0.5, steps=3))
    b = list(PoissonBatchSampler(1000, 0.5, steps=3))
    assert a != b  # equal with probability 2**-3000
    s = PoissonBatchSampler(1000, 0.5, steps=3)
    assert list(s) != list(s)  # a second pass draws fresh coins


def _seed_everything(seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_independent_of_global_rngs():
    _seed_everything()
    a = list(PoissonBatchSampler(1000, 0.5, steps=2))
    _seed_everything()
    b = list(PoissonBatchSampler(1000, 0.5, steps=2))
    assert a != b  # a public torch/numpy seed does not fix the batches

    # and neither the sampler nor the loader reads (advances) a global RNG
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    list(PoissonBatchSampler(100, 0.5, steps=5))
    list(dp_data_loader(TensorDataset(torch.zeros(20, 2)), 0.5, steps=5))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_default_coins_come_from_os_urandom(monkeypatch):
    # all-zero "entropy" -> every uniform is 0 -> every record is in, however small q is
    monkeypatch.setattr(sampling.os, "urandom", lambda k: bytes(k))
    assert list(PoissonBatchSampler(10, 1e-9, steps=2)) == [list(range(10))] * 2
    # all-ones -> every uniform is 1 - 2**-53 -> only q = 1 selects
    monkeypatch.setattr(sampling.os, "urandom", lambda k: b"\xff" * k)
    assert list(PoissonBatchSampler(10, 0.999999, steps=1)) == [[]]
    assert list(PoissonBatchSampler(10, 1.0, steps=1)) == [list(range(10))]


def test_uniforms_have_53_bits():
    u = sampling._OsEntropy()(4096)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    scaled = u * 2.0 ** 53
    assert np.array_equal(scaled, np.floor(scaled))   # multiples of 2**-53 ...
    assert (scaled % 2 == 1).sum() > 1500             # ... using the lowest bit too (about half odd)


def test_seeded_mode_repeats_and_warns():
    with pytest.warns(UserWarning, match="INSECURE"):
        a = PoissonBatchSampler(500, 0.3, steps=4, generator=7)
    with pytest.warns(UserWarning, match="INSECURE"):
        b = PoissonBatchSampler(500, 0.3, steps=4, generator=7)
    with pytest.warns(UserWarning, match="INSECURE"):
        c = PoissonBatchSampler(500, 0.3, steps=4, generator=8)
    assert not a.secure and PoissonBatchSampler(5, 0.5, 1).secure
    first = list(a)
    assert first == list(b) and first != list(c)
    assert list(a) != first  # the stream continues on a second pass; it does not replay the first
    _seed_everything(1)
    with pytest.warns(UserWarning):
        d = PoissonBatchSampler(500, 0.3, steps=4, generator=7)
    assert list(d) == first  # global seeds do not enter the seeded stream either


def test_seeded_loader_warns_at_the_callers_line():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dp_data_loader(TensorDataset(torch.zeros(4, 1)), 0.5, 2, generator=3)
    assert len(w) == 1 and "INSECURE" in str(w[0].message) and w[0].filename == __file__


class _ZerosCSPRNG:
    """Stands in for commcomp.privacy.csprng: anything with uniform(n, device) is accepted."""

    def __init__(self):
        self.calls = []

    def uniform(self, n, device):
        self.calls.append((n, device))
        return torch.zeros(n, dtype=torch.float64, device=device)


def test_duck_typed_generator_is_used():
    g = _ZerosCSPRNG()
    s = PoissonBatchSampler(6, 1e-9, steps=2, generator=g)
    assert s.secure and s.generator is g
    assert list(s) == [list(range(6))] * 2
    assert g.calls == [(6, torch.device("cpu"))] * 2
    loader = dp_data_loader(TensorDataset(torch.arange(6.0)), 1e-9, 1, generator=_ZerosCSPRNG())
    assert torch.equal(next(iter(loader))[0], torch.arange(6.0))


@pytest.mark.parametrize("out", [torch.zeros(5, dtype=torch.float64), torch.zeros(6, dtype=torch.float32),
                                 np.zeros(6), torch.full((6,), 1.0, dtype=torch.float64)])
def test_duck_typed_generator_output_is_checked(out):
    class Bad:
        def uniform(self, n, device):
            return out

    with pytest.raises(ValueError, match="generator.uniform"):
        list(PoissonBatchSampler(6, 0.5, 1, generator=Bad()))


# ----------------------------------------------------------------------------- the loader

def test_empty_batches_have_the_right_shapes():
    x = torch.randn(5, 3, 4)
    y = torch.arange(5)
    loader = dp_data_loader(TensorDataset(x, y), 1e-12, steps=3)
    assert len(loader) == 3 and isinstance(loader.batch_sampler, PoissonBatchSampler)
    batches = list(loader)
    assert len(batches) == 3
    for xb, yb in batches:
        assert xb.shape == (0, 3, 4) and xb.dtype == torch.float32
        assert yb.shape == (0,) and yb.dtype == torch.int64  # labels stay integer
    model = torch.nn.Linear(4, 2)
    assert model(batches[0][0]).shape == (0, 3, 2)  # a step on an empty batch still runs


Pair = namedtuple("Pair", "image label")


class _Structured(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"pair": Pair(torch.full((2, 2), float(i), dtype=torch.float64), i),
                "name": f"rec{i}", "mask": np.ones(3, dtype=np.bool_)}


def test_empty_batches_mirror_nested_structure_and_mixed_batches_agree():
    loader = dp_data_loader(_Structured(), 0.5, steps=400)
    seen_empty = seen_full = False
    for b in loader:
        assert set(b) == {"pair", "name", "mask"} and isinstance(b["pair"], Pair)
        k = len(b["name"])
        assert b["pair"].image.shape == (k, 2, 2) and b["pair"].image.dtype == torch.float64
        assert b["pair"].label.shape == (k,) and b["pair"].label.dtype == torch.int64
        assert b["mask"].shape == (k, 3) and b["mask"].dtype == torch.bool
        seen_empty |= k == 0
        seen_full |= k > 0
    assert seen_empty and seen_full  # P(no empty batch in 400 steps) = (15/16)**400 < 1e-11


def test_custom_collate_is_wrapped_and_empties_are_fresh():
    def collate(batch):
        return torch.stack([b[0] for b in batch]) * 2

    loader = dp_data_loader(TensorDataset(torch.ones(3, 5)), 1e-12, 2, collate_fn=collate, num_workers=0)
    a, b = list(loader)
    assert a.shape == (0, 5) and a is not b
    full = dp_data_loader(TensorDataset(torch.ones(3, 5)), 1.0, 1, collate_fn=collate)
    assert torch.equal(next(iter(full)), torch.full((3, 5), 2.0))


def test_loader_pieces_pickle_for_worker_processes():
    loader = dp_data_loader(TensorDataset(torch.zeros(4, 2), torch.arange(4)), 1e-12, 1)
    collate = pickle.loads(pickle.dumps(loader.collate_fn))
    xb, yb = collate([])
    assert xb.shape == (0, 2) and yb.dtype == torch.int64
    s = pickle.loads(pickle.dumps(loader.batch_sampler))
    assert len(s) == 1 and s.sample_rate == 1e-12


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs, name", [
    (dict(num_samples=0), "num_samples"), (dict(num_samples=-3), "num_samples"),
    (dict(num_samples=2.5), "num_samples"), (dict(num_samples=True), "num_samples"),
    (dict(num_samples="10"), "num_samples"),
    (dict(sample_rate=0), "sample_rate"), (dict(sample_rate=-0.1), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"), (dict(sample_rate=float("nan")), "sample_rate"),
    (dict(sample_rate=float("inf")), "sample_rate"), (dict(sample_rate=True), "sample_rate"),
    (dict(sample_rate="0.1"), "sample_rate"),
    (dict(steps=0), "steps"), (dict(steps=1.0), "steps"), (dict(steps=None), "steps"),
    (dict(generator=torch.Generator()), "generator"), (dict(generator=-1), "generator"),
    (dict(generator="seed"), "generator"), (dict(generator=1.5), "generator"),
])
def test_bad_arguments_raise(kwargs, name):
    args = dict(num_samples=10, sample_rate=0.1, steps=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        PoissonBatchSampler(**args)
    msg = str(info.value)
    assert msg.startswith("commcomp: ") and "got" in msg  # says what was given ...
    assert "Pass" in msg or "Use" in msg                    # ... and what to do


def test_numpy_scalars_are_accepted():
    s = PoissonBatchSampler(np.int64(10), np.float32(0.5), np.int32(2))
    assert (s.num_samples, s.steps) == (10, 2) and type(s.num_samples) is int


@pytest.mark.parametrize("kw", ["batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"])
def test_loader_refuses_batching_kwargs(kw):
    with pytest.raises(ValueError, match=kw):
        dp_data_loader(TensorDataset(torch.zeros(4)), 0.5, 2, **{kw: None})


def test_loader_refuses_unusable_datasets():
    with pytest.raises(ValueError, match="empty"):
        dp_data_loader(TensorDataset(torch.zeros(0, 2)), 0.5, 2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="map-style"):
        dp_data_loader(Stream(), 0.5, 2)
    with pytest.raises(ValueError, match="sample_rate"):
        dp_data_loader(TensorDataset(torch.zeros(4)), 2.0, 2)
    with pytest.raises(ValueError, match="num_samples"):
        expected_batch_size(0, 0.5)
