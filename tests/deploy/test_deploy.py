"""Deployment on loopback: real SuperLink + SuperNodes, insecure and TLS with node authentication."""

import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, read_metrics
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy import flags
from deploy.certs import make_certificates
from deploy.local import Deployment, connection_toml, node_config

# Fast settings for deployment runs: synthetic data, few samples, no client-side evaluation.
DEPLOY_FAST = {
    "dataset": "synthetic",
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "max-samples-per-client": 200,
    "central-eval-samples": 300,
    "round-timeout-s": 120.0,
}


def left_over(workdir):
    """Processes still running whose FLWR_HOME lies under ``workdir``."""
    left = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            home = (p.info["environ"] or {}).get("FLWR_HOME", "")
        except psutil.Error:
            continue
        if home.startswith(str(workdir)):
            left.append(" ".join(p.info["cmdline"] or []))
    return left


# ---------------------------------------------------------------------------- fast
def test_node_config_string():
    assert node_config(1, 3, client_id="site-1", device_class="phone") == (
        'partition-id=1 num-partitions=3 client-id="site-1" device-class="phone"'
    )
    assert node_config(0, 2) == "partition-id=0 num-partitions=2"
    with pytest.raises(ValueError):
        node_config(3, 3)
    with pytest.raises(ValueError):
        node_config(0, 2, client_id="has space")


def test_node_config_is_parsed_by_flower():
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([node_config(2, 4, client_id="hospital-a", device_class="laptop")])
    assert parsed == {
        "partition-id": 2,
        "num-partitions": 4,
        "client-id": "hospital-a",
        "device-class": "laptop",
    }


def test_connection_toml(tmp_path):
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    insecure = tomllib.loads(connection_toml("127.0.0.1:9000", None))
    assert insecure["superlink"]["default"] == "fedmoe-local"
    assert insecure["superlink"]["fedmoe-local"] == {"address": "127.0.0.1:9000", "insecure": True}
    ca = tmp_path / "ca.crt"
    tls = tomllib.loads(connection_toml("10.0.0.1:9000", ca))["superlink"]["fedmoe-local"]
    assert tls == {"address": "10.0.0.1:9000", "root-certificates": str(ca.resolve())}


def test_certificates_chain_sans_and_supernode_keys(tmp_path):
    paths = make_certificates(tmp_path, sans=["superlink", "10.251.0.1"], supernodes=2)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"localhost", "127.0.0.1", "superlink", "10.251.0.1"} <= names
    # Python's TLS stack (what Flower's HTTP clients use) accepts the CA file
    ssl.create_default_context(cafile=str(paths.ca_cert))
    assert (paths.server_key.stat().st_mode & 0o777) == 0o600
    # SuperNode keys: what flower-supernode and `flwr supernode register` load
    for i, key in enumerate(paths.supernode_keys):
        priv = load_ssh_private_key(key.read_bytes(), None)
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        pub = load_ssh_public_key(paths.public_key(i).read_bytes())
        assert pub.public_numbers() == priv.public_key().public_numbers()


def test_private_keys_are_created_0600_never_chmodded_later(tmp_path, monkeypatch):
    # A key written with the default mode and narrowed afterwards is world-readable for a
    # moment: forbid every chmod, so only files created 0600 can end up 0600.
    def no_chmod(*args, **kwargs):
        raise AssertionError(f"chmod after writing: {args}")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    stale = tmp_path / "server.key"
    stale.write_bytes(b"old key\n")
    stale_mode = stale.stat().st_mode & 0o777
    old_umask = os.umask(0o022)  # default creation mode of other files: 0644
    try:
        paths = make_certificates(tmp_path, supernodes=2)
    finally:
        os.umask(old_umask)
    assert stale_mode & 0o044  # the file it replaces was readable by others
    private = [paths.ca_key, paths.server_key, *paths.supernode_keys]
    public = [paths.ca_cert, paths.server_cert, *(paths.public_key(i) for i in range(2))]
    assert {p.name: p.stat().st_mode & 0o777 for p in private} == {p.name: 0o600 for p in private}
    assert {p.name: p.stat().st_mode & 0o777 for p in public} == {p.name: 0o644 for p in public}
    assert paths.server_key.read_bytes() != b"old key\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_certs_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "certs.py"), str(tmp_path), "--supernodes", "1", "--san", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
        "supernode-0",
        "supernode-0.pub",
    }


@pytest.mark.parametrize("mode", ["insecure", "tls"])
def test_generated_commands_use_existing_flags(tmp_path, mode):
    certs = make_certificates(tmp_path / "certs", supernodes=1) if mode == "tls" else None
    dep = Deployment(ROOT, tmp_path / "wd", mode=mode, certs=certs)
    link = dep.superlink_command()
    assert flags.check_argv([link[0]], link[1:]) == []
    assert "--simulation" not in link
    assert ("--enable-supernode-auth" in link) == (mode == "tls")
    key = dep.certs.supernode_keys[0] if dep.certs else None
    node = dep.supernode_command(node_config(0, 2), key=key, runtime_port=9999)
    assert flags.check_argv([node[0]], node[1:]) == []
    assert ("--auth-supernode-private-key" in node) == (mode == "tls")
    for sub in (["run"], ["ls"], ["supernode", "register"], ["supernode", "ls"]):
        assert "--format" in flags.known_flags(["flwr", *sub])
    assert "--stream" in flags.known_flags(["flwr", "run"])
    dep.stop()


def test_auth_requires_tls(tmp_path):
    with pytest.raises(ValueError, match="TLS"):
        Deployment(ROOT, tmp_path, mode="insecure", auth=True)


# ---------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["tls", "insecure"])
def test_local_deployment_runs_two_rounds(tmp_path, mode):
    """SuperLink + 2 SuperNodes as real processes; TLS mode registers both keys first."""
    t0 = time.monotonic()
    workdir = tmp_path / "wd"
    log_path = tmp_path / "run.log"
    run_config = {**DEPLOY_FAST, "min-train-nodes": 2, "run-name": f"deploy-{mode}"}
    try:
        with Deployment(ROOT, workdir, mode=mode, output_root=tmp_path, env={"OMP_NUM_THREADS": "1"}) as dep:
            dep.start_superlink()
            nodes = [
                dep.start_supernode(i, 2, client_id=f"site-{i}", device_class=dc)
                for i, dc in enumerate(("laptop", "phone"))
            ]
            dep.wait_activated()
            if mode == "tls":
                assert all(n.node_id is not None for n in nodes)
                listed = {int(n["node-id"]): n["status"] for n in dep.list_supernodes()}
                assert listed == {n.node_id: "online" for n in nodes}
            with open(log_path, "w") as log:
                result = dep.run(run_config, timeout=300, stream_to=log)
            assert result.ok, (result, log_path.read_text()[-3000:], dep.superlink_log()[-3000:])
            if mode == "tls":
                assert "https://" in dep.superlink_log()
        rounds = read_metrics(tmp_path / "outputs" / f"deploy-{mode}")
        assert [r["round"] for r in rounds] == [0, 1, 2]
        last = rounds[-1]
        # client ids come from the node config, not from partition ids
        assert set(last["assignment"]) == {"site-0", "site-1"}
        assert last["failures"] == 0 and last["bytes_down"] < last["dense_bytes_down"]
        assert not left_over(workdir)
    finally:
        print(f"deployment ({mode}) took {time.monotonic() - t0:.0f}s")
