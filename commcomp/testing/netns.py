"""Two emulated hosts on one Linux machine, for multi-node tests and benchmarks.

A :class:`HostPair` is two network namespaces joined by a veth pair: each end gets an address
of a private subnet, each namespace its loopback. A process started in one namespace reaches
the other only over the veth, through the kernel's TCP stack, as on two hosts behind one switch;
``tc tbf`` on the veth ends (:meth:`HostPair.shape`) limits the bandwidth.
:meth:`HostPair.launch_torchrun` starts one ``torchrun`` agent per namespace (a c10d rendezvous
hosted by the first) and waits for both, killing everything they started on a timeout.

Example::

    >>> from commcomp.testing import netns
    >>> netns.unavailable_reason()           # None where namespaces can be made (root, ip, kernel)
    >>> netns.remove_stale("cctest")          # namespaces left by killed earlier runs
    >>> pair = netns.HostPair.for_process("cctest")   # names carry this process's id
    >>> with pair:                            # create(); teardown() on the way out, failure included
    ...     pair.shape("50mbit")
    ...     agents = pair.launch_torchrun("train.py", ["--steps", "3"], timeout=120)
    >>> [a.returncode for a in agents]

Needs root (``ip netns``, ``ip link``, ``tc``) and iproute2. Only the pair's own namespaces and
devices are created, addressed, shaped and removed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

IFNAMSIZ = 15  # the longest interface name Linux accepts
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def sh(*cmd, check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` (no shell) and capture its output; with `check`, a failure raises with its stderr."""
    argv = [str(c) for c in cmd]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable_reason() -> Optional[str]:
    """Why this machine cannot emulate hosts with network namespaces, or None if it can.

    Checks root, the ``ip`` binary, and that a namespace with a veth pair inside can really be
    made (an unprivileged container refuses ``ip netns add`` even to root); the probe is removed.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, or with sudo)"
    if shutil.which("ip") is None:
        return "no `ip` binary on PATH (install iproute2)"
    probe = f"ccprobe{os.getpid()}"
    try:
        made = sh("ip", "netns", "add", probe, check=False)
        if made.returncode:
            return f"`ip netns add` failed (an unprivileged container?): {made.stderr.strip()}"
        veth = sh("ip", "-n", probe, "link", "add", "ccprobe_a", "type", "veth", "peer", "name", "ccprobe_b",
                  check=False)
        if veth.returncode:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process living in `namespace` (all of them started there by this module's user)."""
    for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_stale(prefix: str = "cctest") -> List[str]:
    """Remove the namespaces and stray veth ends that :meth:`HostPair.for_process` made with
    `prefix` in processes that are no longer alive (a run killed before its teardown).
    Returns the names removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)(a|b|va|vb)$")
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split(" ", 1)[0].strip()
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_inside(name)
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        fields = line.split(":")
        name = fields[1].strip().split("@", 1)[0] if len(fields) > 2 else ""
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _rate_bits(rate: str) -> float:
    """``"50mbit"`` -> 5e7 (``tc``'s units: kbit, mbit, gbit, bit)."""
    num = rate.lower().removesuffix("bit")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(num[-1:], 1.0)
    try:
        return float(num.rstrip("kmg")) * scale
    except ValueError:
        raise ValueError(f"rate must look like '50mbit', '1gbit' or 'unshaped', got {rate!r}") from None


def _torchrun_passes_local_addr() -> bool:
    """Whether torchrun's c10d rendezvous gives the workers node 0's ``--local-addr`` as
    MASTER_ADDR (torch >= 2.5). torch 2.4's gives them node 0's hostname, which both namespaces
    share and which resolves outside them."""
    import torch
    from packaging.version import Version

    return Version(torch.__version__).release >= (2, 5)


@dataclasses.dataclass
class AgentResult:
    """How one torchrun agent ended: exit status (negative: killed by that signal), its output
    (agent and workers, interleaved) and whether it was killed for running past the deadline."""

    namespace: str
    returncode: int
    output: str
    killed: bool


@dataclasses.dataclass(frozen=True)
class HostPair:
    """Two network namespaces joined by a veth pair: two emulated hosts.

    Args:
        namespaces: the two namespace names (``ip netns``, global on the machine).
        devices: the veth ends, one per namespace (at most 15 characters each).
        subnet: an IPv4 network; its first two host addresses go to the two ends.
    """

    namespaces: Tuple[str, str] = ("cctest_a", "cctest_b")
    devices: Tuple[str, str] = ("cctest_va", "cctest_vb")
    subnet: str = "10.231.78.0/24"

    def __post_init__(self):
        for kind, names in (("namespaces", self.namespaces), ("devices", self.devices)):
            if len(names) != 2 or names[0] == names[1] or not all(_NAME.match(n) for n in names):
                raise ValueError(f"HostPair needs two distinct {kind} made of letters, digits, '_', '.', '-'; "
                                 f"got {names!r}")
        if any(len(d) > IFNAMSIZ for d in self.devices):
            raise ValueError(f"veth names are at most {IFNAMSIZ} characters, got {self.devices!r}")
        net = ipaddress.ip_network(self.subnet)
        if net.version != 4 or net.num_addresses < 4:
            raise ValueError(f"subnet must be an IPv4 network with two host addresses (e.g. 10.231.78.0/24), "
                             f"got {self.subnet!r}")

    @classmethod
    def for_process(cls, prefix: str = "cctest", subnet: str = "10.231.78.0/24") -> "HostPair":
        """A pair named after `prefix` and this process's id, so concurrent runs do not collide
        and :func:`remove_stale` can tell a dead run's namespaces from a live one's."""
        tag = f"{prefix}{os.getpid()}"
        return cls((tag + "a", tag + "b"), (tag + "va", tag + "vb"), subnet)

    @property
    def addresses(self) -> Tuple[str, str]:
        hosts = ipaddress.ip_network(self.subnet).hosts()
        return str(next(hosts)), str(next(hosts))

    # -- lifetime
    def create(self) -> "HostPair":
        """Make both namespaces, the veth pair, the addresses; bring the links and loopbacks up.
        Namespaces of the same names are removed first; on failure nothing is left behind."""
        self.teardown()
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        try:
            for ns in self.namespaces:
                sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1])
            for ns, dev, addr in zip(self.namespaces, self.devices, self.addresses):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Kill what still runs inside, remove both namespaces (and with them the veth pair).
        Safe to call twice, or on a pair never created."""
        for ns in self.namespaces:
            _kill_inside(ns)
            sh("ip", "netns", "del", ns, check=False)
        if os.path.exists(f"/sys/class/net/{self.devices[0]}"):  # made, but never moved into its namespace
            sh("ip", "link", "del", self.devices[0], check=False)

    def __enter__(self) -> "HostPair":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.teardown()

    def shape(self, rate: str, latency: str = "200ms") -> None:
        """Limit both veth ends to `rate` (``tc tbf``: ``"50mbit"``, ``"1gbit"``), or remove the
        limit (``"unshaped"``). The bucket holds at least rate / HZ (one timer tick's bytes)."""
        for node, (ns, dev) in enumerate(zip(self.namespaces, self.devices)):
            self.run(node, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if rate != "unshaped":
                burst = max(64_000, int(_rate_bits(rate) / 8 / 100))
                self.run(node, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
                         "latency", latency)

    # -- running things inside
    def exec_argv(self, node: int, argv: Sequence[str]) -> List[str]:
        """`argv` prefixed so that it runs inside namespace `node` (0 or 1)."""
        return ["ip", "netns", "exec", self.namespaces[node], *map(str, argv)]

    def run(self, node: int, *cmd, check: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` inside namespace `node` and capture its output (see :func:`sh`)."""
        return sh(*self.exec_argv(node, cmd), check=check)

    def launch_torchrun(self, script: str, args: Sequence[str] = (), *, nproc_per_node: int = 2,
                        port: int = 29500, timeout: float = 600.0, grace: float = 30.0,
                        env: Optional[Dict[str, str]] = None, run_id: str = "commcomp") -> List[AgentResult]:
        """Run ``torchrun script args`` as two nodes of `nproc_per_node` ranks, one per namespace.

        Node 0 hosts the c10d rendezvous on ``addresses[0]:port``. Each agent gets
        ``--local-addr`` its own address (both namespaces share the machine's hostname, which
        resolves outside them) and ``GLOO_SOCKET_IFNAME`` its veth, on top of the environment
        and `env`. Waits at most `timeout` seconds in all, and `grace` more once an agent has
        failed (its peer may sit in a collective until gloo's timeout); then kills both agents
        and every worker (they live in the namespaces). Returns one :class:`AgentResult` per node.
        """
        procs, logs = [], []
        try:
            for node, (dev, addr) in enumerate(zip(self.devices, self.addresses)):
                if _torchrun_passes_local_addr():
                    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint",
                            f"{self.addresses[0]}:{port}", "--rdzv-id", run_id, "--rdzv-conf",
                            f"is_host={int(node == 0)},join_timeout={max(1, int(timeout))}"]
                else:  # torch 2.4: a static rendezvous gives the workers --master-addr as it is
                    rdzv = ["--node-rank", str(node), "--master-addr", self.addresses[0],
                            "--master-port", str(port), "--rdzv-id", run_id]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                       "--nproc-per-node", str(nproc_per_node), *rdzv,
                       "--local-addr", addr, "--max-restarts", "0", script, *map(str, args)]
                logs.append(tempfile.TemporaryFile(mode="w+"))
                procs.append(subprocess.Popen(self.exec_argv(node, cmd), stdout=logs[-1], stderr=subprocess.STDOUT,
                                              env={**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": dev},
                                              start_new_session=True))
            killed = self._wait(procs, timeout, grace)
            results = []
            for ns, proc, log, k in zip(self.namespaces, procs, logs, killed):
                log.seek(0)
                results.append(AgentResult(ns, proc.returncode, log.read(), k))
            return results
        finally:
            if any(p.poll() is None for p in procs):  # interrupted: leave nothing running
                self._kill(procs)
            for log in logs:
                log.close()

    def _wait(self, procs, timeout: float, grace: float) -> List[bool]:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        killed = [p.poll() is None for p in procs]
        if any(killed):
            self._kill(procs)
        return killed

    def _kill(self, procs) -> None:
        """SIGTERM the agents (torchrun then stops its workers), then SIGKILL whatever is left in
        the namespaces: workers run in sessions of their own, out of reach of the agent's group."""
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        for ns in self.namespaces:
            _kill_inside(ns)
        for p in procs:
            p.wait()
