"""The reported epsilon must bound what the mechanism leaks: each test here pins one way the
sketch_dp hook's guarantee was untrue (secure noise, sampling that happens, replace adjacency,
record-level sensitivity owned by the state, budget by released messages, no data-dependent
side channels, PLD calibration) and fails on code that has the flaw."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.hooks import SketchDPState
from commcomp.privacy import PrivacyLedger, accounting
from commcomp.privacy.mechanisms import NoiseSource
from tests._dist import spawn
from tests.hooks._models import local_grads, make_model, rank_batch
from tests.privacy import _closed_form as closed

# --- 1. noise an eavesdropper cannot regenerate ------------------------------------------------


def test_noise_depends_on_every_bit_of_the_seed():
    """MT19937 kept 32 bits of the seed: seed and seed & 0xFFFFFFFF gave the same noise."""
    seed = (0xDEADBEEF << 32) | 0x12345678
    a = NoiseSource(seed).gaussian(64, 1.0, "cpu")
    b = NoiseSource(seed & 0xFFFFFFFF).gaussian(64, 1.0, "cpu")
    assert not torch.equal(a, b)
    torch.testing.assert_close(NoiseSource(seed).gaussian(64, 1.0, "cpu"), a, rtol=0, atol=0)


def test_unseeded_noise_is_fresh_and_not_a_torch_generator():
    a, b = NoiseSource(), NoiseSource()
    assert not torch.equal(a.gaussian(32, 1.0, "cpu"), b.gaussian(32, 1.0, "cpu"))
    assert not any(isinstance(v, torch.Generator) for v in vars(a).values())
    assert "key" not in repr(a).lower() or "secret" in repr(a).lower()


def run_hook_noise_is_secure(rank, world):
    with pytest.warns(UserWarning, match="INSECURE"):
        SketchDPState(clip_norm=1.0, noise_multiplier=1.0, noise_seed=3)
    state = SketchDPState(clip_norm=1.0, noise_multiplier=1.0)
    assert not state.noise.seeded


def test_hook_noise_is_secure_unless_seeded(tmp_path):
    spawn(run_hook_noise_is_secure, 1, tmp_path)


# --- 2. client-level sampling is carried out and accounted once per step -----------------------

def run_client_sampling(rank, world):
    q, steps, d = 0.25, 400, 1024
    state = SketchDPState(sketch="srht", sketch_ratio=1.0, clip_norm=1.0, noise_multiplier=0.05,
                          sample_rate=q, accountant="pld", noise_seed=7)
    x = torch.full((d,), 1.0 / math.sqrt(d))  # norm 1 = C: not clipped
    took_part, total = 0, torch.zeros(d)
    for step in range(steps):
        msg, sks, _ = state.encode([(0, x)], step)
        assert msg.numel() == sks[0].sketch_size  # same shape whether it takes part or not
        proj = float(sks[0].transpose(msg) @ x)
        assert abs(proj) < 0.2 or abs(proj - 1) < 0.2
        took_part += proj > 0.5
    frac = took_part / steps
    assert abs(frac - q) < 4 * math.sqrt(q * (1 - q) / steps), frac  # the old hook: always 1
    for step in range(steps):
        total += state.release([(0, x)], step)[0]
    # divided by sample_rate * world: unbiased for the mean gradient
    mean = total / steps  # each coordinate: x_i * Bernoulli(q) / q + noise / q, averaged
    bound = 5 * math.sqrt(((1 - q) / q / d + (0.05 / q) ** 2) / steps)
    assert (mean - x).abs().max() < bound
    # along x the mean is 1; a divisor of world instead of q * world would give q = 0.25
    assert abs(float(mean @ x) - 1.0) < 5 * math.sqrt(((1 - q) / q + (0.05 / q) ** 2) / steps)
    assert state.ledger.steps == steps and state.ledger.parts == {1: steps}  # one event per step


def test_client_sample_rate_is_carried_out(tmp_path):
    spawn(run_client_sampling, 1, tmp_path)


def test_bucket_scope_is_one_sampled_event_per_step():
    """The issue's reproduction: sigma 1, q 0.01, 1000 steps of 4 buckets is one sampled
    Gaussian of multiplier 1/2 per step, eps 15.47 (the old ledger composed 4000 independently
    sampled events of multiplier 1: 4.08), and 138 at 16 buckets. Against the sampled
    Gaussian's RDP in closed form (Mironov, Talwar, Zhang 2019), which dp-accounting bounds
    from above at fractional orders: ours may exceed it by a little, never fall below it."""
    for buckets, published in ((4, 15.47), (16, 138.0)):
        ledger = PrivacyLedger(1.0, sample_rate=0.01)
        ledger.record(1000, parts=buckets)
        assert ledger.steps == 1000
        sigma = 1.0 / math.sqrt(buckets)
        exact = closed.rdp_epsilon(lambda a: 1000 * closed.sampled_gaussian_rdp(a, sigma, 0.01), 1e-5)
        assert exact <= ledger.epsilon(1e-5) <= exact * (1 + 3e-3), (ledger.epsilon(1e-5), exact)
        assert ledger.epsilon(1e-5) == pytest.approx(published, rel=2e-3)
    old = closed.rdp_epsilon(lambda a: 4000 * closed.sampled_gaussian_rdp(a, 1.0, 0.01), 1e-5)
    assert old == pytest.approx(4.08, abs=0.01)  # what the per-bucket ledger reported


# --- 3. replace adjacency at client level -------------------------------------------------------

def test_replace_adjacency_doubles_the_sensitivity():
    """The attack's setting: sigma 6.3767 for 100 steps was eps 8.00 under add/remove; a client
    that always sends is protected only under replace: 18.85 (RDP), 17.67 (PLD). Replace is
    the Gaussian mechanism of multiplier sigma / 2: RDP alpha / (2 (sigma/2)^2) per step, and
    the exact epsilon of mu = sqrt(100) / (sigma / 2) (Balle & Wang 2018) for PLD."""
    sigma = 6.3767
    add_remove = closed.gaussian_rdp_epsilon(sigma, 100, 1e-5)
    replace = closed.gaussian_rdp_epsilon(sigma / 2, 100, 1e-5)
    replace_exact = closed.gaussian_exact_epsilon(sigma / 2, 100, 1e-5)
    assert (add_remove, replace, replace_exact) == pytest.approx((8.00, 18.85, 17.67), abs=5e-3)
    assert accounting.epsilon(sigma, 100, 1e-5) == pytest.approx(add_remove, rel=1e-9)
    assert accounting.epsilon(sigma, 100, 1e-5, adjacency="replace") == pytest.approx(replace, rel=1e-9)
    pld = accounting.epsilon(sigma, 100, 1e-5, accountant="pld", adjacency="replace")
    assert pld == pytest.approx(replace_exact, rel=1e-6)
    with pytest.raises(ValueError, match="accountant='pld'"):
        accounting.epsilon(1.0, 10, 1e-5, 0.5, adjacency="replace")


def test_sampled_replace_matches_the_mixtures_integrated_numerically():
    """Replace with Poisson sampling: the outputs are q N(+C) + (1-q) N(0) and q N(-C) +
    (1-q) N(0) (sigma = 1, C = 1 here). delta(eps) = integral of max(0, P - e^eps Q), by
    quadrature, independent of dp-accounting; its epsilon at that delta must come back."""
    from scipy import integrate, stats

    q, eps = 0.3, 0.5

    def gap(x):
        p = q * stats.norm.pdf(x, 1.0) + (1 - q) * stats.norm.pdf(x)
        r = q * stats.norm.pdf(x, -1.0) + (1 - q) * stats.norm.pdf(x)
        return max(0.0, p - math.exp(eps) * r)

    delta = integrate.quad(gap, -12, 12, limit=400, epsabs=1e-13)[0]
    assert delta == pytest.approx(0.0676180, rel=1e-4)
    got = accounting.epsilon(1.0, 1, delta, 0.3, accountant="pld", adjacency="replace")
    assert got == pytest.approx(eps, abs=2e-3)
    add_remove = accounting.epsilon(1.0, 1, delta, 0.3, accountant="pld")
    assert add_remove < eps - 0.1  # the distance-C model would understate it


def run_adjacency_default_and_mismatch(rank, world):
    state = SketchDPState(clip_norm=1.0, noise_multiplier=6.3767)
    assert state.adjacency == "replace"
    state.ledger.record(100)
    assert state.epsilon(1e-5) == pytest.approx(closed.gaussian_rdp_epsilon(6.3767 / 2, 100, 1e-5), rel=1e-9)
    model = DDP(make_model())
    with pytest.raises(RuntimeError, match="adjacency"):  # at registration, not at a step
        commcomp.register(model, "sketch_dp", clip_norm=1.0, noise_multiplier=1.0,
                          adjacency="replace" if rank == 0 else "add_remove")
    commcomp.register(model, "terngrad")  # the failed registration left no hook behind


def test_adjacency_default_and_cross_rank_check(tmp_path):
    spawn(run_adjacency_default_and_mismatch, 2, tmp_path)


# --- 4. record-level sensitivity is owned by the state ------------------------------------------

def run_record_sensitivity(rank, world):
    opacus = pytest.importorskip("opacus")
    state = SketchDPState(level="record", sketch="srht", sketch_ratio=1.0, clip_norm=1.0,
                          noise_multiplier=1.0, sample_rate=0.016, num_records=1000, noise_seed=1)
    model = opacus.GradSampleModule(make_model())
    params = list(model.parameters())
    x, y = rank_batch(rank)

    def backward():
        for p in params:
            p.grad, p.grad_sample = None, None
        ((model(x) - y) ** 2).sum(1).mean().backward()

    backward()  # (a) clipped elsewhere at another bound
    commcomp.privacy.clip_per_sample_(params, max_norm=100.0)
    with pytest.raises(RuntimeError, match="clip_per_sample_"):
        state.reduce_(params, batch_size=16)
    backward()  # (b) not clipped at all
    with pytest.raises(RuntimeError, match="clip_per_sample_"):
        state.reduce_(params, batch_size=16)
    backward()  # (c) a parameter without a per-sample gradient: its plain .grad would leak
    params[0].grad_sample = None
    with pytest.raises(ValueError, match="no grad_sample"):
        state.clip_per_sample_(params)
    backward()  # (d) changed after clipping
    state.clip_per_sample_(params)
    params[1].grad.mul_(100)
    with pytest.raises(RuntimeError, match="changed"):
        state.reduce_(params, batch_size=16)
    assert state.ledger.steps == 0  # nothing was released
    backward()
    state.clip_per_sample_(params)
    state.reduce_(params, batch_size=16)
    assert state.ledger.steps == 1
    with pytest.raises(RuntimeError, match="clip_per_sample_"):  # one clip, one release
        state.reduce_(params, batch_size=16)


def test_record_level_releases_only_what_the_state_clipped(tmp_path):
    spawn(run_record_sensitivity, 1, tmp_path)


# --- 6. budget by released messages; no data-dependent side channels; PLD calibration -----------

def run_budget_counts_messages(rank, world):
    model = DDP(make_model(), bucket_cap_mb=0.001)
    state = commcomp.register(model, "sketch_dp", clip_norm=1.0, target_epsilon=30.0, steps=2,
                              noise_seed=rank)
    x, y = rank_batch(rank)
    if rank == 1:
        x[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning) if rank == 1 else _quiet():
        ((model(x) - y) ** 2).mean().backward()  # rank 1 sends noise alone, still a message
    local_grads(model, rank)
    assert state.ledger.steps == 2 and state.epsilon() <= 30.0
    with pytest.raises(RuntimeError, match="overspend"):
        local_grads(model, rank)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_budget_counts_released_messages(tmp_path):
    spawn(run_budget_counts_messages, 2, tmp_path)


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.unused = nn.Linear(20, 5), nn.BatchNorm1d(5), nn.Linear(5, 5)

    def forward(self, x):
        return self.bn(self.fc(x))


def run_side_channels_refused(rank, world):
    private = dict(clip_norm=1.0, noise_multiplier=1.0)
    model = DDP(_BN())  # broadcast_buffers=True: rank 0's BatchNorm statistics in the clear
    with pytest.raises(ValueError, match="broadcast_buffers"):
        commcomp.register(model, "sketch_dp", **private)
    commcomp.register(model, "terngrad")  # untouched: no hook was registered
    model = DDP(_BN(), find_unused_parameters=True)
    with pytest.raises(ValueError, match="find_unused_parameters"):
        commcomp.register(model, "sketch_dp", **private)
    commcomp.register(DDP(_BN(), broadcast_buffers=False), "sketch_dp", **private)
    commcomp.register(DDP(_BN()), "sketch_dp")  # no noise, no privacy claimed: allowed


def run_direct_registration_refused(rank, world):
    from commcomp.hooks import sketch_dp_hook

    model = DDP(make_model())
    model.register_comm_hook(SketchDPState(clip_norm=1.0, noise_multiplier=1.0), sketch_dp_hook)
    with pytest.raises(RuntimeError, match="commcomp.register"):
        local_grads(model, rank)  # the side-channel checks never ran: refuse to send


def test_hook_refuses_to_run_without_commcomp_register(tmp_path):
    spawn(run_direct_registration_refused, 2, tmp_path)


def test_side_channels_are_refused_at_registration(tmp_path):
    spawn(run_side_channels_refused, 1, tmp_path)


def test_pld_calibration_is_bracketed_and_tight():
    """It used to start PLD at sigma 1e-3 and die with MemoryError. Unsampled, the exact
    epsilon of the Gaussian mechanism (Balle & Wang 2018) says how tight it is."""
    sigma = accounting.noise_for_epsilon(2.0, 1e-5, 100, accountant="pld")
    exact = closed.gaussian_exact_epsilon
    assert exact(sigma, 100, 1e-5) <= 2.0 < exact(sigma * 0.995, 100, 1e-5)
    rdp_sigma = accounting.noise_for_epsilon(2.0, 1e-5, 100)
    rdp = closed.gaussian_rdp_epsilon
    assert rdp(rdp_sigma, 100, 1e-5) <= 2.0 < rdp(rdp_sigma * 0.995, 100, 1e-5)
    assert sigma < rdp_sigma  # tighter than RDP


def run_ddp_modes(rank, world):
    """static_graph, gradient_as_bucket_view and no_sync accumulation work with the private
    hook (find_unused_parameters is refused above); one message per synchronised backward."""
    x, y = rank_batch(rank)
    for kw in (dict(static_graph=True), dict(gradient_as_bucket_view=True), {}):
        model = DDP(make_model(), bucket_cap_mb=0.001, **kw)
        with pytest.warns(UserWarning, match="INSECURE"):
            state = commcomp.register(model, "sketch_dp", clip_norm=1.0, noise_multiplier=0.5,
                                      noise_seed=rank)
        for i in range(3):
            if i == 1:
                with model.no_sync():
                    ((model(x) - y) ** 2).mean().backward()
            ((model(x) - y) ** 2).mean().backward()
        assert state.ledger.steps == 3, kw
        mine = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        every = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine)
        assert torch.equal(every[0], every[1]), kw  # replicas agree


def test_ddp_modes(tmp_path):
    spawn(run_ddp_modes, 2, tmp_path)
