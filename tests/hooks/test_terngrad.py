"""TernGrad through real DDP on gloo: unbiasedness across several buckets, every collective,
bf16 gradients (and that check catches wrong hooks), uncompressed small layers, NaN
propagation, option checks, checkpoints."""

import re

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.hooks import TernGradState
from tests._dist import spawn
from tests.hooks._models import local_grads, make_model, rank_batch, true_mean
from tests.hooks._mutants import MUTANTS, expect_caught, installed


def ddp_model(dtype, **options):
    model = DDP(make_model(dtype), bucket_cap_mb=0.001)  # ~250 floats: several buckets
    state = commcomp.register(model, "terngrad", **options)
    return model, state


def average_output(rank, world, collective, dtype, steps):
    """The hook's output averaged over `steps` steps at the same gradients, and what it is
    checked against: every rank's gradient (and their mean) and each layer's shared scale."""
    model, state = ddp_model(dtype, clip_factor=None, collective=collective, min_compress_numel=0, seed=7)
    mean, per_rank = true_mean(world, dtype)
    # Shared scale per layer without clipping: max over ranks of max |g_r|.
    scales = [torch.stack([g[k].abs().max() for g in per_rank]).max() for k in range(len(mean))]
    total = [torch.zeros_like(m) for m in mean]
    for _ in range(steps):
        grads = local_grads(model, rank, dtype)  # through DDP and the hook
        for t, g in zip(total, grads):
            t += g
    return [t / steps for t in total], mean, per_rank, scales, state


def check_unbiased(average, mean, per_rank, scales, steps, requantized, dtype):
    """TernGrad's output is unbiased: its average over `steps` steps is within 5 sigma of the
    true mean per element, and along the mean (a bias in scale, too small to see in one
    element, adds up along it: a hook that returned 1.1 times the mean passed the first check)."""
    world = len(per_rank)
    for k, (avg, m, s) in enumerate(zip(average, mean, scales)):
        # Per element, one step: the mean of W codes * s has variance <= s^2 / (4 W); two_phase
        # re-ternarizes that mean, adding <= s^2 / 4. Over K steps divide by K; allow 5 sigma,
        # plus bf16 rounding of the result when the model is bf16.
        s = float(s)
        var = s**2 / (4 * world) + (s**2 / 4 if requantized else 0)
        rounding = 2**-8 * s if dtype == torch.bfloat16 else 0.0
        err = (avg - m).double()
        tol = 5 * (var / steps) ** 0.5 + rounding
        assert bool((err.abs() <= tol).all()), (k, float(err.abs().max()), tol)
        # Along m: <err, m> / <m, m> is the relative scale error. Rounding g to s * b, b a coin
        # in {0, sign g}, has variance s|g| - g^2 <= s|g|; the mean of W ranks' codes has
        # var1 <= min(sum_r s|g_r| / W^2, s^2 / (4 W)); two_phase's second rounding of that
        # mean v adds at most min(s E|v|, s^2 / 4) <= min(s (|m| + sqrt(var1)), s^2 / 4).
        # Elements round independently: over K steps the projection has variance
        # <= sum m^2 var / (K <m, m>^2). 5 sigma, plus bf16 rounding.
        m = m.double()
        var1 = torch.clamp(sum(s * g[k].double().abs() for g in per_rank) / world**2, max=s**2 / (4 * world))
        var = var1 + (torch.clamp(s * (m.abs() + var1.sqrt()), max=s**2 / 4) if requantized else 0)
        mm = float((m * m).sum())
        scale_err = float((err * m).sum()) / mm
        scale_tol = 5 * float((m * m * var).sum() / steps) ** 0.5 / mm + rounding * float(m.abs().sum()) / mm
        assert abs(scale_err) <= scale_tol, (k, scale_err, scale_tol)


def run_unbiased(rank, world, collective, dtype, steps):
    average, mean, per_rank, scales, state = average_output(rank, world, collective, dtype, steps)
    requantized = "two_phase" in state.choices.values()
    check_unbiased(average, mean, per_rank, scales, steps, requantized, dtype)
    assert state.step == steps
    ratio = state.compression_ratio()
    assert ratio > (8 if collective != "int8" else 3), ratio


@pytest.mark.parametrize("collective", ["auto", "int8", "allgather", "two_phase"])
def test_hook_is_unbiased_over_steps(tmp_path, collective):
    spawn(run_unbiased, 2, tmp_path, collective, torch.float32, 150)


def test_hook_four_ranks_bf16(tmp_path):
    spawn(run_unbiased, 4, tmp_path, "two_phase", torch.bfloat16, 100)


