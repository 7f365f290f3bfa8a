"""The performance model: its byte counts agree with what the hooks measure, TernGrad's
"auto" takes the model's choice, the model reproduces the network benchmark, and the CLI
(perfmodel, calibrate, bench) works and teaches."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commcomp
from commcomp import perfmodel as pm
from commcomp.hooks import TernGradState
from commcomp.perfmodel.probe import PROBE_NUMEL
from commcomp.utils.metrics import ring_allreduce_bytes as ring
from tests._dist import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sc(**kw):
    base = dict(params=10_000_000, world=8, bandwidth_bytes_per_s=1.25e8, compute_s=0.1)
    base.update(kw)
    return pm.Scenario(**base)


def test_fp32_ring_bytes_and_speedup_basics():
    p = pm.predict("none", sc(), pm.BUILTIN)
    assert p.bytes_sent == pytest.approx(2 * 7 / 8 * 4 * 10_000_000)
    one = pm.predict("none", sc(world=1), pm.BUILTIN)
    assert one.bytes_sent == 0 and one.step_s == pytest.approx(0.1) and one.speedup == pytest.approx(1.0)
    slow, fast = (pm.predict("none", sc(bandwidth_bytes_per_s=b), pm.BUILTIN) for b in (1.25e8, 1.25e10))
    assert fast.step_s < slow.step_s and fast.speedup > slow.speedup
    # compressing 16x cuts the wire time on a slow link
    tern = pm.predict("terngrad", sc(bandwidth_bytes_per_s=1.25e7), pm.BUILTIN, collective="two_phase")
    assert tern.wire_s < pm.predict("none", sc(bandwidth_bytes_per_s=1.25e7), pm.BUILTIN).wire_s / 10


def test_more_ranks_per_core_cost_more_cpu():
    free = pm.predict("terngrad", sc(ranks_per_host=2, cores_per_host=2), pm.BUILTIN, collective="int8")
    busy = pm.predict("terngrad", sc(ranks_per_host=8, cores_per_host=2), pm.BUILTIN, collective="int8")
    assert busy.cpu_s == pytest.approx(4 * free.cpu_s)


@pytest.mark.parametrize("bad", [dict(params=0), dict(world=0), dict(bandwidth_bytes_per_s=0),
                                 dict(compute_s=float("nan")), dict(latency_s=-1.0)])
def test_bad_scenarios_are_refused(bad):
    with pytest.raises(ValueError, match="commcomp"):
        sc(**bad)


def test_unknown_hook_and_collective_are_refused():
    with pytest.raises(ValueError, match="unknown hook"):
        pm.predict("powersgd", sc(), pm.BUILTIN)
    with pytest.raises(ValueError, match="unknown TernGrad collective"):
        pm.predict("terngrad", sc(), pm.BUILTIN, collective="ring")


def test_calibration_file(tmp_path, monkeypatch):
    monkeypatch.delenv("COMMCOMP_CALIBRATION", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pm.load_calibration()["source"] == pm.BUILTIN["source"]  # no default file: built-in
    with pytest.raises(ValueError, match="named by --calibration does not exist"):
        pm.load_calibration(str(tmp_path / "typo.json"))
    monkeypatch.setenv("COMMCOMP_CALIBRATION", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match=r"named by \$COMMCOMP_CALIBRATION does not exist"):
        pm.load_calibration()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        pm.load_calibration(str(bad))


def test_auto_collective_follows_the_model():
    for world in (2, 4, 16, 64, 256):
        for numel in (10_000, 6_500_000):
            for link in (pm.LinkModel(), pm.LinkModel(1.25e10, 5e-6)):
                want = pm.choose_collective(numel, world, None, pm.load_calibration(),
                                            bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
                                            latency_s=link.latency_s)
                assert pm.choose(numel, world, link) == want
    # a slow link and many ranks: the all-gather's (N - 1) payloads lose to the two-phase ring
    assert pm.choose(6_500_000, 64, pm.LinkModel(1.25e8)) == "two_phase"


def _hook_bytes(rank, world, out):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300))
    params = sum(p.numel() for p in model.parameters())
    results = {}
    for name, opts in (("terngrad", {"collective": "int8"}), ("terngrad", {"collective": "allgather"}),
                       ("terngrad", {"collective": "two_phase"}), ("sketch_dp", {"sketch_ratio": 0.05})):
        ddp = DDP(torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)), bucket_cap_mb=25)
        extra = {"noise_multiplier": None, "clip_norm": 1.0} if name == "sketch_dp" else {"min_compress_numel": 1}
        state = commcomp.register(ddp, name, **opts, **extra)
        ddp(torch.randn(4, 300)).sum().backward()
        if name == "terngrad":
            assert state.collective_for(0, params) == opts["collective"]
        results[f"{name}/{opts}"] = state.metrics["bytes_sent"]
    auto = commcomp.register(DDP(torch.nn.Linear(300, 300)), "terngrad")
    # The link was measured at registration on the hook's group; its bytes are counted apart.
    assert auto.link.bandwidth_bytes_per_s > 0 and auto.link.latency_s > 0
    probe = PROBE_NUMEL
    assert auto.metrics["bytes_link_probe"] == (7 * ring(4, world) + 3 * ring(4 * probe, world) + ring(16, world))
    assert auto.metrics["bytes_sent"] == 0
    got = auto.collective_for(0, 300 * 301)
    every = [None] * world
    dist.all_gather_object(every, (auto.link, got))
    assert all(e == every[0] for e in every), f"ranks measured or chose differently: {every}"
    want = pm.choose_collective(300 * 301, world, None, pm.load_calibration(),
                                bandwidth_bytes_per_s=auto.link.bandwidth_bytes_per_s, latency_s=auto.link.latency_s)
    assert got == want  # TernGradState(collective="auto") asks the model
    saved = auto.state_dict()  # the link and the choices travel with the checkpoint
    fresh = TernGradState(process_group=auto.process_group, link=pm.LinkModel(1.0, 1.0))
    fresh.load_state_dict(saved)
    assert fresh.link == auto.link and fresh.choices == auto.choices
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"params": params, "bytes": results}, f)
    dist.barrier()


def test_model_bytes_match_what_the_hooks_measure(tmp_path):
    """The model's per-step bytes are the hooks' own accounting (payload, scales, flags),
    within the side channels the model leaves out (a few hundred bytes here)."""
    out = str(tmp_path / "bytes.json")
    spawn(_hook_bytes, 2, tmp_path, out)
    got = json.load(open(out))
    s = pm.Scenario(params=got["params"], world=2, bandwidth_bytes_per_s=1e9, compute_s=0.0)
    for key, measured in got["bytes"].items():
        name = key.split("/")[0]
        opts = eval(key.split("/", 1)[1])  # noqa: S307 - our own repr of a small dict
        predicted, _, _ = pm.traffic(name, s, **opts)
        assert measured == pytest.approx(predicted, rel=0.02, abs=512), key


def test_model_reproduces_the_network_benchmark():
    """benchmarks/perfmodel_check.py: the built-in calibration (a `commcomp calibrate` run,
    not fitted to these points) predicts the shaped-network step times within 20%."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import perfmodel_check
    finally:
        sys.path.pop(0)
    rows = [r for r in perfmodel_check.check(pm.BUILTIN) if r["current"]]
    assert len(rows) >= 6
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= 0.2, worst


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "commcomp", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})), cwd=ROOT)


