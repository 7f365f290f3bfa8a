"""Every hook with CUDA gradients: 2 ranks on gloo sharing one GPU (gloo moves CUDA tensors
across processes), and NCCL with one rank (one GPU: NCCL cannot run two ranks on one device).

The first step's gradient (what the hook returned) is checked against what the algorithm must
return, computed on the GPU without DDP or the hook from every rank's batch: the exact mean
where the algorithm is exact (gradient coding, exact gradient tracking, an orthogonal sketch
with clipping), the clipped mean plus noise of the right std (sketch_dp with noise), ternary
values with the gradient's signs (TernGrad, whose layers are compressed here: the default
min_compress_numel would send this model's small layers in fp32), and never the rank's own
gradient. With one NCCL rank averaging is the identity, so these are the checks that a hook
returning its input fails. Then the replicas must agree after a few steps, and the
parameters must stay finite, on the GPU, and move. Skipped without a CUDA device (CI); run
on the GPU machine by benchmarks/gpu.sh."""

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
CLIP = 1e-3  # far below this model's gradient norms: clipping binds on every rank
TERNGRAD = {"min_compress_numel": 0}  # compress every layer (the default sends layers < 1024 in fp32)
# name -> (hook, options, first-step check: see _check_first_step)
CASES = {
    "terngrad-int8": ("terngrad", {**TERNGRAD, "collective": "int8"}, "ternary"),
    "terngrad-allgather": ("terngrad", {**TERNGRAD, "collective": "allgather"}, "ternary"),
    "terngrad-two_phase": ("terngrad", {**TERNGRAD, "collective": "two_phase", "error_feedback": True},
                           "ternary"),
    "sketch_dp": ("sketch_dp", {"sketch_ratio": 0.2, "noise_multiplier": 0.5, "clip_norm": 1.0}, None),
    # s close to d: many rows drawn 3+ times, whose de-sketch sum order must not differ by rank
    "sketch_dp-srht": ("sketch_dp", {"sketch": "srht", "sketch_ratio": 0.9, "noise_multiplier": 0.5,
                                     "clip_norm": 1.0}, None),
    # an orthogonal sketch (srht at ratio 1): R^T R = I, so the result is known exactly
    "sketch_dp-clipped": ("sketch_dp", {"sketch": "srht", "sketch_ratio": 1.0, "clip_norm": CLIP},
                          "clipped_mean"),
    "sketch_dp-noise": ("sketch_dp", {"sketch": "srht", "sketch_ratio": 1.0, "clip_norm": CLIP,
                                      "noise_multiplier": 1.0}, "noisy_mean"),
    "gradient_coding": ("gradient_coding", {"s": 1}, "mean"),
    "gradient_tracking-ternary": ("gradient_tracking", {"compressor": "ternary"}, None),
    # complete graph (2 ranks), exact messages, gamma 1: y_i = W g = the mean gradient at step 0
    "gradient_tracking-exact": ("gradient_tracking", {"compressor": None}, "mean"),
}


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _first_step_inputs(name, state, world, dev):
    """What every rank's hook is given at step 0, from the shared starting model on the GPU
    without DDP: [rank's gradient], and the mean the algorithm estimates (for gradient coding
    the coded combinations, and the mean of the partitions' gradients)."""
    ref = make_model().to(dev)

    def grad(j):
        ref.zero_grad()
        x, y = rank_batch(j)
        ((ref(x.to(dev)) - y.to(dev)) ** 2).mean().backward()
        return _flat([p.grad.detach().clone() for p in ref.parameters()])

    if name == "gradient_coding":
        parts = [grad(j) for j in range(world)]
        code = state.code
        coded = [sum(float(code.B[r, j]) * parts[j] for j in code.partitions(r)) for r in range(world)]
        return coded, torch.stack(parts).mean(0)
    local = [grad(r) for r in range(world)]
    return local, torch.stack(local).mean(0)


