"""Run the app in local simulation with a private, self-cleaning SuperLink.

``fedmoe-launch [--num-supernodes N] [--run-config "k=v ..."]`` starts a
SuperLink in simulation mode on a free loopback port with its own ``FLWR_HOME``, runs
``flwr run . <connection> --stream`` against it, and stops the SuperLink (and every
process it started) by PID when the run ends, fails or is interrupted. Runtime
dependency installation is disabled: the app runs in the current environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import psutil
from flwr.common.config import parse_config_args

from ..config import ConfigError, RunConfig, is_model_factory
from ..run.tracking import tracking_problem
from .run_progress import MODES, Display, make_display

CONNECTION = "fedmoe-local"
# Ray starts simulated clients at nice 15, so they yield the CPU to everything else; a client
# here is the workload, not a background job. The environment's RAY_worker_niceness wins.
WORKER_NICENESS = "0"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    """Render a scalar as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def whole_if_integral(value: float) -> int | float:
    """``2.0`` → ``2``: Flower rejects floats where it expects whole resource counts."""
    return int(value) if float(value).is_integer() else float(value)


def run_config_arg(run_config: Mapping[str, Any] | str | None) -> list[str]:
    """``--run-config`` arguments for ``flwr run``."""
    if not run_config:
        return []
    if isinstance(run_config, str):
        return ["--run-config", run_config]
    return ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]


def run_config_problem(app_dir: Path, run_config: Mapping[str, Any] | str | None) -> str | None:
    """Validate the overrides over the app's defaults as the ServerApp will; the error, or None.

    Flower itself rejects an unknown key without naming it, and a value that only the
    ServerApp checks would start (and fail) the whole federation first. A user's model
    (``model = "package.module:factory"``) is imported here as the nodes will, with ``app_dir``
    first on the path: a bad module path or a missing factory stops the launch.
    """
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        return None  # not this app's folder: Flower will say so
    defaults = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    overrides = parse_config_args([run_config]) if isinstance(run_config, str) else dict(run_config or {})
    try:
        cfg = RunConfig.from_run_config({**defaults.get("config", {}), **overrides})
        if is_model_factory(cfg.model):
            from ..models.user_model import resolve_factory

            sys.path.insert(0, str(Path(app_dir).resolve()))
            try:
                resolve_factory(cfg.model)
            finally:
                sys.path.remove(str(Path(app_dir).resolve()))
    except ConfigError as exc:
        return str(exc)
    return tracking_problem(cfg.tracking_section)


