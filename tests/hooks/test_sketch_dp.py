"""The sketch + DP hook through real DDP on gloo: the all-reduced sketches are the sketch of
the sum, an orthogonal sketch without noise reproduces the plain average, clipping bounds
each rank, epsilon matches closed forms (RDP of the Gaussian mechanism, its exact (epsilon,
delta), the sampled Gaussian's RDP; tests/privacy/_closed_form.py), seeds are checked,
non-finite gradients fail on every rank without touching the model, checkpoints round-trip,
and record-level DP runs on Opacus' per-sample gradients."""

import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.codecs import Sketch, sketch_size
from commcomp.hooks import SketchDPState
from commcomp.utils import mix_seed
from tests._dist import spawn
from tests.hooks._models import local_grads, make_model, rank_batch, true_mean
from tests.hooks._mutants import MUTANTS, expect_caught, installed
from tests.privacy import _closed_form as closed


def ddp_model(**options):
    model = DDP(make_model(), bucket_cap_mb=0.001)  # ~250 floats per bucket: several buckets
    state = commcomp.register(model, "sketch_dp", **options)
    return model, state


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


# --- sketch of the sum -----------------------------------------------------------------------

def run_sum_of_sketches(rank, world, kind):
    """state.release on every rank == R^T R (mean of the ranks' vectors), computed locally."""
    state = SketchDPState(sketch=kind, sketch_ratio=0.25, sketch_seed=11)
    xs = [torch.randn(300, generator=torch.Generator().manual_seed(r)) * (r + 1) for r in range(world)]
    out = state.release([(0, xs[rank].clone())], step=3)[0]
    sk = Sketch(kind, 300, sketch_size(kind, 300, 0.25), mix_seed(11, 3, 0))
    expect = sk.transpose(sum(sk.sketch(x) for x in xs)) / world
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    exact = sk.transpose(sk.sketch(torch.stack(xs).mean(0)))  # linearity: sketch of the mean
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-4)
    assert state.metrics["bytes_sent"] < state.metrics["bytes_sent_fp32_allreduce"] / 3


@pytest.mark.parametrize("kind", ["countsketch", "srht", "gaussian"])
def test_allreduce_of_sketches_is_sketch_of_sum(tmp_path, kind):
    spawn(run_sum_of_sketches, 2, tmp_path, kind)


# --- orthogonal sketch, no noise: the plain average ----------------------------------------

def check_plain_average(grads, mean):
    """An orthogonal sketch (srht at ratio 1) without noise or clipping: every rank's gradient
    is the plain average of the ranks' local gradients."""
    for g, m in zip(grads, mean):
        torch.testing.assert_close(g, m, rtol=1e-5, atol=1e-6)


def run_orthogonal(rank, world, clip_scope):
    model, state = ddp_model(sketch="srht", sketch_ratio=1.0, clip_scope=clip_scope)
    mean, _ = true_mean(world)
    for _ in range(2):
        check_plain_average(local_grads(model, rank), mean)
    assert state.step == 2 and state.epsilon() == math.inf  # no noise, no clipping: no privacy


@pytest.mark.parametrize("world,clip_scope", [(2, "model"), (4, "bucket")])
def test_orthogonal_sketch_without_noise_is_plain_average(tmp_path, world, clip_scope):
    spawn(run_orthogonal, world, tmp_path, clip_scope)


def run_orthogonal_mutants(rank, world):
    mean, _ = true_mean(world)
    for mutant in MUTANTS:
        with installed("sketch_dp", mutant):
            model, _ = ddp_model(sketch="srht", sketch_ratio=1.0)
            expect_caught(mutant, check_plain_average, local_grads(model, rank), mean)


def test_plain_average_check_catches_wrong_hooks(tmp_path):
    """The check above fails for a hook that returns its input, one biased by 1.1, and one
    that drops the sign (tests/hooks/_mutants.py)."""
    spawn(run_orthogonal_mutants, 2, tmp_path)


# --- clipping bounds each rank's contribution ---------------------------------------------

def run_clipping(rank, world):
    C = 0.03
    model, _ = ddp_model(sketch="srht", sketch_ratio=1.0, clip_norm=C)
    _, per_rank = true_mean(world)
    got = flat(local_grads(model, rank))
    # each rank's whole gradient (all buckets) scaled to norm <= C, then averaged
    clipped = [flat(g) * min(1.0, C / flat(g).norm().item()) for g in per_rank]
    torch.testing.assert_close(got, torch.stack(clipped).mean(0), rtol=1e-4, atol=1e-6)
    assert got.norm() <= C * (1 + 1e-5)
    assert all(flat(g).norm() > 10 * C for g in per_rank)  # the clip did bind


