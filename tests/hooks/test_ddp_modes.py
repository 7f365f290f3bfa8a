"""Every hook under every DDP mode users run: find_unused_parameters, static_graph, no_sync
accumulation, broadcast_buffers, gradient_as_bucket_view, and bucket rebuilds (small buckets,
several steps). Each hook's collectives run on a process group of their own, so DDP's own
collectives (the unused-parameter map, buffer broadcasts) cannot interleave with them; before
that, find_unused_parameters=True aborted gloo with "Received data size doesn't match".

Where the hook's result is exact, it is compared to the true average of the ranks' gradients;
the stochastic hooks must at least give every replica the same gradient."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from tests._dist import spawn

MODES = {
    "find_unused_parameters": dict(find_unused_parameters=True),
    "static_graph": dict(static_graph=True),
    "gradient_as_bucket_view": dict(gradient_as_bucket_view=True),
    "broadcast_buffers": dict(broadcast_buffers=True),
    "no_sync": dict(),
    "rebuilt_buckets": dict(),
}
# (hook, options, exact): exact hooks return the true average of the ranks' gradients
HOOK_CASES = {
    "terngrad": ({"collective": "two_phase", "min_compress_numel": 0}, False),
    "sketch_dp": ({"sketch": "srht", "sketch_ratio": 1.0}, True),  # no noise: an orthogonal map, exact
    "gradient_coding": ({"s": 0, "timeout": 60.0}, True),  # s = 0: the decoded sum is the plain average
    "gradient_tracking": ({"topology": "complete"}, True),  # complete graph, exact mixing: y_1 = mean g
    "gradient_tracking/ternary": ({"topology": "complete", "compressor": "ternary"}, False),  # the fused kernels
}


class Net(nn.Module):
    """Two used layers, one never used (trainable only for ``find_unused_parameters``: without
    it DDP would wait for its gradient forever), and a buffer that changes with the data
    (``broadcast_buffers``)."""

    def __init__(self, unused_trains: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(3, 3)
        self.unused.requires_grad_(unused_trains)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += x.shape[0]
        return self.b(torch.relu(self.a(x)))


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)


def loss_of(model, rank, step):
    x, y = batch(rank, step)
    return ((model(x) - y) ** 2).mean()


def used_grads(module):
    return [p.grad.detach().clone() for n, p in module.named_parameters() if not n.startswith("unused")]


def true_average(rank_count, step, micro=1):
    """mean over ranks of each rank's gradient at the initial weights (no DDP)."""
    per_rank = []
    for r in range(rank_count):
        net = Net()
        for m in range(micro):
            loss_of(net, r, 10 * step + m).backward()
        per_rank.append(used_grads(net))
    return [torch.stack(gs).mean(0) for gs in zip(*per_rank)]


def run_modes(rank, world, hook):
    options, exact = HOOK_CASES[hook]
    for mode, ddp_kwargs in MODES.items():
        kwargs = dict(bucket_cap_mb=0.0005, broadcast_buffers=False)
        kwargs.update(ddp_kwargs)
        model = DDP(Net(unused_trains=mode == "find_unused_parameters"), **kwargs)
        name = hook.split("/")[0]
        state = commcomp.register(model, name, **options)
        for step in range(3):  # DDP rebuilds its buckets after the first step
            model.zero_grad()
            micro = 2 if mode == "no_sync" else 1
            if micro == 2:
                with model.no_sync():
                    loss_of(model, rank, 10 * step).backward()  # accumulated locally, not sent
            loss_of(model, rank, 10 * step + micro - 1).backward()
            grads = used_grads(model.module)
            assert all(bool(torch.isfinite(g).all()) for g in grads), (hook, mode, step)
            if step == 0 and exact:  # the weights have not moved: compare with the true average
                for g, want in zip(grads, true_average(world, step, micro)):
                    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5, msg=f"{hook} under {mode}")
            if name != "gradient_tracking" or (step == 0 and exact):  # tracking replicas differ after exact step 0
                flat = torch.cat([g.reshape(-1) for g in grads])
                every = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(every, flat)
                assert all(torch.equal(every[0], e) for e in every), f"{hook} under {mode}: replicas differ"
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.01 * p.grad
        assert state.step == 3, (hook, mode, state.step)
        if mode == "broadcast_buffers":  # DDP broadcast rank 0's buffer every forward
            assert float(model.module.seen) == 8 * 3 * 1, float(model.module.seen)
        state.close()


@pytest.mark.parametrize("hook", sorted(HOOK_CASES))
def test_hook_under_every_ddp_mode(tmp_path, hook):
    spawn(run_modes, 2, tmp_path, hook)


def run_clean_exit(rank, world):
    """Two hooks on one DDP group share its executor; closing one leaves the other working; the
    rank then leaves through the normal interpreter exit (the executor's atexit join included)."""
    models = [DDP(Net(), bucket_cap_mb=0.0005, broadcast_buffers=False) for _ in range(2)]
    states = [commcomp.register(models[0], "terngrad", collective="int8", min_compress_numel=0),
              commcomp.register(models[1], "sketch_dp", sketch="srht", sketch_ratio=1.0)]
    for step in range(2):
        for m in models:
            m.zero_grad()
            loss_of(m, rank, step).backward()
    states[0].close()
    models[1].zero_grad()
    loss_of(models[1], rank, 5).backward()  # the shared executor still runs the other hook
    for g, want in zip(used_grads(models[1].module), true_average(world, 0, 1)):
        assert g.shape == want.shape
    # states[1] is left open on purpose: the interpreter's exit must close it cleanly


def test_two_hooks_share_an_executor_and_the_interpreter_exits_cleanly(tmp_path):
    spawn(run_clean_exit, 2, tmp_path, clean_exit=True)
