"""Read the Docker Compose files of ``docker/`` without Docker.

:func:`load` merges a compose file with overlays the way ``docker compose -f a -f b``
does for the keys used here (``command`` and ``entrypoint`` are replaced, ``volumes`` and
``ports`` are merged by target, ``environment`` by name, anything else replaced) and
expands ``${VAR:-default}``. :func:`service_argv` returns the full command line a
service's container runs (image entrypoint + ``command``), so tests can check it against
the installed Flower CLIs and even run the same topology as local processes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: ENTRYPOINT of Flower's official images (``flwr/<name>:<version>``).
IMAGE_ENTRYPOINTS = {
    "superlink": ["flower-superlink"],
    "supernode": ["flower-supernode"],
    "superexec": ["flower-superexec"],
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def expand(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in strings (recursively in lists and dicts)."""
    env = os.environ if env is None else env
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, env) for k, v in value.items()}
    return value


def _target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", entry))
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _env_dict(env: Any) -> dict[str, str]:
    if isinstance(env, dict):
        return {str(k): str(v) for k, v in env.items()}
    out = {}
    for item in env or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def merge_service(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one service of an overlay file into the base service (compose merge rules)."""
    merged = dict(base)
    for key, value in override.items():
        if key in ("volumes", "ports") and key in merged:
            by_target = {_target(v): v for v in merged[key]}
            by_target.update({_target(v): v for v in value})
            merged[key] = list(by_target.values())
        elif key == "environment" and key in merged:
            merged[key] = {**_env_dict(merged[key]), **_env_dict(value)}
        else:
            merged[key] = value
    return merged


def load(*paths: str | Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load and merge compose files; return the whole document with merged ``services``.

    Parameters
    ----------
    *paths : str | Path
        The base file, then overlays (as ``docker compose -f base -f overlay``).
    env : Mapping[str, str] | None
        Variables for ``${VAR:-default}`` (default: an empty mapping, so defaults apply).

    Returns
    -------
    dict
        The merged document, variables expanded; ``x-`` extension keys dropped.

    """
    doc: dict[str, Any] = {"services": {}}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        for key, value in data.items():
            if key == "services":
                for name, service in (value or {}).items():
                    base = doc["services"].get(name, {})
                    doc["services"][name] = merge_service(base, service or {})
            elif not key.startswith("x-"):
                doc[key] = value
    return expand(doc, {} if env is None else env)


def dockerfile_entrypoint(path: str | Path) -> list[str]:
    """Return the exec-form ``ENTRYPOINT [...]`` of a Dockerfile (the last one)."""
    found: list[str] = []
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if stripped.upper().startswith("ENTRYPOINT"):
            found = [str(x) for x in json.loads(stripped[len("ENTRYPOINT") :].strip())]
    if not found:
        raise ValueError(f"{path}: no exec-form ENTRYPOINT")
    return found


def service_entrypoint(service: Mapping[str, Any], compose_dir: str | Path) -> list[str]:
    """Return what a service's container starts before its ``command``."""
    if "entrypoint" in service:
        ep = service["entrypoint"]
        return [ep] if isinstance(ep, str) else list(ep)
    if "build" in service:
        build = service["build"]
        context = Path(compose_dir) / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        return dockerfile_entrypoint(context / dockerfile)
    image = str(service.get("image", ""))
    repo, _, _ = image.partition(":")
    if repo.startswith("flwr/") and repo[5:] in IMAGE_ENTRYPOINTS:
        return list(IMAGE_ENTRYPOINTS[repo[5:]])
    raise ValueError(f"unknown entrypoint for image {image!r}")


def service_argv(service: Mapping[str, Any], compose_dir: str | Path) -> list[str]:
    """Return the full command line of a service: entrypoint followed by ``command``."""
    command = service.get("command", [])
    if isinstance(command, str):
        command = command.split()
    return [*service_entrypoint(service, compose_dir), *[str(c) for c in command]]
