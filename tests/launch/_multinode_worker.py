"""The ranks of tests/launch/test_multinode.py: run by torchrun, one agent in each of two network
namespaces (two emulated hosts), 2 ranks each. Every case trains a fresh model for a few steps
with one hook over gloo and checks the replicas; ``<out>/rank<r>.json`` gets
``{"ifname": ..., "cases": {case: "ok" or the error}}``, rewritten after every case.

    torchrun --nnodes 2 --nproc-per-node 2 ... tests/launch/_multinode_worker.py OUT_DIR

A case is named ``hook`` or ``hook/variant`` after a key of :data:`commcomp.hooks.HOOKS`
(``ddp`` is plain DDP, no hook); the test fails for a hook that has no case here.
``COMMCOMP_MULTINODE_FAIL=<case>`` makes rank 1 fail that case (to check the failure path).
"""

import datetime
import functools
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import commcomp  # noqa: E402
from commcomp.decentralized import GradientTracking  # noqa: E402

STEPS = 3  # the first step rebuilds DDP's buckets; the later ones use the rebuilt ones
LR = 0.05
BUCKET_MB = 0.004  # ~1000 floats: the model's five tensors land in several buckets


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def batch(seed, step):
    g = torch.Generator().manual_seed(1000 * step + seed)
    return torch.randn(16, 20, generator=g), torch.randn(16, 5, generator=g)


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def assert_same_everywhere(flat, world, what):
    """Bit-identical on every rank: rank 0's copy against each other rank's."""
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    for r in range(1, world):
        if not torch.equal(every[r], every[0]):
            diff = (every[r] - every[0]).abs().max().item()
            raise AssertionError(f"{what}: rank {r}'s copy differs from rank 0's (max |diff| {diff:.3g})")


def assert_trained(before, after, world, what):
    assert torch.isfinite(after).all(), f"{what}: non-finite parameters after training"
    assert not torch.equal(before, after), f"{what}: the parameters did not move"
    assert_same_everywhere(after, world, what)


def sgd_steps(model, backward):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        backward(step)
        opt.step()


# -- the cases: case(rank, world) raises on failure
def case_ddp(rank, world, hook=None, **options):
    """Plain DDP (hook None) or one hook from the registry, on this rank's own batches."""
    ddp = DDP(make_model(), bucket_cap_mb=BUCKET_MB)
    state = commcomp.register(ddp, hook, **options) if hook else None
    before = flat_params(ddp)
    sgd_steps(ddp, lambda step: mse(ddp, *batch(rank, step)).backward())
    assert_trained(before, flat_params(ddp), world, hook or "ddp")
    if state is not None:
        assert state.step == STEPS and state.metrics["bytes_sent"] > 0, (state.step, state.metrics)


def case_gradient_coding(rank, world):
    """Rank i back-propagates sum_j B[i, j] * loss_j over its s + 1 partitions (every rank can
    compute every partition); rank 0 decodes from the first n - s coded buckets."""
    ddp = DDP(make_model(), bucket_cap_mb=BUCKET_MB, broadcast_buffers=False)
    state = commcomp.register(ddp, "gradient_coding", s=1, timeout=60)
    code = state.code

    def coded_backward(step):
        loss = sum(float(code.B[rank, j]) * mse(ddp, *batch(j, step)) for j in code.partitions(rank))
        loss.backward()

    before = flat_params(ddp)
    try:
        sgd_steps(ddp, coded_backward)
    finally:
        delivered = state.close(timeout=60)  # before any other collective: late results still arrive
    assert delivered, "gradient_coding: close() did not deliver every round's result"
    assert_trained(before, flat_params(ddp), world, "gradient_coding")


def case_gradient_tracking(rank, world, compressor):
    """Decentralized on a ring: the replicas differ by design; their average must not."""
    ddp = DDP(make_model(), bucket_cap_mb=BUCKET_MB)
    gt = GradientTracking(ddp, LR, topology="ring", compressor=compressor)
    before = flat_params(ddp)
    for step in range(STEPS):
        gt.zero_grad()
        mse(ddp, *batch(rank, step)).backward()
        gt.step()
    avg = torch.cat([v.reshape(-1) for v in gt.average_parameters().values()])
    assert_trained(before, avg, world, f"gradient_tracking/{compressor}: average_parameters()")


CASES = {
    "ddp": case_ddp,
    "terngrad/int8": functools.partial(case_ddp, hook="terngrad", collective="int8", min_compress_numel=0),
    "terngrad/allgather": functools.partial(case_ddp, hook="terngrad", collective="allgather", min_compress_numel=0),
    "terngrad/two_phase": functools.partial(case_ddp, hook="terngrad", collective="two_phase", min_compress_numel=0),
    "sketch_dp/countsketch": functools.partial(case_ddp, hook="sketch_dp", sketch="countsketch", sketch_ratio=0.25,
                                               noise_multiplier=0.5, clip_norm=1.0),
    "sketch_dp/srht": functools.partial(case_ddp, hook="sketch_dp", sketch="srht", sketch_ratio=0.25,
                                        noise_multiplier=0.5, clip_norm=1.0),
    "gradient_coding": case_gradient_coding,
    "gradient_tracking/exact": functools.partial(case_gradient_tracking, compressor=None),
    "gradient_tracking/ternary": functools.partial(case_gradient_tracking, compressor="ternary"),
}


def all_ok(ok: bool) -> bool:
    """Whether the case passed on every rank (False too when the group no longer works)."""
    try:
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0
    except Exception:  # noqa: BLE001 - a broken group is a failed case
        return False


def write(path, report):
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def main(out_dir):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    path = os.path.join(out_dir, f"rank{rank}.json")
    report = {"rank": rank, "world": world, "ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "cases": {}}
    inject = os.environ.get("COMMCOMP_MULTINODE_FAIL")
    healthy = True
    for name, case in CASES.items():
        if not healthy:  # the ranks may no longer agree on which collective comes next
            report["cases"][name] = "not run: an earlier case failed on some rank"
            continue
        try:
            case(rank, world)
            if name == inject and rank == 1:  # after the case: the collectives stay in step
                raise RuntimeError("failure injected by COMMCOMP_MULTINODE_FAIL")
            report["cases"][name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported per case
            report["cases"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
        healthy = all_ok(report["cases"][name] == "ok")
        write(path, report)
    if healthy:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (gloo threads may still hold tensors: pytorch/pytorch#179291).
    os._exit(0 if healthy else 1)


if __name__ == "__main__":
    main(sys.argv[1])
