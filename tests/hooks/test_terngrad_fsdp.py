"""TernGrad under FSDP2: the compressed reduce-scatter against an independent computation
(every rank rebuilds every rank's local gradient and FSDP2's row layout itself), unbiasedness,
NaN, FSDP2's divide factors, reduce dtypes and accumulation, options across ranks, bad input,
HSDP's compressed replicate all-reduce, and checkpoints through DCP and commcomp.checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import commcomp
from commcomp.hooks import terngrad_fsdp
from commcomp.hooks.terngrad import row_scales
from commcomp.ops import reference
from tests._dist import spawn

from ._models import make_model, rank_batch

pytestmark = pytest.mark.skipif(not terngrad_fsdp.fsdp_available(),
                                reason="this torch has no FSDP2 set_custom_reduce_scatter")


def _shard(model, mesh=None):
    from torch.distributed.fsdp import fully_shard

    kw = {} if mesh is None else {"mesh": mesh}
    fully_shard(model[0], **kw)
    fully_shard(model[2], **kw)
    fully_shard(model, **kw)  # the root owns model[4]
    return model


def _loss(model, rank, scale=1.0):
    device = next(model.parameters()).device
    x, y = rank_batch(rank)
    return ((model(x.to(device)) - y.to(device)) ** 2).mean() * scale


def _local_grads(rank, device="cpu"):
    """This rank's unsharded gradient of every parameter, without FSDP (on the CPU)."""
    model = make_model().to(device)
    _loss(model, rank).backward()
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def _rows(grads, names, world):
    """FSDP2's reduce-scatter input built from the gradients: W rows, row r the concatenation
    of each parameter's dim-0 chunk r, zero-padded to ceil(dim0 / W) rows."""
    rows = []
    for r in range(world):
        parts = []
        for name in names:
            g = grads[name]
            c = math.ceil(g.shape[0] / world)
            chunk = torch.zeros((c,) + tuple(g.shape[1:]))
            piece = g[r * c:(r + 1) * c]
            chunk[:piece.shape[0]] = piece
            parts.append(chunk.reshape(-1))
        rows.append(torch.cat(parts))
    return rows