def test_cli_perfmodel_table_json_and_errors():
    r = cli("perfmodel", "--model-params", "25.6M", "--world-size", "8,64", "--bandwidth-gbps", "1",
            "--compute-ms", "100", "--hook", "none,terngrad,terngrad:int8,sketch_dp:0.01,gradient_coding:1,"
            "gradient_tracking:ternary", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert {row["world"] for row in rows} == {8, 64} and len(rows) == 2 * 6
    assert all(row["step_s"] > 0 for row in rows)
    r = cli("perfmodel", "--model-params", "1M", "--world-size", "4", "--bandwidth-gbps", "10", "--compute-ms", "5")
    assert r.returncode == 0 and "speed-up" in r.stdout and "calibration:" in r.stdout
    r = cli("perfmodel", "--model-params", "1M", "--world-size", "4", "--bandwidth-gbps", "10", "--compute-ms", "5",
            "--hook", "powersgd")
    assert r.returncode != 0 and "unknown hook spec 'powersgd'" in r.stderr
    r = cli("perfmodel", "--model-params", "lots", "--world-size", "4", "--bandwidth-gbps", "1", "--compute-ms", "5")
    assert r.returncode != 0 and "expected a count" in r.stderr
    r = cli("perfmodel", "--help")
    assert "speed-up = N x compute / step" in r.stdout and "examples:" in r.stdout


def test_cli_calibrate_then_perfmodel_uses_it(tmp_path):
    path = str(tmp_path / "cal.json")
    r = cli("calibrate", "--world", "2", "--params", "20000", "--steps", "1", "--out", path)
    assert r.returncode == 0, r.stderr
    cal = json.load(open(path))
    assert cal["ranks_per_host"] == 2 and set(cal["seconds_per_pass_element"]) >= {
        "none", "terngrad/int8", "terngrad/allgather", "terngrad/two_phase", "sketch_dp"}
    assert all(v >= 0 for v in cal["seconds_per_pass_element"].values())
    r = cli("perfmodel", "--model-params", "1M", "--world-size", "4", "--bandwidth-gbps", "1", "--compute-ms", "5",
            env={"COMMCOMP_CALIBRATION": path})
    assert r.returncode == 0 and "commcomp calibrate on" in r.stdout
    r = cli("calibrate", "--world", "1", "--out", path)
    assert r.returncode != 0 and "world >= 2" in r.stderr


def test_cli_bench_and_help():
    r = cli("bench", "codec", "--devices", "cpu", "--numel", "20000", "--repeat", "1", "--ref-repeat", "1")
    assert r.returncode == 0, r.stderr
    assert "ternarize_pack fp32" in r.stdout and "native/ref" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and all(t in r.stdout for t in ("perfmodel", "calibrate", "bench", "stragglers", "info"))
