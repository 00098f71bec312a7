"""Emulate several hosts on one Linux machine with network namespaces (root only).

A :class:`NetnsLab` creates one *hub* namespace holding a bridge with the first address of
a private ``/24`` (``10.251.0.1`` by default) and any number of *host* namespaces, each
joined to that bridge by a veth pair and given its own address (``10.251.0.10``,
``.11``, ...). Nothing is added to the namespace the lab was created from: traffic stays
between the lab's namespaces. Run a command "on" a host with ``ip netns exec NAME ...``
(:meth:`NetnsLab.prefix`). :meth:`NetnsLab.destroy` kills what still runs inside the
lab's namespaces and deletes them.

Used by ``tests/deploy/test_deploy_netns.py`` to run a SuperLink and SuperNodes as if on
different machines that reach each other only by IP address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import psutil

from fedmoe_app.tools.launch import kill_remaining


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here (``None`` when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fmprobe{os.getpid()}"
    try:
        add = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc}"
    if add.returncode != 0:
        return f"`ip netns add` failed: {add.stderr.strip()}"
    try:
        bridge = subprocess.run(
            ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], capture_output=True, text=True
        )
        if bridge.returncode != 0:
            return f"cannot create a bridge in a namespace: {bridge.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """One emulated host: a network namespace and its address on the lab's bridge."""

    name: str
    netns: str
    address: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Command prefix that runs a program on this host."""
        return ("ip", "netns", "exec", self.netns)


@dataclass
class NetnsLab:
    """A private bridged network of namespaces; see the module docstring.

    Parameters
    ----------
    tag : str
        Unique prefix of the namespace names (e.g. ``f"fm{os.getpid()}"``); at most 10
        characters so that names stay short.
    subnet : str
        First three octets of the private ``/24`` used inside the lab.

    """

    tag: str
    subnet: str = "10.251.0"
    hub: Host | None = field(default=None, init=False)
    hosts: list[Host] = field(default_factory=list, init=False)
    _namespaces: list[str] = field(default_factory=list, init=False)

    def _add_ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def add_hub(self, name: str = "hub") -> Host:
        """Create the hub namespace: bridge ``br0`` with address ``<subnet>.1``."""
        if self.hub is not None:
            raise RuntimeError("the lab already has a hub")
        ns = self._add_ns(name)
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{self.subnet}.1/24", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        self.hub = Host(name, ns, f"{self.subnet}.1")
        return self.hub

    def add_host(self, name: str) -> Host:
        """Create a host namespace wired to the hub's bridge, address ``<subnet>.(10+k)``."""
        if self.hub is None:
            self.add_hub()
        assert self.hub is not None
        index = len(self.hosts)
        if index > 200:
            raise RuntimeError("at most 200 hosts per lab")
        ns = self._add_ns(name)
        veth = f"v{index}"
        _ip("-n", self.hub.netns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub.netns, "link", "set", veth, "master", "br0", "up")
        address = f"{self.subnet}.{10 + index}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name, ns, address)
        self.hosts.append(host)
        return host

    def pids(self) -> list[int]:
        """PIDs of the processes still running in the lab's namespaces."""
        found: list[int] = []
        for ns in self._namespaces:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            found += [int(p) for p in out.stdout.split()]
        return found

    def destroy(self, grace: float = 5.0) -> None:
        """Kill what still runs inside the lab (SIGTERM, then SIGKILL) and delete its namespaces."""
        pids = self.pids()
        procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
            except psutil.Error:
                continue
        kill_remaining(procs, grace)
        for ns in reversed(self._namespaces):
            for _ in range(3):
                if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)
        self._namespaces.clear()
        self.hosts.clear()
        self.hub = None

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