def _module_names(model):
    """Per FSDP module (in commcomp's order): the names of the parameters it owns."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for fqn, module in model.named_modules():
        if isinstance(module, FSDPModule):
            groups = module._get_fsdp_state()._fsdp_param_groups
            if groups:
                names = {id(p): n for n, p in model.named_parameters()}
                out.append([names[id(fp.sharded_param)] for fp in groups[0].fsdp_params])
    return out


def _expected_shards(world, rank, state, calls=0, grads=None, block=0):
    """Independently: every rank's codes (reference ternarizer, the state's streams), averaged
    over ranks, for this rank's row of each module. ``block``: one scale per block of that many
    elements of each parameter's row (max over ranks of the block's max |g|), else per parameter."""
    grads = grads or [_local_grads(r) for r in range(world)]
    model = _shard(make_model())  # only for the layout's names, never run
    out = {}
    for index, names in enumerate(_module_names(model)):
        rows_per_rank = [_rows(g, names, world) for g in grads]
        row_lengths = [math.ceil(grads[0][n].shape[0] / world) * grads[0][n][0].numel() for n in names]
        segs, owner = [], []  # one row's segments, and their parameter
        for k, n in enumerate(row_lengths):
            cuts = [min(block, n - a) for a in range(0, n, block)] if block else [n]
            segs += cuts
            owner += [k] * len(cuts)
        xs = [torch.cat(rows) for rows in rows_per_rank]
        if block:  # per (row, block): max over ranks
            scales = torch.stack([torch.stack([p.abs().max() for p in torch.split(x, segs * world)])
                                  for x in xs]).amax(0)
        else:  # per parameter, the same in every row
            per_param = torch.stack([torch.stack([grads[r][n].abs().max() for r in range(world)]).max()
                                     for n in names])
            scales = per_param[owner].repeat(world)
        nrow = sum(row_lengths)
        total = torch.zeros(nrow)
        for r in range(world):
            seed = commcomp.utils.mix_seed(state.seed, r, calls, index, 0)
            codes = reference.ternarize_int8(xs[r], scales, segs * world, seed, 0)
            total += codes[rank * nrow:(rank + 1) * nrow].float()
        mine = scales.view(world, -1)[rank]
        avg = torch.cat([t * sc / world for t, sc in zip(torch.split(total, segs), mine)])
        pos = 0
        for n, length in zip(names, row_lengths):
            out[n] = avg[pos:pos + length]
            pos += length
    return out


def _check_against_independent(rank, world, device="cpu", block=0):
    mesh = None
    if device == "cuda":  # 2 gloo ranks sharing the GPU (gloo moves CUDA tensors)
        from torch.distributed.device_mesh import init_device_mesh

        torch.cuda.set_device(0)
        mesh = init_device_mesh("cuda", (world,))
    model = _shard(make_model().to(device), mesh)
    state = commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=0, seed=3, scale_block=block)
    assert len(state.comms) == 3
    _loss(model, rank).backward()
    expected = _expected_shards(world, rank, state, grads=[_local_grads(r, device) for r in range(world)],
                                block=block)
    for name, p in model.named_parameters():
        got = p.grad.to_local().reshape(-1).cpu()
        want = expected[name][:got.numel()]
        assert torch.equal(got, want), (name, (got - want).abs().max(), (got != want).float().mean())
    assert state.calls == [1, 1, 1] and state.step == 1
    # bytes: 2-bit payloads plus the scales' MAX all-reduce, against FSDP2's fp32 reduce-scatter
    if block == 0:  # (blocks of 8 elements send a scale per 8: more than the codes)
        assert state.metrics["bytes_sent"] * 8 < state.metrics[terngrad_fsdp.FP32_FSDP]


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_reduce_scatter_equals_independent_average(tmp_path, world):
    spawn(_check_against_independent, world, tmp_path)


def test_block_scales_equal_independent_average(tmp_path):
    """scale_block=8: one scale per (row, block of 8 elements), blocks cut at parameter ends
    (hundreds of segments: the decode's one expanded multiply)."""
    spawn(_check_against_independent, 2, tmp_path, "cpu", 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compressed_reduce_scatter_on_cuda_equals_independent_average(tmp_path):
    """FSDP2 on CUDA tensors: the CUDA kernels' codes are the reference's, bit for bit."""
    spawn(_check_against_independent, 2, tmp_path, "cuda")


def _check_small_layers_exact(rank, world):
    model = _shard(make_model())
    state = commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=200, seed=3)
    _loss(model, rank).backward()
    grads = [_local_grads(r) for r in range(world)]
    expected = _expected_shards(world, rank, state, grads=grads)
    for name, p in model.named_parameters():
        got = p.grad.to_local().reshape(-1)
        full = torch.stack([g[name] for g in grads]).mean(0)
        if full.numel() < 200:  # exact fp32 reduce-scatter
            c = math.ceil(full.shape[0] / world)
            want = full[rank * c:(rank + 1) * c].reshape(-1)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, expected[name][:got.numel()]), name


def test_small_layers_are_reduced_exactly(tmp_path):
    spawn(_check_small_layers_exact, 2, tmp_path)


def _check_unbiased(rank, world):
    model = _shard(make_model())
    state = commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=0, seed=11)
    trials = 300
    acc = {n: torch.zeros_like(p.to_local()) for n, p in model.named_parameters()}
    for _ in range(trials):
        model.zero_grad()
        _loss(model, rank).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.to_local()
    assert state.step == trials
    grads = [_local_grads(r) for r in range(world)]
    worst = 0.0
    for n, p in model.named_parameters():
        g = torch.stack([gr[n] for gr in grads]).double()  # [W, ...]
        c = math.ceil(g.shape[1] / world)
        g = g[:, rank * c:(rank + 1) * c]
        s = torch.stack([gr[n].abs().max() for gr in grads]).max().double()
        var = (s * g.abs() - g * g).sum(0) / world ** 2  # variance of the average of W codes
        mean = acc[n].double().reshape(g.shape[1:]) / trials
        z = (mean - g.mean(0)).abs() / (var / trials).sqrt().clamp_min(1e-12)
        worst = max(worst, float(z.max()))
    assert worst < 5.5, worst  # ~1000 elements: P(any |z| > 5.5) < 1e-4


def test_unbiased_over_steps(tmp_path):
    spawn(_check_unbiased, 2, tmp_path)


def _check_nonfinite(rank, world, value):
    model = _shard(make_model())
    commcomp.register(model, "terngrad", min_compress_numel=0)
    x, y = rank_batch(rank)
    if rank == world - 1:
        x[0, 0] = value
    ((model(x) - y) ** 2).mean().backward()
    for n, p in model.named_parameters():
        assert torch.isnan(p.grad.to_local()).all(), n


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_on_one_rank_gives_nan_everywhere(tmp_path, value):
    spawn(_check_nonfinite, 2, tmp_path, value)


