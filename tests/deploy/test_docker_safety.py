"""The compose files are safe by default: no insecure API beyond loopback, no unused private key.

Read statically (no Docker needed) with the merge rules of deploy/compose.py; each rule is
also shown to catch the mistake it exists for, on a copy of the real files with that
mistake made.
"""

import copy

import pytest
from conftest import ROOT

from deploy import compose
from deploy.compose_safety import exposure_problems, is_loopback, key_mount_problems, published_host_ips

DOCKER = ROOT / "docker"
BASE, TLS, TEST = DOCKER / "compose.yml", DOCKER / "compose.tls.yml", DOCKER / "compose.test.yml"
HOST_NET = {"FEDMOE_BIND_HOST": "127.0.0.1"}  # what the test overlay is used with
STACKS = {
    "insecure": ((BASE,), {}),
    "tls": ((BASE, TLS), {}),
    "insecure-test-overlay": ((BASE, TEST), HOST_NET),
    "tls-test-overlay": ((BASE, TLS, TEST), HOST_NET),
}


def load(name):
    files, env = STACKS[name]
    return compose.load(*files, env=env)


@pytest.mark.parametrize("name", list(STACKS))
def test_the_compose_files_are_safe(name):
    doc = load(name)
    assert exposure_problems(doc) == []
    assert key_mount_problems(doc) == []


def test_insecure_superlink_is_published_on_loopback_only():
    link = load("insecure")["services"]["superlink"]
    assert "--insecure" in link["command"]
    assert [ip for ip, _ in published_host_ips(link)] == ["127.0.0.1"]
    # no other service publishes anything (SuperNode Runtime APIs stay on the Compose network)
    assert [n for n, s in load("tls")["services"].items() if s.get("ports")] == ["superlink"]


@pytest.mark.parametrize(
    "ports",
    [
        ["8000:8000"],
        ["0.0.0.0:8000:8000"],
        ["8000"],
        ["10.0.0.5:8000:8000"],
        [{"target": 8000, "published": 8000}],
    ],
)
def test_an_insecure_superlink_published_beyond_loopback_is_caught(ports):
    doc = copy.deepcopy(load("insecure"))
    doc["services"]["superlink"]["ports"] = ports
    problems = exposure_problems(doc)
    assert len(problems) == 1 and problems[0].startswith("superlink: insecure"), problems


def test_host_networking_without_a_loopback_bind_is_caught():
    # the test overlay without FEDMOE_BIND_HOST would bind every host interface
    problems = exposure_problems(compose.load(BASE, TEST, env={}))
    assert sorted(p.split(":")[0] for p in problems) == [
        "superlink",
        "supernode-0",
        "supernode-1",
        "supernode-2",
    ]


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["", "0.0.0.0", "::", "10.0.0.5", "superlink"]))
    ips = [ip for ip, _ in published_host_ips({"ports": ["[::1]:8000:8000", "[::]:8000:8000", "8000:8000"]})]
    assert ips == ["::1", "::", ""]


@pytest.mark.parametrize(
    ("service", "mount", "why"),
    [
        (
            "superlink",
            "./certs:/certs:ro",
            "mounts the folder",
        ),  # the whole folder: ca.key and every node key
        ("superlink", "./certs/ca.key:/certs/ca.key:ro", "CA's private key"),
        ("supernode-0", "./certs/supernode-1:/certs/supernode-1:ro", "unused"),  # another node's key
        ("superexec-serverapp", "./certs/server.key:/certs/server.key:ro", "unused"),
        (
            "superexec-clientapp-0",
            {"type": "bind", "source": "./certs/supernode-0", "target": "/k"},
            "unused",
        ),
    ],
)
def test_a_private_key_mounted_where_it_is_not_used_is_caught(service, mount, why):
    doc = copy.deepcopy(load("tls"))
    doc["services"][service].setdefault("volumes", []).append(mount)
    problems = key_mount_problems(doc)
    assert len(problems) == 1 and problems[0].startswith(f"{service}:") and why in problems[0], problems


def test_every_tls_container_gets_only_its_own_files():
    mounted = {
        name: sorted(v.split(":")[1] for v in svc.get("volumes", []) if v.startswith("./certs/"))
        for name, svc in load("tls")["services"].items()
    }
    assert mounted == {
        "superlink": ["/certs/ca.crt", "/certs/server.key", "/certs/server.pem"],
        "superexec-serverapp": ["/certs/ca.crt"],
        **{f"supernode-{i}": ["/certs/ca.crt", f"/certs/supernode-{i}"] for i in range(3)},
        **{f"superexec-clientapp-{i}": [] for i in range(3)},
    }
