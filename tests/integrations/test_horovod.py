"""commcomp.integrations.horovod: the math without Horovod (ranks as threads around a stand-in
``hvd``), then the real thing under ``horovodrun --gloo -np 2`` when Horovod is installed.

This file is also the worker of the real test: ``python -m tests.integrations.test_horovod``.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from commcomp.integrations import horovod as H

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUM, AVERAGE, MAX = "Sum", "Average", "Max"


class FakeWorld:
    """``n`` ranks as threads, each with a :class:`FakeHvd`; all-reduces meet at a barrier and
    reduce as Horovod does on CPU: in rank order, Average = Sum times ``1/n`` in the tensor's own
    dtype (Horovod's ScaleBuffer)."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots = [None] * n

    def run(self, fn):
        """``[fn(hvd_rank) for each rank]``, run concurrently; re-raises a rank's exception."""
        results, errors = [None] * self.n, [None] * self.n

        def body(r):
            try:
                results[r] = fn(FakeHvd(self, r))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors[r] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                     next((e for e in errors if e is not None), None))
        if first is not None:
            raise first
        return results

    def reduce(self, rank: int, name, t: torch.Tensor, op) -> torch.Tensor:
        self.slots[rank] = (name, t.detach().clone())
        self.barrier.wait()
        names = {s[0] for s in self.slots}
        assert len(names) == 1, f"ranks all-reduced different names {names}"
        parts = [s[1] for s in self.slots]
        self.barrier.wait()  # everyone has read the slots
        if op == MAX:
            return torch.stack(parts).amax(0)
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        if op == AVERAGE:  # Horovod: times (float)(1/n) for floats, truncated for integers
            acc = acc * torch.tensor(1.0 / self.n, dtype=acc.dtype) if acc.is_floating_point() else (
                acc.double() * (1.0 / self.n)).to(acc.dtype)
        return acc


class FakeHvd:
    """The slice of ``horovod.torch`` the compressors and these tests use."""

    Sum, Average, Max = SUM, AVERAGE, MAX

    def __init__(self, world: FakeWorld, rank: int):
        self.world, self._rank, self._calls = world, rank, 0

    def size(self):
        return self.world.n

    def rank(self):
        return self._rank

    def allreduce(self, tensor, name=None, compression=None, op=AVERAGE):
        if name is None:
            name, self._calls = f"noname.{self._calls}", self._calls + 1
        if compression is None:
            return self.world.reduce(self._rank, name, tensor, op)
        c, ctx = compression.compress(tensor)
        return compression.decompress(self.world.reduce(self._rank, name, c, op), ctx)


def per_rank(r: int, n: int = 4000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + r)) * (r + 1)


# --------------------------------------------------------------------------- without Horovod


def test_module_loads_without_horovod_and_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # import fails, as when not installed
    comp = H.Compression.sketch(ratio=0.1)
    with pytest.raises(ImportError, match="launch/install_horovod.sh"):
        comp.compress(torch.randn(5000))


