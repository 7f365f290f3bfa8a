"""Gradient coding through real DDP on gloo: coded training equals uncoded training (and that
check catches wrong hooks), a sleeping rank does not delay the others, a killed rank is
survived (up to s of them), more than s killed is a clear error, and the errors are clear."""

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp.coding import make_code
from commcomp.hooks import GradientCodingState
from tests._dist import spawn, spawn_allowing_deaths
from tests.hooks._models import make_model
from tests.hooks._mutants import MUTANTS, expect_caught, installed

LR = 0.1


def partition_batch(step, j):
    """Partition j of step `step`: the same on every rank (any rank can compute any partition)."""
    g = torch.Generator().manual_seed(1000 * step + j)
    return torch.randn(8, 20, generator=g), torch.randn(8, 5, generator=g)


def coded_backward(model, code, rank, step):
    """One backward of sum_j B[rank, j] * loss_j over this rank's s + 1 partitions."""
    model.zero_grad()
    loss = 0.0
    for j in code.partitions(rank):
        x, y = partition_batch(step, j)
        loss = loss + float(code.B[rank, j]) * ((model(x) - y) ** 2).mean()
    loss.backward()


def uncoded_params(n, steps):
    """Plain SGD on the average over all n partitions, in one process, in float64."""
    model = make_model().double()
    for step in range(steps):
        model.zero_grad()
        loss = sum(((model(x.double()) - y.double()) ** 2).mean() for x, y in
                   (partition_batch(step, j) for j in range(n))) / n
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return [p.detach().float() for p in model.parameters()]


def assert_replicas_agree(model, world):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    for r in range(1, world):
        assert torch.equal(every[r], every[0]), f"rank {r}'s model differs from rank 0's"


