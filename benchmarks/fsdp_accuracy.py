"""Accuracy of FSDP2 with and without TernGrad's compressed reduce-scatter at equal steps:
examples/train_fsdp.py under torchrun (4 ranks, CPU, gloo) for each hook and seed; prints the
final test accuracy per run, the mean per hook and the difference, and writes every run.

    python benchmarks/fsdp_accuracy.py --seeds 0,1,2 --steps 300 --json docs/fsdp_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(hook: str, seed: int, args, folder: str) -> dict:
    out = os.path.join(folder, f"{hook}-{seed}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
           os.path.join(ROOT, "examples", "train_fsdp.py"), "--hook", hook, "--seed", str(seed),
           "--steps", str(args.steps), "--eval-every", str(args.steps), "--out", out] + args.extra
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--hooks", default="none,terngrad")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*", help="further train_fsdp.py arguments (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for hook in args.hooks.split(","):
                log = run(hook, seed, args, folder)
                ratio = None
                if "metrics" in log:
                    m = log["metrics"]
                    ratio = m["bytes_sent_fp32_fsdp"] / m["bytes_sent"]
                rows.append({"hook": hook, "seed": seed, "accuracy": log["final_accuracy"],
                             "median_step_s": log["median_step_s"], "fp32_bytes_over_sent": ratio})
                print(f"{hook:9s} seed {seed}: test accuracy {log['final_accuracy']:.2f}%  "
                      f"median step {1e3 * log['median_step_s']:.0f} ms"
                      + (f"  {ratio:.1f}x fewer reduction bytes than FSDP2 fp32" if ratio else ""), flush=True)
    means = {h: statistics.mean(r["accuracy"] for r in rows if r["hook"] == h) for h in args.hooks.split(",")}
    for h, m in means.items():
        accs = [r["accuracy"] for r in rows if r["hook"] == h]
        print(f"{h:9s} mean {m:.2f}%  (min {min(accs):.2f}, max {max(accs):.2f}, {len(accs)} seeds)")
    hooks = args.hooks.split(",")
    if len(hooks) == 2:
        paired = [a["accuracy"] - b["accuracy"] for a in rows if a["hook"] == hooks[1]
                  for b in rows if b["hook"] == hooks[0] and b["seed"] == a["seed"]]
        print(f"{hooks[1]} - {hooks[0]}: mean {statistics.mean(paired):+.2f} points, per seed "
              + ", ".join(f"{d:+.2f}" for d in paired))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "ranks": args.ranks, "runs": rows, "means": means}, f, indent=1)


if __name__ == "__main__":
    main()
