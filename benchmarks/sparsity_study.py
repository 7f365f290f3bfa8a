"""Sparsity under compressed gossip (issue 16, item 6): instrumented runs and remedies.

The training loop is examples/train_decentralized.py's (same data split, model, seeds, lr,
batch, l1 on weights, ring). GradientTracking is subclassed (the library is not changed):

* instrumentation (rank 0, weights only, every step from --stats-from on): for the prox zeros
  Z = {x^{t+1/2} == 0}, the mixing correction corr = mix(x^{t+1/2}) - x^{t+1/2}, the fraction of
  Z that mixing makes non-zero, quantiles of |corr| on Z against lr*lambda, the non-zero fraction
  of the x message q_x, |hat_x| on Z and the ternary quantum (the non-zero |q| value);
* remedies (--remedy):
    none        the method as it is;
    prox_after  (a) the prox moves after the mixing: x^{t+1} = prox(mix(x^t - lr y^t));
    prox_both   (a') prox before and after: x^{t+1} = prox(mix(prox(x^t - lr y^t)));
    mask_corr   (c) corr := 0 where x^{t+1/2} == 0 and |corr| < k * lr * lambda (--k, inf: always);
    exact_tail  (d) the last --tail steps mix x exactly (fp32 messages, gamma 1);
    hat_prox    (b) every rank keeps its in-neighbours' estimates hat_j and applies the same prox
                to all of them (hat_j <- prox(hat_j)) after each round; acc_i = sum_j W_ij hat_j.
  and at every evaluation, for free: (d') the prox of the average model, prox_{lr r}(mean x).

    python benchmarks/sparsity_study.py --method cdproxsgt-ternary --remedy none --out runs/sparsity_none.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
for _d in (os.path.join(os.path.dirname(HERE), "examples"),):  # the examples' data, model and split
    if os.path.exists(os.path.join(_d, "_mnist.py")):
        sys.path.insert(0, _d)
from _mnist import CNN, accuracy, mnist  # noqa: E402
from train_decentralized import METHODS, split_non_iid, train_step, weights_only  # noqa: E402

from commcomp.decentralized import L1, GradientTracking, sparsity  # noqa: E402
from commcomp.decentralized.mixing import Mixer, make_mixing_compressor, wide  # noqa: E402
from commcomp.utils import mix_seed, ring_allreduce_bytes  # noqa: E402


class HatProxMixer(Mixer):
    """Compressed mixing that keeps every in-neighbour's estimate hat_j separately (ring: 2 more
    flat tensors) so that a deterministic map (here the prox) can be applied to every estimate on
    every rank that holds it; acc_i = sum_j W_ij hat_j is then recomputed, so
    sum_i (acc_i - hat_i) = 0 still holds and the mixing keeps the average."""

    def __init__(self, exchange, compressor, gamma, prox_fn, init=None, counter=None, label=None):
        super().__init__(exchange, compressor, gamma, init=init, counter=counter, label=label)
        self.prox_fn = prox_fn  # flat tensor -> in place prox on the prox-params entries
        self.nb = None  # j -> hat_j (in-neighbours)

    def finish(self, rnd, step):
        inflight = rnd.inflight.wait()
        ex, v = self.exchange, rnd.v
        hat, acc = rnd.flats  # hat already holds q_i (start); acc is rebuilt below
        if self.nb is None:  # every estimate starts at x^0, like hat_i (init)
            self.nb = {j: (hat - rnd.q).clone() for j, _ in inflight.weights}
        for j, w in inflight.weights:
            self.nb[j].add_(self.compressor.decompress(inflight.received[j], rnd.ctx).to(acc.dtype))
        self.prox_fn(hat)
        for j, _ in inflight.weights:
            self.prox_fn(self.nb[j])
        acc.copy_(hat).mul_(ex.topology.self_weight(ex.rank, step))
        for j, w in inflight.weights:
            acc.add_(self.nb[j], alpha=w)
        out = torch.sub(acc, hat)
        return out.mul_(self.gamma).add_(v)

    def start(self, v, names, lengths, step, seed):
        vw = v.to(wide(v.dtype))
        hat, _ = self.store.get(names, lengths, vw)
        before = hat.clone()
        rnd = super().start(v, names, lengths, step, seed)
        rnd.q = hat - before
        return rnd


class SparseGT(GradientTracking):
    def __init__(self, *a, remedy="none", k=math.inf, tail=0, total_steps=0, stats_from=100, **kw):
        super().__init__(*a, **kw)
        self.remedy, self.k, self.tail, self.total_steps = remedy, k, tail, total_steps
        self.stats_from = stats_from
        self.mask = torch.cat([torch.full((p.numel(),), n in self._prox_names, dtype=torch.bool)
                               for n, p in self._named])
        self.thr = self.lr * self.prox.lam if self.prox is not None else 0.0
        self.stats = []
        if remedy == "hat_prox":
            old = self.mixer_x
            by_name = dict(self._named)
            self.mixer_x = HatProxMixer(self.exchange, self.compressor_x, self.gamma_x, self._prox_flat,
                                        init=lambda name, n: by_name[name].detach().reshape(-1),
                                        counter=self.bytes, label="bytes_x")
            self.mixer_x.store = old.store

    def _prox_flat(self, flat):
        if self.prox is None:
            return flat
        pos = 0
        for n, p in self._named:
            m = p.numel()
            if n in self._prox_names:
                self.prox.apply_(flat[pos:pos + m], self.lr)
            pos += m
        return flat

    def _prox_params(self):
        for n, p in self._named:
            if n in self._prox_names:
                self.prox.apply_(p.data, self.lr)

    @torch.no_grad()
    def step(self, closure=None):
        t = self.step_count
        g = self._flat_grads()
        rec = self.prox is not None and self.rank == 0 and t >= self.stats_from
        if rec:  # y^{t-1/2} = y^{t-1} + g^t - g^{t-1}: the tracker's mixing input
            y_old, g_old = (f.clone() for f in self.tracker.store.get(self._names, self._lengths, g.to(wide(g.dtype))))
            y_half = y_old + g - g_old
            x_t = self._flat_params()
        started = self.tracker.start(g, self._names, self._lengths, t, 0, True)
        y_t = self.tracker.finish(started, t)
        self._write(y_t, grads=True)
        if rec:  # counterfactual: would prox(x^t - lr y^t) zero more without this step's y correction
            # or without the previous step's x correction?
            cy = y_t - y_half
            z = x_t - self.lr * y_t
            prev = getattr(self, "_last_corr", None)
            m, thr = self.mask, self.thr
            zs = {"cf_actual": z, "cf_no_ycorr": z + self.lr * cy}
            if prev is not None:
                zs["cf_no_xcorr"] = z - prev
                zs["cf_no_both"] = z - prev + self.lr * cy
            self._cf = {k: float((w[m].abs() <= thr).float().mean()) for k, w in zs.items()}
            self._cf["lr_ycorr_med"] = float((self.lr * cy[m]).abs().median())
            self._cf["lr_ycorr_below_thr"] = float(((self.lr * cy[m]).abs() < thr).float().mean())
        for _, p in self._named:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)
        if self.prox is not None and self.remedy != "prox_after":
            self._prox_params()  # 3. x^{t+1/2} = prox(x - lr y)
        v = self._flat_params()
        if self.remedy in ("exact_tail", "exact_tail_xy", "exact_tail_y", "reset_tail") and t == self.total_steps - self.tail:
            self._switch_to_exact(v)
            v = self._flat_params()
        exact = self.mixer_x.exact
        hat_before = None
        if not exact and self.rank == 0 and t >= self.stats_from:
            hat_before = self.mixer_x.store.get(self._names, self._lengths, v.to(wide(v.dtype)))[0].clone()
        seed = mix_seed(self.seed, self.rank, t, 1)
        mixed = self.mixer_x.finish(self.mixer_x.start(v, self._names, self._lengths, t, seed), t)
        corr = mixed - v
        if self.prox is not None and self.rank == 0 and t >= self.stats_from:
            self._record(t, v, mixed, corr, hat_before)
        if self.rank == 0:
            self._last_corr = corr
        if self.remedy == "mask_corr":
            drop = self.mask & (v == 0) & (corr.abs() < self.k * self.thr)
            mixed = torch.where(drop, torch.zeros_like(mixed), mixed)
        self._write(mixed, grads=False)
        if self.remedy in ("prox_after", "prox_both") and self.prox is not None:
            self._prox_params()  # the model a rank holds is a prox output
        self.step_count = t + 1

    def _switch_to_exact(self, v):
        """The last `tail` steps: exact x mixing (exact_tail), exact x and y (exact_tail_xy), or
        first one all-reduce x_i := mean x (then exact x and y; reset_tail)."""
        exact = make_mixing_compressor(None)
        old_x = self.mixer_x
        if self.remedy == "reset_tail":
            flat = v.to(torch.float64)
            dist.all_reduce(flat, group=self.process_group)
            self.bytes.add(ring_allreduce_bytes(v.numel() * 4, self.world_size), "bytes_x")  # fp32 cost
            self._write((flat / self.world_size).to(v.dtype), grads=False)
        self.mixer_x = Mixer(self.exchange, exact, 1.0, counter=self.bytes, label="bytes_x")
        if self.remedy == "exact_tail_y":
            self.mixer_x = old_x
        if self.remedy in ("exact_tail_xy", "reset_tail", "exact_tail_y"):
            self.tracker.mixer = Mixer(self.exchange, exact, 1.0, counter=self.bytes, label="bytes_y")

    def _record(self, t, v, mixed, corr, hat_before):
        m = self.mask
        vw, cw, xw = v[m], corr[m], mixed[m]
        z = vw == 0
        s = {"step": t, "prox_zero_frac": float(z.float().mean()), "thr": self.thr,
             "mixed_zero_frac": float((xw == 0).float().mean())}
        if z.any():
            cz = cw[z].abs().double()
            s.update(revived=float((xw[z] != 0).float().mean()),
                     corr_z_q10=float(cz.quantile(0.1)), corr_z_med=float(cz.median()),
                     corr_z_q90=float(cz.quantile(0.9)),
                     corr_z_below_thr=float((cz < self.thr).float().mean()),
                     corr_z_below_10thr=float((cz < 10 * self.thr).float().mean()))
        s["corr_all_med"] = float(cw.abs().median())
        if hat_before is not None:
            hat = self.mixer_x.store.get(self._names, self._lengths, v.to(wide(v.dtype)))[0]
            q = (hat - hat_before)[m]
            nz = q != 0
            s.update(q_nnz=float(nz.float().mean()),
                     q_nnz_on_z=float(nz[z].float().mean()) if z.any() else float("nan"),
                     quantum_med=float(q[nz].abs().median()) if nz.any() else 0.0,
                     hat_z_med=float(hat[m][z].abs().median()) if z.any() else float("nan"),
                     hat_z_zero=float((hat[m][z] == 0).float().mean()) if z.any() else float("nan"))
        else:
            s.update(q_nnz=float((vw != 0).float().mean()))  # exact: the message is x^{t+1/2} itself
        s.update(getattr(self, "_cf", {}))
        self.stats.append(s)


def summarize(stats, last=100):
    tail = stats[-last:]
    keys = sorted({k for s in tail for k in s if k != "step"})
    return {k: sum(s[k] for s in tail if k in s) / max(1, sum(1 for s in tail if k in s)) for k in keys}


def evaluate(model, gt, test, prox, lr):
    weights = lambda: (p for n, p in model.named_parameters() if weights_only(n))  # noqa: E731
    m = gt.measure()
    own_acc, own_sp = accuracy(model, test), sparsity(weights())
    own_prox_sp = sparsity(prox(p, lr) for n, p in model.named_parameters() if weights_only(n)) if prox else own_sp
    avg = gt.average_parameters()
    dev = torch.cat([(p.detach() - avg[n]).abs().reshape(-1) for n, p in model.named_parameters() if weights_only(n)])
    avgw = torch.cat([avg[n].abs().reshape(-1) for n, p in model.named_parameters() if weights_only(n)])
    thr = lr * prox.lam if prox is not None else 0.0
    small = avgw < thr
    extra = {"dev_med": float(dev.median()), "dev_below_thr": float((dev < thr).float().mean()),
             "dev_med_where_avg_small": float(dev[small].median()) if small.any() else float("nan"),
             "avg_below_thr": float(small.float().mean()), "tracker_error": m["tracker_error"]}
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(avg[n])
        avg_acc, avg_sp = accuracy(model, test), sparsity(weights())
        if prox is not None:
            for n, p in model.named_parameters():
                if weights_only(n):
                    prox.apply_(p, lr)
        pavg_acc, pavg_sp = accuracy(model, test), sparsity(weights())
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {"acc_avg": avg_acc, "acc_rank0": own_acc, "sp_avg": avg_sp, "sp_rank0": own_sp,
            "consensus": m["consensus_error"], "prox_out_sp": m.get("prox_sparsity", own_sp),
            "proxavg_acc": pavg_acc, "proxavg_sp": pavg_sp, "rank0_prox_sp": own_prox_sp,
            "tracking_residual": m["tracking_residual"], "bytes": gt.metrics["bytes_sent"], **extra}


def run(rank, world, args, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        train, test = mnist(seed=0)
        xs, ys = split_non_iid(*train, rank, world, args.classes_per_rank)
        torch.manual_seed(args.seed)
        model = CNN()
        prox = L1(args.l1) if args.l1 > 0 else None
        spec = METHODS[args.method]
        numel = sum(p.numel() for p in model.parameters())
        if spec is None:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net, gt = DDP(model), None
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        else:
            net, opt = model, None
            gt = SparseGT(model, args.lr, topology="ring", compressor=spec["compressor"], tracking=spec["tracking"],
                          prox=prox, prox_params=weights_only, seed=args.seed, remedy=args.remedy, k=args.k,
                          tail=args.tail, total_steps=args.steps, stats_from=args.stats_from)
            if rank == 0:
                print(repr(gt), args.remedy, flush=True)
        gen = torch.Generator().manual_seed(1000 + rank)
        curve, t0 = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = torch.randint(len(xs), (args.batch,), generator=gen)
            train_step(net, model, gt, opt, prox, xs[batch], ys[batch], args.lr)
            if step % args.eval_every == 0 or step == args.steps:
                if gt is None:
                    acc = accuracy(model, test)
                    sp = sparsity(p for n, p in model.named_parameters() if weights_only(n))
                    e = {"acc_avg": acc, "acc_rank0": acc, "sp_avg": sp, "sp_rank0": sp, "consensus": 0.0,
                         "prox_out_sp": sp, "proxavg_acc": acc, "proxavg_sp": sp, "rank0_prox_sp": sp,
                         "bytes": step * ring_allreduce_bytes(numel * 4, world)}
                else:
                    e = evaluate(model, gt, test, prox, args.lr)
                e["step"] = step
                curve.append(e)
                if rank == 0:
                    st = summarize(gt.stats, 50) if gt is not None and gt.stats else {}
                    print(f"step {step:4d} acc avg {e['acc_avg']:5.2f} r0 {e['acc_rank0']:5.2f} sp avg "
                          f"{e['sp_avg']:.3f} r0 {e['sp_rank0']:.3f} proxout {e['prox_out_sp']:.3f} cons "
                          f"{e['consensus']:.3e} | proxavg {e['proxavg_acc']:5.2f}/{e['proxavg_sp']:.3f} | "
                          + " ".join(f"{k} {v:.3g}" for k, v in st.items()), flush=True)
        if rank == 0:
            out = {"args": vars(args), "final": curve[-1], "curve": curve, "wall_s": time.perf_counter() - t0,
                   "stats_last100": summarize(gt.stats, 100) if gt is not None and gt.stats else {},
                   "repr": repr(gt) if gt else "DDP"}
            with open(result_file, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="cdproxsgt-ternary", choices=list(METHODS))
    ap.add_argument("--remedy", default="none",
                    choices=["none", "prox_after", "prox_both", "mask_corr", "exact_tail", "exact_tail_xy", "reset_tail",
                             "exact_tail_y",
                             "hat_prox"])
    ap.add_argument("--k", type=float, default=math.inf)
    ap.add_argument("--tail", type=int, default=20)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--l1", type=float, default=3e-3)
    ap.add_argument("--classes-per-rank", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stats-from", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rf = os.path.join(tmp, "r.json")
        mp.spawn(run, args=(args.world, args, os.path.join(tmp, "rdzv"), rf), nprocs=args.world, join=True)
        with open(rf) as f:
            res = json.load(f)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    fin = res["final"]
    print("FINAL", args.method, args.remedy, json.dumps({k: fin[k] for k in fin if k != "step"}),
          "wall", round(res["wall_s"], 1))
    print("STATS", json.dumps(res["stats_last100"]))


if __name__ == "__main__":
    main()