def write_flower_config(flwr_home: Path, address: str) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one insecure connection to ``address``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until the SuperLink answers ``/health``; raise if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not become healthy within {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def processes_of(flwr_home: Path) -> list[psutil.Process]:
    """List processes whose environment names ``flwr_home`` (the run's SuperLink and children)."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        try:
            if (proc.info["environ"] or {}).get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_remaining(procs: list[psutil.Process], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``procs`` to exit, then SIGKILL those still alive."""
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def reap(flwr_home: Path, grace: float = 15.0) -> None:
    """Wait for the run's processes (Ray workers included) to exit; kill what remains."""
    kill_remaining(processes_of(flwr_home), grace)


def last_run_status(env: Mapping[str, str], app_dir: Path) -> str | None:
    """Status (e.g. ``finished:completed``) of the newest run on the SuperLink in ``env``."""
    proc = subprocess.run(
        ["flwr", "ls", CONNECTION, "--format", "json"],
        env=dict(env),
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(proc.stdout).get("runs", [])
    except json.JSONDecodeError:
        return None
    if not runs:
        return None
    newest = max(runs, key=lambda r: r.get("created-at", ""))
    return newest.get("status")


def launch_env(
    home: Path, app_dir: Path, output_root: str | Path | None, ray_address: str | None
) -> dict[str, str]:
    """Return the environment of the SuperLink and ``flwr run``: this process's, plus the run's settings.

    Parameters
    ----------
    home : Path
        The run's ``FLWR_HOME``.
    app_dir : Path
        The app's folder (resolved); put first on ``PYTHONPATH``.
    output_root : str | Path | None
        Where relative ``output-dir`` resolves (``FEDMOE_OUTPUT_ROOT``); ``app_dir`` if ``None``.
    ray_address : str | None
        ``RAY_ADDRESS`` of a Ray cluster to join; ``None`` keeps the environment's, if any.

    Returns
    -------
    dict of str to str
        The environment.

    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_worker_niceness=env.get("RAY_worker_niceness", WORKER_NICENESS),
        FEDMOE_OUTPUT_ROOT=str(Path(output_root).resolve() if output_root else app_dir),
        PYTHONPATH=os.pathsep.join(p for p in (str(app_dir), env.get("PYTHONPATH", "")) if p),
    )
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def superlink_command(port: int) -> list[str]:
    """Return the command of an insecure simulation SuperLink on ``127.0.0.1:port``."""
    return [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def flwr_run_command(
    app_dir: Path,
    num_supernodes: int,
    num_cpus: float,
    num_gpus: float,
    run_config: Mapping[str, Any] | str | None,
) -> list[str]:
    """Return the ``flwr run ... --stream`` command of the app against :data:`CONNECTION`."""
    cpus, gpus = (toml_value(whole_if_integral(n)) for n in (num_cpus, num_gpus))
    federation = (
        f"num_supernodes={num_supernodes} client_resources_num_cpus={cpus} client_resources_num_gpus={gpus}"
    )
    return [
        "flwr",
        "run",
        str(app_dir),
        CONNECTION,
        "--stream",
        "--federation-config",
        federation,
        *run_config_arg(run_config),
    ]


def pump_lines(stream: IO[bytes], display: Display) -> None:
    """Hand every line of ``stream`` (decoded; undecodable bytes replaced) to ``display`` until EOF.

    The pipe is drained to its end whatever the display does: a line it fails on is dropped
    (counted once on stderr), so ``flwr run`` never blocks on a full pipe.
    """
    failed = 0
    for raw in iter(stream.readline, b""):
        try:
            display.line(raw.decode("utf-8", errors="replace"))
        except Exception as exc:
            failed += 1
            if failed == 1:
                print(f"fedmoe: the log display failed ({exc!r}); draining the log", file=sys.stderr)


def _run_to_end(
    cmd: list[str], env: dict[str, str], app_dir: Path, out: Any, timeout: float | None, progress: str
) -> int:
    """Run ``flwr run`` (``cmd``) to its end; return its exit code, 124 on timeout, 1 if the run failed.

    The log is read through a pipe and shown by the ``progress`` display
    (:func:`.run_progress.make_display`). ``flwr run --stream`` exits 0 even when the run
    failed, so the SuperLink is asked for the run's status afterwards. The process group of
    ``flwr run`` is stopped in any case.
    """
    display = make_display(progress, out, Path(env["FEDMOE_OUTPUT_ROOT"]))
    run = subprocess.Popen(
        cmd, env=env, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert run.stdout is not None
    reader = threading.Thread(target=pump_lines, args=(run.stdout, display), daemon=True)
    reader.start()
    try:
        code = run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124
    finally:
        stop_process_group(run)
        reader.join(timeout=10)  # the group is gone: the pipe is at its end
        display.close()
        run.stdout.close()
    status = last_run_status(env, app_dir)
    if code == 0 and status != "finished:completed":
        print(f"fedmoe: run ended with status {status!r}", file=out, flush=True)
        return 1
    return code


def launch(
    app_dir: str | Path = ".",
    *,
    num_supernodes: int = 10,
    run_config: Mapping[str, Any] | str | None = None,
    flwr_home: str | Path | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    output_root: str | Path | None = None,
    timeout: float | None = None,
    stream_to: Any = None,
    ray_address: str | None = None,
    progress: str = "auto",
) -> int:
    """Run the Flower app at ``app_dir`` in local simulation; return ``flwr run``'s exit code.

    Parameters
    ----------
    app_dir : str | Path
        Folder holding the app's ``pyproject.toml``.
    num_supernodes : int
        Simulated SuperNodes (clients).
    run_config : Mapping | str | None
        Run-config overrides (a mapping, or ``flwr run``'s ``k=v`` string or TOML path).
    flwr_home : str | Path | None
        Flower home for this run; a temporary folder (removed afterwards) if ``None``.
    num_cpus, num_gpus : float
        Ray resources per simulated client (``client-resources``).
    output_root : str | Path | None
        Where relative ``output-dir`` resolves; defaults to ``app_dir``.
    timeout : float | None
        Seconds after which the run is stopped (exit code 124).
    stream_to : file object | None
        Where the run's log goes (default: this process's stdout).
    ray_address : str | None
        ``host:port`` of a running Ray cluster (``ray start --head``) the simulation joins
        instead of starting its own Ray (set as ``RAY_ADDRESS`` for the SuperLink, which
        runs the simulation; docs/SCALE.md); ``None``: the environment's ``RAY_ADDRESS``, if any.
    progress : str
        How the run's progress shows next to its log (:data:`.run_progress.MODES`): ``rich`` (a
        live bar with round i/N, elapsed, ETA, last metrics and bytes), ``plain`` (a
        ``fedmoe: progress ...`` line after each round), ``off``; ``auto``: ``rich`` when
        ``stream_to`` is a terminal, else ``plain``.

    """
    app_dir = Path(app_dir).resolve()
    out = stream_to if stream_to is not None else sys.stdout
    problem = run_config_problem(app_dir, run_config)
    if problem:
        print(f"fedmoe: {problem}", file=out, flush=True)
        return 2
    home = Path(flwr_home) if flwr_home else Path(tempfile.mkdtemp(prefix="fedmoe-flwr-"))
    port = free_port()
    write_flower_config(home, f"127.0.0.1:{port}")
    env = launch_env(home, app_dir, output_root, ray_address)
    with open(home / "superlink.log", "wb") as link_log:
        superlink = subprocess.Popen(
            superlink_command(port),
            env=env,
            cwd=app_dir,
            stdout=link_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(port, superlink)
            cmd = flwr_run_command(app_dir, num_supernodes, num_cpus, num_gpus, run_config)
            return _run_to_end(cmd, env, app_dir, out, timeout, progress)
        finally:
            stop_process_group(superlink)
            reap(home)
            if flwr_home is None:
                shutil.rmtree(home, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    """Return the command line's parser (``fedmoe-launch``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app_dir", nargs="?", default=".", help="app folder (default: .)")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument(
        "--run-config", default=None, help="overrides, e.g. \"num-server-rounds=3 policy='greedy'\""
    )
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per simulated client")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per simulated client")
    parser.add_argument("--flwr-home", default=None, help="keep Flower's state here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument(
        "--ray-address",
        default=None,
        help="join this running Ray cluster (host:port of `ray start --head`) instead of a private Ray",
    )
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="progress next to the log: a live bar (rich), a line per round (plain), off; "
        "auto: rich on a terminal, else plain",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser()
    options = vars(parser.parse_args(argv))  # every flag is a keyword of launch()
    return launch(options.pop("app_dir"), **options)


if __name__ == "__main__":
    sys.exit(main())
