"""Differentially private training on real MNIST digits with sketched gradient exchange
(commcomp's ``sketch_dp``): accuracy vs epsilon vs bytes.

    python examples/train_dp.py --epsilon 8 --sketch-ratio 0.1          # spawns 4 local ranks
    torchrun --standalone --nproc_per_node 4 examples/train_dp.py --epsilon 8 --sketch-ratio 0.1

Each rank holds a disjoint shard of the 4,000 training digits (1,000 each with 4 ranks) and
trains a small tanh CNN (``_mnist.DPCNN``, 26,010 parameters) with SGD. Two levels:

* ``--level record`` (default; DP-SGD, Abadi et al. 2016): every step each rank Poisson-samples
  its shard (each digit independently with probability ``sample_rate = batch / shard size``,
  so the batch size varies around ``--batch``) with :class:`commcomp.privacy.PoissonBatchSampler`,
  whose coins come from OS entropy (a sampler seeded from a public seed lets an adversary
  replay the batches: reported epsilon 8 was 22 for an average digit), Opacus'
  ``GradSampleModule`` gives per-sample gradients, ``state.clip_per_sample_`` clips each to
  ``--clip`` and sums them, and ``state.reduce_`` adds the Gaussian noise on the rank,
  sketches, all-reduces, de-sketches and divides by the expected batch. The guarantee is per digit, against
  everyone outside the digit's own rank (local DP per message, see ``sketch_dp``).
* ``--level client``: each rank is one client; the DDP hook (``commcomp.register(model,
  "sketch_dp", ...)``) clips each rank's whole batch gradient and noises it. Fixed-size
  shuffled batches, ``sample_rate`` 1, replace adjacency (any two datasets of the client).
  With 4 clients this is a very strong unit of privacy and the noise drowns the signal at any
  useful epsilon; it is here so both levels run.

Privacy knobs: ``--epsilon E`` calibrates the noise (``dp-accounting``, RDP) so that all the
planned steps spend ``E`` at ``--delta``; ``--epsilon inf`` adds no noise but keeps the
clipping (so it isolates the clipping's and the sketch's effect); ``--epsilon inf --clip 0``
is plain non-private training (mean gradient, no Opacus).

``--sketch-ratio 1.0`` with ``--sketch srht`` is an orthogonal transform, i.e. unsketched
DP-SGD. ``--noise-placement sketch`` puts the noise on the sketch instead of the gradient
(``s`` instead of ``d`` noise coordinates). The library refuses it at record level (its
``reduce_`` clips the *sum*; record level needs each sample clipped); this example then
implements it on its own, clearly separated (:func:`release_sketch_space`): each sample's
gradient is sketched, each sketch is clipped to ``--clip``, the sketches are summed and
noised with the state's calibrated noise, and the state's ledger counts the release. Same
sensitivity (``--clip``), same Poisson sampling, same accounting.

Rank 0 writes ``--out/<name>.json``: per-epoch test accuracy, final accuracy, epsilon spent
(``state.epsilon(delta)``), bytes sent vs a fp32 ring all-reduce (``state.metrics``) and wall
time; ``examples/plot_dp.py`` turns a folder of them into a table and a plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _mnist import DPCNN, accuracy, mnist

import commcomp
from commcomp.utils import ring_allreduce_bytes
from commcomp.codecs import Sketch, sketch_size
from commcomp.hooks import SketchDPState
from commcomp.privacy import PoissonBatchSampler, clip_coefficient


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", choices=["record", "client"], default="record")
    ap.add_argument("--epsilon", type=float, default=8.0, help="target epsilon; inf: no noise")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--sketch-ratio", type=float, default=0.1, help="s/d; 1.0 with srht: unsketched")
    ap.add_argument("--sketch", choices=["countsketch", "srht"], default="countsketch")
    ap.add_argument("--noise-placement", choices=["gradient", "sketch"], default="gradient")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64, help="expected batch per rank")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0, help="per-sample (record) or per-rank "
                    "(client) L2 bound; 0 with --epsilon inf: no clipping, non-private")
    ap.add_argument("--seed", type=int, default=0,
                    help="model init, sketch seed and client-level shuffle (sampling: --sampling-seed)")
    ap.add_argument("--noise-seed", type=int, default=None,
                    help="repeatable noise for experiments, INSECURE (default: OS entropy, as in deployment)")
    ap.add_argument("--sampling-seed", type=int, default=None,
                    help="repeatable Poisson batches for experiments, INSECURE (default: OS entropy)")
    ap.add_argument("--world", type=int, default=4, help="ranks to spawn when not under torchrun")
    ap.add_argument("--name", default=None, help="JSON file name (default: from the settings)")
    ap.add_argument("--out", default="runs/dp")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.clip <= 0 and math.isfinite(args.epsilon):
        ap.error("a finite --epsilon needs --clip > 0 (noise without clipping protects nothing)")
    return args


def run_name(args) -> str:
    if args.name:
        return args.name
    eps = "inf" if math.isinf(args.epsilon) else f"{args.epsilon:g}"
    clip = "noclip" if args.clip <= 0 else f"clip{args.clip:g}"
    return (f"{args.level}-{args.sketch}-r{args.sketch_ratio:g}-{args.noise_placement}-eps{eps}-"
            f"{clip}-seed{args.seed}")


# --- the example-side sketch-space mechanism (record level) ---------------------------------

def release_sketch_space(state: SketchDPState, params, batch_size: float, step_seed: int) -> None:
    """Record-level DP with the noise in sketch space: ``y = sum_i clip(R g_i) + N(0, (sigma
    C)^2 I_s)`` per rank (sensitivity ``C`` per record, as for the gradient placement), all-reduce,
    ``p.grad = R^T (sum y) / (world * batch_size)``. Uses the state's calibrated noise
    multiplier, its private noise generator and its ledger. Reads ``p.grad_sample`` (Opacus);
    with no sample this step, the message is the noise alone."""
    state._check_budget()  # counts released messages
    params = list(params)
    d = sum(p.numel() for p in params)
    sk = Sketch(state.sketch, d, sketch_size(state.sketch, d, state.sketch_ratio, state.block),
                step_seed, state.block)
    y = torch.zeros(sk.sketch_size)
    gs = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if gs:
        per_sample = torch.cat([g.reshape(g.shape[0], -1).float() for g in gs], 1)
        sketches = torch.stack([sk.sketch(g) for g in per_sample])
        coef = clip_coefficient(sketches.norm(dim=1), state.clip_norm)
        y += (coef[:, None] * sketches).sum(0)
    if state.noise_multiplier > 0:
        y += state.noise.gaussian(y.numel(), state.noise_multiplier * state.clip_norm, y.device)
    state.ledger.record()  # counted before it is sent, as the library does
    dist.all_reduce(y, group=state.process_group)
    state.metrics.sent(ring_allreduce_bytes(4 * y.numel(), state.world_size))
    state.metrics.fp32_allreduce(d, state.world_size)
    state.step += 1
    avg = sk.transpose(y).div_(state.world_size * batch_size)
    pos = 0
    for p in params:
        p.grad = avg[pos:pos + p.numel()].view_as(p).clone()
        p.grad_sample = None
        pos += p.numel()


# --- training -------------------------------------------------------------------------------

def make_state(args, world: int, steps: int, sample_rate: float, num_records: int, ddp=None):
    eps = args.epsilon if math.isfinite(args.epsilon) else None
    common = {"sketch": args.sketch, "sketch_ratio": args.sketch_ratio, "sketch_seed": args.seed,
              "noise_seed": args.noise_seed}
    privacy = {"clip_norm": args.clip if args.clip > 0 else None, "target_epsilon": eps,
               "target_delta": args.delta, "steps": steps if eps else None}
    if args.level == "client":
        return commcomp.register(ddp, "sketch_dp", level="client", noise_placement=args.noise_placement,
                                 sample_rate=1.0, **privacy, **common)
    if args.clip <= 0:  # non-private: the plain (sketched) average of the ranks' mean gradients
        return SketchDPState(level="client", **common)
    return SketchDPState(level="record", noise_placement="gradient", sample_rate=sample_rate,
                         num_records=num_records, **privacy, **common)


def record_step(args, state, gsm, params, x, y, batch: float) -> None:
    """One record-level step: per-sample gradients, clip, privatize, average (into p.grad)."""
    if len(x):
        F.cross_entropy(gsm(x), y).backward()  # mean loss: Opacus rescales grad_sample per sample
    if args.noise_placement == "sketch":
        release_sketch_space(state, params, batch, (args.seed * 1_000_003 + state.step) % 2**63)
        return
    if not len(x):  # an empty Poisson batch still releases (noise only), so the accounting holds
        for p in params:
            p.grad_sample = torch.zeros(0, *p.shape)
    state.clip_per_sample_(params)  # the state's own clip_norm; reduce_ accepts nothing else
    state.reduce_(params, batch_size=batch)


def train(rank: int, world: int, args, data=None) -> dict:
    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP convergence chatter
    # Opacus' hooks on the first layer: its input needs no gradient, which is fine here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    (train_x, train_y), test = data or mnist(seed=0)  # the same 4,000 / 1,000 split for every run
    shard = len(train_x) // world
    xs, ys = train_x[rank * shard:(rank + 1) * shard], train_y[rank * shard:(rank + 1) * shard]
    torch.manual_seed(args.seed)  # same initial model on every rank
    net = DPCNN()
    sample_rate = min(1.0, args.batch / shard)
    steps_per_epoch = max(1, round(shard / args.batch))
    steps = args.epochs * steps_per_epoch
    private = math.isfinite(args.epsilon) or args.clip > 0
    ddp = gsm = None
    if args.level == "client":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(net)
    elif private:
        from opacus import GradSampleModule

        gsm = GradSampleModule(net)
    if args.level == "record" and args.noise_placement == "sketch" and not private:
        raise SystemExit("train_dp: --noise-placement sketch needs clipping (--clip > 0)")
    state = make_state(args, world, steps, sample_rate, shard, ddp)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    shuffle = torch.Generator().manual_seed(1_000_003 * args.seed + rank)  # client level only
    poisson = iter(PoissonBatchSampler(shard, sample_rate, steps, generator=None if args.sampling_seed is None
                                       else 1_000_003 * args.sampling_seed + rank))
    log = {"args": vars(args), "world": world, "params": sum(p.numel() for p in params),
           "shard": shard, "sample_rate": sample_rate, "steps": steps,
           "noise_multiplier": state.noise_multiplier, "acc": [], "epsilon": [], "loss": [],
           "batch_sizes": []}
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(shard, generator=shuffle)
        batches = range(steps_per_epoch)
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        losses = []
        for i in batches:
            if args.level == "record":  # Poisson sampling from OS entropy: what the accountant assumes
                idx = torch.tensor(next(poisson), dtype=torch.long)
            else:
                idx = order[i * args.batch:(i + 1) * args.batch]
            x, y = xs[idx], ys[idx]
            opt.zero_grad(set_to_none=True)
            if args.level == "client":
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()  # the hook clips, noises, sketches and averages
            elif private:
                record_step(args, state, gsm, params, x, y, args.batch)
            else:
                F.cross_entropy(net(x), y).backward()
                state.reduce_(params)
            opt.step()
            log["batch_sizes"].append(len(idx))
            if len(idx):
                with torch.no_grad():
                    losses.append(F.cross_entropy(net(x), y).item())
        acc = accuracy(net, test) if rank == 0 else float("nan")
        eps = state.epsilon(args.delta)
        log["acc"].append(acc)
        log["epsilon"].append(eps)
        log["loss"].append(sum(losses) / max(1, len(losses)))
        if rank == 0:
            print(f"{run_name(args)} epoch {epoch + 1}: loss {log['loss'][-1]:.3f}  test accuracy "
                  f"{acc:5.2f}%  epsilon {eps:.2f}", flush=True)
    log["wall_s"] = time.perf_counter() - t_start
    log["final_acc"] = log["acc"][-1]
    log["epsilon_spent"] = state.epsilon(args.delta)
    log["bytes_sent"] = state.metrics["bytes_sent"]
    log["bytes_fp32"] = state.metrics["bytes_sent_fp32_allreduce"]
    log["bytes_ratio"] = log["bytes_sent"] / log["bytes_fp32"] if log["bytes_fp32"] else float("nan")
    return log


def write(args, log: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, run_name(args) + ".json")
    with open(path, "w") as f:
        json.dump(log, f)
    print(f"{run_name(args)}: final accuracy {log['final_acc']:.2f}%, epsilon {log['epsilon_spent']:.2f} "
          f"(delta {args.delta:g}), bytes {log['bytes_ratio']:.4f} of fp32, {log['wall_s']:.0f} s -> {path}",
          flush=True)


def _spawned(rank: int, world: int, init_file: str, args, data) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        log = train(rank, world, args, data)
        if rank == 0:
            write(args, log)
    finally:
        dist.destroy_process_group()


def main():
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        try:
            log = train(dist.get_rank(), dist.get_world_size(), args)
            if dist.get_rank() == 0:
                write(args, log)
        finally:
            dist.destroy_process_group()
        return
    data = mnist(seed=0)  # loaded once, handed to the ranks
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(args.world, os.path.join(tmp, "rendezvous"), args, data),
                 nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
