"""The README's setup: ``scripts/setup.sh`` makes ``.venv``, where ``flwr run .`` works offline.

The slow test types what a Flower user types after setup (``source .venv/bin/activate``,
``flwr run . --stream``) with a private ``FLWR_HOME``, the managed local SuperLink on free
ports, and every network path blocked (dead proxy, ``UV_OFFLINE``, ``PIP_NO_INDEX``, an empty
uv cache). Each managed SuperLink it starts is stopped by PID. The same without the
setting the venv provides fails, so the test can tell the two apart.
"""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import ROOT

from fedmoe_app.tools.launch import free_port, processes_of

VENV = ROOT / ".venv"
PTH = ROOT / "scripts" / "fedmoe-venv.pth"
FAST_RUN = "dataset='synthetic' num-server-rounds=1 max-samples-per-client=100 central-eval-samples=200"


def _pth_env(env):
    """Environment a fresh interpreter has after running the .pth file's import line."""
    line = next(x for x in PTH.read_text().splitlines() if x.startswith("import "))
    code = line + "\nimport json, os; print(json.dumps(dict(os.environ)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_venv_pth_puts_the_venv_first_and_disables_runtime_installs():
    env = {k: v for k, v in os.environ.items() if k != "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"}
    env["PATH"] = "/usr/bin:/bin"
    got = _pth_env(env)
    assert got["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert got["PATH"] == os.path.join(sys.prefix, "bin") + os.pathsep + "/usr/bin:/bin"
    again = _pth_env({**env, "PATH": got["PATH"], "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "0"})
    assert again["PATH"] == got["PATH"]  # not prepended twice
    assert again["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "0"  # a user's explicit choice stays


def test_readme_runs_everything_from_the_venv():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for c in first_block.splitlines() if c and not c.startswith("#")]
    assert len(commands) == 2
    for command in commands:
        setup, run = command.split(" && ")
        assert setup.startswith("bash scripts/setup.sh") and run.startswith(".venv/bin/python -m ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh --test" in ci and ".venv/bin/python -m pytest -q" in ci
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [x for x in setup.splitlines() if "pip install" in x and not x.lstrip().startswith("#")]
    assert "-m venv" in setup and installs and all(x.lstrip().startswith('"$VPY" -m pip') for x in installs)


def _stop_managed_superlink(home):
    """Stop the SuperLink ``flwr`` started for ``home`` by PID (SIGTERM), then what is left."""
    procs = processes_of(home)
    for p in procs:
        if "flower-superlink" in " ".join(p.cmdline()):
            os.kill(p.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


def _flwr_run_in_venv(tmp_path, name, before_run=""):
    home = tmp_path / f"flwr-home-{name}"
    env = {k: v for k, v in os.environ.items() if k != "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"}
    env.update(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FEDMOE_OUTPUT_ROOT=str(tmp_path),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        UV_OFFLINE="1",
        UV_CACHE_DIR=str(tmp_path / "uv-cache"),
        PIP_NO_INDEX="1",
    )
    script = (
        f"source {VENV}/bin/activate && {before_run} "
        f"flwr run . --stream --run-config \"{FAST_RUN} run-name='{name}'\"; flwr ls --format json"
    )
    try:
        out = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
        )
    finally:
        stopped = _stop_managed_superlink(home)
    assert stopped, "flwr run started no SuperLink under the private FLWR_HOME"
    assert not processes_of(home)
    runs = json.loads(out.stdout[out.stdout.rfind('{\n  "success"') :] or "{}").get("runs", [])
    return [r["status"] for r in runs], out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file(), reason="no .venv: run bash scripts/setup.sh")
def test_flwr_run_in_the_venv_works_offline(tmp_path):
    status, log = _flwr_run_in_venv(tmp_path, "venv-offline")
    assert status == ["finished:completed"], log[-3000:]
    assert (tmp_path / "outputs" / "venv-offline" / "metrics.json").is_file()
    # without the venv's setting the managed SuperLink installs the app's dependencies: offline it fails
    status, log = _flwr_run_in_venv(
        tmp_path, "with-installs", "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=0 &&"
    )
    assert status == ["finished:failed"], log[-3000:]
    assert "Runtime installation of app dependencies failed" in log, log[-3000:]
