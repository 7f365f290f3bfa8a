"""BufferPool: the same tensor for the same name, size, dtype and device; new otherwise."""

import torch

from commcomp.collectives.buffers import FRESH, BufferPool


def test_pool_reuses_by_key_size_and_dtype():
    pool = BufferPool()
    a = pool.get("a", 10, torch.float32)
    a.fill_(3.0)
    b = pool.get("a", 10, torch.float32)
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, torch.full((10,), 3.0))  # old data kept
    assert pool.get("a", 10, torch.float32, zero=True).eq(0).all()
    assert pool.get("a", 11, torch.float32).numel() == 11  # another size: a new buffer
    assert pool.get("a", 11, torch.int8).dtype == torch.int8
    assert len(pool) == 1 and pool.nbytes() == 11


def test_scopes_keep_buckets_apart_and_fresh_allocates():
    pool = BufferPool()
    x, y = pool.scope(0).get("buf", 4, torch.uint8), pool.scope(1).get("buf", 4, torch.uint8)
    assert x.data_ptr() != y.data_ptr() and len(pool) == 2
    first, second = FRESH.get("buf", 4, torch.float32, zero=True), FRESH.get("buf", 4, torch.float32)
    assert first.data_ptr() != second.data_ptr() and first.eq(0).all()
    pool.clear()
    assert len(pool) == 0 and pool.nbytes() == 0


def test_sweep_drops_what_was_not_asked_for_since_the_last_sweep():
    pool = BufferPool()
    pool.get((0, "x"), 8, torch.float32)
    pool.get((1, "x"), 8, torch.float32)
    pool.sweep()
    assert len(pool) == 2
    kept = pool.get((1, "x"), 8, torch.float32)  # a step that only used bucket 1 (after a rebuild)
    pool.sweep()
    assert len(pool) == 1 and pool.get((1, "x"), 8, torch.float32).data_ptr() == kept.data_ptr()
