"""Coded data assignment and the coded loss: partitions of a step are disjoint and cover the
global batch, every rank agrees on them, the weights follow B's row, DataLoader integration,
and -- on a tiny float64 model -- the decoded coded gradients equal the mean of the
per-partition gradients for every survivor set."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from commcomp.coding.codes import cyclic_repetition_code, fractional_repetition_code, make_code
from commcomp.coding.data import CodedSampler, coded_loss, epoch_permutation, uncoded_partition

CODES = [cyclic_repetition_code(5, 2, seed=1), fractional_repetition_code(6, 2), make_code("cyclic", 4, 0)]


def samplers(code, dataset_size=103, partition_size=4, **kw):
    return [CodedSampler(dataset_size, code, rank, partition_size, **kw) for rank in range(code.n)]


@pytest.mark.parametrize("code", CODES, ids=repr)
def test_partitions_disjoint_cover_and_agree(code):
    every = samplers(code, seed=3)
    first = every[0]
    assert len(first) == 103 // (code.n * 4)
    seen = set()
    for epoch in (0, 1):
        for sampler in every:
            sampler.set_epoch(epoch)
        for step in range(len(first)):
            parts = [first.partition(step, j) for j in range(code.n)]
            flat = [i for p in parts for i in p]
            assert len(set(flat)) == len(flat) == code.n * 4  # disjoint
            assert flat == first.global_batch(step)  # cover the global batch, in order
            assert not seen & set(flat)  # steps of an epoch do not repeat samples
            seen |= set(flat)
            for rank, sampler in enumerate(every):  # every rank cuts the same partitions
                assert [sampler.partition(step, j) for j in range(code.n)] == parts
                assert sampler.batch(step) == [i for j in code.partitions(rank) for i in parts[j]]
                assert uncoded_partition(103, code.n, 4, step, rank, epoch=epoch, seed=3) == parts[rank]
        seen = set()
    assert len(first.global_batch(0)) == code.n * 4


def test_epochs_and_seeds():
    code = CODES[0]
    a, b = CodedSampler(100, code, 0, 5, seed=1), CodedSampler(100, code, 0, 5, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(CodedSampler(100, code, 0, 5, seed=2)) != list(a)
    ordered = CodedSampler(100, code, 0, 5, shuffle=False)
    assert ordered.partition(1, 2) == list(range(35, 40))
    assert torch.equal(epoch_permutation(10, shuffle=False), torch.arange(10))
    before = torch.get_rng_state()
    list(CodedSampler(100, code, 0, 5, seed=1))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("code", CODES, ids=repr)
def test_weights_follow_row(code):
    for rank, sampler in enumerate(samplers(code, partition_size=3)):
        w = sampler.sample_weights()
        assert w.dtype == torch.float64 and w.shape == ((code.s + 1) * 3,)
        expected = torch.cat([torch.full((3,), float(code.B[rank, j]) / 3, dtype=torch.float64)
                              for j in code.partitions(rank)])
        assert torch.equal(w, expected)
        assert sampler.sample_weights(torch.float32).dtype == torch.float32
        w[0] = 123.0  # a copy: the sampler's weights are unchanged
        assert sampler.sample_weights()[0] != 123.0


def test_data_loader_integration():
    code = CODES[0]
    data = torch.arange(60, dtype=torch.float64)
    sampler = CodedSampler(len(data), code, rank=3, partition_size=2, seed=0)
    sampler.set_epoch(2)
    loader = DataLoader(TensorDataset(data), batch_sampler=sampler)
    batches = [x for (x,) in loader]
    assert len(batches) == len(loader) == 6
    for step, x in enumerate(batches):
        assert x.tolist() == [float(i) for i in sampler.batch(step)]
        assert x.shape == sampler.sample_weights().shape


def tiny_problem(dataset_size=64, dim=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(dataset_size, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(dataset_size, generator=gen, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    return x, y, model


def grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def per_sample(model, x, y):
    return (model(x).squeeze(1) - y) ** 2


@pytest.mark.parametrize("code", CODES, ids=repr)
def test_decoded_coded_gradient_equals_uncoded_mean(code):
    x, y, model = tiny_problem()
    every = samplers(code, dataset_size=len(x), partition_size=3, seed=7)
    for sampler in every:
        sampler.set_epoch(1)
    for step in range(2):
        # Uncoded: each partition's mean-loss gradient; DDP would average these over n ranks.
        parts = [every[0].partition(step, j) for j in range(code.n)]
        target = torch.stack([grad(model, per_sample(model, x[p], y[p]).mean()) for p in parts]).mean(0)
        coded = {}
        for rank, sampler in enumerate(every):
            idx = sampler.batch(step)
            coded[rank] = grad(model, coded_loss(per_sample(model, x[idx], y[idx]), sampler.sample_weights()))
        for S in itertools.combinations(range(code.n), code.n - code.s):
            a = code.decode(S)
            decoded = sum(a[i] * coded[i] for i in S) / code.n
            torch.testing.assert_close(decoded, target, rtol=1e-10, atol=1e-12)


def test_identity_code_is_the_uncoded_baseline():
    x, y, model = tiny_problem()
    sampler = CodedSampler(len(x), make_code("cyclic", 4, 0), rank=2, partition_size=5)
    idx = sampler.batch(0)
    assert idx == sampler.partition(0, 2)
    loss = coded_loss(per_sample(model, x[idx], y[idx]), sampler.sample_weights())
    torch.testing.assert_close(loss, per_sample(model, x[idx], y[idx]).mean(), rtol=1e-14, atol=0)


def test_coded_loss_casts_and_checks():
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    out = coded_loss(losses, torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64))
    assert out.dtype == torch.float32 and out.item() == -2.5
    with pytest.raises(ValueError, match="one loss per sample"):
        coded_loss(losses, torch.ones(4))
    with pytest.raises(ValueError, match="reduction='none'"):
        coded_loss(torch.ones(3, 2), torch.ones(3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset_size=10, rank=0, partition_size=3), "global batch of n \\* partition_size = 5 \\* 3 = 15"),
    (dict(dataset_size=100, rank=5, partition_size=3), "rank must be in 0..4"),
    (dict(dataset_size=100, rank=0, partition_size=0), "partition_size must be >= 1"),
    (dict(dataset_size=100, rank=0.5, partition_size=3), "rank must be an integer"),
])
def test_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodedSampler(code=CODES[0], **kwargs)


def test_index_errors():
    sampler = CodedSampler(100, CODES[0], 0, 5)
    with pytest.raises(ValueError, match="step must be in 0..3"):
        sampler.batch(4)
    with pytest.raises(ValueError, match="partition must be in 0..4"):
        sampler.partition(0, 5)
    with pytest.raises(ValueError, match="partition must be in 0..4"):
        uncoded_partition(100, 5, 5, 0, 7)
    with pytest.raises(ValueError, match="GradientCode"):
        CodedSampler(100, "cyclic", 0, 5)
    assert "rank=0" in repr(sampler)