def run_unbiased_mutants(rank, world, steps):
    for mutant in MUTANTS:
        with installed("terngrad", mutant):
            average, mean, per_rank, scales, _ = average_output(rank, world, "int8", torch.float32, steps)
        expect_caught(mutant, check_unbiased, average, mean, per_rank, scales, steps, False, torch.float32)


def test_unbiasedness_check_catches_wrong_hooks(tmp_path):
    """check_unbiased, at the normal test's step count, fails for a hook that returns its input,
    one biased by 1.1 and one that drops the sign (tests/hooks/_mutants.py). Margins measured
    (statistic / tolerance, largest layer): input 4.7 per element, x1.1 2.4 along the mean
    (0.8 per element: the along-the-mean check is what catches it), sign 26; two_phase's wider
    tolerance leaves x1.1 only 1.3-1.5, so the mutants run on int8."""
    spawn(run_unbiased_mutants, 2, tmp_path, 150)


def run_uncompressed(rank, world):
    model, state = ddp_model(torch.float32, min_compress_numel=10**9)
    mean, _ = true_mean(world, torch.float32)
    for g, m in zip(local_grads(model, rank, torch.float32), mean):
        torch.testing.assert_close(g, m, rtol=1e-6, atol=1e-7)
    assert state.metrics["bytes_sent"] == state.metrics["bytes_sent_fp32_allreduce"]


def test_small_layers_travel_uncompressed_and_exact(tmp_path):
    spawn(run_uncompressed, 2, tmp_path)


def run_nan(rank, world):
    model, _ = ddp_model(torch.float32, min_compress_numel=0)
    x, y = rank_batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    ((model(x) - y) ** 2).mean().backward()
    for p in model.parameters():  # every bucket saw a NaN on rank 1: NaN everywhere
        assert bool(p.grad.isnan().any()), "a non-finite gradient was hidden"


def test_nan_on_one_rank_reaches_every_rank(tmp_path):
    spawn(run_nan, 2, tmp_path)


def run_mismatch(rank, world):
    model = DDP(make_model(), bucket_cap_mb=0.001)
    with pytest.raises(RuntimeError, match=r"ranks disagree on the options \['clip_factor'\]"):
        commcomp.register(model, "terngrad", clip_factor=2.5 if rank == 0 else 2.0)
    local_grads(model, rank, torch.float32)  # refused at registration: the model kept no hook


def test_ranks_with_different_options_fail_clearly(tmp_path):
    spawn(run_mismatch, 2, tmp_path)


def run_calibration_mismatch(rank, world, cal_file):
    """collective="auto" reads each host's calibration: different files could pick different
    collectives for one bucket (a hang or garbage); registration refuses them instead."""
    import json
    import os

    from commcomp.perfmodel import BUILTIN

    cal = json.loads(json.dumps(BUILTIN))
    cal["source"] = "another host"
    cal["seconds_per_pass_element"]["terngrad/int8"] *= 10
    with open(cal_file, "w") as f:
        json.dump(cal, f)
    os.environ.pop("COMMCOMP_CALIBRATION", None)
    os.environ["HOME"] = os.path.dirname(cal_file)  # no ~/.cache/commcomp/calibration.json: built-in
    if rank == 1:
        os.environ["COMMCOMP_CALIBRATION"] = cal_file
    model = DDP(make_model(), bucket_cap_mb=0.001)
    with pytest.raises(RuntimeError, match="auto_collective_calibration"):
        commcomp.register(model, "terngrad")


def test_ranks_with_different_calibrations_fail_clearly_under_auto(tmp_path):
    spawn(run_calibration_mismatch, 2, tmp_path, str(tmp_path / "cal.json"))


def run_checkpoint(rank, world):
    model, state = ddp_model(torch.float32, error_feedback=True, min_compress_numel=0)
    for _ in range(3):
        local_grads(model, rank, torch.float32)
    saved = state.state_dict()
    assert saved["step"] == 3 and saved["residuals"] and "process_group" not in saved["options"]
    assert set(saved["residuals"]) == {n for n, _ in model.named_parameters()}
    fresh = TernGradState(error_feedback=True, min_compress_numel=0)
    fresh.load_state_dict(saved)
    assert fresh.step == 3 and fresh.metrics == state.metrics
    assert all(torch.equal(fresh.residuals[k], v) for k, v in state.residuals.items())
    unnamed = TernGradState(error_feedback=True, min_compress_numel=0)
    unnamed.residuals[object()] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="saved by name"):
        unnamed.state_dict()
    with pytest.raises(ValueError, match="checkpoint options differ"):
        TernGradState(error_feedback=False, min_compress_numel=0).load_state_dict(saved)


