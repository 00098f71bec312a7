"""The simulation runs on a Ray cluster started outside Flower, and work lands on every node.

A Ray head and a second Ray node (each 1 CPU, their own custom resource) are started on this
machine with ``ray start``, as docs/SCALE.md tells a user to on several hosts; the app is run
by the launcher with ``ray_address`` (``RAY_ADDRESS`` for the SuperLink that runs the
simulation). Every train reply names the Ray node it ran on (``ray_nodes`` in the metrics
row); both nodes must appear. Every process the cluster started is stopped by process group
and found by a marker in its environment, so none is left, even when the test fails. (Never
``ray stop``: it would stop every Ray on the machine, not only this test's.)
"""

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, read_metrics

from fedmoe_app.tools.launch import free_port, launch, processes_of, reap, stop_process_group

pytestmark = pytest.mark.slow

RAY_NODE_LINE = re.compile(r"^\s*1 node_([0-9a-f]+)\s*$", re.MULTILINE)


def _ray_start(args, env, log_path):
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                "ray",
                "start",
                "--block",
                "--disable-usage-stats",
                f"--object-store-memory={80 * 2**20}",
                *args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _cluster_nodes(address, env):
    proc = subprocess.run(
        ["ray", "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
    )
    active = proc.stdout.split("Pending:")[0]
    return set(RAY_NODE_LINE.findall(active))


@pytest.fixture
def ray_cluster(tmp_path):
    """Start a two-node Ray cluster (head + one more node); yield (address, node ids)."""
    # Ray's socket paths must stay short: a temp dir right under /tmp, not pytest's tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="fedmoe-ray-", dir="/tmp"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", FLWR_HOME=str(temp_dir))  # FLWR_HOME: marker
    port = free_port()
    address = f"127.0.0.1:{port}"
    started = []
    try:
        started.append(
            _ray_start(
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--num-cpus=1",
                    '--resources={"fedmoe-head": 1}',
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=false",
                    f"--dashboard-port={free_port()}",
                    f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                ],
                env,
                tmp_path / "ray-head.log",
            )
        )
        nodes: set[str] = set()
        deadline = time.monotonic() + 120
        worker = None
        while time.monotonic() < deadline:
            for proc in started:
                assert proc.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            nodes = _cluster_nodes(address, env)
            if nodes and worker is None:
                worker = _ray_start(
                    [
                        f"--address={address}",
                        "--node-ip-address=127.0.0.1",
                        "--num-cpus=1",
                        '--resources={"fedmoe-worker": 1}',
                        f"--dashboard-agent-listen-port={free_port()}",
                        f"--metrics-export-port={free_port()}",
                    ],
                    env,
                    tmp_path / "ray-worker.log",
                )
                started.append(worker)
            if len(nodes) == 2:
                break
            time.sleep(1.0)
        assert len(nodes) == 2, f"cluster nodes: {nodes}"
        yield address, nodes
    finally:
        for proc in reversed(started):
            stop_process_group(proc, grace=10.0)
        reap(temp_dir, grace=10.0)
        left = [p.pid for p in processes_of(temp_dir)]
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
        assert not left, f"Ray processes left running: {left}"


def test_simulation_runs_on_every_node_of_an_existing_ray_cluster(ray_cluster, tmp_path):
    address, cluster_nodes = ray_cluster
    home = tmp_path / "flwr-home"
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        code = launch(
            ROOT,
            num_supernodes=4,
            run_config={
                **FAST,
                "num-server-rounds": 2,
                "fraction-evaluate": 0.0,
                "max-samples-per-client": 64,
                "central-eval-samples": 64,
                "run-name": "ray-cluster",
            },
            flwr_home=home,
            output_root=tmp_path,
            timeout=300,
            stream_to=log,
            ray_address=address,
        )
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    rows = [r for r in read_metrics(tmp_path / "outputs" / "ray-cluster") if r["round"] > 0]
    assert [r["round"] for r in rows] == [1, 2]
    ran_on = {node for r in rows for node in r["ray_nodes"].values()}
    # two actors of 1 CPU each on two nodes of 1 CPU each: one actor per node, both train;
    # a private Ray started by the simulation would report a node id outside the cluster
    assert ran_on == cluster_nodes, json.dumps([r["ray_nodes"] for r in rows])
    assert all(len(r["ray_nodes"]) == r["valid_replies"] == 4 for r in rows)
    assert not processes_of(home)
