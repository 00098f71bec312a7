"""Run fedmoe on real Flower deployment processes: one SuperLink, N SuperNodes, ``flwr run``.

``python -m deploy.local --mode insecure|tls --supernodes N --rounds R [--run-config "k=v ..."]``

starts one ``flower-superlink`` (deployment runtime, not ``--simulation``; Fleet, Control
and Runtime APIs share its one ``--port``) and N ``flower-supernode`` processes on free
loopback ports, each with its own ``FLWR_HOME`` and a node config
``partition-id=i num-partitions=N client-id='site-i' device-class='...'``; then submits the
app with ``flwr run . fedmoe-local --stream`` through a private ``FLWR_HOME/config.toml``
and asks the SuperLink for the run's final status (``flwr run --stream`` exits 0 even
when the run failed). ServerApp and ClientApps run in Flower's default ``subprocess``
isolation (each SuperLink/SuperNode starts its own ``flower-superexec``).

``--mode tls`` creates a private CA, a SuperLink certificate and one EC P-384 key pair per
SuperNode (``deploy/certs.py``), starts the SuperLink with ``--enable-supernode-auth``,
registers every SuperNode's public key with ``flwr supernode register`` and gives each
SuperNode its private key (``--auth-supernode-private-key``). Everything started is
stopped by process group and reaped by ``FLWR_HOME`` at the end, also on errors and
Ctrl-C. Runtime dependency installation is disabled: apps run in this environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from deploy.certs import CertPaths, make_certificates, supernode_keypair
from fedmoe_app.tools.launch import (
    CONNECTION,
    free_port,
    reap,
    run_config_arg,
    stop_process_group,
    toml_value,
)

Mode = Literal["insecure", "tls"]
MODES: tuple[Mode, ...] = ("insecure", "tls")
#: Log line a SuperNode prints once the SuperLink accepted (activated) it.
ACTIVATED = "SuperNode ID:"
#: Log line of a SuperNode whose key the SuperLink refused.
ACTIVATION_FAILED = "Failed to activate SuperNode"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")
_PROBE = (
    "import ssl,sys,urllib.request\n"
    "ctx=ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else None\n"
    "try:\n"
    "    r=urllib.request.urlopen(sys.argv[1],timeout=2,context=ctx)\n"
    "    sys.exit(0 if r.status==200 else 1)\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


def node_config(
    partition_id: int | None,
    num_partitions: int | None,
    *,
    client_id: str | None = None,
    device_class: str | None = None,
    data_path: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
    data_key: str = "data-path",
) -> str:
    """Build the ``--node-config`` string of a fedmoe SuperNode.

    Parameters
    ----------
    partition_id, num_partitions : int | None
        Which data partition this node trains on, out of how many; ``None`` (both) for a
        node with its own ``data_path``.
    client_id : str | None
        Stable client id the server keys alignment state on (default: the partition id;
        required with ``data_path``).
    device_class : str | None
        Emulated device class reported in the capacity profile (``tiny``, ``phone``,
        ``laptop``, ``edge`` or ``measured``); ``None`` measures the machine.
    data_path : str | Path | None
        The node's own data folder (node config ``data-path``; see
        ``fedmoe_app/data/local.py`` for the formats), used instead of a partition.
    extra : Mapping[str, Any] | None
        Further ``key=value`` pairs.
    data_key : str
        The key that names ``data_path``: ``data-path``, or its alias ``dataset-path``.

    Returns
    -------
    str
        E.g. ``partition-id=0 num-partitions=3 client-id="site-0" device-class="phone"``.

    """
    items: dict[str, Any] = {}
    if partition_id is not None or num_partitions is not None or data_path is None:
        if partition_id is None or num_partitions is None or not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
        items = {"partition-id": partition_id, "num-partitions": num_partitions}
    if data_path is not None and client_id is None:
        raise ValueError("a node with a data-path needs a client-id")
    if client_id is not None:
        items["client-id"] = str(client_id)
    if device_class is not None:
        items["device-class"] = str(device_class)
    if data_key not in ("data-path", "dataset-path"):
        raise ValueError(f"data_key {data_key!r}: allowed 'data-path' or 'dataset-path'")
    if data_path is not None:
        items[data_key] = str(Path(data_path).resolve())
    items.update(extra or {})
    for key, value in items.items():
        pattern = _PATH if key in ("data-path", "dataset-path") else _NAME
        if isinstance(value, str) and not pattern.match(value):
            allowed = "letters, digits, '_', '.', '-'" + (", '/'" if pattern is _PATH else "")
            raise ValueError(f"node-config {key}={value!r}: use {allowed} only")
    return " ".join(f"{k}={toml_value(v)}" for k, v in items.items())


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """``config.toml`` text with one SuperLink connection named :data:`CONNECTION`."""
    lines = [
        "[superlink]",
        f"default = {toml_value(CONNECTION)}",
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {toml_value(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"


def _json_from(text: str) -> Any:
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in output: {text[-500:]!r}")
    return json.loads(text[start:])


@dataclass
class SuperNodeHandle:
    """A running (or exited) ``flower-supernode`` process started by :class:`Deployment`."""

    name: str
    proc: subprocess.Popen
    home: Path
    log_path: Path
    node_config: str
    key: Path | None = None
    node_id: int | None = None

    def log_text(self) -> str:
        """Everything the SuperNode wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def activated(self) -> bool:
        """Whether the SuperLink accepted this SuperNode."""
        return ACTIVATED in self.log_text()