def test_state_dict_round_trip(tmp_path):
    spawn(run_checkpoint, 2, tmp_path)


def run_bad_options(rank, world):
    bad = [({"clip_factor": 0}, r"clip_factor must be .*> 0.*got 0"),
           ({"collective": "ring"}, r"collective must be one of \(.*'two_phase'\), got 'ring'"),
           ({"min_compress_numel": -1}, re.escape("min_compress_numel must be an int >= 0, got -1")),
           ({"seed": -1}, re.escape("seed must be an int in [0, 2**63), got -1"))]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            TernGradState(**options)
    with pytest.raises(ValueError, match="unknown hook 'ternary'; available"):
        commcomp.register(DDP(make_model()), "ternary")
    with pytest.raises(TypeError, match="needs a DistributedDataParallel"):
        commcomp.register(make_model(), "terngrad")


def test_bad_options_are_refused(tmp_path):
    spawn(run_bad_options, 2, tmp_path)


def run_error_feedback(rank, world, steps, collective):
    # An exact-average collective: two_phase re-ternarizes the average, which error feedback
    # does not see (and "auto" picks by a measured link, so it could pick two_phase).
    model, state = ddp_model(torch.float32, clip_factor=None, error_feedback=True, min_compress_numel=0,
                             collective=collective)
    mean, _ = true_mean(world, torch.float32)
    total = [torch.zeros_like(m) for m in mean]
    for _ in range(steps):
        for t, g in zip(total, local_grads(model, rank, torch.float32)):
            t += g
    # sum_t out_t = K * mean - mean_r e_K^r exactly (telescoping residuals): the error of the
    # average is at most max |residual| / K, far below the 1/sqrt(K) of plain TernGrad.
    worst = torch.stack([r.abs().max() for r in state.residuals.values()]).max()
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    for t, m in zip(total, mean):
        assert float((t / steps - m).abs().max()) <= float(worst) / steps + 1e-6


@pytest.mark.parametrize("collective", ["int8", "allgather"])
def test_error_feedback_telescopes(tmp_path, collective):
    spawn(run_error_feedback, 2, tmp_path, 40, collective)


def run_nan_error_feedback(rank, world):
    """One bucket of compressed and uncompressed layers with error feedback: a NaN on one rank
    makes the whole bucket NaN on every rank, and the next, finite step is finite again (the
    residual of the NaN step is not kept)."""
    model = DDP(make_model(), bucket_cap_mb=25)  # one bucket: biases (< 100) travel in fp32
    state = commcomp.register(model, "terngrad", min_compress_numel=100, error_feedback=True)
    assert all(bool(torch.isfinite(g).all()) for g in local_grads(model, rank))
    model.zero_grad()
    x, y = rank_batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    ((model(x) - y) ** 2).mean().backward()
    for p in model.parameters():
        assert bool(p.grad.isnan().all()), "part of a non-finite bucket stayed finite"
    for _ in range(2):
        assert all(bool(torch.isfinite(g).all()) for g in local_grads(model, rank)), "NaN outlived its step"
    assert all(bool(torch.isfinite(r).all()) for r in state.residuals.values())


def test_nan_with_error_feedback_does_not_poison_later_steps(tmp_path):
    spawn(run_nan_error_feedback, 2, tmp_path)


def run_pipelined(rank, world, collective):
    """pipeline_numel cuts the bucket into pieces across layers: int8 and allgather return
    exactly the unpipelined gradients; two_phase agrees on every rank."""
    grads = {}
    for pieces in (0, 64):  # 1,535 elements in one bucket: 24 pieces
        model = DDP(make_model(), bucket_cap_mb=25)
        commcomp.register(model, "terngrad", collective=collective, min_compress_numel=0, seed=3,
                          pipeline_numel=pieces)
        grads[pieces] = [local_grads(model, rank) for _ in range(2)]
    for step in range(2):
        for a, b in zip(grads[0][step], grads[64][step]):
            if collective == "two_phase":
                every = [torch.empty_like(b) for _ in range(world)]
                torch.distributed.all_gather(every, b)
                assert all(torch.equal(e, b) for e in every) and bool(torch.isfinite(b).all())
            else:
                assert torch.equal(a, b), collective


@pytest.mark.parametrize("collective", ["int8", "allgather", "two_phase"])
def test_pipelined_buckets(tmp_path, collective):
    spawn(run_pipelined, 2, tmp_path, collective)