def train(model, code, rank, steps, delay=lambda step: 0.0, die_at=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        if die_at is not None and step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no goodbye to anyone
        time.sleep(delay(step))
        coded_backward(model, code, rank, step)
        opt.step()


def check_matches_uncoded(model, world, steps):
    """After `steps` coded SGD steps the model is the one plain SGD on all n partitions reaches."""
    for p, want in zip(model.parameters(), uncoded_params(world, steps)):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def run_matches_uncoded(rank, world, code_name, s):
    model = DDP(make_model(), broadcast_buffers=False, bucket_cap_mb=0.001)  # several buckets
    state = commcomp.register(model, "gradient_coding", s=s, code=code_name)
    # The slowest rank changes from step to step, so rounds decode from different survivor sets.
    steps = 6
    train(model, state.code, rank, steps, delay=lambda step: 0.3 if step % world == rank and step > 0 else 0.0)
    assert state.close()
    check_matches_uncoded(model, world, steps)
    assert_replicas_agree(model, world)
    assert state.step == steps
    if rank == 0:
        summary = state.metrics_summary()
        assert summary["rounds"] > 0 and set(summary["survivor_counts"]) <= set(range(world - s, world + 1))


@pytest.mark.parametrize("code_name", ["cyclic", "fractional"])
def test_coded_training_matches_uncoded(tmp_path, code_name):
    spawn(run_matches_uncoded, 4, tmp_path, code_name, 1)


def run_mutants(rank, world):
    steps = 3
    for mutant in MUTANTS:
        # a group per model: no coordinator message of one state can reach the next
        group = dist.new_group(list(range(world)))
        with installed("gradient_coding", mutant):
            model = DDP(make_model(), process_group=group, broadcast_buffers=False, bucket_cap_mb=0.001)
            state = commcomp.register(model, "gradient_coding", s=1, code="cyclic", timeout=60)
        train(model, state.code, rank, steps)
        state.close(timeout=30)
        expect_caught(mutant, check_matches_uncoded, model, world, steps)


def test_uncoded_check_catches_wrong_hooks(tmp_path):
    """check_matches_uncoded fails for a hook that returns its input (the coded combination),
    one biased by 1.1 and one that drops the sign (tests/hooks/_mutants.py)."""
    spawn(run_mutants, 3, tmp_path)


def run_sleeper(rank, world, stamps):
    model = DDP(make_model(), broadcast_buffers=False)
    state = commcomp.register(model, "gradient_coding", s=1, timeout=60)
    nap = 6.0
    train(model, state.code, rank, 2)  # past DDP's first (collective) step
    t0 = time.time()
    train(model, state.code, rank, 4, delay=lambda step: nap if (rank == world - 1 and step == 0) else 0.0)
    with open(os.path.join(stamps, f"rank{rank}"), "w") as f:
        f.write(f"{t0} {time.time()}")
    assert state.close(timeout=60)  # the sleeper still gets every result
    assert_replicas_agree(model, world)


def test_sleeping_rank_does_not_delay_the_round(tmp_path):
    spawn(run_sleeper, 4, tmp_path, str(tmp_path))
    t = {r: tuple(map(float, open(tmp_path / f"rank{r}").read().split())) for r in range(4)}
    woke = t[3][0] + 6.0
    for r in range(3):  # the others did all 4 steps while rank 3 slept
        assert t[r][1] < woke, (r, t[r][1] - t[r][0])


def run_permanently_slow(rank, world):
    model = DDP(make_model(), broadcast_buffers=False)
    state = commcomp.register(model, "gradient_coding", s=1, timeout=60, max_backlog=2)
    train(model, state.code, rank, 2)  # past DDP's first (collective) step
    lags = []
    slow = world - 1
    for step in range(10):
        train(model, state.code, rank, 1, delay=lambda _: 0.15 if rank == slow else 0.0)
        if rank == 0:
            lags.append(state.aggregator.lag()[slow])
    assert state.close(timeout=60)
    assert_replicas_agree(model, world)
    if rank == 0:
        # without back-pressure rank `slow` falls one more round behind every step; with it, the
        # coordinator waits once it is max_backlog results behind
        assert state.aggregator.metrics["backpressure_waits"] > 0
        assert max(lags) <= 2 * 2 + 1, lags  # its results + its expected messages, each bounded


def test_a_permanently_slow_rank_is_waited_for_at_max_backlog(tmp_path):
    spawn(run_permanently_slow, 3, tmp_path)


def run_killed(rank, world, victims, s):
    model = DDP(make_model(), broadcast_buffers=False)
    state = commcomp.register(model, "gradient_coding", s=s, timeout=60)
    train(model, state.code, rank, 2)
    if len(victims) <= s:
        train(model, state.code, rank, 6, die_at=2 if rank in victims else None)
        state.close(timeout=30)
        if rank == 0:
            assert set(state.dead_ranks) == set(victims), state.dead_ranks
        return
    # The coordinator explains; the others then learn that it is gone.
    expected = "tolerates s=1" if rank == 0 else "tolerates s=1|lost the gradient-coding coordinator"
    with pytest.raises(RuntimeError, match=expected):
        train(model, state.code, rank, 6, die_at=2 if rank in victims else None)
    if rank == 0:  # the coordinator gave up because the victims died, and knows which
        assert set(state.dead_ranks) == set(victims), state.dead_ranks


def test_killed_worker_does_not_stop_training(tmp_path):
    codes = spawn_allowing_deaths(run_killed, 4, tmp_path, (2,), 1, may_die=(2,))
    assert codes[2] == -signal.SIGKILL


def test_more_dead_workers_than_s_is_a_clear_error(tmp_path):
    codes = spawn_allowing_deaths(run_killed, 4, tmp_path, (2, 3), 1, may_die=(2, 3))
    # the victims died of the kill (a victim failing otherwise, or living on, is allowed by may_die)
    assert codes[2] == codes[3] == -signal.SIGKILL, codes


def run_bad_options(rank, world):
    model = DDP(make_model(), broadcast_buffers=False)
    with pytest.raises(ValueError, match="n=3 but the group has 2 ranks"):
        GradientCodingState(n=3, s=1)
    with pytest.raises(ValueError, match=r"tolerates s in 0\.\.1 .*got s=2"):
        GradientCodingState(s=2)  # s >= n
    with pytest.raises(ValueError, match="timeout"):
        GradientCodingState(s=1, timeout=0)
    with pytest.raises(ValueError, match="transport"):
        GradientCodingState(s=1, transport="carrier-pigeon")
    with pytest.raises(ValueError, match="coordinator=5"):
        GradientCodingState(s=1, coordinator=5)
    code = make_code("cyclic", 2, 1)
    state = GradientCodingState(s=1, code=code)
    saved = state.state_dict()
    assert saved["code"] == code.to_dict() and "process_group" not in saved["options"]
    GradientCodingState(s=1, code=code).load_state_dict(saved)
    with pytest.raises(ValueError, match="checkpoint was made with code"):
        GradientCodingState(s=0).load_state_dict(saved)
    with pytest.raises(ValueError, match="checkpoint options differ"):
        GradientCodingState(code=code, coordinator=1).load_state_dict(saved)
    assert GradientCodingState(code=code).s == 1  # s is read off a given code
    # Ranks that disagree on s: a clear error at registration, on every rank.
    with pytest.raises(RuntimeError, match=r"ranks disagree on the options \['code_digest', 's'\]"):
        commcomp.register(model, "gradient_coding", s=rank % 2)
    for st in (state,):
        st.close(timeout=5)


def test_bad_options_and_checkpoints(tmp_path):
    spawn(run_bad_options, 2, tmp_path)


def run_step_function(rank, world):
    """Without DDP: state.reduce_(params) after a coded backward."""
    model = make_model()
    state = GradientCodingState(s=1, code="cyclic")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = 4
    for step in range(steps):
        time.sleep(0.2 if step % world == rank else 0.0)
        coded_backward(model, state.code, rank, step)
        state.reduce_(list(model.parameters()))
        opt.step()
    assert state.close()
    for p, want in zip(model.parameters(), uncoded_params(world, steps)):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    assert state.metrics["bytes_sent"] > 0 and state.metrics["bytes_sent_fp32_allreduce"] > 0


def test_step_function_without_ddp(tmp_path):
    spawn(run_step_function, 3, tmp_path)
