"""The docker/ Compose stack run for real: containers, a `flwr run`, a SuperNode killed mid-run.

SuperLink + 3 SuperNodes + 4 SuperExecs from docker/compose.yml (and compose.tls.yml),
through the test overlay docker/compose.test.yml: host networking on 127.0.0.1 and
locally built stand-ins for the flwr/* images (deploy/docker_stack.py builds them from a
debootstrapped Debian; no registry, no bridge network). Per stack: every SuperNode comes
online, a 2-round run starts, SuperNode 2's container is killed while it trains in
round 2, the run still finishes (`finished:completed`, not just exit code 0) and the
metrics read back from the `outputs` volume show round 1 with all three sites and round 2
with the failure counted. Insecure: every socket listens on 127.0.0.1 only, and a
restarted SuperLink still lists the run (state on its volume). TLS: the SuperNodes' keys
are registered first and each container mounts exactly the certificate files it uses.
Local DP (insecure): the image's `dp` and `hf` extras import inside the containers, and a
2-round run with `dp='local'` (the clients clip and noise, the ServerApp accounts with
Opacus) completes with every site in both rounds and its privacy spent reported.
Every container, network and volume, and a daemon the test started, are gone afterwards.
"""

import json
import os
import time

import flwr
import pytest
from conftest import ROOT
from test_deploy import DEPLOY_FAST

from deploy import docker_stack as ds
from deploy.certs import make_certificates
from deploy.local import Deployment, connection_toml

pytestmark = pytest.mark.slow

SUPERNODES = ("supernode-0", "supernode-1", "supernode-2")
SITES = {"site-0", "site-1", "site-2"}
VICTIM = "supernode-2"
TRAIN_RECEIVED = "Receiving: train message"
LINK = "127.0.0.1:8000"
BUILD_BUDGET_S = 1800


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Docker daemon + the overlay's images, built once for both stacks; stops a daemon it started.

    The build has its own time budget (``BUILD_BUDGET_S``; a cold build takes minutes):
    the tests' timeouts cover the test functions only (``func_only``).
    """
    reason = ds.unavailable_reason(need_debootstrap=ds.image_label(ds.BASE_IMAGE) is None)
    if reason:
        pytest.skip(f"Docker tests skipped: {reason}")
    workdir = tmp_path_factory.mktemp("docker-images")
    daemon = ds.Daemon.ensure(workdir)
    try:
        timings = {}
        t0 = time.monotonic()
        ds.build_images(
            workdir, flwr.__version__, compose_files("insecure"), stack_env(None), timings, BUILD_BUDGET_S
        )
        timings["total"] = time.monotonic() - t0
        print(f"docker images (s): {json.dumps({k: round(v) for k, v in timings.items()})}")
        yield timings
    finally:
        daemon.stop()
    if daemon.proc is not None:  # the daemon this session started is gone
        assert daemon.proc.poll() is not None
        assert ds.run(["docker", "info"], check=False, timeout=60).returncode != 0


def compose_files(mode):
    docker = ROOT / "docker"
    files = [docker / "compose.yml"] + ([docker / "compose.tls.yml"] if mode == "tls" else [])
    return [*files, docker / "compose.test.yml"]


def stack_env(certs_dir):
    env = {
        "FEDMOE_BIND_HOST": "127.0.0.1",
        "FLWR_VERSION": flwr.__version__,
        "FEDMOE_TEST_TORCH": ds.TEST_TORCH,
        "FEDMOE_TEST_TORCHVISION": ds.TEST_TORCHVISION,
    }
    if certs_dir is not None:
        env["FEDMOE_CERTS"] = str(certs_dir)
    return env


@pytest.fixture
def stack_for(images, tmp_path):
    """Factory of a Compose project for a mode; tears it down (also on failure) and checks it is gone."""
    made = []

    def make(mode, certs_dir=None):
        busy = ds.ports_in_use()
        assert not busy, f"ports {busy} are taken on this machine; the stack needs {ds.PORTS}"
        project = f"fedmoe-e2e-{mode}-{os.getpid()}"
        stack = ds.Stack(project, compose_files(mode), stack_env(certs_dir), tmp_path / "stack")
        made.append(stack)
        stack.config()
        return stack

    yield make
    for stack in made:
        stack.save_logs()
        left = stack.down()
        assert left == [], f"left behind: {left} (logs in {stack.workdir})"


def cli(tmp_path, ca_cert=None):
    """The `flwr` CLI with a private FLWR_HOME and a connection to the stack's SuperLink."""
    dep = Deployment(ROOT, tmp_path / "cli", mode="tls" if ca_cert else "insecure", link_port=8000)
    dep.cli_home.mkdir(parents=True, exist_ok=True)
    (dep.cli_home / "config.toml").write_text(connection_toml(LINK, ca_cert))
    return dep


