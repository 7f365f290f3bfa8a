"""Data-parallel training of a CNN on real MNIST digits with any DDP communication hook of commcomp.

    torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook terngrad
    torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook sketch_dp --opt sketch_ratio=0.1
    torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook gradient_coding --opt s=1
    torchrun --standalone --nproc_per_node 4 examples/train_ddp.py --hook gradient_tracking \\
        --opt compressor=ternary --opt topology=ring

The process group comes from ``commcomp.launch.init_from_env()``, so the same command line runs
under torchrun, srun, mpirun / mpiexec and horovodrun (recipes in ``launch/``).

Hooks: ``none`` (plain fp32 all-reduce), torch's own ``fp16`` and ``powersgd`` (rank 1, one
bucket: torch's PowerSGD hangs on gloo with several) as baselines, and commcomp's
``terngrad``, ``sketch_dp``, ``gradient_coding`` (each rank back-propagates the B-weighted loss
of its s + 1 partitions of the global batch; the decoded update is the uncoded one) and
``gradient_tracking`` (decentralized: ``GradientTracking`` replaces the optimizer step and
rank 0 evaluates the ranks' average model). ``--opt key=value`` (repeatable) passes options to
the hook (``commcomp.register`` / ``GradientTracking``); values are read as int, float,
True/False/None, else a string. Each epoch prints test accuracy, step time, bytes sent per
step and the reduction against fp32; rank 0 writes the curves to ``--out`` as JSON, and
``examples/plot_runs.py`` draws them. CPU and gloo by default; NCCL when CUDA is present.

Fault tolerance: ``--checkpoint-dir D --checkpoint-every K`` saves, every K steps, one file
per rank (model, optimizer, the hook's state or GradientTracking's trackers, step, epoch and
the position in the data order); a (re)started job resumes from the newest step every rank
has and prints ``resumed from step S``. With ``torchrun --max-restarts 1`` a crashed worker is
restarted and training continues exactly where the checkpoint left it: the data order and the
hooks' random streams depend only on the seed and the step, so the losses after a restart
equal those of an uninterrupted run (``tests/launch/test_fault_recovery.py``). The exception
is ``sketch_dp``'s DP noise, drawn from OS entropy unless ``--opt noise_seed=N``.
``--log-jsonl F``: rank 0 appends ``{"step", "loss", "restart"}`` per step.
``COMMCOMP_EXAMPLE_DIE_AT_STEP=S`` (with ``COMMCOMP_EXAMPLE_DIE_RANK=R``, default 0) makes
rank R SIGKILL itself after step S, on the first attempt only (TORCHELASTIC_RESTART_COUNT 0).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from packaging.version import Version
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without install
from _mnist import CNN, accuracy, mnist  # noqa: E402

import commcomp  # noqa: E402
from commcomp.launch import init_from_env  # noqa: E402

HOOKS = ["none", "fp16", "powersgd", "terngrad", "sketch_dp", "gradient_coding", "gradient_tracking"]


def ring_bytes(nbytes: float, world: int) -> float:
    return 2 * (world - 1) / world * nbytes


def baseline_bytes(model, hook: str, world: int, rank: int = 1, min_rate: float = 2.0) -> float:
    """Bytes one rank sends per step under torch's hooks, from their algorithms (ring
    all-reduce): fp32 all, fp16 half, PowerSGD P and Q factors for matrices it compresses."""
    total = 0.0
    for p in model.parameters():
        n = p.numel()
        if hook == "fp16":
            total += ring_bytes(2 * n, world)
        elif hook == "powersgd" and p.dim() > 1:
            rows, cols = p.shape[0], n // p.shape[0]
            compressed = (rows + cols) * rank
            total += ring_bytes(4 * (compressed if n >= min_rate * compressed else n), world)
        else:
            total += ring_bytes(4 * n, world)
    return total


def parse_value(text: str):
    """``--opt`` values: None, True/False, int, float, else the string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_opts(pairs) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--opt {pair!r}: expected key=value, e.g. --opt error_feedback=True")
        out[key.strip()] = parse_value(value)
    return out


class PowerSGDCheckpoint:
    """state_dict / load_state_dict for torch's PowerSGDState (error feedback, warm-start
    factors, its RNG, the iteration), leaving the process group out."""

    def __init__(self, state):
        self.state = state

    def state_dict(self) -> dict:
        return {k: getattr(self.state, k) for k in self.state.__slots__ if k != "process_group"}

    def load_state_dict(self, saved: dict) -> None:
        for k, v in saved.items():
            setattr(self.state, k, v)


