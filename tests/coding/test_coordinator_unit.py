"""Coordinator pieces that need no peers: message framing and the decoding-accuracy warning."""

import logging

import pytest
import torch

from commcomp.coding import CodedAggregator, make_code
from commcomp.coding.coordinator import pack, unpack


class NoPeers:
    """A transport whose messages never arrive (only the threads' set-up is exercised)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def isend(self, buf, peer):
        raise AssertionError("nothing is sent in these tests")

    def irecv(self, buf, peer):
        raise AssertionError("nothing is received in these tests")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_messages_round_trip(dtype):
    payload = torch.randn(37).to(dtype)
    key, sender, got = unpack(pack((12, 3), 5, payload), dtype)
    assert key == (12, 3) and sender == 5 and torch.equal(got, payload)
    bad = pack((1, 0), 0, payload)
    bad[:8] = 0
    with pytest.raises(RuntimeError, match="bad header"):
        unpack(bad, dtype)


def test_warns_when_a_cyclic_code_magnifies_float32_rounding(caplog):
    n, s = 64, 8
    agg = CodedAggregator(make_code("cyclic", n, s), transport=NoPeers(0, n), timeout=5)
    survivors = list(range(s, n))
    with caplog.at_level(logging.WARNING, logger="commcomp.coding.coordinator"):
        agg._warn_amplification(survivors, torch.float64)  # float64: never
        assert not caplog.records
        agg._warn_amplification(survivors, torch.float32)
    amp = agg.code.amplification(survivors)
    assert (amp * torch.finfo(torch.float32).eps > 1e-3) == bool(caplog.records), amp
    assert agg.close(timeout=1)


def test_fractional_code_never_warns(caplog):
    agg = CodedAggregator(make_code("fractional", 8, 1), transport=NoPeers(0, 8), timeout=5)
    with caplog.at_level(logging.WARNING, logger="commcomp.coding.coordinator"):
        agg._warn_amplification([0, 1, 2, 4, 5, 6, 7], torch.bfloat16)
    assert not caplog.records
    assert agg.close(timeout=1)


def test_code_must_match_the_group():
    with pytest.raises(ValueError, match="n=4 workers but the group has 3 ranks"):
        CodedAggregator(make_code("cyclic", 4, 1), transport=NoPeers(0, 3))


def test_a_send_refused_at_once_marks_the_peer_dead_instead_of_failing_the_round():
    """gloo's isend can raise synchronously when the pair closed before the receiver noticed
    (seen in CI: the coordinator's round failed with a raw "Connection reset by peer")."""
    from commcomp.coding.transport import PeerSender

    dead = {}

    class Refusing(NoPeers):
        def isend(self, buf, peer):
            raise RuntimeError("Connection reset by peer")

    tx = PeerSender(Refusing(0, 2), 1, lambda peer, exc: dead.setdefault(peer, str(exc)))
    tx.start()
    tx.send(torch.zeros(4, dtype=torch.uint8))  # must not raise
    assert dead == {1: "Connection reset by peer"} and tx.failed is not None and tx.pending == 0
    tx.send(torch.zeros(4, dtype=torch.uint8))  # a failed sender drops later sends
    tx.stop()
    tx.join(5)
    assert not tx.is_alive()


def test_bytes_are_counted_in_the_counter_given():
    """The hook passes its metrics (a ByteCounter): the aggregator's sends land there, and
    ``bytes_sent`` reads it back."""
    from commcomp.utils import ByteCounter

    sent = []

    class Recording(NoPeers):
        def isend(self, buf, peer):
            sent.append(buf.numel())
            return DoneWork()

        def irecv(self, buf, peer):
            return NeverWork()

    class DoneWork:
        def wait(self):
            pass

    class NeverWork:
        def wait(self):
            raise RuntimeError("closed")

    counter = ByteCounter()
    agg = CodedAggregator(make_code("cyclic", 2, 1), transport=Recording(1, 2), timeout=5, counter=counter)
    assert agg.counter is counter and agg.bytes_sent == 0 and agg.dead_set() == agg._dead_set()
    agg.start((0, 0), torch.ones(5))
    assert agg.bytes_sent == counter["bytes_sent"] == sum(sent) == 32 + 5 * 4
    agg.close(timeout=1)
    assert CodedAggregator(make_code("cyclic", 2, 1), transport=NoPeers(0, 2)).bytes_sent == 0