def wait_online(dep, n, timeout=300):
    def online():
        try:
            return sum(node["status"] == "online" for node in dep.list_supernodes()) >= n
        except RuntimeError:
            return False

    wait_for(online, timeout, f"{n} SuperNodes online")


def run_and_kill_victim(stack, dep, tmp_path, run_name):
    """2 rounds; SuperNode 2's container is killed while it trains in round 2."""
    run_config = {**DEPLOY_FAST, "min-train-nodes": 3, "run-name": run_name}
    log_path = tmp_path / f"{run_name}.log"
    with open(log_path, "w") as log:
        run = dep.start_run(run_config, stream_to=log)
        wait_for(
            lambda: stack.logs(VICTIM).count(TRAIN_RECEIVED) >= 2 or run.poll() is not None,
            420,
            "round-2 training on the victim",
        )
        assert run.poll() is None, log_path.read_text()[-3000:]
        ds.run(["docker", "update", "--restart=no", stack.container(VICTIM)])  # it stays dead
        stack.kill(VICTIM)
        result = dep.wait_run(run, timeout=420)
    assert result.ok, (result, log_path.read_text()[-3000:])
    image = f"{ds.STANDIN_REPO}/superlink:{flwr.__version__}"
    rounds = json.loads(stack.read_volume("outputs", f"{run_name}/metrics.json", image))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[1]["assignment"]) == SITES and rounds[1]["failures"] == 0
    assert rounds[2]["failures"] >= 1  # the killed node's reply never came
    assert {"site-0", "site-1"} <= set(rounds[2]["assignment"]) <= SITES
    assert stack.read_volume("outputs", f"{run_name}/final_model.npz", image)[:2] == b"PK"
    return result


@pytest.mark.timeout(600, func_only=True)
def test_insecure_stack_runs_survives_a_killed_supernode_and_keeps_state(stack_for, tmp_path):
    t0 = time.monotonic()
    stack = stack_for("insecure")
    stack.up()
    dep = cli(tmp_path)
    wait_online(dep, 3)
    for port in ds.PORTS:  # host networking: nothing listens beyond loopback
        assert ds.listening_addresses(port) == ["127.0.0.1"], (port, ds.listening_addresses(port))
    result = run_and_kill_victim(stack, dep, tmp_path, "docker-insecure")
    # the SuperLink's state lives on its volume: a restarted SuperLink still lists the run
    stack.restart("superlink")

    def listed():  # {} while the SuperLink restarts (no answer, or an error answer without runs)
        try:
            runs = dep._flwr_json("ls", "fedmoe-local").get("runs", [])
        except RuntimeError:
            return {}
        return {r["run-id"]: r["status"] for r in runs}

    wait_for(lambda: listed().get(result.run_id) == "finished:completed", 120, "the run after a restart")
    print(f"insecure docker stack took {time.monotonic() - t0:.0f}s")


