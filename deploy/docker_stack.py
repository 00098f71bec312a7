"""Run the ``docker/`` Compose stack for real on a machine without registry or bridge networks.

What ``tests/deploy/test_docker_e2e.py`` needs, as a library:

* :class:`Daemon`: use the Docker engine that runs, or start ``dockerd --bridge=none
  --iptables=false --ip-masq=false`` (no bridge, no firewall rules) and stop it by PID;
* :func:`build_images`: the local images the test overlay ``docker/compose.test.yml``
  names. A Debian bookworm base made with ``debootstrap`` (``local/bookworm``); stand-ins for
  ``flwr/superlink``, ``flwr/supernode`` and ``flwr/superexec`` from
  ``docker/test/Dockerfile`` (flwr only, one shared Python environment), then the app's
  image from the project's own ``docker/Dockerfile`` through ``docker-compose build``. pip
  inside both builds installs from wheels that ``pip download`` collects on this machine
  and an HTTP server on 127.0.0.1 hands out (no index is needed inside the build). Images
  are rebuilt only when their inputs change (a hash label or tag);
* :class:`Stack`: one Compose project from the project's compose files plus the overlay:
  ``docker-compose config`` merges them, ``ports`` are dropped (docker-compose 1.29 refuses
  them with host networking, where nothing is published), then ``build``/``up``/``kill``
  /``restart``, logs, files read back from named volumes, and :meth:`Stack.down`, which
  removes every container, network and volume of the project and reports what is left.

Everything runs through the ``docker`` and ``docker-compose`` command-line tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
BASE_IMAGE = "local/bookworm"
STANDIN_REPO = "fedmoe-test"
COMPONENTS = ("superlink", "supernode", "superexec")
#: Torch for the test images: the CPU build 2.13.0 (a 190 MB wheel) instead of the tested
#: 2.14.1 CUDA build (~3 GB with its CUDA libraries), to keep a cold build within minutes.
#: docker/compose.test.yml passes them to docker/Dockerfile as build arguments (same defaults).
TEST_TORCH = os.environ.get("FEDMOE_TEST_TORCH", "2.13.0+cpu")
TEST_TORCHVISION = os.environ.get("FEDMOE_TEST_TORCHVISION", "0.28.0")
#: Optional extras of pyproject.toml the app image installs (docker/Dockerfile's FEDMOE_EXTRAS default).
APP_EXTRAS = ("dp", "hf")
#: The app image docker/compose.test.yml builds (from docker/Dockerfile on the superexec stand-in).
APP_IMAGE = f"{STANDIN_REPO}/fedmoe-superexec"
#: Loopback port the wheel server prefers: a stable build argument keeps Docker's layer cache.
WHEEL_PORT = 18765
#: Host ports the stack uses with host networking (SuperLink, SuperNode Runtime APIs).
PORTS = (8000, 9094, 9095, 9096)
_HASH_LABEL = "org.fedmoe.inputs"
_NON_LOCAL = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|fedmoe)$", re.I)


def run(
    cmd: Sequence[str], *, timeout: float = 600, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing text output; on failure raise with the output's tail."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def unavailable_reason(need_debootstrap: bool = True) -> str | None:
    """Why the Docker tests cannot run here (``None``: they can)."""
    tools = ["docker", "docker-compose"] + (["debootstrap"] if need_debootstrap else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install docker.io docker-compose debootstrap)"
    if run(["docker", "info"], check=False, timeout=60).returncode != 0:
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            return "no Docker daemon reachable, and dockerd cannot be started here (needs root)"
    return None


class Deadline:
    """Seconds left of an overall time budget, for the timeouts of the steps within it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, step: float) -> float:
        """Return the smaller of ``step`` and the time left; raise when none is left."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the image build ran out of its time budget")
        return min(step, left)


@dataclass
class Daemon:
    """The Docker daemon the tests use; :meth:`stop` stops it only if :meth:`ensure` started it."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @classmethod
    def ensure(cls, log_dir: Path, timeout: float = 90) -> Daemon:
        """Return the running daemon, or start ``dockerd`` without bridge and firewall rules.

        A daemon started here runs at ``nice -n 10`` (and so do its builds and containers):
        it yields the CPUs to foreground work on a shared machine.
        """
        if run(["docker", "info"], check=False, timeout=60).returncode == 0:
            return cls()
        log_path = Path(log_dir) / "dockerd.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["nice", "-n", "10", "dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        daemon = cls(proc, log_path)
        deadline = time.monotonic() + timeout
        while run(["docker", "info"], check=False, timeout=60).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                daemon.stop()
                raise RuntimeError(f"dockerd did not come up:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        return daemon

    def stop(self) -> None:
        """Stop the daemon this object started (SIGTERM by PID, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def image_label(image: str) -> str | None:
    """Return the inputs hash an image was built with (``None``: no such image)."""
    proc = run(["docker", "image", "inspect", image], check=False, timeout=60)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout)[0]["Config"].get("Labels") or {}
    return str(labels.get(_HASH_LABEL, ""))


def ensure_base_image(workdir: Path, deadline: Deadline) -> bool:
    """Create ``local/bookworm`` with debootstrap unless it exists; return whether it was built."""
    if image_label(BASE_IMAGE) is not None:
        return False
    rootfs = Path(tempfile.mkdtemp(prefix="bookworm-", dir=workdir))
    try:
        run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            timeout=deadline.left(900),
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, timeout=deadline.left(600))
        tar.wait(timeout=60)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return True


def app_dependencies(extras: Sequence[str] = APP_EXTRAS) -> list[str]:
    """Return the dependencies of ``pyproject.toml`` plus those of its optional ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(d for e in extras for d in project["optional-dependencies"][e])]