def attach_hook(ddp, opt, args, opts: dict):
    """Register ``args.hook``; returns (state to checkpoint or None, GradientTracking or None)."""
    name = args.hook
    if name == "none":
        if opts:
            raise SystemExit(f"--hook none takes no options, got {sorted(opts)}")
        return None, None
    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None, None
    if name == "powersgd":
        options = dict(matrix_approximation_rank=1, start_powerSGD_iter=2, min_compression_rate=2, **opts)
        state = powerSGD_hook.PowerSGDState(process_group=None, **options)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return PowerSGDCheckpoint(state), None
    if name == "gradient_tracking":
        from commcomp.decentralized import GradientTracking

        gt = GradientTracking(ddp, opt, **dict({"seed": args.seed}, **opts))
        return None, gt
    defaults = {"terngrad": {"seed": args.seed, "collective": args.collective},
                "gradient_coding": {"s": 1, "code": "cyclic"}}.get(name, {})
    if name == "sketch_dp" and "target_epsilon" in opts:
        defaults = {"steps": args.total_steps}
    return commcomp.register(ddp, name, **dict(defaults, **opts)), None


class Checkpoints:
    """One file per rank and step in ``folder``; the newest two are kept, so a rank killed
    while saving still leaves a step that every rank has."""

    def __init__(self, folder: str, rank: int, world: int, keep: int = 2):
        self.folder, self.rank, self.world, self.keep = folder, rank, world, keep
        os.makedirs(folder, exist_ok=True)

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"rank{self.rank:05d}-step{step:09d}.pt")

    def steps(self):
        found = glob.glob(os.path.join(self.folder, f"rank{self.rank:05d}-step*.pt"))
        return sorted(int(re.search(r"step(\d+)\.pt$", p).group(1)) for p in found)

    def latest_common(self):
        """The newest step saved by every rank (a collective), or None."""
        every = [None] * self.world
        dist.all_gather_object(every, self.steps())
        common = set(every[0]).intersection(*map(set, every[1:]))
        return max(common) if common else None

    def save(self, step: int, objects: dict, extra: dict) -> None:
        commcomp.checkpoint.save(self.path(step), step, model=objects["model"], optimizer=objects["optimizer"],
                                 states=objects["states"], extra=extra)
        for old in self.steps()[:-self.keep]:
            os.unlink(self.path(old))

    def load(self, step: int, objects: dict) -> dict:
        path = self.path(step)
        extra = commcomp.checkpoint.read(path)["extra"]
        if extra["world"] != self.world or extra["hook"] != objects["hook"]:
            raise SystemExit(f"{path} was saved by a {extra['world']}-rank run with --hook {extra['hook']}; this is "
                             f"{self.world} ranks with --hook {objects['hook']}: use another --checkpoint-dir")
        commcomp.checkpoint.load(path, model=objects["model"], optimizer=objects["optimizer"],
                                 states=objects["states"])
        return extra


def local_batch(order, start: int, rank: int, batch: int, code):
    """This rank's sample indices of the global batch starting at ``start`` (and the coded
    per-sample weights under gradient coding: partition j is the batch uncoded rank j gets)."""
    if code is None:
        return order[start + rank * batch: start + (rank + 1) * batch], None
    parts = code.partitions(rank)
    idx = torch.cat([order[start + j * batch: start + (j + 1) * batch] for j in parts])
    return idx, torch.repeat_interleave((code.weights(rank) / batch).float(), batch)


def warm_up(ddp, x, y) -> None:
    """One forward and backward through plain DDP (fp32 all-reduce), before any hook, and no
    update. DDP's first backward puts every gradient in one bucket and its second forward
    rebuilds the buckets in execution order; the hooks' random streams and residuals follow
    the buckets, so without this a resumed run's first step (a first backward again) would
    differ from the same step of an uninterrupted run. It also keeps the collective bucket
    rebuild out of gradient coding's straggler-tolerant steps."""
    F.cross_entropy(ddp(x), y).backward()
    ddp.zero_grad(set_to_none=True)