@pytest.mark.timeout(600, func_only=True)
def test_tls_auth_stack_runs_and_survives_a_killed_supernode(stack_for, tmp_path):
    t0 = time.monotonic()
    certs = make_certificates(tmp_path / "certs", sans=["superlink"], supernodes=3)
    keys = [certs.server_key, *certs.supernode_keys]
    # the containers run as UID 49999; the keys stay 0600, owned by that user
    for key in keys:
        os.chown(key, 49999, 49999)
    stack = stack_for("tls", certs.ca_cert.parent)
    stack.up("superlink", "superexec-serverapp")
    dep = cli(tmp_path, certs.ca_cert)
    wait_for(lambda: _answers(dep), 180, "a successful TLS call to the SuperLink")
    for i in range(3):
        _register(dep, certs.public_key(i))
    stack.up()
    wait_online(dep, 3)
    # each container mounts exactly the files it uses (never ca.key, never another node's key)
    expected = {
        "superlink": {"ca.crt", "server.pem", "server.key"},
        "superexec-serverapp": {"ca.crt"},
        **{f"supernode-{i}": {"ca.crt", f"supernode-{i}"} for i in range(3)},
        **{f"superexec-clientapp-{i}": set() for i in range(3)},
    }
    for service, files in expected.items():
        binds = {os.path.basename(m["Source"]) for m in stack.mounts(service) if m["Type"] == "bind"}
        assert binds == files, (service, binds)
    run_and_kill_victim(stack, dep, tmp_path, "docker-tls")
    print(f"tls docker stack took {time.monotonic() - t0:.0f}s")


def _answers(dep):
    """True once `flwr supernode ls` succeeds over TLS (an error reply does not count)."""
    try:
        dep.list_supernodes()
        return True
    except RuntimeError:
        return False


def _register(dep, public_key, tries=10):
    """``flwr supernode register``, retried a few times while the SuperLink settles."""
    for attempt in range(tries):
        try:
            return dep.register(public_key)
        except RuntimeError:
            if attempt == tries - 1:
                raise
            time.sleep(2)


@pytest.mark.timeout(600, func_only=True)
def test_insecure_stack_runs_local_dp_with_the_images_extras(stack_for, tmp_path):
    t0 = time.monotonic()
    stack = stack_for("insecure")
    stack.up()
    # the dp and hf extras are installed; peft is not imported: it imports torchvision, which does
    # not load next to the test image's CPU torch (docs/DEPLOYMENT.md)
    probe = (
        "import importlib.metadata as m, opacus.accountants, safetensors, tokenizers, transformers; "
        "print(transformers.__version__, m.version('peft'))"
    )
    proc = ds.run(
        ["docker", "exec", stack.container("superexec-serverapp"), "python", "-c", probe], timeout=300
    )
    assert proc.stdout.split()[0].startswith("5.") and proc.stdout.split()[1], (proc.stdout, proc.stderr)
    dep = cli(tmp_path)
    wait_online(dep, 3)
    run_name = "docker-dp-local"
    # z = 0.05 as in docs/PRIVACY.md's local-DP run: at the default z = 1 every coordinate gets noise of
    # std 1 and the model is NaN by round 2 (every reply then rejected, nothing accounted)
    run_config = {
        **DEPLOY_FAST,
        "min-train-nodes": 3,
        "dp": "local",
        "dp-noise-multiplier": 0.05,
        "run-name": run_name,
    }
    log_path = tmp_path / f"{run_name}.log"
    with open(log_path, "w") as log:
        result = dep.wait_run(dep.start_run(run_config, stream_to=log), timeout=420)
    assert result.ok, (result, log_path.read_text()[-3000:])
    image = f"{ds.STANDIN_REPO}/superlink:{flwr.__version__}"
    rounds = json.loads(stack.read_volume("outputs", f"{run_name}/metrics.json", image))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for row in rounds[1:]:  # every site trained, and the accountant reported the privacy spent
        assert set(row["assignment"]) == SITES and row["failures"] == 0 and not row["rejected"], row
        assert 0 < row["dp_epsilon_shared"] < float("inf"), row
    assert rounds[2]["dp_epsilon_shared"] > rounds[1]["dp_epsilon_shared"]  # privacy spent accumulates
    print(f"local-DP docker stack took {time.monotonic() - t0:.0f}s")
