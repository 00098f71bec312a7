"""Where a simulated client ran: the Ray node id of the worker executing the ClientApp.

Flower's simulation runs every ClientApp inside a Ray actor; on a Ray cluster of several
nodes (``ray start --head`` + ``ray start --address=...``, docs/SCALE.md) the actors spread
over the nodes. A train reply names the Ray node it was computed on, so the server can
show where work ran. Outside Ray (a deployed SuperNode, a unit test) there is no node id
and nothing is added.
"""

from __future__ import annotations

import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def ray_node_id() -> str | None:
    """Return the Ray node id of this process, or None when it is not a Ray worker.

    Ray is not imported here: a process that has not imported it is not running under Ray.
    The answer is cached: an actor stays on the node it was placed on.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - a Ray without a runtime context: no placement to report
        return None
