"""Registration is a collective that fails on every rank or on none: a state that cannot be
built on one rank, a second hook on one model, a closed state used again; and ByteCounter
metrics pickle."""

import copy
import pickle

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.collectives import ExecutorClosed
from commcomp.utils import ByteCounter
from tests._dist import spawn
from tests.hooks._models import local_grads, make_model


def run_one_rank_fails(rank, world):
    model = DDP(make_model(), bucket_cap_mb=0.001)
    # num_records is each rank's own: on rank 1, target_delta is not below 1/num_records
    with pytest.raises(ValueError if rank == 1 else RuntimeError,
                       match="is not below 1/num_records" if rank == 1 else r"failed on rank\(s\) \[1\]"):
        commcomp.register(model, "sketch_dp", num_records=10 ** 4 if rank == 0 else 10 ** 6, target_delta=1e-5)
    local_grads(model, rank)  # no rank registered it: plain DDP all-reduce, no hang

    state = commcomp.register(model, "gradient_coding", s=0)
    with pytest.raises(RuntimeError, match="register_comm_hook"):  # DDP takes one hook
        commcomp.register(model, "terngrad")
    local_grads(model, rank)
    assert state.close(timeout=10)
    with pytest.raises(ExecutorClosed, match="was closed"):
        local_grads(model, rank)  # a closed state sends nothing more


def test_registration_fails_on_every_rank_or_none(tmp_path):
    spawn(run_one_rank_fails, 2, tmp_path)


def test_byte_counter_pickles_and_restores_exactly():
    c = ByteCounter(("bytes_x",))
    c.sent(10, "bytes_x")
    c.fp32_allreduce(100, 4)
    assert dict(pickle.loads(pickle.dumps(c))) == dict(c) == dict(copy.deepcopy(c))
    fresh = ByteCounter(("bytes_x",))
    fresh.sent(5)
    fresh.load_state_dict({"bytes_sent": 3})  # a counter the save lacks restarts at 0
    assert dict(fresh) == {"bytes_sent": 3, "bytes_sent_fp32_allreduce": 0, "bytes_x": 0}
    with pytest.raises(ValueError, match="not declared here"):
        fresh.load_state_dict({"bytes_y": 1})
    with pytest.raises(KeyError, match="no byte counter 'bytes_z'"):
        c.add(1, "bytes_z")
    assert torch.tensor(c.ratio()) > 1