def test_options_are_checked():
    with pytest.raises(ValueError, match="clip_factor"):
        H.Compression.ternary(clip_factor=0)
    with pytest.raises(ValueError, match="seed"):
        H.Compression.ternary(seed=-1)
    with pytest.raises(ValueError, match="min_numel"):
        H.Compression.ternary(min_numel=-1)
    with pytest.raises(ValueError, match="kind"):
        H.Compression.sketch(kind="gaussian")
    with pytest.raises(ValueError, match="sketch_ratio"):
        H.Compression.sketch(ratio=2)
    with pytest.raises(ValueError, match="power of two"):
        H.Compression.sketch(kind="srht", block=1000)


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64, 723])
def test_packed_codes_sum_digitwise(world):
    """Packing is linear: the sum of the ranks' packed codes unpacks to the per-element sums,
    also after Horovod's Average (times float32 1/n) is undone."""
    g = torch.Generator().manual_seed(world)
    ranks = min(world, 8)  # the sum of 8 ranks' codes, and the extremes of all `world` ranks
    codes = torch.randint(-1, 2, (ranks, 1001), generator=g, dtype=torch.int8)
    packed = torch.stack([H.pack_codes(c, world) for c in codes]).sum(0)
    torch.testing.assert_close(H.unpack_sums(packed, 1001, world), codes.sum(0).long(), rtol=0, atol=0)
    m = H.codes_per_float(world)
    assert m >= 2 and packed.numel() == -(-1001 // m)
    extreme = torch.full((1001,), -1, dtype=torch.int8)
    for sign in (-1, 1):
        total = H.pack_codes(extreme * sign, world) * world  # every rank sent the same extreme codes
        averaged = total * torch.tensor(1.0 / world)
        assert torch.equal(H.unpack_sums(averaged.double() * world, 1001, world), torch.full((1001,), -sign * world))
    assert H.codes_per_float(724) == 1


def test_ternary_with_a_shared_scale_is_unbiased_and_on_the_grid():
    n, trials = 3, 150
    xs = [per_rank(r) for r in range(n)]
    mean = torch.stack(xs).mean(0).double()
    scale = max(float(x.abs().max()) for x in xs)

    def body(hvd):
        comp = H.Compression.ternary(seed=7, hvd=hvd)
        return [hvd.allreduce(xs[hvd.rank()], compression=comp, op=SUM) for _ in range(trials)], comp

    results = FakeWorld(n).run(body)
    for outs, _ in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs, results[0][0])), "ranks disagree"
    outs, comp = results[0]
    k = outs[0] / scale  # the sum of n codes in {-1, 0, 1}
    assert torch.allclose(k, k.round(), atol=1e-5) and float(k.abs().max()) <= n
    est = torch.stack(outs).double().mean(0) / n
    # per element: std of one sum <= sqrt(n) * scale, of the mean over trials / sqrt(trials)
    assert float((est - mean).abs().max()) < 5 * math.sqrt(n) * scale / n / math.sqrt(trials)
    # 7 codes per float32 for 3 ranks, plus the 32-byte scale message and 8 bytes of sentinels
    ratio = comp.metrics["bytes_sent_fp32_allreduce"] / comp.metrics["bytes_sent"]
    assert 6.5 < ratio < 7, ratio


@pytest.mark.parametrize("n", [2, 3])
def test_ternary_average_is_the_sum_over_n(n):
    xs = [per_rank(r) for r in range(n)]

    def body(hvd):
        avg = hvd.allreduce(xs[hvd.rank()], compression=H.Compression.ternary(seed=1, hvd=hvd))
        return avg, hvd.allreduce(xs[hvd.rank()], compression=H.Compression.ternary(seed=1, hvd=hvd), op=SUM)

    avg, total = FakeWorld(n).run(body)[0]
    torch.testing.assert_close(avg * n, total)  # same seeds, same codes


def test_ternary_refuses_max_and_a_rank_out_of_step():
    def body(hvd):
        comp = H.Compression.ternary(hvd=hvd)
        return hvd.allreduce(per_rank(hvd.rank()), compression=comp, op=MAX)

    with pytest.raises(RuntimeError, match="Only op=hvd.Sum and hvd.Average"):
        FakeWorld(2).run(body)

    def skewed(hvd):
        comp = H.Compression.ternary(hvd=hvd)
        comp.calls = 5 * hvd.rank()  # as after loading a checkpoint on one rank only
        return hvd.allreduce(per_rank(hvd.rank()), compression=comp)

    with pytest.raises(RuntimeError, match="same seed and calls counter"):
        FakeWorld(2).run(skewed)


def test_ternary_nan_on_one_rank_is_nan_everywhere():
    def body(hvd):
        x = per_rank(hvd.rank())
        if hvd.rank() == 1:
            x[3] = math.nan
        return hvd.allreduce(x, compression=H.Compression.ternary(hvd=hvd))

    for out in FakeWorld(2).run(body):
        assert bool(out.isnan().all())


def test_ternary_size_mismatch_fails_on_every_rank():
    def body(hvd):
        comp = H.Compression.ternary(hvd=hvd)
        try:
            comp.compress(per_rank(0, 2000 + hvd.rank()))
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    msgs = FakeWorld(2).run(body)
    assert all("different sizes" in m for m in msgs), msgs