def _grads_of(model):
    return {n: p.grad.to_local().clone() for n, p in model.named_parameters()}


def _check_divide_dtype_accumulation(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def build(mp=None):
        model = make_model()
        kw = {} if mp is None else {"mp_policy": mp}
        for m in (model[0], model[2], model):
            fully_shard(m, **kw)
        return model, commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=0, seed=5)

    base, _ = build()
    _loss(base, rank).backward()
    ref = _grads_of(base)
    # set_gradient_divide_factor: FSDP2 asks for sum / factor (PREMUL_SUM); same codes, same seeds
    divided, _ = build()
    for m in (divided[0], divided[2], divided):
        m.set_gradient_divide_factor(3.0)
    _loss(divided, rank).backward()
    for n, g in _grads_of(divided).items():
        torch.testing.assert_close(g, ref[n] * world / 3.0, rtol=1e-6, atol=1e-7)
    # reduce dtypes: bf16 (AVG in bf16) and fp16 (SUM with pre- and post-division)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        model, _ = build(MixedPrecisionPolicy(reduce_dtype=dtype))
        _loss(model, rank).backward()
        for n, g in _grads_of(model).items():
            # the codes come from the reduce-dtype input: a few may flip against fp32's
            close = torch.isclose(g.float(), ref[n], rtol=tol, atol=tol * float(ref[n].abs().max()))
            assert close.float().mean() > 0.97, (dtype, n, close.float().mean())
    # accumulation: two micro-batches without sync, then one that syncs: one reduce-scatter of the sum
    acc, state = build()
    for m in (acc[0], acc[2], acc):
        m.set_requires_gradient_sync(False)
    _loss(acc, rank, 0.5).backward()
    assert state.calls == [0, 0, 0]
    for m in (acc[0], acc[2], acc):
        m.set_requires_gradient_sync(True)
    _loss(acc, rank, 0.5).backward()
    assert state.calls == [1, 1, 1]
    for n, g in _grads_of(acc).items():  # 0.5 g + 0.5 g: the same input up to rounding
        close = torch.isclose(g, ref[n], rtol=1e-5, atol=1e-7)
        assert close.float().mean() > 0.97, (n, close.float().mean())


def test_divide_factor_reduce_dtypes_and_accumulation(tmp_path):
    spawn(_check_divide_dtype_accumulation, 2, tmp_path)


def _check_option_mismatch(rank, world):
    model = _shard(make_model())
    with pytest.raises(RuntimeError, match="disagree on the options.*clip_factor"):
        commcomp.register(model, "terngrad", clip_factor=2.0 + rank)
    # nothing was installed: FSDP2's own reduce-scatter still runs
    _loss(model, rank).backward()
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    for fqn, m in model.named_modules():
        for group in getattr(m, "_get_fsdp_state", lambda: None)()._fsdp_param_groups if hasattr(
                m, "_get_fsdp_state") else []:
            assert isinstance(group._reduce_scatter_comm, DefaultReduceScatter)


def test_option_mismatch_raises_on_every_rank(tmp_path):
    spawn(_check_option_mismatch, 2, tmp_path)


def _check_bad_options(rank, world):
    model = _shard(make_model())
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    for kwargs, match in (({"clip_factor": -1.0}, "clip_factor"),
                          ({"error_feedback": True}, "error_feedback=True is not offered"),
                          ({"collective": "ring"}, "collective"),
                          ({"min_compress_numel": -3}, "min_compress_numel"),
                          ({"process_group": None}, "process group"),
                          ({"bogus": 1}, "bogus")):
        with pytest.raises((ValueError, TypeError), match=match):
            commcomp.register(model, "terngrad", **kwargs)
    with pytest.raises(ValueError, match="DistributedDataParallel only"):
        commcomp.register(model, "sketch_dp", sketch_ratio=0.1)
    for n, p in model.named_parameters():
        assert torch.equal(p.to_local(), before[n])
    state = commcomp.register(model, "terngrad")  # still registrable, and trains
    with pytest.raises(ValueError, match="registered twice"):
        commcomp.register(model, "terngrad")
    _loss(model, rank).backward()
    assert state.step == 1
    # close(): FSDP2's own reduce-scatter comes back, training goes on, a new state may register
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    state.close()
    assert all(isinstance(c.module_group._reduce_scatter_comm, DefaultReduceScatter) for c in state.comms)
    model.zero_grad()
    _loss(model, rank).backward()
    assert state.step == 1
    again = commcomp.register(model, "terngrad")
    model.zero_grad()
    _loss(model, rank).backward()
    assert again.step == 1


