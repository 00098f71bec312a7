"""Static checks of docker/ (no Docker engine needed): services, flags, ports, certificates."""

import re
import shlex
import subprocess
import tomllib

import flwr
import pytest
import yaml
from conftest import ROOT, shell_blocks
from flwr.common.config import parse_config_args

from deploy import compose, flags
from deploy import docker_stack as ds
from fedmoe_app.capacity import DEVICE_CLASSES, MEASURED

DOCKER = ROOT / "docker"
BASE = DOCKER / "compose.yml"
TLS = DOCKER / "compose.tls.yml"
TEST = DOCKER / "compose.test.yml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCS = ROOT / "docs" / "DEPLOYMENT.md"
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")


def services(*files):
    return compose.load(*files)["services"]


def argv_of(svcs):
    return {name: compose.service_argv(svc, DOCKER) for name, svc in svcs.items()}


def value(cmd, flag):
    """Value following ``flag`` (or of ``flag=value``) in ``cmd``; None if absent."""
    for i, tok in enumerate(cmd):
        if tok == flag:
            return cmd[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def supernode_names(svcs):
    return sorted(n for n in svcs if re.fullmatch(r"supernode-\d+", n))


@pytest.fixture(scope="module", params=["insecure", "tls"])
def variant(request):
    files = (BASE,) if request.param == "insecure" else (BASE, TLS)
    svcs = services(*files)
    return request.param, svcs, argv_of(svcs)


def test_yaml_parses_and_has_every_service():
    for path in (BASE, TLS):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    svcs = services(BASE)
    nodes = supernode_names(svcs)
    assert len(nodes) >= 2
    expected = {"superlink", "superexec-serverapp", *nodes, *(f"superexec-clientapp-{n[10:]}" for n in nodes)}
    assert set(svcs) == expected
    # the overlay only changes services that exist in the base file
    assert set(yaml.safe_load(TLS.read_text())["services"]) <= set(svcs)


def build_args(svc):
    args = svc["build"]["args"]
    return dict(a.split("=", 1) if "=" in a else (a, None) for a in args) if isinstance(args, list) else args


def test_images_pin_the_installed_flower_version():
    version = flwr.__version__
    for name, svc in services(BASE, TLS).items():
        if "build" in svc:
            assert build_args(svc)["FLWR_VERSION"] == version, name
            assert svc["image"].endswith(f":{version}"), name
        else:
            assert svc["image"] in (f"flwr/superlink:{version}", f"flwr/supernode:{version}"), name
    text = DOCKERFILE.read_text()
    assert f"ARG FLWR_VERSION={version}" in text
    # users get Flower's official image; the test overlay swaps in a local stand-in
    assert re.search(r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert compose.dockerfile_entrypoint(DOCKERFILE) == ["flower-superexec"]
    # torch defaults to the version the project is tested with (scripts/setup.sh pins it)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        default = re.search(rf'"{pkg}==\$\{{{arg}:-([^}}]+)\}}"', text).group(1)
        assert re.search(rf"^{pkg.upper()}={re.escape(default)}$", setup, re.M), (pkg, default)
    for svc in services(BASE, TEST).values():  # the overlay keeps the same service definitions
        if "build" in svc:
            assert build_args(svc)["BASE_IMAGE"] == f"fedmoe-test/superexec:{version}"


def test_the_image_installs_the_extras_in_the_dependency_layer_after_torch():
    text = DOCKERFILE.read_text()
    lines = text.splitlines()
    torch_run = next(i for i, line in enumerate(lines) if '"torch==${TORCH_VERSION' in line)
    extras_arg = next(i for i, line in enumerate(lines) if line.startswith("ARG FEDMOE_EXTRAS="))
    copy_project = next(
        i for i, line in enumerate(lines) if line.startswith("COPY") and "pyproject.toml" in line
    )
    # the torch layer's cache survives a change of extras, and the extras install with pyproject's deps
    assert torch_run < extras_arg < copy_project, (torch_run, extras_arg, copy_project)
    default = lines[extras_arg].split("=", 1)[1]
    assert tuple(default.split(",")) == ds.APP_EXTRAS == ("dp", "hf")
    for env, want in (({}, default), ({"FEDMOE_EXTRAS": "dp"}, "dp")):  # compose: the same default
        for svc in compose.load(BASE, env=env)["services"].values():
            if "build" in svc:
                assert build_args(svc)["FEDMOE_EXTRAS"] == want
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wheels = ds.app_requirements(flwr.__version__)  # the test build's wheel folder holds the extras too
    assert all(dep in wheels for extra in ds.APP_EXTRAS for dep in extras[extra])


def test_every_flag_exists_in_the_installed_cli(variant):
    _, _, argv = variant
    problems = []
    for name, cmd in argv.items():
        assert cmd[0] in FLOWER_CLIS, (name, cmd)
        problems += [f"{name}: {p}" for p in flags.check_argv(cmd[:1], cmd[1:])]
    assert problems == []


def test_dockerfile_flower_commands_use_existing_flags():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        if line.startswith(("RUN", "CMD", "ENTRYPOINT", "HEALTHCHECK")):
            for cmd in flower_commands(line):
                assert flags.check_argv(cmd[0], cmd[1]) == [], line


def test_ports_and_addresses_match(variant):
    _, svcs, argv = variant
    link = argv["superlink"]
    port = value(link, "--port")
    # on the Compose bridge network 0.0.0.0 is the container's own interface; the host
    # publishes the port on its loopback only (tests/deploy/test_docker_safety.py)
    assert value(link, "--host") == "0.0.0.0"
    assert svcs["superlink"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert value(link, "--database") == "/app/superlink.db"
    assert "superlink-state:/app" in svcs["superlink"]["volumes"]
    assert value(link, "--isolation") == "process"  # a separate SuperExec runs the ServerApp
    assert value(argv["superexec-serverapp"], "--runtime-api-address") == f"superlink:{port}"
    node_ports = set()
    for node in supernode_names(svcs):
        cmd = argv[node]
        assert value(cmd, "--superlink") == f"superlink:{port}", node
        assert value(cmd, "--host") == "0.0.0.0" and value(cmd, "--isolation") == "process", node
        node_port = value(cmd, "--port")
        node_ports.add(node_port)
        exec_cmd = argv[f"superexec-clientapp-{node.split('-')[1]}"]
        assert value(exec_cmd, "--runtime-api-address") == f"{node}:{node_port}", node
        assert svcs[f"superexec-clientapp-{node.split('-')[1]}"]["depends_on"] == [node]
    assert len(node_ports) == len(supernode_names(svcs))


def test_node_configs_identify_each_client(variant):
    _, svcs, argv = variant
    nodes = supernode_names(svcs)
    configs = [parse_config_args([value(argv[n], "--node-config")]) for n in nodes]
    assert sorted(c["partition-id"] for c in configs) == list(range(len(nodes)))
    assert {c["num-partitions"] for c in configs} == {len(nodes)}
    assert len({c["client-id"] for c in configs}) == len(nodes)
    for c in configs:
        assert c["device-class"] in {*DEVICE_CLASSES, MEASURED}


def test_insecure_and_tls_variants(variant):
    mode, svcs, argv = variant
    flower = {n: a for n, a in argv.items() if not n.startswith("superexec-clientapp-")}
    if mode == "insecure":
        assert all("--insecure" in cmd for cmd in argv.values())
        return
    link = argv["superlink"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for name, cmd in flower.items():
        assert "--insecure" not in cmd, name
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svcs[name].get("volumes", []) if ":" in m}
        for tok in cmd:  # every certificate/key file is mounted read-only from ./certs, one by one
            if tok.startswith("/certs/"):
                assert mounts.get(tok) == f"./certs/{tok[len('/certs/') :]}", (name, tok)
                assert f"{mounts[tok]}:{tok}:ro" in svcs[name]["volumes"], (name, tok)
    assert value(link, "--ssl-ca-certfile") == "/certs/ca.crt"
    assert value(argv["superexec-serverapp"], "--root-certificates") == "/certs/ca.crt"
    keys = [value(argv[n], "--auth-supernode-private-key") for n in supernode_names(svcs)]
    assert len(set(keys)) == len(keys) and None not in keys
    assert all(value(argv[n], "--root-certificates") == "/certs/ca.crt" for n in supernode_names(svcs))


def flower_commands(text):
    """(command, args) of every Flower CLI invocation in a shell snippet."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line.lstrip("$ "), comments=True)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            if tok not in FLOWER_CLIS:
                continue
            args = []
            for t in tokens[i + 1 :]:
                if t in ("&&", "||", "|", ";", "&") or t.startswith(">"):
                    break
                args.append(t)
            cmd = [tok]
            if tok == "flwr":
                subs = [a for a in args if not a.startswith("-")][:2]
                if subs:
                    cmd.append(subs[0])
                    if subs[0] in ("supernode", "app", "federation", "config") and len(subs) > 1:
                        cmd.append(subs[1])
            found.append((cmd, args))
    return found


def test_docs_commands_use_existing_flags():
    blocks = shell_blocks(DOCS.read_text())
    commands = [c for block in blocks for c in flower_commands(re.sub(r"\\\n\s*", " ", block))]
    assert {c[0][0] for c in commands} >= {"flower-superlink", "flower-supernode", "flwr"}
    problems = [p for cmd, args in commands for p in flags.check_argv(cmd, args)]
    assert problems == []


def test_docs_deploy_scripts_parse():
    from deploy import certs, local

    parsers = {"deploy/local.py": local.build_parser(), "deploy/certs.py": certs.build_parser()}
    seen = set()
    for block in shell_blocks(DOCS.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) > 2 and tokens[0] == "python" and tokens[1] == "-m":  # python -m deploy.local
                tokens = ["python", tokens[2].replace(".", "/") + ".py", *tokens[3:]]
            if len(tokens) > 1 and tokens[0] == "python":
                script = next((k for k in parsers if tokens[1].endswith(k)), None)
                if script:
                    parsers[script].parse_args(tokens[2:])  # SystemExit on a bad flag
                    seen.add(script)
    assert seen == set(parsers)


def _stub_path(tmp_path, uid):
    """A PATH with only stub ``id`` and ``apt-get`` (which logs its arguments): no Docker tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "id").write_text(f"#!/bin/bash\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return str(bin_dir), log


@pytest.mark.parametrize("uid", [0, 1000])
def test_install_docker_installs_the_missing_tools_as_root_with_apt(tmp_path, uid):
    path, log = _stub_path(tmp_path, uid)
    proc = subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "install-docker.sh")],
        env={"PATH": path},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    if uid == 0:
        assert calls[0] == "update -qq"
        assert calls[1].split()[-3:] == ["docker.io", "docker-compose", "debootstrap"], calls
    else:  # not root: nothing installed, the missing tools named
        assert calls == []
        assert "docker.io docker-compose debootstrap missing" in proc.stderr


def test_setup_test_installs_the_docker_tools():
    """``scripts/setup.sh --test`` (what ``.ci/run`` runs) calls ``scripts/install-docker.sh``."""
    code = [
        line.split("#")[0]
        for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert any(
        re.search(r'\[ "\$\{1:-\}" = "--test" \] && bash scripts/install-docker\.sh', line) for line in code
    )
    assert "bash scripts/setup.sh --test" in (ROOT / ".ci" / "run").read_text()
