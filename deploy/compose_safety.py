"""Safety rules for the compose files of ``docker/``, checked without Docker.

Two mistakes turn a Docker deployment into a hole, and both are visible in the files:

* **an insecure component reachable from other machines**: an ``--insecure`` SuperLink
  lets anyone who reaches its port submit an app and run code in its SuperExecs, so an
  insecure service may publish ports only on the loopback interface
  (``127.0.0.1:8000:8000``); with ``network_mode: host`` nothing is published and
  ``--host`` binds the host's own interfaces, so every ``--host`` must be a loopback
  address (the SuperNodes' Runtime APIs are plain HTTP even in the TLS overlay);
* **a private key in a container that does not use it**: every bind mount that brings a
  private key (``*.key``, a SuperNode key ``supernode-<i>``) into a container must be a
  file its command names; ``ca.key`` never belongs in a container, and mounting a whole
  folder of certificates hands every key in it to the container.

:func:`exposure_problems` and :func:`key_mount_problems` take the merged document of
:func:`deploy.compose.load` and return one sentence per violation (empty: safe).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Mapping
from typing import Any

LOOPBACK_NAMES = ("localhost",)
#: A SuperNode private key as ``deploy/certs.py`` names it (its public key adds ``.pub``).
_SUPERNODE_KEY = re.compile(r"supernode-[A-Za-z0-9_-]+")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is a loopback address."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_private_key_name(name: str) -> bool:
    """Whether a file name is one of a private key (``ca.key``, ``server.key``, ``supernode-0``)."""
    base = posixpath.basename(name)
    return base.endswith(".key") or _SUPERNODE_KEY.fullmatch(base) is not None


def _command(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _flag(cmd: list[str], flag: str) -> str | None:
    for i, tok in enumerate(cmd):
        if tok == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def published_host_ips(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(host_ip, spec)`` of every published port; ``host_ip`` is ``""`` for all interfaces."""
    out = []
    for entry in service.get("ports", []) or []:
        if isinstance(entry, Mapping):
            out.append((str(entry.get("host_ip", "")), str(entry)))
            continue
        spec = str(entry).split("/", 1)[0]
        if spec.startswith("["):  # "[::1]:8000:8000"
            host, _, rest = spec[1:].partition("]")
            out.append((host, str(entry)) if rest.count(":") == 2 else ("", str(entry)))
            continue
        parts = spec.split(":")
        out.append((parts[0] if len(parts) == 3 else "", str(entry)))
    return out


def exposure_problems(doc: Mapping[str, Any]) -> list[str]:
    """Services an insecure API of which is reachable beyond loopback (see the module docstring)."""
    problems = []
    for name, service in doc.get("services", {}).items():
        cmd = _command(service)
        if "--insecure" not in cmd:
            continue
        for host_ip, spec in published_host_ips(service):
            if not is_loopback(host_ip):
                where = host_ip or "every interface"
                problems.append(f"{name}: insecure, but port {spec!r} is published on {where}")
    for name, service in doc.get("services", {}).items():
        host = _flag(_command(service), "--host")
        if service.get("network_mode") == "host" and host is not None and not is_loopback(host):
            problems.append(f"{name}: host networking, but --host {host} binds beyond loopback")
    return problems


def _bind_mounts(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(source, target)`` of every bind mount (named volumes are skipped)."""
    out = []
    for entry in service.get("volumes", []) or []:
        if isinstance(entry, Mapping):
            if entry.get("type", "bind") == "bind":
                out.append((str(entry.get("source", "")), str(entry.get("target", ""))))
            continue
        parts = str(entry).split(":")
        if len(parts) >= 2 and (parts[0].startswith((".", "/", "~", "$")) or "/" in parts[0]):
            out.append((parts[0], parts[1]))
    return out


def key_mount_problems(doc: Mapping[str, Any]) -> list[str]:
    """Private keys mounted into containers that do not use them (see the module docstring)."""
    problems = []
    for name, service in doc.get("services", {}).items():
        paths = {tok for tok in _command(service) if tok.startswith("/")}
        for source, target in _bind_mounts(service):
            target = posixpath.normpath(target)
            inside = sorted(p for p in paths if p.startswith(target.rstrip("/") + "/"))
            if inside:
                problems.append(
                    f"{name}: mounts the folder {source} at {target}, so every key in it is visible "
                    f"(it uses only {', '.join(inside)}); mount those files one by one"
                )
            elif posixpath.basename(source) == "ca.key" or posixpath.basename(target) == "ca.key":
                problems.append(f"{name}: mounts the CA's private key {source}; keep ca.key offline")
            elif is_private_key_name(source) or is_private_key_name(target):
                if target not in paths:
                    problems.append(f"{name}: mounts the private key {source} at {target}, unused")
    return problems