def test_clipping_bounds_each_rank(tmp_path):
    spawn(run_clipping, 2, tmp_path)


def run_clip_sketch_space(rank, world):
    C = 0.01
    state = SketchDPState(sketch="countsketch", sketch_ratio=0.5, clip_norm=C, noise_placement="sketch")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(rank)) * 10
    out = state.release([(0, x)], step=0)[0]
    sk = Sketch("countsketch", 1000, 500, mix_seed(0, 0, 0))
    ys = [sk.sketch(torch.randn(1000, generator=torch.Generator().manual_seed(r)) * 10) for r in range(world)]
    expect = sk.transpose(sum(y * min(1.0, C / y.norm().item()) for y in ys)) / world
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-7)


def test_sketch_placement_clips_the_sketch(tmp_path):
    spawn(run_clip_sketch_space, 2, tmp_path)


# --- noise: unbiased, and epsilon from closed forms ------------------------------------------

def run_noise(rank, world, steps):
    sigma, C = 0.8, 1.0
    state = SketchDPState(sketch="srht", sketch_ratio=1.0, clip_norm=C, noise_multiplier=sigma,
                          noise_seed=5)
    x = torch.full((512,), 0.01)  # norm 0.226 < C: not clipped
    total = torch.zeros(512)
    for step in range(steps):
        total += state.release([(0, x)], step)[0]
    # mean of `world` noises of std sigma*C per coordinate, averaged over `steps` steps
    std = sigma * C / math.sqrt(world * steps)
    err = total / steps - x
    assert err.abs().max() < 5 * std
    assert 0.7 * std < err.std() < 1.3 * std  # the noise is really there, at its scale
    # client level replaces by default: distance 2C, i.e. a Gaussian mechanism of multiplier
    # sigma / 2 per step; RDP alpha / (2 (sigma/2)^2) per step, added over the steps
    replace = closed.gaussian_rdp_epsilon(sigma / 2, steps, 1e-5)
    assert state.epsilon(1e-5) == pytest.approx(replace, rel=1e-9)
    assert replace > 2.5 * closed.gaussian_rdp_epsilon(sigma, steps, 1e-5)  # add/remove would be far less
    assert state.ledger.steps == steps


def test_noise_scale_and_epsilon_match_the_closed_form(tmp_path):
    spawn(run_noise, 2, tmp_path, 40)


def test_pld_epsilon_is_the_exact_gaussian_mechanism():
    """Without sampling, T steps of multiplier sigma are one Gaussian mechanism whose means are
    sqrt(T) / sigma stds apart: PLD must return its exact epsilon (Balle & Wang 2018)."""
    for sigma, steps, delta in ((1.3, 1, 1e-6), (5.0, 100, 1e-5)):
        ours = commcomp.privacy.epsilon(sigma, steps, delta, accountant="pld")
        assert ours == pytest.approx(closed.gaussian_exact_epsilon(sigma, steps, delta), rel=1e-6)


def test_pld_epsilon_of_sampled_steps():
    q, sigma = 0.01, 1.3
    # one sampled step: exact, from the mixture's two normal tails
    ours = commcomp.privacy.epsilon(sigma, 1, 1e-6, sample_rate=q, accountant="pld")
    assert ours == pytest.approx(closed.sampled_gaussian_exact_epsilon(sigma, q, 1e-6), rel=1e-6)
    # 250 sampled steps: above what one distinguishing test proves, below the RDP bound
    ours = commcomp.privacy.epsilon(sigma, 250, 1e-6, sample_rate=q, accountant="pld")
    low = closed.sampled_gaussian_epsilon_lower_bound(sigma, q, 250, 1e-6)
    high = closed.rdp_epsilon(lambda a: 250 * closed.sampled_gaussian_rdp(a, sigma, q), 1e-6)
    assert low <= ours <= high, (low, ours, high)
    assert ours > 2 * commcomp.privacy.epsilon(sigma, 1, 1e-6, sample_rate=q, accountant="pld")  # composed


def test_rdp_epsilon_of_sampled_steps_and_noise_for_epsilon():
    """The sampled Gaussian's RDP (Mironov, Talwar, Zhang 2019) through the same conversion.
    dp-accounting bounds the RDP at fractional orders from above (its series adds the terms'
    magnitudes), so ours may exceed the closed form, by well under 0.1% here."""
    def rdp_eps(sigma):
        return closed.rdp_epsilon(lambda a: 100 * closed.sampled_gaussian_rdp(a, sigma, 0.1), 1e-5)

    ours, exact = commcomp.privacy.epsilon(2.0, 100, 1e-5, 0.1), rdp_eps(2.0)
    assert exact <= ours <= exact * (1 + 1e-3), (ours, exact)
    sigma = commcomp.privacy.noise_for_epsilon(4.0, 1e-5, steps=100, sample_rate=0.1)
    assert rdp_eps(sigma) <= 4.0 < rdp_eps(sigma * 0.99)  # tight: 1% less noise overspends


