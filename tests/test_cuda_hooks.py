"""Every hook with CUDA gradients: 2 ranks on gloo sharing one GPU (gloo moves CUDA tensors
across processes), and NCCL with one rank (one GPU: NCCL cannot run two ranks on one device).
The replicas must agree after a few steps, and the parameters must stay finite and on the GPU.
Skipped without a CUDA device (CI); run on the GPU machine by benchmarks/gpu.sh."""

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from tests._dist import spawn
from tests.hooks._models import make_model, rank_batch

pytestmark = pytest.mark.cuda

STEPS = 4
CASES = {
    "terngrad-int8": ("terngrad", {"collective": "int8"}),
    "terngrad-allgather": ("terngrad", {"collective": "allgather"}),
    "terngrad-two_phase": ("terngrad", {"collective": "two_phase", "error_feedback": True}),
    "sketch_dp": ("sketch_dp", {"sketch_ratio": 0.2, "noise_multiplier": 0.5, "clip_norm": 1.0}),
    # s close to d: many rows drawn 3+ times, whose de-sketch sum order must not differ by rank
    "sketch_dp-srht": ("sketch_dp", {"sketch": "srht", "sketch_ratio": 0.9, "noise_multiplier": 0.5,
                                     "clip_norm": 1.0}),
    "gradient_coding": ("gradient_coding", {"s": 1}),
    "gradient_tracking-ternary": ("gradient_tracking", {"compressor": "ternary"}),
    "gradient_tracking-exact": ("gradient_tracking", {"compressor": None}),
}


def _train(rank, world, name, options):
    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = DDP(make_model().to(dev), device_ids=[0], broadcast_buffers=False, bucket_cap_mb=0.001)
    if name == "gradient_tracking":
        gt = commcomp.decentralized.GradientTracking(model, 0.05, topology="ring" if world > 2 else "complete",
                                                     **options)
        step = gt.step
        opt = None
    else:
        state = commcomp.register(model, name, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        step = opt.step
    for i in range(STEPS):
        model.zero_grad()
        if name == "gradient_coding":
            loss = 0.0
            for j in state.code.partitions(rank):
                x, y = rank_batch(100 * i + j)
                loss = loss + float(state.code.B[rank, j]) * ((model(x.to(dev)) - y.to(dev)) ** 2).mean()
        else:
            x, y = rank_batch(100 * i + rank)
            loss = ((model(x.to(dev)) - y.to(dev)) ** 2).mean()
        loss.backward()
        step()
    if name == "gradient_coding":
        assert state.close()
    if name == "gradient_tracking":
        avg = gt.average_parameters()
        flat = torch.cat([avg[n].reshape(-1) for n, _ in model.named_parameters()])
    else:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert flat.is_cuda and torch.isfinite(flat).all()
    if world > 1:  # DDP replicas agree exactly; so does the decentralized average every rank computes
        every = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        for r in range(1, world):
            assert torch.equal(every[r], every[0]), f"{name}: rank {r}'s model differs from rank 0's"
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()]).to(dev)
    assert not torch.equal(flat, start), f"{name}: the model did not move"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hook_on_cuda_over_gloo(tmp_path, case):
    name, options = CASES[case]
    spawn(_train, 2, tmp_path, name, options)


def _nccl_entry(rank, init_file, name, options):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _train(0, 1, name, options)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs NCCL")
@pytest.mark.parametrize("case", ["terngrad-int8", "terngrad-allgather", "terngrad-two_phase", "sketch_dp"])
def test_hook_on_nccl_one_rank(tmp_path, case):
    name, options = CASES[case]
    mp.spawn(_nccl_entry, args=(os.path.join(str(tmp_path), "rdzv"), name, options), nprocs=1, join=True)