def train_step(ddp, opt, gt, x, y, weights):
    opt.zero_grad()
    if weights is None:
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
    else:
        losses = F.cross_entropy(ddp(x), y, reduction="none")
        commcomp.coding.coded_loss(losses, weights.to(losses.device)).backward()
        loss = losses.detach().mean()  # what is logged: the plain loss on this rank's partitions
    if gt is not None:
        gt.step()
    else:
        opt.step()
    return loss.item()


def evaluate(ddp, gt, test, rank: int) -> float:
    """Test accuracy on rank 0; under gradient tracking, of the ranks' average model (the
    average is a collective: every rank calls this)."""
    model = ddp.module
    if gt is None:
        if rank != 0:
            return float("nan")
        device = next(model.parameters()).device
        acc = accuracy(model.cpu(), test)
        model.to(device)
        return acc
    avg = gt.average_parameters()
    if rank != 0:
        return float("nan")
    with torch.no_grad():
        own = {n: p.detach().clone() for n, p in ddp.named_parameters()}
        for n, p in ddp.named_parameters():
            p.copy_(avg[n])
        acc = accuracy(model, tuple(t.to(next(model.parameters()).device) for t in test))
        for n, p in ddp.named_parameters():
            p.copy_(own[n])
    return acc


def maybe_die(step: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL after step COMMCOMP_EXAMPLE_DIE_AT_STEP, first attempt only."""
    at = os.environ.get("COMMCOMP_EXAMPLE_DIE_AT_STEP")
    if at is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != 0:
        return
    if step == int(at) and rank == int(os.environ.get("COMMCOMP_EXAMPLE_DIE_RANK", 0)):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", choices=HOOKS, default="terngrad")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="hook option (repeatable), e.g. --opt error_feedback=True --opt clip_factor=None")
    ap.add_argument("--collective", default="auto", help="terngrad: auto, int8, allgather, two_phase")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps in all (overrides --epochs)")
    ap.add_argument("--batch", type=int, default=32, help="per rank (per partition under gradient coding)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--checkpoint-dir", default=None, help="save here and resume from here")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    ap.add_argument("--log-jsonl", default=None, help="rank 0 appends one JSON line per step")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1 or args.checkpoint_every < 1:
        ap.error("--steps and --checkpoint-every must be >= 1")
    return args


def build(args, world: int, device, data):
    """The model under DDP, its optimizer and hook; returns (model, ddp, opt, state, gt)."""
    (train_x, train_y), _ = data
    torch.manual_seed(args.seed)
    model = CNN().to(device)
    # ~3 buckets for this model; PowerSGD gets one (torch's hook hangs on gloo with several).
    # Gradient coding and tracking must not broadcast buffers: that collective would wait for
    # stragglers, or overwrite the decentralized replicas.
    local_buffers = {"broadcast_buffers": False} if args.hook in ("gradient_coding", "gradient_tracking") else {}
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
    ddp = DDP(model, bucket_cap_mb=1000 if args.hook == "powersgd" else 0.1, **local_buffers)
    warm_up(ddp, train_x[:args.batch].to(device), train_y[:args.batch].to(device))
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    state, gt = attach_hook(ddp, opt, args, parse_opts(args.opt))
    return model, ddp, opt, state, gt


def set_threads(world: int) -> None:
    """Threads for this rank: SLURM's --cpus-per-task when srun started it, else this machine's
    cores shared by the ranks on it (the launchers' local sizes; else the whole world). The
    recipes export OMP_NUM_THREADS=1 for OpenMP's sake, and torchrun does too, so it is not read."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        torch.set_num_threads(int(cpus))
        return
    local = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                                               "HOROVOD_LOCAL_SIZE") if os.environ.get(k, "").isdigit()), 0)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local or world)))