def run_budget(rank, world):
    model, state = ddp_model(target_epsilon=8.0, target_delta=1e-5, steps=2, clip_norm=1.0)
    assert state.noise_multiplier > 0
    local_grads(model, rank)
    local_grads(model, rank)
    assert state.epsilon() <= 8.0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="overspend"):
        local_grads(model, rank)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_budget_is_not_overspent(tmp_path):
    spawn(run_budget, 2, tmp_path)


def run_bucket_scope_ledger(rank, world):
    model, state = ddp_model(clip_norm=1.0, noise_multiplier=2.0, clip_scope="bucket",
                             adjacency="add_remove")
    for _ in range(3):  # DDP may rebuild its buckets after the first step
        local_grads(model, rank)
    parts = state.ledger.parts
    assert state.ledger.steps == 3  # one mechanism per step, not per bucket
    buckets = max(parts)
    assert buckets > 1
    # B buckets clipped to C with noise 2C each: one Gaussian with multiplier 2 / sqrt(B) per
    # step, RDP alpha B / (2 * 2^2), added over the steps
    expect = closed.rdp_epsilon(lambda a: sum(n * closed.gaussian_rdp(a, 2.0 / math.sqrt(b))
                                              for b, n in parts.items()), 1e-5)
    assert state.epsilon(1e-5) == pytest.approx(expect, rel=1e-9)
    assert state.epsilon(1e-5) > closed.gaussian_rdp_epsilon(2.0, 3, 1e-5)  # costlier than unsplit


def test_bucket_scope_accounts_one_mechanism_per_step(tmp_path):
    spawn(run_bucket_scope_ledger, 2, tmp_path)


# --- errors -----------------------------------------------------------------------------

def run_seed_mismatch(rank, world):
    with pytest.raises(RuntimeError, match="sketch_seed"):  # at registration, every rank
        ddp_model(sketch_seed=rank)


def test_ranks_disagreeing_on_sketch_seed_raise(tmp_path):
    spawn(run_seed_mismatch, 2, tmp_path)


def run_nonfinite_public(rank, world):
    """Without noise (no privacy claimed) a NaN on one rank fails the step on every rank."""
    model, state = ddp_model(sketch="srht", sketch_ratio=1.0, clip_norm=1.0)
    local_grads(model, rank)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = rank_batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN/Inf"):
        ((model(x) - y) ** 2).mean().backward()
    assert state.step == 1  # the failed step is undone
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_gradient_without_noise_fails_on_every_rank(tmp_path):
    spawn(run_nonfinite_public, 2, tmp_path)


def run_nonfinite_private(rank, world):
    """With noise the non-finite flag never leaves the rank: that rank sends noise alone and
    warns, the others learn nothing, the step counts against the budget."""
    model, state = ddp_model(sketch="srht", sketch_ratio=1.0, clip_norm=1.0, noise_multiplier=1e-4,
                             noise_seed=rank)
    x, y = rank_batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    model.zero_grad()
    with pytest.warns(RuntimeWarning, match="NaN/Inf") if rank == 1 else _no_warning():
        ((model(x) - y) ** 2).mean().backward()
    got = flat([p.grad for p in model.parameters()])
    _, per_rank = true_mean(world)
    clipped0 = flat(per_rank[0]) * min(1.0, 1.0 / flat(per_rank[0]).norm().item())
    torch.testing.assert_close(got, clipped0 / world, rtol=0, atol=5e-3)  # rank 1 sent noise only
    assert state.nonfinite_steps == (1 if rank == 1 else 0)
    assert state.ledger.steps == 1
    assert state.metrics["bytes_sent"] == commcomp.utils.ring_allreduce_bytes(
        4 * sum(sk for sk in [sketch_size("srht", got.numel(), 1.0)]), world)  # no flag float


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_nonfinite_gradient_with_noise_stays_on_the_rank(tmp_path):
    spawn(run_nonfinite_private, 2, tmp_path)