def test_bad_options_raise_and_leave_the_model_untouched(tmp_path):
    spawn(_check_bad_options, 2, tmp_path)


def _train(model, rank, steps, opt, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        x, y = rank_batch(rank * 1000 + step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _check_dcp_resume(rank, world, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model = _shard(make_model())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, commcomp.register(model, "terngrad", seed=7, min_compress_numel=64)

    model, opt, state = fresh()
    _train(model, rank, 3, opt)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "commcomp": state}, checkpoint_id=f"{folder}/dcp")
    saved_metrics = dict(state.metrics)
    commcomp.checkpoint.save(f"{folder}/ck-{rank}.pt", 3, states={"terngrad": state})
    _train(model, rank, 3, opt, start=3)
    want = {n: p.to_local().clone() for n, p in model.named_parameters()}
    for how in ("dcp", "commcomp"):
        model2, opt2, state2 = fresh()
        _train(model2, rank, 1, opt2, start=50)  # a different past, overwritten by the load
        msd2, osd2 = get_state_dict(model2, opt2)
        sd = {"model": msd2, "optim": osd2}
        if how == "dcp":
            sd["commcomp"] = state2
        dcp.load(sd, checkpoint_id=f"{folder}/dcp")
        set_state_dict(model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if how == "commcomp":  # the state from commcomp.checkpoint alone
            assert state2.calls == [1, 1, 1]
            assert commcomp.checkpoint.load(f"{folder}/ck-{rank}.pt", states={"terngrad": state2}) == 3
        assert state2.calls == [3, 3, 3] and state2.step == 3
        assert dict(state2.metrics) == saved_metrics, (how, dict(state2.metrics), saved_metrics)
        _train(model2, rank, 3, opt2, start=3)
        for n, p in model2.named_parameters():
            assert torch.equal(p.to_local(), want[n]), (how, n)
    # a checkpoint made with other options is refused before anything changes
    other = commcomp.register(_shard(make_model()), "terngrad", seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state.state_dict())
    assert other.step == 0


def test_dcp_and_commcomp_checkpoint_resume_bit_exactly(tmp_path):
    spawn(_check_dcp_resume, 2, tmp_path, str(tmp_path))


def _check_hsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh)  # native HSDP: refused, with the advice
    with pytest.raises(ValueError, match="2-D mesh"):
        commcomp.register(model, "terngrad")
    # replicate groups that pair different shard positions ([0, 3] and [1, 2] across the shard
    # groups [0, 1] and [2, 3]) would average different chunks: refused on every rank
    crossed = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    model = _shard(make_model(), mesh["shard"])
    with pytest.raises((ValueError, RuntimeError), match="shard positions|failed on another rank"):
        commcomp.register(model, "terngrad", replicate_group=crossed[0 if rank in (0, 3) else 1])
    for collective in ("int8", "two_phase", "allgather"):
        _check_hsdp_collective(rank, world, mesh, collective)


def _check_hsdp_collective(rank, world, mesh, collective):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh["shard"])
    state = commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=0, collective=collective,
                              replicate_group=mesh["replicate"].get_group(), seed=2)
    seen = {}  # module index -> (shard before the replicate all-reduce, after)

    def recorder(comm):
        def hook(shard):
            before = shard.clone()
            comm.all_reduce_hook(shard)
            seen[comm.index] = (before, shard.clone())
        return hook

    for comm in state.comms:
        comm.module.set_all_reduce_hook(recorder(comm))
    _loss(model, rank).backward()
    assert sorted(seen) == [0, 1, 2]
    shard_rank = mesh["shard"].get_local_rank()
    replicas = [row[shard_rank] for row in mesh.mesh.tolist()]  # [replicate][shard] -> global rank
    assert rank in replicas
    for comm in state.comms:
        before, after = seen[comm.index]
        every = [None] * world
        dist.all_gather_object(every, (before, after))
        for r in replicas:  # replicas of one shard hold the same values
            assert torch.equal(every[r][1], after), (collective, comm.fqn)
        if collective == "two_phase":  # re-ternarized chunk sums: checked by the bytes below
            continue
        # int8 and allgather: the average over the replicas of their codes, rebuilt here
        segs = comm.row_lengths
        ins = [every[r][0] for r in replicas]
        scales = torch.stack([torch.stack([p.abs().max() for p in torch.split(x, segs)]) for x in ins]).amax(0)
        total = torch.zeros_like(after)
        for r, x in zip(replicas, ins):
            seed = commcomp.utils.mix_seed(state.seed, r, 0, comm.index, 1)
            total += reference.ternarize_int8(x, scales, segs, seed, 0).float()
        want = torch.cat([t * sc / len(replicas) for t, sc in zip(torch.split(total, segs), scales)])
        assert torch.equal(after, want), (collective, comm.fqn, (after - want).abs().max())
    assert state.metrics["bytes_sent"] * 4 < state.metrics[terngrad_fsdp.FP32_FSDP]


