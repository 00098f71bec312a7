"""Which nodes take part in a round: identified by client id, drawn by the run's generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from .discovery import Discovery


@dataclass(frozen=True)
class Sample:
    """The nodes drawn for one round.

    Attributes
    ----------
    nodes : list of int
        The sampled node ids, each with a known client id, ordered by client id.
    query_failures : int
        Nodes whose ``query`` failed while sampling.
    population : int
        Nodes the draw ran over (the DP accountant's ``K``).

    """

    nodes: list[int]
    query_failures: int
    population: int


def sample_nodes(
    nodes: Discovery,
    grid: Grid,
    *,
    fraction: float,
    minimum: int,
    server_round: int,
    rng: np.random.Generator,
    discovery: str,
) -> Sample:
    """Sample ``fraction`` of the connected nodes (at least ``minimum``), by client id.

    Nodes are identified first (:class:`~.discovery.Discovery`), and sampling runs over
    sorted client ids, so the same seed picks the same clients even when node ids change
    (a resumed run). With run-config ``discovery = "sampled"`` the draw runs over the
    connected nodes (known ones by client id, new ones by node id) and only the sampled
    new nodes are queried; a sampled node that does not answer sits the round out.
    """
    if discovery == "sampled":  # sample first, then query only the sampled new nodes
        pool = nodes.ordered(nodes.connected(grid, minimum))
        picked, failed = nodes.identify(grid, pick(pool, fraction, minimum, rng), server_round)
        return Sample(picked, failed, len(pool))
    pool, failed = nodes.known_nodes(grid, minimum, server_round)
    return Sample(pick(pool, fraction, minimum, rng), failed, len(pool))


def pick(nodes: list[int], fraction: float, minimum: int, rng: np.random.Generator) -> list[int]:
    """Draw ``fraction`` of ``nodes`` (at least ``minimum``), keeping their order."""
    if not nodes:
        return []
    size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=size, replace=False))]
