"""Who this client is and the run it serves: the validated run config and the stable client id."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flwr.app import Context

from ..config import RunConfig


@lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_run_config(dict(items))


def run_config(context: Context) -> RunConfig:
    """Return the validated run config (cached per process)."""
    return _config(tuple(sorted(context.run_config.items())))


def identity(context: Context) -> str:
    """Return the node's client id: node config ``client-id``, else its ``partition-id``."""
    nc = context.node_config
    if "client-id" in nc:
        return str(nc["client-id"])
    if "partition-id" in nc:
        return str(nc["partition-id"])
    own = nc.get("data-path") or nc.get("dataset-path")
    needs = "'client-id'" if own else "'partition-id' and 'num-partitions'"
    raise ValueError(f"node config needs {needs}; it has {sorted(nc)}")