@pytest.mark.parametrize("kind", ["countsketch", "srht"])
@pytest.mark.parametrize("op", [SUM, AVERAGE])
def test_sketch_of_the_sum_is_the_sum_of_sketches(kind, op):
    n = 3
    xs = [per_rank(r).reshape(40, 100) for r in range(n)]

    def body(hvd):
        comp = H.Compression.sketch(ratio=0.25, kind=kind, seed=3, hvd=hvd)
        first = hvd.allreduce(xs[hvd.rank()], compression=comp, op=op)
        return first, hvd.allreduce(xs[hvd.rank()], compression=comp, op=op), comp

    results = FakeWorld(n).run(body)
    comp = results[0][2]
    total = torch.stack(xs).sum(0) / (n if op == AVERAGE else 1)
    for call in (0, 1):
        sk = comp.sketch_for(total.numel(), call)
        want = sk.transpose(sk.sketch(total.reshape(-1))).reshape(total.shape)  # de-sketch of the sum
        for r in range(n):
            torch.testing.assert_close(results[r][call], want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(results[0][0], results[0][1])  # a fresh R per call
    ratio = comp.metrics["bytes_sent"] / comp.metrics["bytes_sent_fp32_allreduce"]
    assert 0.25 <= ratio < 0.26


def test_sketch_is_unbiased():
    x = per_rank(0, 2000)
    est = torch.zeros(2000, dtype=torch.float64)
    trials = 300

    def body(hvd):
        comp = H.Compression.sketch(ratio=0.5, hvd=hvd)
        return [hvd.allreduce(x, compression=comp) for _ in range(trials)]

    for out in FakeWorld(1).run(body)[0]:
        est += out.double()
    err = (est / trials - x.double()).abs().max()
    assert float(err) < 5 * float(x.norm()) / math.sqrt(1000 * trials)  # per-coordinate std ~ ||x|| / sqrt(s)


def test_sketch_tags_catch_ranks_out_of_step():
    def body(hvd):
        comp = H.Compression.sketch(ratio=0.1, hvd=hvd)
        comp.calls = hvd.rank()  # as after loading a checkpoint on one rank only
        return hvd.allreduce(per_rank(hvd.rank()), compression=comp)

    with pytest.raises(RuntimeError, match="same seed and calls counter"):
        FakeWorld(2).run(body)


def test_small_integer_and_sparse_tensors_go_through_untouched():
    def body(hvd):
        comp = H.Compression.ternary(hvd=hvd)
        small = torch.randn(10)
        ints = torch.arange(5000)
        for t in (small, ints, small.to_sparse()):
            c, ctx = comp.compress(t)
            assert c is t and comp.decompress(c, ctx) is t
        return comp.calls

    assert FakeWorld(1).run(body) == [0]


@pytest.mark.parametrize("factory", [lambda hvd: H.Compression.ternary(seed=9, hvd=hvd),
                                     lambda hvd: H.Compression.sketch(0.1, "srht", seed=9, hvd=hvd)])
def test_state_dict_round_trip_resumes_the_same_stream(factory):
    def body(hvd):
        a = factory(hvd)
        for _ in range(3):
            a.compress(per_rank(0))
        saved = a.state_dict()
        b = factory(hvd)
        b.load_state_dict(saved)
        assert b.state_dict() == saved and b.calls == 3
        ca, _ = a.compress(per_rank(1))
        cb, _ = b.compress(per_rank(1))
        assert torch.equal(ca, cb)
        other = H.Compression.sketch(ratio=0.2, hvd=hvd)
        with pytest.raises(ValueError, match="options"):
            other.load_state_dict(saved)
        return True

    assert FakeWorld(1).run(body) == [True]


# --------------------------------------------------------------------------- with Horovod

HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None


def _horovod_or_skip() -> None:
    """Skip without Horovod; fail instead under COMMCOMP_REQUIRE_HOROVOD=1 (CI after the install)."""
    missing = pytest.fail if os.environ.get("COMMCOMP_REQUIRE_HOROVOD") == "1" else pytest.skip
    if not HAVE_HOROVOD:
        missing("horovod is not installed (bash launch/install_horovod.sh builds it; ~5 min on 2 cores)")
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"horovod is installed but horovod.torch does not import: {probe.stderr.strip()[-300:]}")


