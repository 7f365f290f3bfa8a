"""The ternary collectives against an independent computation of the same average."""

import pytest
import torch
import torch.distributed as dist

from commcomp import collectives, ops, perfmodel
from commcomp.collectives import Encoding
from commcomp.collectives.buffers import BufferPool
from commcomp.ops.reference import per_element
from tests._dist import rank_tensor, spawn

LENGTHS = [500, 3, 0, 501]  # odd sizes: chunks and bytes straddle segments
N = sum(LENGTHS)


def shared_scales(world, dtype):
    xs = [rank_tensor(r, N, dtype) for r in range(world)]
    return xs, torch.stack([ops.segment_stats(x, LENGTHS)[0] for x in xs]).amax(0)


def exact_average(xs, scales, world):
    """mean_r decode(code_r), from the codes every rank would draw (seed 100 + r, offset 8)."""
    codes = [ops.ternarize_int8(x, scales, 100 + r, 8, segments=LENGTHS) for r, x in enumerate(xs)]
    return sum(c.to(torch.int32) for c in codes).float() * per_element(scales, LENGTHS, N) / world


def requantized_average(avg, scales, world, piece=N):
    """What two_phase(requantize=True) must return: each owner's chunk re-ternarized; with
    pipelining, each piece of `piece` elements is a two_phase exchange of its own."""
    out = torch.zeros(N)
    for a in range(0, N, piece):
        b = min(N, a + piece)
        piece_len, piece_idx = collectives.ternary.slice_segments(LENGTHS, a, b)
        chunk = -(-((b - a + 3) // 4) // world)
        for owner in range(world):
            e0, e1 = min(4 * chunk * owner, b - a), min(4 * chunk * (owner + 1), b - a)
            lens, idx = collectives.ternary.slice_segments(piece_len, e0, e1)
            if e1 > e0:
                s = scales[piece_idx][idx]
                codes = ops.ternarize_int8(avg[a + e0:a + e1].contiguous(), s, 200 + owner, 8 + a + e0, segments=lens)
                out[a + e0:a + e1] = codes.float() * per_element(s, lens, e1 - e0)
    return out


def run_collective(rank, world, name, dtype):
    xs, scales = shared_scales(world, dtype)
    enc = Encoding(scales, LENGTHS, seed=100 + rank, offset=8)
    kwargs = {}
    if name.startswith("two_phase"):
        kwargs = {"seed2": 200 + rank, "requantize": name == "two_phase"}
    fn = collectives.COLLECTIVES[name.replace("_exact", "")]
    launched = fn(xs[rank], enc, None, want_own=True, **kwargs)
    got = launched.future.wait()
    avg = exact_average(xs, scales, world)
    if name == "two_phase":
        want = requantized_average(avg, scales, world)
    else:
        want = avg
    if name == "allgather":  # a float32 running sum of +-s: may round differently in the last bit
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    else:
        assert torch.equal(got, want)
    # This rank's own decoded payload, for error feedback.
    own = ops.ternarize_int8(xs[rank], scales, 100 + rank, 8, segments=LENGTHS).float()
    assert torch.equal(launched.own, own * per_element(scales, LENGTHS, N))
    # Every rank ends with the same bytes: replicas stay in sync.
    every = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(every, got)
    assert all(torch.equal(e, got) for e in every)
    assert launched.bytes_sent > 0
    # Decoding into a given tensor with buffers kept across calls (the hook's hot path) gives
    # the same values, on the first call and when the buffers are reused (holding old data).
    # Another seed on the second call: stale data left in a reused buffer would show.
    pool = BufferPool()
    for seed in (100 + rank, 300 + rank):
        other = Encoding(scales, LENGTHS, seed=seed, offset=8)
        fresh = fn(xs[rank], other, None, **kwargs).future.wait()
        dest = torch.full((N,), 7.0)
        again = fn(xs[rank], other, None, out=dest, scratch=pool.scope(0), **kwargs)
        assert again.future.wait() is dest
        assert torch.equal(dest, fresh)
    assert len(pool) > 0 or name == "int8"
    # Pipelined in pieces (cut across segments): int8 and allgather give the same values;
    # two_phase is one exchange per piece; own payloads are whole.
    piece = 256
    dest = torch.full((N,), 7.0)
    piped = collectives.pipelined(name.replace("_exact", ""), xs[rank], enc, None, piece_numel=piece,
                                  want_own=True, out=dest, scratch=pool.scope(1), **kwargs)
    value = piped.future.wait()
    assert value is dest
    if name == "two_phase":
        assert torch.equal(value, requantized_average(avg, scales, world, piece))
    else:
        assert torch.equal(value, got)
    assert torch.equal(piped.own, launched.own)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["int8", "allgather", "two_phase_exact", "two_phase"])
def test_collective_equals_exact_average(tmp_path, world, name):
    spawn(run_collective, world, tmp_path, name, torch.float32)


@pytest.mark.parametrize("name", ["int8", "allgather", "two_phase"])
def test_collective_bf16_input(tmp_path, name):
    spawn(run_collective, 2, tmp_path, name, torch.bfloat16)


def test_bytes_per_rank_stay_flat_for_two_phase():
    n = 1 << 20
    for w in (2, 4, 8, 16):
        t2 = perfmodel.estimate("two_phase", n, w, perfmodel.LinkModel(latency_s=0, codec_s_per_element=0))
        ag = perfmodel.estimate("allgather", n, w, perfmodel.LinkModel(latency_s=0, codec_s_per_element=0))
        assert t2 <= 2 * n / 4 / 1.25e8 * 1.0001  # < 2 * n/4 bytes whatever W
        assert ag >= t2 * (w - 1) / 2 - 1e-12


def test_auto_choice_depends_on_world_size():
    assert perfmodel.choose(1 << 22, 2) == "allgather"
    assert perfmodel.choose(1 << 22, 16) == "two_phase"
