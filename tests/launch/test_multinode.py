"""Two emulated hosts: network namespaces joined by a veth pair (commcomp.testing.netns), one
torchrun agent in each with 2 ranks, the c10d rendezvous hosted in the first. Every hook of the
registry trains a few steps over real TCP between them and the replicas must agree (the ranks
are tests/launch/_multinode_worker.py). Needs root and iproute2; skips with the reason elsewhere.
"""

import json
import os
import subprocess

import pytest

from commcomp.hooks import HOOKS
from commcomp.testing import netns
from tests.launch import _multinode_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "cctest"  # benchmarks/network.py uses ccbench_*: both can run at once
TIMEOUT = 240.0


def missing_cases(case_names):
    covered = {name.split("/")[0] for name in case_names}
    return [f"add a case for hook {h} to tests/launch/_multinode_worker.py" for h in HOOKS if h not in covered]


def test_every_hook_has_a_case():
    assert not missing_cases(worker.CASES), missing_cases(worker.CASES)


def skip_unless_namespaces():
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot emulate two hosts with network namespaces: {reason}")


@pytest.fixture
def host_pair(request):
    skip_unless_namespaces()
    netns.remove_stale(PREFIX)  # left by an earlier run that was killed before its teardown
    pair = netns.HostPair.for_process(PREFIX)
    request.addfinalizer(pair.teardown)
    return pair.create()


def read_reports(out_dir, world):
    reports = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                reports[r] = json.load(f)
    return reports


@pytest.mark.slow
def test_every_hook_across_two_hosts(host_pair, tmp_path):
    try:
        agents = host_pair.launch_torchrun(
            os.path.join(ROOT, "tests", "launch", "_multinode_worker.py"), [str(tmp_path)], nproc_per_node=2,
            timeout=TIMEOUT, run_id="cctest", env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    finally:
        host_pair.teardown()
    logs = "\n".join(f"--- agent in {a.namespace}: exit {a.returncode}{' (killed at the deadline)' if a.killed else ''}"
                     f"\n{a.output[-6000:]}" for a in agents)
    reports = read_reports(tmp_path, 4)
    assert sorted(reports) == [0, 1, 2, 3], f"ranks {sorted(reports)} reported, of 0-3\n{logs}"
    failures = [f"rank {r} {case}: {msg}" for r, rep in reports.items() for case, msg in rep["cases"].items()
                if msg != "ok"]
    assert not failures, "\n".join(failures) + "\n" + logs
    for rep in reports.values():
        assert list(rep["cases"]) == list(worker.CASES), rep["cases"]
    assert not missing_cases(reports[0]["cases"]), missing_cases(reports[0]["cases"])
    # the world really spans both hosts: two ranks behind each veth end
    assert sorted(rep["ifname"] for rep in reports.values()) == sorted(host_pair.devices * 2), reports
    assert all(a.returncode == 0 for a in agents), logs


# -- the skip path and the capability check, without touching the machine

def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.unavailable_reason()


def test_unavailable_without_ip(monkeypatch):
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    assert "no `ip` binary" in netns.unavailable_reason()


def test_unavailable_when_netns_add_fails(monkeypatch):
    calls = []

    def refuse(*cmd, check=True):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "mount --make-shared /run/netns failed: Operation not permitted")

    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: "/usr/sbin/ip")
    monkeypatch.setattr(netns, "sh", refuse)
    reason = netns.unavailable_reason()
    assert "`ip netns add` failed" in reason and "Operation not permitted" in reason
    assert calls[-1][:3] == ("ip", "netns", "del")  # the probe is cleaned up whatever happened


def test_skips_with_the_reason(monkeypatch):
    monkeypatch.setattr(netns, "unavailable_reason", lambda: "creating network namespaces needs root")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        skip_unless_namespaces()


def test_host_pair_checks_its_names():
    pair = netns.HostPair.for_process("cctest")
    assert pair.addresses == ("10.231.78.1", "10.231.78.2")
    assert all(len(d) <= netns.IFNAMSIZ for d in pair.devices)
    with pytest.raises(ValueError, match="at most 15"):
        netns.HostPair(devices=("a_very_long_device_name", "b"))
    with pytest.raises(ValueError, match="two distinct"):
        netns.HostPair(namespaces=("same", "same"))
    with pytest.raises(ValueError, match="IPv4"):
        netns.HostPair(subnet="10.0.0.0/31")