@dataclass
class RunResult:
    """Outcome of one ``flwr run``."""

    code: int
    status: str | None
    run_id: str | None = None

    @property
    def ok(self) -> bool:
        """``True`` when ``flwr run`` exited 0 and the SuperLink reports ``finished:completed``."""
        return self.code == 0 and self.status == "finished:completed"


@dataclass
class Deployment:
    """One SuperLink, any number of SuperNodes and the ``flwr`` CLI, as local processes.

    Use it as a context manager; :meth:`stop` (also on exceptions) stops every process
    it started by process group and reaps leftovers by ``FLWR_HOME``.

    Parameters
    ----------
    app_dir : Path
        The Flower app (folder with ``pyproject.toml``).
    workdir : Path | None
        Holds certificates, every process's ``FLWR_HOME`` and logs; a temporary folder
        (removed by :meth:`stop` unless ``keep``) when ``None``.
    mode : {"insecure", "tls"}
        Plain HTTP, or TLS on every SuperLink API.
    auth : bool | None
        SuperNode authentication (``--enable-supernode-auth``); default: on with TLS.
        Flower only allows it with TLS.
    link_host : str
        Address the SuperLink binds (``--host``); ``0.0.0.0`` for every interface.
    link_port : int | None
        SuperLink port (``--port``); a free port when ``None``.
    link_address : str | None
        ``host:port`` SuperNodes and the CLI dial; default ``link_host:link_port``
        (``127.0.0.1`` for a ``0.0.0.0`` bind).
    link_prefix : Sequence[str]
        Command prefix for the SuperLink and the ``flwr`` CLI, e.g.
        ``("ip", "netns", "exec", "ns0")`` to run them in a network namespace.
    sans : Sequence[str]
        Extra names/IPs for the SuperLink certificate (the dialled host is added).
    output_root : Path | None
        Where the ServerApp writes ``outputs/<run-name>`` (``$FEDMOE_OUTPUT_ROOT``);
        default ``app_dir``.
    keep : bool
        Keep a temporary ``workdir`` after :meth:`stop`.
    env : Mapping[str, str]
        Extra environment for every process (e.g. ``{"OMP_NUM_THREADS": "1"}``).
    certs : CertPaths | None
        Existing CA/server certificate (TLS); created in ``workdir/certs`` when ``None``.

    """

    app_dir: Path = Path(".")
    workdir: Path | None = None
    mode: Mode = "insecure"
    auth: bool | None = None
    link_host: str = "127.0.0.1"
    link_port: int | None = None
    link_address: str | None = None
    link_prefix: Sequence[str] = ()
    sans: Sequence[str] = ()
    output_root: Path | None = None
    keep: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    certs: CertPaths | None = None
    supernodes: list[SuperNodeHandle] = field(default_factory=list, init=False)
    superlink: subprocess.Popen | None = field(default=None, init=False)
    _procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list, init=False)
    _own_workdir: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.auth is None:
            self.auth = self.mode == "tls"
        if self.auth and self.mode != "tls":
            raise ValueError("SuperNode authentication needs TLS (mode='tls')")
        self.app_dir = Path(self.app_dir).resolve()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedmoe-deploy-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output_root = Path(self.output_root).resolve() if self.output_root else self.app_dir
        if self.link_port is None:
            self.link_port = free_port()
        if self.link_address is None:
            host = "127.0.0.1" if self.link_host in ("0.0.0.0", "") else self.link_host
            self.link_address = f"{host}:{self.link_port}"

    # ------------------------------------------------------------------ helpers
    @property
    def tls(self) -> bool:
        """Whether the SuperLink serves TLS."""
        return self.mode == "tls"

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI (holds ``config.toml``)."""
        return self._dir / "cli"

    @property
    def link_home(self) -> Path:
        """``FLWR_HOME`` of the SuperLink (and its ServerApp processes)."""
        return self._dir / "superlink"

    @property
    def _dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(
            FLWR_HOME=str(home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            **extra,
        )
        return env

    def spawn(self, name: str, cmd: Sequence[str], **extra_env: str) -> subprocess.Popen:
        """Start ``cmd`` in its own session, ``FLWR_HOME=<workdir>/<name>``, log ``<workdir>/<name>.log``.

        Every process started this way is stopped by :meth:`stop`.
        """
        home = self._dir / name
        log_path = self._dir / f"{name}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                env=self._env(home, **extra_env),
                cwd=self.app_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._procs.append((proc, home))
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with the deployment's CLI ``FLWR_HOME`` (and ``link_prefix``)."""
        return subprocess.run(
            [*self.link_prefix, "flwr", *args],
            env=self._env(self.cli_home),
            cwd=self.app_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def _flwr_json(self, *args: str) -> Any:
        proc = self.flwr(*args, "--format", "json")
        try:
            return _json_from(proc.stdout)
        except ValueError as exc:
            raise RuntimeError(
                f"`flwr {' '.join(args)}` failed ({proc.returncode}): "
                f"{proc.stdout[-800:]} {proc.stderr[-800:]}"
            ) from exc

    # ------------------------------------------------------------------ SuperLink
    def superlink_command(self) -> list[str]:
        """Return the ``flower-superlink`` command line (without ``link_prefix``)."""
        cmd = ["flower-superlink"]
        if self.tls:
            assert self.certs is not None
            cmd += [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        else:
            cmd.append("--insecure")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        cmd += [
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            self.link_host,
            "--port",
            str(self.link_port),
        ]
        return cmd

    def start_superlink(self, timeout: float = 120, command: Sequence[str] | None = None) -> None:
        """Create certificates (TLS), start the SuperLink, wait for ``/health``, write the CLI config.

        ``command`` replaces :meth:`superlink_command` (e.g. a command line taken from a
        compose file); it must serve on this deployment's ``link_address``.
        """
        if self.tls and self.certs is None:
            host = str(self.link_address).rsplit(":", 1)[0].strip("[]")
            self.certs = make_certificates(self._dir / "certs", sans=[host, *self.sans])
        self.superlink = self.spawn(
            "superlink",
            [*self.link_prefix, *(command or self.superlink_command())],
            FEDMOE_OUTPUT_ROOT=str(self.output_root),
        )
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            connection_toml(str(self.link_address), self.certs.ca_cert if self.certs else None)
        )
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 120) -> None:
        """Wait until the SuperLink answers ``GET /health`` (over TLS in TLS mode)."""
        assert self.superlink is not None
        url = f"{'https' if self.tls else 'http'}://{self.link_address}/health"
        cafile = str(self.certs.ca_cert) if self.certs else ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.superlink.returncode}:\n"
                    f"{self.superlink_log()[-2000:]}"
                )
            if self._probe(url, cafile):
                return
            time.sleep(0.5)
        raise RuntimeError(f"flower-superlink not healthy at {url} within {timeout:.0f}s")

    def _probe(self, url: str, cafile: str) -> bool:
        if self.link_prefix:  # another network namespace: probe from inside it
            probe = subprocess.run(
                [*self.link_prefix, sys.executable, "-c", _PROBE, url, cafile],
                capture_output=True,
                timeout=30,
            )
            return probe.returncode == 0
        ctx = ssl.create_default_context(cafile=cafile) if cafile else None
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return resp.status == 200
        except OSError:
            return False

    def superlink_log(self) -> str:
        """Everything the SuperLink wrote so far."""
        path = self._dir / "superlink.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------ SuperNodes
    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key with ``flwr supernode register``; return its node id."""
        out = self._flwr_json("supernode", "register", str(public_key), CONNECTION)
        if not out.get("success"):
            raise RuntimeError(f"registering {public_key} failed: {out}")
        return int(out["node-id"])

    def list_supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls`` as a list of ``{"node-id", "status", ...}``.

        Raises ``RuntimeError`` on an error reply (e.g. the SuperLink is not serving yet).
        """
        out = self._flwr_json("supernode", "ls", CONNECTION)
        if not out.get("success"):
            raise RuntimeError(f"`flwr supernode ls` failed: {out}")
        return list(out.get("nodes", []))

    def supernode_command(
        self, config: str, *, key: Path | None, runtime_port: int, superlink: str | None = None
    ) -> list[str]:
        """Return the ``flower-supernode`` command line (without a prefix)."""
        cmd = ["flower-supernode"]
        if self.tls:
            assert self.certs is not None
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
        else:
            cmd.append("--insecure")
        cmd += ["--superlink", superlink or str(self.link_address)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += [
            "--node-config",
            config,
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(runtime_port),
        ]
        return cmd

    def start_supernode(
        self,
        partition_id: int | None,
        num_partitions: int | None,
        *,
        client_id: str | None = None,
        device_class: str | None = None,
        data_path: str | Path | None = None,
        name: str | None = None,
        register: bool = True,
        key: Path | None = None,
        prefix: Sequence[str] = (),
        superlink: str | None = None,
        runtime_port: int | None = None,
        data_key: str = "data-path",
    ) -> SuperNodeHandle:
        """Start one SuperNode (generating and, if ``register``, registering its auth key).

        Parameters
        ----------
        partition_id, num_partitions, client_id, device_class, data_path, data_key
            The node config (see :func:`node_config`).
        name : str | None
            Label for its ``FLWR_HOME``, log and key files (default ``node-<partition>``,
            or ``node-<client-id>`` for a node with its own ``data_path``).
        register : bool
            With authentication, register the node's public key first; ``False`` starts a
            node the SuperLink does not know (it is refused).
        key : Path | None
            Existing OpenSSH EC private key; one is generated when ``None`` (auth only).
        prefix : Sequence[str]
            Command prefix, e.g. ``("ip", "netns", "exec", "ns1")``.
        superlink : str | None
            ``host:port`` this node dials (default: the deployment's ``link_address``).
        runtime_port : int | None
            Port of the SuperNode's local Runtime API (``--port``; free port if ``None``).

        Returns
        -------
        SuperNodeHandle
            The process, its log and (with auth) its key and registered node id.

        """
        name = name or f"node-{partition_id if partition_id is not None else client_id}"
        config = node_config(
            partition_id,
            num_partitions,
            client_id=client_id,
            device_class=device_class,
            data_path=data_path,
            data_key=data_key,
        )
        node_id = None
        if self.auth:
            if key is None:
                (self._dir / "keys").mkdir(exist_ok=True)
                key = self._dir / "keys" / f"supernode-{name}"
                supernode_keypair(key)
            if register:
                node_id = self.register(Path(f"{key}.pub"))
        cmd = self.supernode_command(
            config, key=key, runtime_port=runtime_port or free_port(), superlink=superlink
        )
        label = f"supernode-{name}"
        proc = self.spawn(label, [*prefix, *cmd])
        handle = SuperNodeHandle(
            name, proc, self._dir / label, self._dir / f"{label}.log", config, key, node_id
        )
        self.supernodes.append(handle)
        return handle

    def wait_activated(self, handles: Sequence[SuperNodeHandle] | None = None, timeout: float = 120) -> None:
        """Wait until the SuperLink accepted ``handles`` (default: all started SuperNodes)."""
        handles = list(self.supernodes if handles is None else handles)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [h for h in handles if not h.activated]
            if not pending:
                return
            for h in pending:
                if h.proc.poll() is not None:
                    raise RuntimeError(
                        f"SuperNode {h.name} exited ({h.proc.returncode}):\n{h.log_text()[-2000:]}"
                    )
            time.sleep(0.5)
        raise RuntimeError(f"SuperNodes not activated within {timeout:.0f}s: {[h.name for h in pending]}")

    def kill_supernode(self, handle: SuperNodeHandle, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a SuperNode's whole process group (SuperNode, SuperExec, ClientApp)."""
        try:
            os.killpg(handle.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            handle.proc.wait()

    # ------------------------------------------------------------------ runs
    def start_run(
        self, run_config: Mapping[str, Any] | str | None = None, stream_to: IO[Any] | None = None
    ) -> subprocess.Popen:
        """Submit the app with ``flwr run APP fedmoe-local --stream``; return that process."""
        cmd = [*self.link_prefix, "flwr", "run", str(self.app_dir), CONNECTION, "--stream"]
        cmd += run_config_arg(run_config)
        proc = subprocess.Popen(
            cmd,
            env=self._env(self.cli_home),
            cwd=self.app_dir,
            stdout=stream_to if stream_to is not None else sys.stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append((proc, self.cli_home))
        return proc

    def wait_run(self, proc: subprocess.Popen, timeout: float | None = None) -> RunResult:
        """Wait for a :meth:`start_run` process; return exit code and the SuperLink's run status."""
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            stop_process_group(proc)
        run = self.last_run()
        return RunResult(
            code,
            run.get("status") if run else None,
            str(run["run-id"]) if run and "run-id" in run else None,
        )

    def run(
        self,
        run_config: Mapping[str, Any] | str | None = None,
        *,
        timeout: float | None = None,
        stream_to: IO[Any] | None = None,
    ) -> RunResult:
        """Submit the app, stream its log to ``stream_to`` and wait for the result."""
        return self.wait_run(self.start_run(run_config, stream_to), timeout)

    def last_run(self) -> dict[str, Any] | None:
        """Return the newest run on the SuperLink (``flwr ls --format json``), or ``None``."""
        try:
            runs = self._flwr_json("ls", CONNECTION).get("runs", [])
        except RuntimeError:
            return None
        return max(runs, key=lambda r: r.get("created-at", "")) if runs else None

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Stop every process this deployment started (SIGTERM, then SIGKILL) and reap leftovers."""
        alive = [(p, h) for p, h in self._procs if p.poll() is None]
        for proc, _ in reversed(alive):  # SuperNodes first, then the SuperLink
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, _ in reversed(self._procs):
            stop_process_group(proc, grace=10)
        for home in dict.fromkeys(h for _, h in self._procs):
            reap(home)
        self._procs.clear()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


DEVICE_CYCLE = ("laptop", "phone", "edge")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``python -m deploy.local``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app-dir", default=".", help="the Flower app (default: .)")
    parser.add_argument("--mode", choices=MODES, default="insecure")
    parser.add_argument("--no-auth", action="store_true", help="TLS without SuperNode authentication")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="num-server-rounds")
    parser.add_argument(
        "--run-config", default="", help="more overrides, e.g. \"dataset='synthetic' policy='greedy'\""
    )
    parser.add_argument(
        "--device-classes",
        default=",".join(DEVICE_CYCLE),
        help="device-class per SuperNode, cycled (comma-separated; '' to measure the machine)",
    )
    parser.add_argument("--client-id-prefix", default="site-", help="client-id = PREFIX<partition-id>")
    parser.add_argument(
        "--data-paths",
        default="",
        help="comma-separated data folders, one SuperNode each (node config data-path, client-id = "
        "folder name; replaces --supernodes and partitions)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="SuperLink bind address")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    parser.add_argument("--workdir", default=None, help="certs, FLWR_HOMEs and logs (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--output-root", default=None, help="where outputs/<run-name> goes (default: app)")
    parser.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stop the deployment on `kill` as on Ctrl-C

    classes = [c for c in args.device_classes.split(",") if c]
    dep = Deployment(
        Path(args.app_dir),
        Path(args.workdir) if args.workdir else None,
        mode=args.mode,
        auth=False if args.no_auth else None,
        link_host=args.host,
        link_port=args.port,
        output_root=Path(args.output_root) if args.output_root else None,
        keep=args.keep,
    )
    try:
        with dep:
            dep.start_superlink()
            print(f"fedmoe: SuperLink ({args.mode}) at {dep.link_address}; workdir {dep.workdir}", flush=True)
            paths = [Path(p) for p in args.data_paths.split(",") if p]
            for i in range(len(paths) or args.supernodes):
                h = dep.start_supernode(
                    None if paths else i,
                    None if paths else args.supernodes,
                    client_id=paths[i].name if paths else f"{args.client_id_prefix}{i}",
                    device_class=classes[i % len(classes)] if classes else None,
                    data_path=paths[i] if paths else None,
                )
                print(f"fedmoe: SuperNode {h.name}: {h.node_config}", flush=True)
            dep.wait_activated()
            run_config = f"num-server-rounds={args.rounds} {args.run_config}".strip()
            result = dep.run(run_config, timeout=args.timeout)
            print(f"fedmoe: run {result.run_id}: {result.status} (flwr run exit {result.code})", flush=True)
            return 0 if result.ok else (result.code or 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
