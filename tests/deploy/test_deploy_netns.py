"""Multi-host deployment emulated with network namespaces (root only).

One namespace runs the SuperLink (TLS + SuperNode authentication) and the ``flwr`` CLI;
four others each run one SuperNode that reaches the SuperLink only by its address on a
private bridge (10.251.0.0/24, which exists only inside the test's namespaces):

* three SuperNodes whose public keys were registered train a 2-round run;
* a fourth SuperNode with an unregistered key is refused: the SuperLink logs
  ``No SuperNode found with the given public key`` (HTTP 412 on ``activate-node``), the
  SuperNode exits with "Failed to activate SuperNode" (Flower exit code 305) and never
  shows up in ``flwr supernode ls``;
* one registered SuperNode is killed (SIGKILL, whole process group) while it trains in
  round 1: the run still completes with the other two, and ``metrics.json`` counts the
  missing reply as a failure.
"""

import os
import time

import pytest
from conftest import ROOT, read_metrics
from test_deploy import DEPLOY_FAST, left_over

from deploy.local import ACTIVATION_FAILED, Deployment
from deploy.netns import NetnsLab, unavailable_reason

pytestmark = pytest.mark.slow

LINK_PORT = 9092
REFUSED_AT_LINK = "No SuperNode found with the given public key"
TRAIN_RECEIVED = "Receiving: train message"


@pytest.fixture(scope="module")
def netns_ok():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test skipped: {reason}")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(420)
def test_tls_auth_deployment_across_namespaces(netns_ok, tmp_path):
    t0 = time.monotonic()
    workdir = tmp_path / "wd"
    lab = NetnsLab(f"fm{os.getpid() % 100000}")
    dep = None
    try:
        link_host = lab.add_hub("link")
        hosts = [lab.add_host(f"n{i}") for i in range(4)]
        dep = Deployment(
            ROOT,
            workdir,
            mode="tls",
            link_host="0.0.0.0",
            link_port=LINK_PORT,
            link_address=f"{link_host.address}:{LINK_PORT}",
            link_prefix=link_host.prefix,
            output_root=tmp_path,
            env={"OMP_NUM_THREADS": "1"},
        )
        dep.start_superlink()
        nodes = [
            dep.start_supernode(
                i,
                3,
                client_id=f"host-{i}",
                device_class=("laptop", "phone", "edge")[i],
                prefix=hosts[i].prefix,
                runtime_port=9094,
            )
            for i in range(3)
        ]
        rogue = dep.start_supernode(
            0, 3, client_id="rogue", name="rogue", register=False, prefix=hosts[3].prefix, runtime_port=9094
        )

        # --- the unregistered key is refused
        rogue.proc.wait(timeout=120)
        assert rogue.proc.returncode != 0
        assert ACTIVATION_FAILED in rogue.log_text(), rogue.log_text()[-2000:]
        dep.wait_activated(nodes)
        assert REFUSED_AT_LINK in dep.superlink_log()
        listed = {int(n["node-id"]): n["status"] for n in dep.list_supernodes()}
        assert listed == {n.node_id: "online" for n in nodes}, listed  # the rogue never appears

        # --- SuperNodes reached the SuperLink by its bridge address, from other namespaces
        assert f"{link_host.address}:{LINK_PORT}" in nodes[0].proc.args
        assert nodes[0].proc.args[:4] == ["ip", "netns", "exec", hosts[0].netns]

        # --- run 2 rounds; kill one SuperNode while it trains in round 1
        run_config = {
            **DEPLOY_FAST,
            "min-train-nodes": 2,
            "round-timeout-s": 90.0,
            "run-name": "netns",
        }
        victim = nodes[2]
        log_path = tmp_path / "run.log"
        with open(log_path, "w") as log:
            run = dep.start_run(run_config, stream_to=log)
            wait_for(lambda: TRAIN_RECEIVED in victim.log_text() or run.poll() is not None, 240, "training")
            assert run.poll() is None, log_path.read_text()[-3000:]
            dep.kill_supernode(victim)
            result = dep.wait_run(run, timeout=300)
        assert result.ok, (result, log_path.read_text()[-3000:])

        rounds = read_metrics(tmp_path / "outputs" / "netns")
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert rounds[1]["failures"] >= 1  # the killed node's reply never came
        assert set(rounds[1]["assignment"]) == {"host-0", "host-1", "host-2"}
        survivors = {"host-0", "host-1"}
        assert survivors <= set(rounds[2]["assignment"]) <= {"host-0", "host-1", "host-2"}
        assert "rogue" not in {c for r in rounds[1:] for c in r["assignment"]}
    finally:
        still_running = []
        try:
            if dep is not None:
                dep.stop()
            still_running = lab.pids()
        finally:
            lab.destroy()  # kills whatever still runs inside, deletes the namespaces
        print(f"netns deployment took {time.monotonic() - t0:.0f}s")
    assert still_running == []
    assert not left_over(workdir)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(lab.tag)]
