"""`python -m commcomp stragglers ...` in a subprocess."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACE = "Canada-w256-r20-load0_250-b2048-desktop.npz"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "commcomp", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_simulate_json_matches_golden():
    golden = json.loads((Path(__file__).parent / "data" / "golden_authors.json").read_text())
    case = next(c for c in golden["cases"] if c["trace"] == TRACE and c["scheme"] == "msgc"
                and c["params"] == {"B": 1, "W": 3, "lambd": 30})
    p = _run("stragglers", "simulate", "--trace", TRACE, "--scheme", "msgc", "--B", "1", "--W", "3",
             "--lambd", "30", "--n-jobs", "10", "--mu", "1.0", "--base-comp", "2.2013", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == {"runtime", "load", "T", "num_waits", "params"}
    assert abs(out["runtime"] - case["runtime"]) <= 1e-9 * case["runtime"]
    assert out["T"] == 2 and out["num_waits"] == case["num_waits"]


def test_search_synthetic_and_png(tmp_path):
    png = tmp_path / "cmp.png"
    p = _run("stragglers", "simulate", "--model", "bursty", "--rounds", "16", "--workers", "16", "--gen-lambd", "4",
             "--search", "--lambd-max", "6", "--json", "--png", str(png))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == {"uncoded", "ignore", "gc", "srsgc", "msgc"} and png.stat().st_size > 0


def test_errors_and_help():
    p = _run("stragglers", "simulate", "--trace", TRACE, "--scheme", "srsgc", "--B", "1")
    assert p.returncode != 0 and "--W" in p.stderr
    h = _run("stragglers", "simulate", "--help")
    assert h.returncode == 0 and "fastest * (1 + mu)" in h.stdout


def test_run_live_search_json_and_png(tmp_path):
    """`stragglers run --search`: 3 worker processes and a coordinator; every scheme runs live
    with its best simulated parameters and reports the prediction beside the measurement."""
    png = tmp_path / "live.png"
    p = _run("stragglers", "run", "--search", "--schemes", "gc,msgc", "--model", "bursty", "--gen-B", "1",
             "--gen-W", "2", "--gen-lambd", "1", "--p-start", "0.2", "--workers", "3", "--rounds", "10", "--jobs",
             "6", "--time-scale", "0.03", "--json", "--png", str(png))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert [r["scheme"] for r in out["runs"]] == ["gc", "msgc"] and png.stat().st_size > 0
    for r in out["runs"]:
        assert r["predicted"] > 0 and r["runtime"] > 0 and r["T"] >= 0 and set(r["params"])


def test_run_errors_are_actionable():
    p = _run("stragglers", "run", "--scheme", "ignore", "--s", "1", "--model", "none", "--workers", "3")
    assert p.returncode != 0 and "the live engine runs uncoded, gc, srsgc, msgc" in p.stderr
    p = _run("stragglers", "run", "--model", "none", "--workers", "3")
    assert p.returncode != 0 and "give --scheme" in p.stderr
    p = _run("stragglers", "run", "--scheme", "msgc", "--B", "1", "--W", "3", "--lambd", "1", "--trace", TRACE,
             "--workers", "4", "--jobs", "19")
    assert p.returncode != 0 and "--extend" in p.stderr
    # checked before any process is spawned: one line, no traceback from a child
    for args, want in ((("--B", "2", "--W", "4", "--lambd", "1", "--jobs", "3"), "larger than n_jobs=3"),
                       (("--B", "1", "--W", "2", "--lambd", "3", "--jobs", "8"), "lambd=3 must be < n=3"),
                       (("--B", "1", "--W", "3", "--lambd", "1", "--jobs", "8", "--models", "2"), "T \\+ 1 = 3")):
        p = _run("stragglers", "run", "--scheme", "msgc", *args, "--model", "none", "--workers", "3")
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert re.search(want, p.stderr), p.stderr