@pytest.mark.slow
def test_under_horovodrun_gloo_two_ranks():
    _horovod_or_skip()
    # `horovodrun` is a console script for horovod.runner.launch. Run the module with this
    # interpreter: a venv that sees a system-wide Horovod has no horovodrun of its own, and the
    # system one need not be on PATH (CI's was not).
    cmd = [sys.executable, "-m", "horovod.runner.launch", "--gloo", "-np", "2", "-H", "localhost:2",
           sys.executable, "-m", "tests.integrations.test_horovod"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("horovod worker ok") == 2, out.stdout[-4000:]


@pytest.mark.slow
def test_recipe_runs_the_ddp_demo_with_a_hook_under_horovodrun(tmp_path):
    """launch/horovodrun.sh with --hook: train_ddp.py's group comes from Horovod's environment."""
    _horovod_or_skip()
    log = tmp_path / "steps.jsonl"
    cmd = ["bash", "launch/horovodrun.sh", "2", "--hook", "terngrad", "--opt", "error_feedback=True",
           "--steps", "4", "--log-jsonl", str(log), "--out", str(tmp_path)]
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "examples/train_ddp.py --hook terngrad" in out.stderr  # the recipe chose the DDP demo
    assert "terngrad  epoch 1: test accuracy" in out.stdout, out.stdout[-4000:]
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert json.loads((tmp_path / "terngrad-seed0.json").read_text())["acc"]


def _worker() -> None:
    """Each rank of ``horovodrun --gloo -np 2``: real all-reduces and a DistributedOptimizer."""
    import horovod.torch as hvd

    hvd.init()
    rank, n = hvd.rank(), hvd.size()
    xs = [per_rank(r).reshape(40, 100) for r in range(n)]
    total = torch.stack(xs).sum(0)

    for kind in ("countsketch", "srht"):  # sketch of the sum == sum of the sketches
        comp = H.Compression.sketch(ratio=0.25, kind=kind, seed=3)
        for op, div in ((hvd.Sum, 1), (hvd.Average, n)):
            call = comp.calls
            got = hvd.allreduce(xs[rank], compression=comp, op=op, name=f"sk.{kind}.{call}")
            sk = comp.sketch_for(total.numel(), call)
            want = sk.transpose(sk.sketch(total.reshape(-1) / div)).reshape(total.shape)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)

    comp = H.Compression.ternary(seed=5)
    twin = H.Compression.ternary(seed=5)  # same seeds: the same codes, summed instead of averaged
    scale = max(float(x.abs().max()) for x in xs)
    acc = torch.zeros_like(total, dtype=torch.float64)
    trials = 100
    for t in range(trials):
        avg = hvd.allreduce(xs[rank], compression=comp, name=f"tern.{t}")
        summed = hvd.allreduce(xs[rank], compression=twin, op=hvd.Sum, name=f"tern.sum.{t}")
        torch.testing.assert_close(avg * n, summed)
        k = summed / scale
        assert torch.allclose(k, k.round(), atol=1e-5) and float(k.abs().max()) <= n, "not on the ternary grid"
        both = hvd.allgather(avg.reshape(1, -1))
        assert torch.equal(both[0], both[1]), "ranks disagree"
        acc += avg.double()
    bound = 5 * math.sqrt(n) * scale / n / math.sqrt(trials)
    assert float((acc / trials - total.double() / n).abs().max()) < bound
    ratio = comp.metrics["bytes_sent_fp32_allreduce"] / comp.metrics["bytes_sent"]
    assert ratio > 8.5, f"ternary sent only {ratio:.2f}x fewer bytes than fp32"  # 9 codes per float32
    try:
        hvd.allreduce(xs[rank], compression=H.Compression.ternary(), op=hvd.Max, name="max")
        raise AssertionError("a Max all-reduce of ternary codes was not refused")
    except RuntimeError as exc:
        assert "Only op=hvd.Sum and hvd.Average" in str(exc)

    for make in (lambda: H.Compression.ternary(seed=1, min_numel=64),
                 lambda: H.Compression.sketch(ratio=0.5, seed=1, min_numel=64)):
        torch.manual_seed(rank)  # different data on each rank, same start after the broadcast
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        comp = make()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=comp)
        for _ in range(4):
            x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert bool(torch.isfinite(flat).all())
        every = hvd.allgather(flat.reshape(1, -1))
        assert torch.equal(every[0], every[1]), f"{comp.name}: replicas differ after DistributedOptimizer steps"
        assert comp.calls > 0 and comp.metrics["bytes_sent"] < comp.metrics["bytes_sent_fp32_allreduce"]
    print(f"rank {rank}: horovod worker ok", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    _worker()


@pytest.mark.cuda
@pytest.mark.parametrize("factory", ["ternary", "sketch"])
def test_compressors_on_cuda_gradients_match_cpu(factory):
    """Most Horovod jobs run on GPUs: the compressors take CUDA gradients, return CUDA results,
    and give what the same run on CPU gives (the same codes; sketches up to summation order)."""
    n = 2
    outs = {}
    for dev in ("cpu", "cuda"):
        xs = [per_rank(r).to(dev) for r in range(n)]

        def body(hvd):
            comp = getattr(H.Compression, factory)(seed=3, hvd=hvd)
            return [hvd.allreduce(xs[hvd.rank()], compression=comp, op=SUM) for _ in range(3)]

        outs[dev] = FakeWorld(n).run(body)
    for rank_out in outs["cuda"]:
        assert all(t.is_cuda for t in rank_out)
        assert all(torch.equal(a, b) for a, b in zip(rank_out, outs["cuda"][0]))
    for a, b in zip(outs["cuda"][0], outs["cpu"][0]):
        if factory == "ternary":
            assert torch.equal(a.cpu(), b)
        else:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
