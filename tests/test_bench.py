"""`commcomp bench codec|sketch` in a subprocess: both run and print one table per device
(`bench sketch` once failed to import its timer when run as a package module)."""

import json
import subprocess
import sys
from pathlib import Path

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
