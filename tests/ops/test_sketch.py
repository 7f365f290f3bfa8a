"""The sketch ops (CountSketch, block SRHT): agreement of every backend with the reference,
the linear-algebra properties (adjoint, linear, unbiased, orthogonal at s == n), argument
checks, autograd, torch.compile, and the CUDA kernels against the CPU ones."""

import contextlib
import math

import pytest
import torch

from commcomp import ops
from commcomp.ops import _loader, reference
from tests.ops._fresh import run_on_reference

LENGTHS = [0, 1, 3, 4097, 10**5 + 3]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ERR = (TypeError, ValueError, RuntimeError)


def make(n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 2).to(dtype).to(device)


def sum_tolerance(x):
    """Reorderings of a float32 sum of these terms differ by at most ~count * eps * sum |x|."""
    return 2.0**-20 * float(x.float().abs().sum()) + 1e-30


def blocks_for(n):
    if n > 10**4:  # the reference is slow: fewer cases for the largest input
        return [64, 8192]
    return sorted({1, 64, ops.default_block(n), 8192})


def sizes_for(n, block):
    npad = -(-n // block) * block
    return sorted({1 if n < 10**4 else npad // 10, max(1, npad // 10), max(1, npad)})


# ------------------------------------------------------------------ native == reference


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_countsketch_matches_reference(native, ref, device, n, dtype):
    x = make(n, dtype, device, seed=n)
    cases = [(7, 2**40 + 3), (max(1, n // 10), 5)]
    if n < 10**4:
        cases += [(1, 0), (max(1, 3 * n), 9)]
    for s, seed in cases:
        y = make(s, dtype, device, seed=s)
        got = native.countsketch_transpose(y, n, seed)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert torch.equal(got, ref.countsketch_transpose(y, n, seed))
        got = native.countsketch(x, s, seed)
        assert got.dtype == torch.float32 and got.shape == (s,)
        torch.testing.assert_close(got, ref.countsketch(x, s, seed), rtol=0, atol=sum_tolerance(x))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_srht_matches_reference(native, ref, device, n, dtype):
    x = make(n, dtype, device, seed=n + 1)
    for block in blocks_for(n):
        for s in sizes_for(n, block):
            seed = block * 31 + s
            got = native.srht(x, s, block, seed)
            assert got.dtype == torch.float32 and got.shape == (s,)
            assert torch.equal(got, ref.srht(x, s, block, seed)), (block, s)
            y = make(s, dtype, device, seed=s)
            got = native.srht_transpose(y, n, block, seed)
            assert got.shape == (n,)
            torch.testing.assert_close(got, ref.srht_transpose(y, n, block, seed), rtol=1e-5,
                                       atol=1e-5 * float(y.float().abs().max()))


def test_cpu_results_do_not_depend_on_the_thread_count(native, device):
    if device.type != "cpu":
        pytest.skip("CPU threading")
    x = make(300_001)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append((native.countsketch(x, 3001, 4), native.srht_transpose(x[:2048], 300_001, 8192, 4)))
    finally:
        torch.set_num_threads(before)
    for a, b in runs[1:]:
        assert torch.equal(a, runs[0][0]) and torch.equal(b, runs[0][1])


# ------------------------------------------------------------------ linear algebra


def _sketches(n, s):
    """(R, R^T) pairs as functions of the public wrappers."""
    return {
        "countsketch": (lambda v, seed: ops.countsketch(v, s, seed),
                        lambda y, seed: ops.countsketch_transpose(y, n, seed)),
        "srht": (lambda v, seed: ops.srht(v, s, seed, block=256),
                 lambda y, seed: ops.srht_transpose(y, n, seed, block=256)),
    }


@pytest.mark.parametrize("kind", ["countsketch", "srht"])
def test_adjoint_and_linear(device, kind):
    n, s = 1000, 100
    fwd, bwd = _sketches(n, s)[kind]
    a, b, y = make(n, device=device, seed=1), make(n, device=device, seed=2), make(s, device=device, seed=3)
    for seed in (0, 17):
        lhs = torch.dot(fwd(a, seed).double(), y.double())
        rhs = torch.dot(a.double(), bwd(y, seed).double())
        assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-5, abs_tol=1e-4)
        torch.testing.assert_close(fwd(a + b, seed), fwd(a, seed) + fwd(b, seed), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fwd(3 * a, seed), 3 * fwd(a, seed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["countsketch", "srht"])
def test_unbiased_against_the_variance(device, kind):
    """E[R^T R x] = x over seeds. For both sketches one coordinate of R^T R x has variance
    (||x||^2 - x_j^2) / s: CountSketch adds x_i (random sign) for each other i in j's bucket
    (probability 1/s); the SRHT with one block (n = block) and s rows drawn with replacement
    estimates x_j by the mean of s terms n z_r H_rj d_j, whose second moment is ||x||^2.
    Each coordinate's mean over K seeds lies within 5 standard errors, and the sample
    variance matches the formula on average."""
    n, s, draws = 256, 16, 1000
    x = make(n, device=device, seed=7)
    fwd, bwd = _sketches(n, s)[kind]
    est = torch.stack([bwd(fwd(x, seed), seed) for seed in range(draws)]).double()
    xd = x.double()
    var = (xd.pow(2).sum() - xd.pow(2)) / s
    err = est.mean(0) - xd
    assert bool((err.abs() <= 5 * (var / draws).sqrt()).all()), (err.abs() / (var / draws).sqrt()).max()
    ratio = (est.var(0) / var).mean().item()
    assert 0.85 < ratio < 1.15, ratio


@pytest.mark.parametrize("n,block", [(4096, 4096), (1000, 64), (5000, 8192)])
def test_srht_with_all_rows_is_orthogonal(device, n, block):
    x = make(n, device=device, seed=3)
    npad = -(-n // block) * block
    y = ops.srht(x, npad, seed=5, block=block)
    assert math.isclose(y.double().norm().item(), x.double().norm().item(), rel_tol=1e-5)
    back = ops.srht_transpose(y, n, seed=5, block=block)
    torch.testing.assert_close(back, x, rtol=0, atol=2e-6 * float(x.abs().max()) * math.log2(block + 1))


@contextlib.contextmanager
def deterministic(on=True):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_seeds(device):
    x = make(5000, device=device)
    for fn in (lambda seed: ops.countsketch(x, 100, seed), lambda seed: ops.srht(x, 100, seed),
               lambda seed: ops.countsketch_transpose(x[:100].contiguous(), 5000, seed),
               lambda seed: ops.srht_transpose(x[:100].contiguous(), 5000, seed)):
        with deterministic():  # CUDA countsketch adds with atomics unless asked not to
            assert torch.equal(fn(3), fn(3))
            assert not torch.equal(fn(3), fn(4))


def test_countsketch_is_close_run_to_run_and_exact_when_asked(device):
    """CUDA's atomics may reorder a bucket's sum (50 inputs per bucket here); the results stay
    within rounding, and deterministic mode makes them identical."""
    x = make(5000, device=device, seed=4)
    first = ops.countsketch(x, 100, 7)
    for _ in range(5):
        torch.testing.assert_close(ops.countsketch(x, 100, 7), first, rtol=1e-5, atol=1e-5)
    with deterministic():
        runs = [ops.countsketch(x, 100, 7) for _ in range(5)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    torch.testing.assert_close(runs[0], first, rtol=1e-5, atol=1e-5)


def test_srht_transpose_is_deterministic_when_rows_collide(device):
    """s = 4000 rows drawn with replacement from 4096: many rows are drawn three or more times.
    The sum order must not depend on the run (replicas de-sketch the same sketch)."""
    y = make(4000, device=device, seed=8)
    runs = [ops.srht_transpose(y, 4096, seed=2, block=4096) for _ in range(10)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    want = reference.srht_transpose(y.cpu(), 4096, 4096, 2)
    torch.testing.assert_close(runs[0].cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_empty_inputs(device):
    empty = torch.empty(0, device=device)
    assert torch.equal(ops.countsketch(empty, 5, 1), torch.zeros(5, device=device))
    assert torch.equal(ops.srht(empty, 5, 1), torch.zeros(5, device=device))
    assert ops.countsketch_transpose(torch.ones(5, device=device), 0, 1).shape == (0,)
    assert ops.srht_transpose(torch.ones(5, device=device), 0, 1).shape == (0,)
    assert [ops.default_block(n) for n in (0, 1, 2, 3, 4096, 4097, 10**6)] == [1, 1, 2, 4, 4096, 4096, 4096]


# ------------------------------------------------------------------ bad input


def _bad_calls(device):
    x = make(100, device=device)
    y = make(10, device=device)
    return [
        ("countsketch", (x, 0, 1), r"sketch_size = 0 is out of range; allowed 1 <= sketch_size < 2\^31"),
        ("countsketch", (x, 2**31, 1), r"sketch_size = 2147483648 is out of range"),
        ("countsketch", (x.double(), 5, 1), "x must be float32, float16 or bfloat16"),
        ("countsketch", (make(64, device=device).reshape(8, 8).t(), 5, 1), "x must be contiguous"),
        ("countsketch", (x, 5, -1), "seed must be"),
        ("countsketch_transpose", (y, -1, 1), "numel must be >= 0, got -1"),
        ("countsketch_transpose", (y[:0], 5, 1), r"y.numel\(\) = 0 is out of range"),
        ("srht", (x, 5, 3, 1), r"block = 3 is not allowed; allowed a power of two in \[1, 2\^24\]"),
        ("srht", (x, 5, 2**25, 1), r"block = 33554432 is not allowed"),
        ("srht", (x, 129, 64, 1), r"sketch_size = 129 exceeds the padded length n = 128"),
        ("srht_transpose", (y, 2**31, 1, 1), r"padded length must be < 2\^31"),
        ("srht_transpose", (y, 5, 4, 1), r"sketch_size = 10 exceeds the padded length n = 8"),
        ("srht_transpose", (y.to(torch.int32), 50, 64, 1), "y must be float32"),
    ]


def test_raw_ops_refuse_bad_input_on_every_backend(device):
    """Direct torch.ops calls (native C++ checks or the reference's RAW_CHECKS), and the
    reference registrations themselves, give the same messages; inputs stay untouched."""
    for name, args, message in _bad_calls(device):
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ERR, match=message):
            getattr(torch.ops.commcomp, name)(*args)
        with pytest.raises(ERR, match=message):
            _loader._checked_reference(name)(*args)
        for a, b in zip(args, before):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_wrappers_refuse_bad_input(device):
    x = make(100, device=device)
    with pytest.raises(ValueError, match="sketch_size = 0 is out of range"):
        ops.countsketch(x, 0, seed=1)
    with pytest.raises(TypeError, match="sketch_size must be an int"):
        ops.srht(x, 2.5, seed=1)
    with pytest.raises(ValueError, match="block = 6 is not allowed"):
        ops.srht(x, 5, seed=1, block=6)
    with pytest.raises(ValueError, match="sketch_size = 200 exceeds the padded length n = 128"):
        ops.srht(x, 200, seed=1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        ops.countsketch_transpose(x, 10, seed=-2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.countsketch([1.0, 2.0], 1, seed=0)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        ops.default_block(-1)


# ------------------------------------------------------------------ torch.library, autograd


def _cases(device):
    x = make(300, device=device).requires_grad_()  # float32 cases also check the autograd
    return [
        (torch.ops.commcomp.countsketch.default, (x, 17, 3)),
        (torch.ops.commcomp.countsketch.default, (x.detach().half(), 1, 4)),
        (torch.ops.commcomp.countsketch_transpose.default, (x.detach()[:17].bfloat16(), 300, 3)),
        (torch.ops.commcomp.srht.default, (x, 40, 64, 3)),
        (torch.ops.commcomp.srht_transpose.default, (x.detach()[:40].clone().requires_grad_(), 300, 64, 3)),
    ]


def test_opcheck(device):
    for op, args in _cases(device):
        torch.library.opcheck(op, args)


def test_gradients_are_the_transposes(device):
    x = make(500, device=device).requires_grad_()
    for fwd, bwd in _sketches(500, 50).values():
        g = make(50, device=device, seed=9)
        (grad,) = torch.autograd.grad(fwd(x, 11), x, g)
        assert torch.equal(grad, bwd(g, 11))
        y = g.clone().requires_grad_()
        with deterministic():  # the gradient of countsketch_transpose is a (CUDA: atomic) countsketch
            (grad,) = torch.autograd.grad(bwd(y, 11), y, x.detach())
            assert torch.equal(grad, fwd(x.detach(), 11))
    xh = make(64, torch.float16, device).requires_grad_()
    ops.srht(xh, 16, seed=1).pow(2).sum().backward()
    assert xh.grad.dtype == torch.float16 and xh.grad.shape == (64,)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck(device):
    x = make(40, device=device).requires_grad_()
    y = make(8, device=device).requires_grad_()
    kw = {"eps": 1e-2, "atol": 1e-2, "rtol": 1e-2, "fast_mode": True}
    assert torch.autograd.gradcheck(lambda v: ops.countsketch(v, 8, 1), (x,), **kw)
    assert torch.autograd.gradcheck(lambda v: ops.srht(v, 8, 1, block=16), (x,), **kw)
    assert torch.autograd.gradcheck(lambda v: ops.countsketch_transpose(v, 40, 1), (y,), **kw)
    assert torch.autograd.gradcheck(lambda v: ops.srht_transpose(v, 40, 1, block=16), (y,), **kw)


def test_gradient_inversion_backpropagates_through_a_sketch(device):
    """An attacker fits x to an observed sketch: the loss must reach x through the op."""
    target = ops.countsketch(make(64, device=device), 32, 5)
    x = torch.zeros(64, device=device, requires_grad=True)
    loss = (ops.countsketch(x, 32, 5) - target).pow(2).sum() + ops.srht(x, 8, 5).sum()
    loss.backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_sketches_trace_under_torch_compile(device):
    def step(x, y):
        return ops.srht_transpose(ops.srht(x, 64, 3), 300, 3) + ops.countsketch_transpose(
            ops.countsketch(x, 30, 4) + y, 300, 4)

    x, y = make(300, device=device), make(30, device=device, seed=1)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), step(x, y))
    xg = x.clone().requires_grad_()
    compiled(xg, y).sum().backward()
    xe = x.clone().requires_grad_()
    step(xe, y).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad)


FALLBACK = """
import torch
import commcomp.ops as ops
from commcomp.ops import reference
assert ops.backend("cpu") == "reference"
x = torch.randn(1000, requires_grad=True)
y = ops.srht(x, 100, seed=3)
assert torch.equal(y, reference.srht(x.detach(), 100, 1024, 3))
ops.countsketch(x, 10, seed=1).sum().backward()
assert torch.equal(x.grad, ops.countsketch_transpose(torch.ones(10), 1000, seed=1))
try:
    torch.ops.commcomp.srht(x.detach(), 5, 3, 1, )
except ValueError as e:
    assert "block = 3 is not allowed" in str(e)
else:
    raise AssertionError("raw reference op accepted a bad block")
print("ok")
"""


def test_reference_fallback_in_a_fresh_process():
    run_on_reference(FALLBACK)


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 4097, 10**5 + 3, 1 << 20])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(n, dtype):
    c = torch.ops.commcomp
    x = make(n, dtype)
    xc = x.cuda()
    for s in (1, max(1, n // 10)):
        y = make(s, dtype, seed=s)
        assert torch.equal(c.countsketch_transpose(y.cuda(), n, 7).cpu(), c.countsketch_transpose(y, n, 7))
        torch.testing.assert_close(c.countsketch(xc, s, 7).cpu(), c.countsketch(x, s, 7), rtol=0,
                                   atol=sum_tolerance(x))
    for block in (1, 4, 64, 4096, 8192, 1 << 15):
        npad = -(-n // block) * block
        for s in sorted({max(1, npad // 10), npad}):
            assert torch.equal(c.srht(xc, s, block, 2).cpu(), c.srht(x, s, block, 2)), (block, s)
            y = make(s, dtype, seed=s)
            torch.testing.assert_close(c.srht_transpose(y.cuda(), n, block, 2).cpu(),
                                       c.srht_transpose(y, n, block, 2), rtol=1e-5,
                                       atol=1e-5 * float(y.float().abs().max()))


@pytest.mark.cuda
def test_cuda_sketches_run_on_current_stream():
    x = torch.randn(1 << 20, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
        outs = [torch.ops.commcomp.countsketch(x, 1000, 1), torch.ops.commcomp.srht(x, 1000, 8192, 1),
                torch.ops.commcomp.countsketch_transpose(x[:1000], 1 << 20, 1),
                torch.ops.commcomp.srht_transpose(x[:1000], 1 << 20, 4096, 1)]
    assert torch.cuda.default_stream().query()
    assert not stream.query()
    stream.synchronize()
    assert torch.equal(outs[1].cpu(), torch.ops.commcomp.srht(x.cpu(), 1000, 8192, 1))