def _check_first_step(case, out, inputs, mean, rank, world, options, lengths):
    """`out`: this rank's flat gradient after its first backward through DDP and the hook."""
    check = CASES[case][2]
    assert out.is_cuda and torch.isfinite(out).all(), f"{case}: non-finite or not on the GPU"
    own = inputs[rank]
    assert not torch.allclose(out, own, rtol=1e-3, atol=1e-7), f"{case}: the hook returned its input"
    if check == "mean":
        torch.testing.assert_close(out, mean, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{case}: not the mean: {m}")
    elif check in ("clipped_mean", "noisy_mean"):
        clipped = torch.stack([g * min(1.0, CLIP / float(g.norm())) for g in inputs]).mean(0)
        if check == "clipped_mean":
            torch.testing.assert_close(out, clipped, rtol=1e-4, atol=1e-9,
                                       msg=lambda m: f"{case}: not the mean of the clipped gradients: {m}")
        else:  # each rank adds N(0, (sigma C)^2) per coordinate; the mean of W has std sigma C / sqrt(W)
            noise = (out - clipped).double()
            std = options["noise_multiplier"] * CLIP / world ** 0.5
            n = noise.numel()
            assert abs(float(noise.mean())) < 5 * std / n ** 0.5, (case, float(noise.mean()), std)
            # the sample std of n = 1535 draws is within 10% of std but with odds of 5.5 sigma
            assert 0.9 * std < float(noise.std()) < 1.1 * std, (case, float(noise.std()), std)
    elif check == "ternary":
        pos = 0
        for n in lengths:
            layer, g = out[pos:pos + n], own[pos:pos + n]
            pos += n
            values = torch.unique(layer)
            if world == 1:  # this rank's own codes: {-c, 0, c}, with the signs of its gradient
                c = float(layer.abs().max())
                assert c > 0 and all(float(v) in (-c, 0.0, c) for v in values), (case, values[:8])
                same_sign = (layer == 0) | (torch.sign(layer) == torch.sign(g))
                assert bool(same_sign.all()), f"{case}: a sign flipped"
            elif n > 10 * world:  # a mean of W ranks' ternary codes: a few levels, not a float gradient
                assert values.numel() <= 4 * world + 1, (case, n, values.numel())
    else:
        assert check is None, check


def _need_accounting(case):
    if case.startswith("sketch_dp"):  # its (epsilon, delta) ledger needs the dp extra
        pytest.importorskip("dp_accounting", reason="sketch_dp needs dp-accounting (pip install 'commcomp[dp]')")


def _train(rank, world, case):
    name, options = CASES[case][:2]
    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = DDP(make_model().to(dev), device_ids=[0], broadcast_buffers=False, bucket_cap_mb=0.001)
    if name == "gradient_tracking":
        gt = commcomp.decentralized.GradientTracking(model, 0.05, topology="ring" if world > 2 else "complete",
                                                     **options)
        state = gt.hook_state
        step = gt.step
    else:
        state = commcomp.register(model, name, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        step = opt.step
    inputs, mean = _first_step_inputs(name, state, world, dev)
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
        if i == 0:
            out = _flat([p.grad.detach() for p in model.parameters()])
            lengths = [p.numel() for p in model.parameters()]
            _check_first_step(case, out, inputs, mean, rank, world, options, lengths)
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
            assert torch.equal(every[r], every[0]), f"{case}: rank {r}'s model differs from rank 0's"
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()]).to(dev)
    assert not torch.equal(flat, start), f"{case}: the model did not move"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hook_on_cuda_over_gloo(tmp_path, case):
    _need_accounting(case)
    spawn(_train, 2, tmp_path, case)


def _nccl_entry(rank, init_file, case):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _train(0, 1, case)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


NCCL_CASES = ["terngrad-int8", "terngrad-allgather", "terngrad-two_phase", "sketch_dp", "sketch_dp-clipped",
              "sketch_dp-noise"]


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs NCCL")
@pytest.mark.parametrize("case", NCCL_CASES)
def test_hook_on_nccl_one_rank(tmp_path, case):
    _need_accounting(case)
    mp.spawn(_nccl_entry, args=(os.path.join(str(tmp_path), "rdzv"), case), nprocs=1, join=True)


# ------------------------------------------------------------- the exchange's own stream
SLEEP_CYCLES = int(5e8)  # ~0.25 s of GPU time at ~2 GHz: far longer than the kernels around it


def test_kernels_issued_after_submit_do_not_queue_behind_the_job():
    """The executor runs a CUDA job on its own stream: work the submitter issues afterwards
    completes while the job's (deliberately slow) GPU work is still running, and reading the
    future's value waits for the job."""
    from commcomp.collectives.executor import OrderedExecutor

    dev = torch.device("cuda", 0)
    executor = OrderedExecutor("cuda-stream-test")
    like = torch.zeros(1, device=dev)
    slept = torch.cuda.Event()

    def job():
        torch.cuda._sleep(SLEEP_CYCLES)
        slept.record()
        return like + 1

    fut = executor.submit(job, like)
    assert executor.flush(30)  # the job's CPU side has run: its sleep is queued on the GPU
    after = torch.ones(1000, device=dev) * 2  # "backward" work issued after the hook
    issued = torch.cuda.Event()
    issued.record()
    issued.synchronize()
    assert not slept.query(), "the submitter's stream waited for the exchange's stream"
    assert fut.wait().item() == 1 and slept.query()
    assert after.sum().item() == 2000
    assert executor.close(30)


