"""`commcomp bench codec|sketch` in a subprocess: both run and print one table per device
(`bench sketch` once failed to import its timer when run as a package module)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args):
    return subprocess.run([sys.executable, "-m", "commcomp", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_bench_sketch_prints_a_row_per_sketch_direction_and_ratio(tmp_path):
    out = tmp_path / "sketch.json"
    r = bench("sketch", "--devices", "cpu", "--numel", "4096", "--repeat", "1", "--ratios", "0.1",
              "--no-reference", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "cpu (" in r.stdout and "d=4,096" in r.stdout and "native/ref" in r.stdout
    rows = json.loads(out.read_text())[0]["rows"]
    assert [(row["sketch"].split()[0], row["direction"]) for row in rows] == [
        ("countsketch", "sketch"), ("countsketch", "de-sketch"), ("srht", "sketch"), ("srht", "de-sketch")]
    assert sum(line.startswith(("countsketch", "srht")) for line in r.stdout.splitlines()) == 4


def test_bench_codec_table_has_every_op():
    r = bench("codec", "--devices", "cpu", "--numel", "4096", "--repeat", "1", "--ref-repeat", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert len(lines) - header - 1 == 7 and lines[header + 1].startswith("ternarize_pack fp32")


def test_terngrad_profile_runs_and_accounts_its_stages(tmp_path):
    """benchmarks/terngrad_profile.py (issue 15's profile) still runs: two ranks, one step."""
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, "benchmarks/terngrad_profile.py", "--world", "2", "--steps", "1",
                        "--warmup", "1", "--collectives", "two_phase", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    prof = json.loads(out.read_text())["terngrad/two_phase"]
    assert {"encode", "decode", "statistics"} <= set(prof["stages"]) and prof["buckets"] >= 1
    assert "in no op: waits" in r.stdout


@pytest.mark.slow
def test_time_to_accuracy_local_smoke(tmp_path):
    """benchmarks/time_to_accuracy.py --local (4 ranks on loopback, no namespaces, no root):
    fp32 sets the target, each run has its curve, step times and time to target, the table
    has a row per hook."""
    out = tmp_path / "tta.json"
    r = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--local", "--model", "mlp", "--hooks",
                        "none,fp16", "--seeds", "0", "--steps", "12", "--eval-every", "4", "--compute-steps", "0",
                        "--timeout", "240", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    runs = {run["hook"]: run for run in res["runs"]}
    assert set(runs) == {"none", "fp16"} and all(run["status"] == "ok" for run in runs.values())
    fp32 = runs["none"]
    assert fp32["reference"] and res["targets"]["0"] == fp32["curve"][-1][2] - 1.0
    for run in runs.values():
        assert [c[0] for c in run["curve"]] == [0, 4, 8, 12] and len(run["step_s"]) == 12
        assert all(t > 0 for t in run["step_s"]) and run["curve"][-1][1] > 0 and run["target"] == res["targets"]["0"]
        assert run["outcome"] in ("reached", "never") and (run["outcome"] == "reached") == (
            run["time_to_target"] is not None)
    assert fp32["outcome"] == "reached" and fp32["time_to_target"] <= fp32["curve"][-1][1]
    row = res["summary"]["local"]["none"]
    assert row["time_to_target"]["0"] == fp32["time_to_target"] == row["time_to_target_median"]
    assert {"step_s_median", "step_s_min", "step_s_max", "last_accuracy_median", "x_fp16", "x_powersgd4"} <= set(row)
    assert res["summary"]["local"]["fp16"]["x_fp16"] in (1.0, "never")
    assert "== local ==" in r.stdout and "target = fp32 final - 1 (seed 0: " in r.stdout
    table = r.stdout[r.stdout.index("== local =="):].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["none", "fp16"] and "x fp16" in table[1]


@pytest.mark.slow
def test_time_to_accuracy_decentralized_local_smoke(tmp_path):
    """--suite decentralized --local: fp32 DDP and CDProxSGT-ternary on the non-IID split (3 classes
    per rank), the examples' small CNN, 2 ranks (4 take ~1.5x as long on 2 cores). The gt run scores
    the ranks' average model and records rank 0's own, bytes per step are counted for it and
    computed for DDP, the table has both; fp32 sets the target after --reference-steps 4, the gt
    run goes on to --steps 8."""
    out = tmp_path / "tta.json"
    r = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--local", "--suite", "decentralized",
                        "--model", "small", "--world", "2", "--hooks", "none,gt/cdproxsgt-ternary", "--seeds", "0",
                        "--steps", "8", "--reference-steps", "4", "--eval-every", "4", "--compute-steps", "0",
                        "--timeout", "120", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    cfg = res["config"]
    assert (cfg["split"], cfg["momentum"], cfg["l1"], cfg["world"], cfg["reference_steps"]) == (
        "classes:3", 0.0, 1e-4, 2, 4)
    runs = {run["hook"]: run for run in res["runs"]}
    assert set(runs) == {"none", "gt/cdproxsgt-ternary"} and all(run["status"] == "ok" for run in runs.values())
    fp32, gt = runs["none"], runs["gt/cdproxsgt-ternary"]
    assert fp32["reference"] and res["targets"]["0"] == fp32["curve"][-1][2] - 1.0
    for run, steps in ((fp32, 4), (gt, 8)):
        assert run["split"] == "classes:3" and run["world"] == 2 and run["steps"] == steps == len(run["step_s"])
        assert [c[0] for c in run["curve"]] == list(range(0, steps + 1, 4)) and all(len(c) == 5 for c in run["curve"])
        assert all(math.isfinite(v) for c in run["curve"] for v in c if v is not None)
        assert all(0 <= c[2] <= 100 and 0 <= c[4] <= 100 for c in run["curve"])
        assert all(t > 0 and math.isfinite(t) for t in run["step_s"]) and run["curve"][-1][1] > 0
        assert math.isfinite(run["bytes_per_step"]) and run["bytes_per_step"] > 0
        assert run["outcome"] in ("reached", "never") and (run["steps_to_target"] is None) == (
            run["outcome"] == "never")
    assert fp32["outcome"] == "reached" and fp32["steps_to_target"] in (0, 4)
    assert all(c[2] == c[4] for c in fp32["curve"])  # DDP: rank 0's model is the model
    assert not fp32["bytes_counted"] and gt["bytes_counted"] and gt["gt"].startswith("GradientTracking(CDProxSGT")
    m = gt["gt_metrics"]
    assert gt["bytes_per_step"] == (m["bytes_x"] + m["bytes_y"]) / 8 and m["bytes_diagnostic"] > 0
    assert gt["bytes_per_step"] < fp32["bytes_per_step"] / 4  # base-3 ternary (1.6 bits) against fp32
    rows = res["summary"]["local"]
    for spec in runs:
        assert {"step_s_median", "bytes_per_step_median", "last_accuracy_median", "last_rank0_accuracy_median",
                "time_to_target_median", "time_to_target_projected", "x_none", "x_fp16", "x_powersgd4",
                "x_none_projected"} <= set(rows[spec])
        assert rows[spec]["projected_from_other_rate"] == []  # one rate: nothing to project from
        assert math.isfinite(rows[spec]["step_s_median"]) and math.isfinite(rows[spec]["bytes_per_step_median"])
    assert rows["none"]["x_none"] == 1.0 and rows["none"]["x_fp16"] is None and res["curve_checks"] == []
    table = r.stdout[r.stdout.index("== local =="):].splitlines()
    assert "2 ranks, classes:3, 8 steps max (fp32 reference 4)" in table[0]
    assert "target = fp32 final - 1 (seed 0: " in table[0]
    assert all(col in table[1] for col in ("MB/step", "rank0", "x fp32")) and "x fp16" not in table[1]
    assert "tt proj" not in table[1]
    assert [line.split()[0] for line in table[2:4]] == ["none", "gt/cdproxsgt-ternary"]