def main(argv=None):
    args = parse_args(argv)
    rank, world, _, device = init_from_env()
    set_threads(world)
    data = mnist()
    (train_x, train_y), test = data
    per_step = world * args.batch
    steps_per_epoch = len(range(0, len(train_x) - per_step + 1, per_step))
    args.total_steps = args.steps or args.epochs * steps_per_epoch
    model, ddp, opt, state, gt = build(args, world, device, data)
    code = state.code if args.hook == "gradient_coding" else None
    meter = gt if gt is not None else (state if hasattr(state, "metrics") else None)
    ckpt = Checkpoints(args.checkpoint_dir, rank, world) if args.checkpoint_dir else None
    objects = {"model": model, "optimizer": opt, "hook": args.hook,
               "states": {} if gt is None and state is None else {"hook": gt if gt is not None else state}}
    fp32_bytes = baseline_bytes(model, "none", world)
    est_bytes = baseline_bytes(model, args.hook, world)
    log = {"hook": args.hook, "seed": args.seed, "world": world, "losses": [], "acc": [], "step_ms": [],
           "bytes_per_step": [], "fp32_bytes_per_step": fp32_bytes}
    step, log = resume(ckpt, objects, log, rank) if ckpt else (0, log)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    jsonl = open(args.log_jsonl, "a") if args.log_jsonl and rank == 0 else None
    for epoch in range(step // steps_per_epoch, math.ceil(args.total_steps / steps_per_epoch)):
        # The data order is a function of (seed, epoch): the step alone says where to resume.
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1000 * args.seed + epoch))
        ks = range(step - epoch * steps_per_epoch, min(steps_per_epoch, args.total_steps - epoch * steps_per_epoch))
        bar = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ks), desc=f"{args.hook} epoch {epoch + 1}", leave=False)
        times, sent_before = [], meter.metrics["bytes_sent"] if meter else 0
        for k in ks:
            idx, weights = local_batch(order, k * per_step, rank, args.batch, code)
            t0 = time.perf_counter()
            loss = train_step(ddp, opt, gt, train_x[idx].to(device), train_y[idx].to(device), weights)
            times.append(time.perf_counter() - t0)
            log["losses"].append(loss)
            step += 1
            if jsonl:
                jsonl.write(json.dumps({"step": step, "loss": loss, "restart": restart}) + "\n")
                jsonl.flush()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
            if k == ks[-1]:
                if bar is not None:
                    bar.close()
                epoch_summary(args, ddp, gt, meter, test, log, epoch, times, sent_before, est_bytes, fp32_bytes, rank)
            if ckpt and step % args.checkpoint_every == 0:
                ckpt.save(step, objects, {"epoch": epoch, "next_batch": k + 1, "world": world, "hook": args.hook,
                                          "seed": args.seed, "torch_rng": torch.get_rng_state(),
                                          "log": log if rank == 0 else None})
            maybe_die(step, rank)
    if jsonl:
        jsonl.close()
    finish(args, state, log, rank)


def resume(ckpt: Checkpoints, objects: dict, log: dict, rank: int):
    """(step, log) from the newest checkpoint every rank has, or (0, log) when there is none."""
    step = ckpt.latest_common()
    if step is None:
        return 0, log
    extra = ckpt.load(step, objects)
    torch.set_rng_state(extra["torch_rng"])
    if rank == 0:
        print(f"resumed from step {step} (epoch {extra['epoch'] + 1}, batch {extra['next_batch']})", flush=True)
    return step, extra["log"] if rank == 0 else log


def finish(args, state, log, rank: int) -> None:
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{args.hook}-seed{args.seed}.json")
        with open(path, "w") as f:
            json.dump(log, f)
    if hasattr(state, "close"):
        state.close()  # gradient coding: deliver the last rounds before the group goes away
    # torch < 2.8 can deadlock destroying a gloo group (pytorch/pytorch#154976); exit_now ends it
    if Version(torch.__version__).release >= (2, 8):
        dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """Skip interpreter teardown once the work is saved: a gloo thread still releasing the last
    collective's tensors can abort a finishing process (README, "Known issue"; pytorch/pytorch
    #179291), which torchrun would count as a failure and restart. MPI is finalized first
    when mpi4py found the rendezvous."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(0)


def epoch_summary(args, ddp, gt, meter, test, log, epoch, times, sent_before, est_bytes, fp32_bytes, rank):
    sent = (meter.metrics["bytes_sent"] - sent_before) / len(times) if meter else est_bytes
    acc = evaluate(ddp, gt, test, rank)
    step_ms = 1e3 * sum(times) / len(times)
    log["acc"].append(acc)
    log["step_ms"].append(step_ms)
    log["bytes_per_step"].append(sent)
    if rank == 0:
        how = "measured" if meter else "from the algorithm"
        print(f"{args.hook:9s} epoch {epoch + 1}: test accuracy {acc:5.2f}%  step {step_ms:6.1f} ms  "
              f"sent {sent / 1e3:8.1f} kB/step ({how}), {fp32_bytes / max(sent, 1e-9):5.1f}x less than fp32",
              flush=True)


if __name__ == "__main__":
    main()