def _overlap(rank, world):
    """Bucket 0's exchange sleeps on the GPU; the first layer's backward, issued after that
    bucket's hook and after the sleep was queued, must finish before the sleep does."""
    import threading

    import torch.nn as nn

    import commcomp.hooks.terngrad as tg

    dev = torch.device("cuda", 0)
    queued, events = threading.Event(), {}
    real = tg._reduce_bucket

    def slow(state, index, *args):
        if index == 0 and "slept" not in events:
            torch.cuda._sleep(SLEEP_CYCLES)
            events["slept"] = torch.cuda.Event(enable_timing=True)
            events["slept"].record()
            queued.set()
        return real(state, index, *args)

    tg._reduce_bucket = slow
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).to(dev)
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.2)  # the last layers' bucket is small: it fires early
    commcomp.register(ddp, "terngrad", min_compress_numel=0)

    def first_layer_grad(g):  # on the autograd thread, before the first layer's backward
        events["queued_first"] = queued.wait(30)  # bucket 0's job has queued its sleep on the GPU
        return g

    x = torch.randn(16, 64, device=dev)
    ddp(x).sum().backward()  # a first step: DDP rebuilds its buckets after it
    torch.cuda.synchronize()
    events.clear()
    queued.clear()
    done = torch.cuda.Event(enable_timing=True)
    handles = [model[0].register_forward_hook(lambda m, i, o: o.register_hook(first_layer_grad) and None),
               model[0].weight.register_hook(lambda g: done.record() or g)]
    ddp(x).sum().backward()
    for handle in handles:
        handle.remove()
    torch.cuda.synchronize()
    assert "slept" in events, "bucket 0's exchange did not run"
    assert events.get("queued_first"), "bucket 0's hook did not run before the first layer's backward"
    first = {id(p) for p in model[0].parameters()}
    bucket0 = ddp.reducer._get_zeros_like_grad_buckets()[0].parameters() if hasattr(
        ddp.reducer, "_get_zeros_like_grad_buckets") else []
    assert not any(id(p) in first for p in bucket0), "the first layer is in bucket 0: nothing to overlap"
    # positive: the first layer's gradient was done before the exchange's sleep ended
    assert done.elapsed_time(events["slept"]) > 0, "backward kernels queued behind bucket 0's exchange"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backward_overlaps_a_slow_exchange_two_gloo_ranks_one_gpu(tmp_path):
    spawn(_overlap, 2, tmp_path)


# ------------------------------------------------ decentralized training on flat CUDA state
def _flat_gt(rank, world, x_mixing):
    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    model = make_model().to(dev)
    gt = commcomp.decentralized.GradientTracking(model, 0.05, topology="complete", compressor="ternary",
                                                 x_mixing=x_mixing, seed=3)
    assert gt.flat is not None and gt.flat.x.is_cuda and gt.mixer_x.fused
    for i in range(STEPS):
        gt.zero_grad()
        x, y = rank_batch(100 * i + rank)
        ((model(x.to(dev)) - y.to(dev)) ** 2).mean().backward()
        gt.step()
    m = gt.measure()
    assert m["tracking_residual"] < 1e-4, m  # mean y = mean g with the CUDA kernels
    assert m["nonfinite_model_steps"] == 0 and gt.metrics["nonfinite_steps"] == 0
    assert m["consensus_error"] < 0.1 * m["mean_model_sqnorm"], m  # the ranks' models agree
    own = gt.flat.x.clone()
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()]).to(dev)
    assert torch.isfinite(own).all() and not torch.equal(own, start)
    gt.close()


@pytest.mark.parametrize("x_mixing", ["after", "before"])
def test_gradient_tracking_on_flat_cuda_state_two_gloo_ranks(tmp_path, x_mixing):
    """The fused mixing kernels (mix_stats/encode/decode, track_prep) on CUDA, end to end."""
    spawn(_flat_gt, 2, tmp_path, x_mixing)