def app_requirements(
    flwr_version: str, torch: str = TEST_TORCH, torchvision: str = TEST_TORCHVISION
) -> list[str]:
    """Return flwr, torch, torchvision pinned, plus the other dependencies of ``pyproject.toml``.

    The others include those of the extras the app image installs (:data:`APP_EXTRAS`).
    """
    deps = app_dependencies()
    pinned = {
        "flwr": f"flwr=={flwr_version}",
        "torch": f"torch=={torch}",
        "torchvision": f"torchvision=={torchvision}",
    }
    rest = [d for d in deps if re.split(r"[\[<>=!~ ;]", d)[0] not in pinned]
    return [*pinned.values(), *rest]


def local_constraints() -> list[str]:
    """``name==version`` of this environment's packages (minus torch/CUDA), so wheels match it."""
    from importlib import metadata

    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and not _NON_LOCAL.match(name):
            pins[name.lower()] = f"{name}=={dist.version}"
    return sorted(pins.values())


def download_wheels(requirements: Sequence[str], dest: Path, timeout: float) -> None:
    """``pip download`` the wheels of ``requirements`` (with their dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text("\n".join(requirements) + "\n")
    cons = dest / "constraints.txt"
    cons.write_text("\n".join(local_constraints()) + "\n")
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest),
         "-r", str(req), "-c", str(cons)], timeout=timeout)  # fmt: skip


class WheelServer:
    """``python -m http.server`` on a free loopback port serving a wheel folder (context manager)."""

    def __init__(self, folder: Path) -> None:
        from fedmoe_app.tools.launch import free_port

        self.port = WHEEL_PORT if not ports_in_use([WHEEL_PORT]) else free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                str(self.port),
                "--directory",
                str(folder),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )

    def __enter__(self) -> WheelServer:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def standin(component: str, flwr_version: str) -> str:
    """Tag of the local stand-in for ``flwr/<component>:<flwr_version>``."""
    return f"{STANDIN_REPO}/{component}:{flwr_version}"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def app_image_inputs() -> list[bytes | str]:
    """Return what the app image depends on: docker/Dockerfile, its context, the dependencies."""
    deps = app_dependencies()
    files = [DOCKER_DIR / "Dockerfile", DOCKER_DIR / "pip.conf", ROOT / ".dockerignore"]
    return [*(f.read_bytes() for f in files), "\n".join(deps), TEST_TORCH, TEST_TORCHVISION]


def build_images(
    workdir: Path,
    flwr_version: str,
    files: Sequence[Path],
    env: Mapping[str, str],
    timings: dict[str, float],
    budget: float = 1800,
) -> None:
    """Build ``local/bookworm``, the three stand-ins and the app image, each unless up to date.

    Parameters
    ----------
    workdir : Path
        Scratch space (debootstrap root, wheels, the merged compose file).
    flwr_version : str
        Flower version of the stand-ins (the tags compose.yml names).
    files : Sequence[Path]
        Compose files whose ``superexec-serverapp`` service builds the app image (the
        project's compose.yml + the test overlay).
    env : Mapping[str, str]
        Variables for the compose files.
    timings : dict[str, float]
        Receives the seconds each step took (``base``, ``wheels``, ``standins``, ``app-image``).
    budget : float
        Seconds the whole build may take.

    """
    deadline = Deadline(budget)
    timings.update(base=0.0, wheels=0.0, standins=0.0, app_image=0.0)
    t0 = time.monotonic()
    ensure_base_image(workdir, deadline)
    timings["base"] = time.monotonic() - t0
    dockerfile = (DOCKER_DIR / "test" / "Dockerfile").read_bytes()
    base_id = run(["docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE], timeout=60).stdout.strip()
    standin_digest = _digest(dockerfile, flwr_version, base_id)
    app_tag = f"{APP_IMAGE}:inputs-{_digest(standin_digest, *app_image_inputs())}"
    standins_ok = all(image_label(standin(c, flwr_version)) == standin_digest for c in COMPONENTS)
    if standins_ok and image_label(app_tag) is not None:
        return
    t0 = time.monotonic()
    wheels = workdir / "wheels"
    download_wheels(app_requirements(flwr_version), wheels, deadline.left(1200))
    timings["wheels"] = time.monotonic() - t0
    with WheelServer(wheels) as server:
        options = f"--no-index --find-links {server.url}"
        t0 = time.monotonic()
        if not standins_ok:
            context = workdir / "standin-context"
            context.mkdir(parents=True, exist_ok=True)
            shutil.copy(DOCKER_DIR / "test" / "Dockerfile", context / "Dockerfile")
            for component in COMPONENTS:  # the base stage is built once, then cached
                run(
                    ["docker", "build", "--network", "host", "--target", component,
                     "--label", f"{_HASH_LABEL}={standin_digest}",
                     "--build-arg", f"FLWR_VERSION={flwr_version}",
                     "--build-arg", f"PIP_INSTALL_OPTIONS={options}",
                     "-t", standin(component, flwr_version), str(context)],
                    timeout=deadline.left(1500),
                    env={**os.environ, "DOCKER_BUILDKIT": "0"},
                )  # fmt: skip
        timings["standins"] = time.monotonic() - t0
        t0 = time.monotonic()
        stack = Stack("fedmoe-build", files, {**env, "PIP_INSTALL_OPTIONS": options}, workdir / "build")
        stack.config()
        stack.compose("build", "superexec-serverapp", timeout=deadline.left(1500))
        run(["docker", "tag", f"{APP_IMAGE}:{flwr_version}", app_tag], timeout=60)
        timings["app_image"] = time.monotonic() - t0
    shutil.rmtree(wheels, ignore_errors=True)


def ports_in_use(ports: Sequence[int] = PORTS) -> list[int]:
    """Ports among ``ports`` that something on this machine listens on (TCP, IPv4/IPv6)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                listening.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports) & listening)


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses (dotted) that listen on TCP ``port`` (from ``/proc/net/tcp``)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, port_hex = fields[1].split(":")
        if fields[3] == "0A" and int(port_hex, 16) == port:
            out.append(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


@dataclass
class Stack:
    """One Compose project of ``files`` (the project's compose files + the test overlay).

    Parameters
    ----------
    project : str
        Compose project name (prefix of every container, network and volume).
    files : Sequence[Path]
        Compose files, base first (as ``-f`` in this order).
    env : Mapping[str, str]
        Variables for the compose files (``FEDMOE_BIND_HOST``, ``FEDMOE_CERTS``, build args).
    workdir : Path
        Holds the merged file ``stack.yml`` and saved logs.

    """

    project: str
    files: Sequence[Path]
    env: Mapping[str, str]
    workdir: Path
    doc: dict[str, Any] = field(default_factory=dict, init=False)

    @property
    def merged(self) -> Path:
        """The merged compose file the stack runs from."""
        return self.workdir / "stack.yml"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0", **self.env}

    def config(self) -> dict[str, Any]:
        """Merge the files with ``docker-compose config``, drop ``ports``, write :attr:`merged`."""
        args = [a for f in self.files for a in ("-f", str(f))]
        out = run(["docker-compose", "-p", self.project, *args, "config"], env=self._env(), timeout=120)
        doc = yaml.safe_load(out.stdout)
        for service in doc["services"].values():
            if service.get("network_mode") == "host":
                service.pop("ports", None)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.merged.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.doc = doc
        return doc

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """``docker-compose -p PROJECT -f stack.yml ARGS``."""
        cmd = ["docker-compose", "-p", self.project, "-f", str(self.merged), *args]
        return run(cmd, env=self._env(), timeout=timeout, check=check)

    def up(self, *services: str) -> None:
        """Create and start ``services`` (all when none), without building."""
        self.compose("up", "-d", "--no-build", *services)

    def container(self, service: str) -> str:
        """Return the container id of ``service``."""
        cid = self.compose("ps", "-q", service).stdout.strip()
        if not cid:
            raise RuntimeError(f"no container for {service}")
        return cid.splitlines()[0]

    def logs(self, service: str) -> str:
        """Everything ``service``'s container wrote (stdout and stderr)."""
        proc = run(["docker", "logs", self.container(service)], check=False, timeout=60)
        return proc.stdout + proc.stderr

    def kill(self, service: str) -> None:
        """SIGKILL ``service``'s container."""
        run(["docker", "kill", self.container(service)], timeout=60)

    def restart(self, service: str) -> None:
        """Restart ``service``'s container (SIGTERM, then start again)."""
        run(["docker", "restart", "-t", "10", self.container(service)], timeout=120)

    def mounts(self, service: str) -> list[dict[str, Any]]:
        """``docker inspect`` mounts of ``service``'s container."""
        out = run(["docker", "inspect", self.container(service)], timeout=60).stdout
        return list(json.loads(out)[0]["Mounts"])

    def read_volume(self, volume: str, path: str, image: str) -> bytes:
        """Bytes of ``path`` inside the project's named volume ``volume`` (a throwaway container)."""
        proc = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "cat",
             "-v", f"{self.project}_{volume}:/volume:ro", image, f"/volume/{path}"],
            capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if proc.returncode != 0:
            raise FileNotFoundError(f"{volume}:{path}: {proc.stderr.decode(errors='replace')[-500:]}")
        return proc.stdout

    def save_logs(self) -> None:
        """Write every service's log to ``workdir/<service>.log`` (for failures)."""
        for service in self.doc.get("services", {}):
            try:
                (self.workdir / f"{service}.log").write_text(self.logs(service))
            except RuntimeError:
                continue

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        left = []
        for kind, cmd in (
            ("container", ["docker", "ps", "-aq", "--filter", label]),
            ("network", ["docker", "network", "ls", "-q", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "-q", "--filter", label]),
        ):
            left += [f"{kind} {x}" for x in run(cmd, timeout=60).stdout.split()]
        return left

    def down(self) -> list[str]:
        """Remove every container, network and volume of the project; return what is left."""
        if self.merged.exists():
            self.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
        label = f"label=com.docker.compose.project={self.project}"
        ids = run(["docker", "ps", "-aq", "--filter", label], timeout=60).stdout.split()
        if ids:
            run(["docker", "rm", "-f", "-v", *ids], check=False, timeout=120)
        vols = run(["docker", "volume", "ls", "-q", "--filter", label], timeout=60).stdout.split()
        if vols:
            run(["docker", "volume", "rm", "-f", *vols], check=False, timeout=120)
        return self.leftovers()
