"""Run the Docker Compose topology (compose.yml + compose.tls.yml) as local processes.

Without a Docker engine (tests/deploy/test_docker_e2e.py runs the real containers), this runs
exactly the command lines of every compose
service (SuperLink, SuperExec for the ServerApp, SuperNodes, one SuperExec per SuperNode;
isolation ``process``; TLS + SuperNode authentication) with container host names mapped
to 127.0.0.1, ports to free ports, ``/certs`` to freshly generated certificates and
``/app`` (the SuperLink's database) to a temporary folder.
It proves the services' flags, ports and certificate wiring work together end to end.
"""

import re
import time

import pytest
from conftest import ROOT, read_metrics
from test_deploy import DEPLOY_FAST, left_over

from deploy import compose
from deploy.certs import make_certificates
from deploy.local import ACTIVATED, Deployment
from fedmoe_app.tools.launch import free_port

pytestmark = pytest.mark.slow

DOCKER = ROOT / "docker"
_ADDR = re.compile(r"^([A-Za-z0-9_.-]+):(\d+)$")


def rewrite(argv, ports, certs_dir):
    """Map container host names/ports/paths of one service's argv to this machine."""
    out = []
    for i, tok in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev == "--port":
            tok = str(ports[tok])
        elif tok == "0.0.0.0":
            tok = "127.0.0.1"
        elif tok.startswith("/certs/"):
            tok = str(certs_dir / tok.removeprefix("/certs/"))
        elif tok.startswith("/app/"):  # e.g. the SuperLink's --database on its volume
            tok = str(certs_dir.parent / tok.removeprefix("/app/"))
        elif m := _ADDR.match(tok):
            tok = f"127.0.0.1:{ports[m.group(2)]}"
        out.append(tok)
    return out


@pytest.mark.timeout(420)
def test_compose_tls_topology_runs_as_processes(tmp_path):
    t0 = time.monotonic()
    services = compose.load(DOCKER / "compose.yml", DOCKER / "compose.tls.yml")["services"]
    argv = {name: compose.service_argv(svc, DOCKER) for name, svc in services.items()}
    ports = {}
    for cmd in argv.values():
        for i, tok in enumerate(cmd):
            if cmd[i - 1] == "--port":
                ports.setdefault(tok, free_port())
    supernodes = sorted(n for n in services if n.startswith("supernode-"))
    workdir = tmp_path / "wd"
    link_port = ports[argv["superlink"][argv["superlink"].index("--port") + 1]]
    certs = make_certificates(workdir / "certs", sans=["superlink"], supernodes=len(supernodes))
    with Deployment(
        ROOT,
        workdir,
        mode="tls",
        link_port=link_port,
        output_root=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
        certs=certs,
    ) as dep:
        local = {name: rewrite(cmd, ports, dep.certs.ca_cert.parent) for name, cmd in argv.items()}
        dep.start_superlink(command=local["superlink"])
        for i in range(len(supernodes)):
            dep.register(dep.certs.public_key(i))
        dep.spawn("superexec-serverapp", local["superexec-serverapp"], FEDMOE_OUTPUT_ROOT=str(tmp_path))
        procs = {name: dep.spawn(name, local[name]) for name in supernodes}
        for name in services:
            if name.startswith("superexec-clientapp-"):
                dep.spawn(name, local[name])

        def activated():
            for name, proc in procs.items():
                assert proc.poll() is None, (workdir / f"{name}.log").read_text()[-2000:]
            return all(ACTIVATED in (workdir / f"{n}.log").read_text() for n in supernodes)

        deadline = time.monotonic() + 120
        while not activated():
            assert time.monotonic() < deadline, "SuperNodes not activated"
            time.sleep(0.5)
        assert {n["status"] for n in dep.list_supernodes()} == {"online"}

        log_path = tmp_path / "run.log"
        run_config = {**DEPLOY_FAST, "min-train-nodes": len(supernodes), "run-name": "compose-tls"}
        with open(log_path, "w") as log:
            result = dep.run(run_config, timeout=300, stream_to=log)
        assert result.ok, (result, log_path.read_text()[-3000:])
    rounds = read_metrics(tmp_path / "outputs" / "compose-tls")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[-1]["assignment"]) == {f"site-{i}" for i in range(len(supernodes))}
    assert not left_over(workdir)
    print(f"compose topology took {time.monotonic() - t0:.0f}s")