def test_hsdp_compresses_the_replicate_all_reduce(tmp_path):
    spawn(_check_hsdp, 4, tmp_path)


def _check_hsdp_one_shard(rank, world):
    """A shard group of one rank (FSDP2 skips the reduce-scatter): the replicate all-reduce
    still advances its streams every step, equals an independent rebuild, and a gradient
    divide factor makes it a sum (as native HSDP's SUM all-reduce); a replicate group that
    overlaps the shard group is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole = make_model()
    for m in (whole[0], whole[2], whole):
        fully_shard(m)
    with pytest.raises(ValueError, match="share ranks"):
        commcomp.register(whole, "terngrad", replicate_group=dist.group.WORLD)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = _shard(make_model(), mesh["shard"])
    for m in (model[0], model[2], model):
        m.set_gradient_divide_factor(1.0)
    state = commcomp.register(model, "terngrad", clip_factor=None, min_compress_numel=0, collective="int8",
                              replicate_group=mesh["replicate"].get_group(), seed=4)
    grads = [_local_grads(r) for r in range(world)]
    names = _module_names(model)
    results = []
    for step in range(2):
        model.zero_grad()
        _loss(model, rank).backward()
        assert state.replicate_calls == [step + 1] * 3 and state.calls == [0, 0, 0]
        results.append({n: p.grad.to_local().clone() for n, p in model.named_parameters()})
    # the module's shard is its parameters' gradients end to end, one segment (scale) each
    for step in range(2):
        for index, module_names in enumerate(names):
            xs = [torch.cat([g[n].reshape(-1) for n in module_names]) for g in grads]
            segs = [grads[0][n].numel() for n in module_names]
            scales = torch.stack([torch.stack([p.abs().max() for p in torch.split(x, segs)]) for x in xs]).amax(0)
            total = torch.zeros_like(xs[0])
            for r, x in enumerate(xs):
                total += reference.ternarize_int8(x, scales, segs, commcomp.utils.mix_seed(4, r, step, index, 1), 0).float()
            want = torch.cat([t * sc / world for t, sc in zip(torch.split(total, segs), scales)]) * world
            got = torch.cat([results[step][n].reshape(-1) for n in module_names])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert any(not torch.equal(results[0][n], results[1][n]) for n in results[0])  # the streams moved on


def test_hsdp_with_one_rank_per_shard_group(tmp_path):
    spawn(_check_hsdp_one_shard, 2, tmp_path)


def _check_compile(rank, world):
    model = _shard(make_model())
    state = commcomp.register(model, "terngrad", min_compress_numel=0)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(4):
        opt.zero_grad()
        x, y = rank_batch(rank)
        loss = ((compiled(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert state.calls == [4, 4, 4]
    assert losses[-1] < losses[0], losses


def test_fully_shard_with_the_compressed_reduce_scatter_compiles(tmp_path):
    spawn(_check_compile, 2, tmp_path)


def test_layer_scales_match_a_direct_computation():
    torch.manual_seed(0)
    world, shapes = 3, [(7, 5), (4,), (10, 3), (20, 50)]
    grads = [torch.randn(s) * (k + 1) for k, s in enumerate(shapes)]
    grads[3] = grads[3] * 1e-3 + 100.0  # a mean 10^5 sigmas away: E[x^2] - mean^2 would cancel to noise
    names = [str(k) for k in range(len(shapes))]
    rows = _rows(dict(zip(names, grads)), names, world)
    x = torch.cat(rows)
    row_lengths = [math.ceil(s[0] / world) * int(torch.Size(s[1:]).numel()) for s in shapes]
    got, segs = row_scales(x, row_lengths, [g.numel() for g in grads], world, 2.0)
    assert segs == row_lengths
    want = [min(float(g.abs().max()), 2.0 * float(g.double().std(correction=0))) for g in grads]
    torch.testing.assert_close(got[:-1], torch.tensor(want), rtol=1e-3, atol=0)  # float32 segment sums
    assert got[-1] == 0
    x[3] = float("nan")
    assert row_scales(x, row_lengths, [g.numel() for g in grads], world, 2.0)[0][-1] == 1