def run_bad_options(rank, world):
    bad = [
        dict(clip_norm=0.0), dict(clip_norm=-1.0), dict(clip_norm=float("inf")),
        dict(sketch_ratio=0.0), dict(sketch_ratio=1.5), dict(sketch_ratio=True),
        dict(sketch="fft"), dict(noise_multiplier=1.0),  # noise without clip_norm
        dict(noise_multiplier=-1.0, clip_norm=1.0), dict(clip_norm=1.0, target_epsilon=0.0, steps=10),
        dict(clip_norm=1.0, target_epsilon=-1.0, steps=10), dict(clip_norm=1.0, target_epsilon=1.0),
        dict(clip_norm=1.0, target_epsilon=1.0, steps=10, target_delta=1.0),
        dict(clip_norm=1.0, target_epsilon=1.0, steps=10, noise_multiplier=1.0),
        dict(sample_rate=0.0), dict(level="server"), dict(clip_scope="layer"),
        dict(noise_placement="sketch", level="record", clip_norm=1.0), dict(block=3),
        dict(sketch_seed=-1), dict(noise_multiplier=0.0, clip_norm=1.0),
        dict(sample_rate=1.5), dict(sample_rate=-0.1), dict(adjacency="swap"),
        dict(level="record", clip_norm=1.0), dict(level="record", clip_norm=1.0, num_records=0),
        dict(level="record", clip_norm=1.0, num_records=1000, target_delta=1e-3),
        dict(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1),  # replace + q<1 needs pld
        dict(noise_seed=1.5),
    ]
    for opts in bad:
        with pytest.raises(ValueError, match="commcomp"):
            SketchDPState(**opts)
    state = SketchDPState(clip_norm=1.0, noise_multiplier=1.0)
    for delta in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            state.epsilon(delta)


def test_bad_options_raise(tmp_path):
    spawn(run_bad_options, 1, tmp_path)


# --- checkpoints and record-level DP ---------------------------------------------------------

def run_checkpoint(rank, world):
    model, state = ddp_model(clip_norm=1.0, noise_multiplier=1.5)
    for _ in range(3):
        local_grads(model, rank)
    saved = state.state_dict()
    model2, state2 = ddp_model(clip_norm=1.0, noise_multiplier=1.5)
    state2.load_state_dict(saved)
    assert state2.step == 3 and state2.ledger.steps == 3
    assert state2.epsilon(1e-5) == state.epsilon(1e-5)
    assert state2.metrics == state.metrics
    early = state.state_dict()
    local_grads(model, rank)
    with pytest.raises(ValueError, match="forget"):  # would un-count a message that is out
        state.load_state_dict(early)
    assert state.ledger.steps == 4 and state.step == 4  # untouched
    _, other = ddp_model(clip_norm=1.0, noise_multiplier=2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(saved)


def test_checkpoint_round_trip(tmp_path):
    spawn(run_checkpoint, 2, tmp_path)


def run_record_level(rank, world):
    opacus = pytest.importorskip("opacus")
    C, batch = 0.1, 16
    state = SketchDPState(level="record", sketch="srht", sketch_ratio=1.0, clip_norm=C,
                          sample_rate=batch / 1000, num_records=1000)
    model = opacus.GradSampleModule(make_model())
    x, y = rank_batch(rank)
    ((model(x) - y) ** 2).sum(1).mean().backward()  # per-sample losses (mean: Opacus scales)
    norms = state.clip_per_sample_(model.parameters())
    assert norms.shape == (batch,) and bool((norms > C).any())
    state.reduce_(model.parameters(), batch_size=batch)
    got = flat([p.grad for p in model.parameters()])
    # independently: per-sample gradients by a loop, clipped, summed, averaged over ranks
    plain = make_model()
    per_rank = []
    for r in range(world):
        xr, yr = rank_batch(r)
        total = 0
        for i in range(batch):
            plain.zero_grad()
            ((plain(xr[i:i + 1]) - yr[i:i + 1]) ** 2).sum().backward()
            g = flat([p.grad for p in plain.parameters()])
            total = total + g * min(1.0, C / g.norm().item())
        per_rank.append(total / batch)
    torch.testing.assert_close(got, torch.stack(per_rank).mean(0), rtol=1e-4, atol=1e-6)
    assert state.ledger.steps == 1 and state.ledger.sample_rate == batch / 1000


def test_record_level_on_opacus_per_sample_gradients(tmp_path):
    spawn(run_record_level, 2, tmp_path)


def run_record_level_refuses_hook(rank, world):
    model = DDP(make_model())
    with pytest.raises(ValueError, match="clip_per_sample_"):  # at registration
        commcomp.register(model, "sketch_dp", level="record", clip_norm=1.0, num_records=1000)
    commcomp.register(model, "terngrad")  # no hook was left behind


def test_record_level_refuses_the_ddp_hook(tmp_path):
    spawn(run_record_level_refuses_hook, 1, tmp_path)
