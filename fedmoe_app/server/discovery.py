"""Who is behind each node: client ids and capacity profiles from ``query`` messages.

Nodes are known to the server by node id only; each client reports a stable ``client-id``
(partition id in simulation, node config in deployment) and its capacity profile, so that
alignment state survives restarts and reconnections under new node ids.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from ..capacity import MEASURED, CapacityProfile, ema_update
from ..capacity.link import MAX_MBPS, MIN_MBPS
from ..wire.protocol import CONFIG, PROFILE, reply_client_id


class Discovery:
    """Node id -> client id, and client id -> capacity profile, learned by querying nodes.

    Parameters
    ----------
    timeout_s : float
        Seconds to wait for enough nodes to connect and for query replies.
    retry_rounds : int
        A node that did not answer its query is asked again this many rounds later (1: the
        next round), not every time nodes are sampled, and the wait doubles with every
        further miss (``retry_rounds * 2**(misses - 1)``, at most ``MAX_BACKOFF_ROUNDS``): a
        node that never answers costs O(log rounds) queries. Each failed query is counted once.

    """

    MAX_BACKOFF_ROUNDS = 64
    #: Weight of a new training measurement in a client's profile (exponential moving average).
    PROFILE_EMA = 0.5
    #: Training measurements a reply refreshes in its client's profile.
    MEASURED = ("train-time-s", "samples-per-s", "peak-memory-bytes")
    #: Link speeds a reply of a ``"measured"`` client replaces in its profile (already smoothed).
    LINK = ("down-mbps", "up-mbps")

    def __init__(self, timeout_s: float, retry_rounds: int) -> None:
        self.timeout_s = timeout_s
        self.retry_rounds = max(int(retry_rounds), 1)
        self.clients: dict[int, str] = {}  # node id -> client id
        self.profiles: dict[str, dict[str, Any]] = {}  # client id -> capacity profile
        self.unanswered: dict[int, int] = {}  # node id -> round its last query failed
        self.misses: dict[int, int] = {}  # node id -> failed queries in a row
        self.queries_sent = 0  # query messages sent so far (what discovery costs)
        self.bound_changes = 0  # queries that reported another example count than the kept bound

    def client_of(self, node: int) -> str:
        """Client id of a known node."""
        return self.clients[node]

    def record_training(self, client_id: str, metrics: dict[str, float], num_examples: int) -> None:
        """Refresh a client's profile with what its valid training reply measured.

        Times, throughput and peak memory enter as an EMA (:attr:`PROFILE_EMA`). The link
        speeds a client of class ``"measured"`` timed (:mod:`fedmoe_app.capacity.link`, smoothed
        there) replace its profile's when within ``[MIN_MBPS, MAX_MBPS]``; an emulated class
        keeps its own. The bound on a client's example count is what it first reported: a
        reply may stay under it but never raise it.
        """
        profile = self.profiles.setdefault(client_id, {})
        for key in self.MEASURED:
            if key in metrics:
                profile[key] = ema_update(profile.get(key), metrics[key], self.PROFILE_EMA)
        if profile.get("device-class") == MEASURED:
            for key in self.LINK:
                if MIN_MBPS <= metrics.get(key, 0.0) <= MAX_MBPS:
                    profile[key] = float(metrics[key])
        profile.setdefault("num-examples", num_examples)

    def restore_profiles(self, profiles: dict[str, dict[str, Any]]) -> None:
        """Take the client profiles saved in a checkpoint (node ids are learned anew)."""
        self.profiles = {cid: dict(p) for cid, p in profiles.items()}

    def known_nodes(self, grid: Grid, minimum: int, server_round: int) -> tuple[list[int], int]:
        """Return the connected nodes with a known client id, sorted by client id, and failed queries.

        Waits (up to ``timeout_s``) until at least ``minimum`` nodes are connected, then
        queries the connected nodes not met before.
        """
        return self.identify(grid, self.connected(grid, minimum), server_round)

    def connected(self, grid: Grid, minimum: int) -> list[int]:
        """Return the connected node ids, sorted, after waiting (up to ``timeout_s``) for ``minimum``."""
        deadline = time.monotonic() + self.timeout_s
        while len(nodes := sorted(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum %d)", len(nodes), minimum)
            time.sleep(1.0)
        return nodes

    def ordered(self, nodes: list[int]) -> list[int]:
        """Return ``nodes`` with the known ones first, by client id, then the others by node id."""
        known = sorted((n for n in nodes if n in self.clients), key=self.clients.__getitem__)
        return known + sorted(n for n in nodes if n not in self.clients)

    def identify(self, grid: Grid, nodes: list[int], server_round: int) -> tuple[list[int], int]:
        """Query the unknown ones of ``nodes``; return those of ``nodes`` now known (by client id).

        Only ``nodes`` are asked (each new node once; a silent one again after its back-off),
        so a caller that samples first pays one query per sampled new node, not one per
        connected node. Also returns the number of failed queries.
        """
        failed = self._query_unknown(grid, nodes, server_round)
        known = [n for n in nodes if n in self.clients]
        return sorted(known, key=self.clients.__getitem__), failed

    def _due(self, node: int, server_round: int) -> bool:
        """Whether an unknown node may be asked in ``server_round`` (its back-off is over)."""
        if node not in self.unanswered:
            return True
        wait = min(self.retry_rounds * 2 ** (self.misses.get(node, 1) - 1), self.MAX_BACKOFF_ROUNDS)
        return server_round - self.unanswered[node] >= wait

    def _query_unknown(self, grid: Grid, nodes: list[int], server_round: int) -> int:
        """Ask nodes we have not met for their client id and profile; return how many failed."""
        unknown = [n for n in nodes if n not in self.clients and self._due(n, server_round)]
        if not unknown:
            return 0
        connected = set(nodes)
        queries = [
            Message(
                content=RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in unknown
        ]
        answered = 0
        self.queries_sent += len(queries)
        for msg in grid.send_and_receive(queries, timeout=self.timeout_s):
            node = msg.metadata.src_node_id
            cid = None if msg.has_error() else reply_client_id(msg)
            if cid is None:
                log(
                    WARNING,
                    "query: node %s gave no client id (%s)",
                    node,
                    msg.error.reason if msg.has_error() else "malformed",
                )
                continue
            owner = next((n for n, c in self.clients.items() if c == cid), None)
            if owner is not None and owner in connected:
                log(WARNING, "query: node %s claims client id %r of node %s; ignored", node, cid, owner)
                continue
            if owner is not None:  # the client reconnected under a new node id
                del self.clients[owner]
            self.clients[node] = cid
            self.profiles[cid] = self._merged(cid, self._profile(msg, node))
            self.unanswered.pop(node, None)
            self.misses.pop(node, None)
            answered += 1
        for n in unknown:
            if n not in self.clients:
                self.unanswered[n] = server_round
                self.misses[n] = self.misses.get(n, 0) + 1
        return len(unknown) - answered

    #: Counts a client reports once and the server keeps: the bounds its replies are checked against.
    BOUNDS = ("num-examples", "num-test-examples")

    def _merged(self, client_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        """Return a client's known profile updated by a new query's, its example bounds kept.

        A client that reconnects (a new node id) or is queried again after the server resumed may
        report other counts; a bound never changes once known (a larger claim would let its
        replies weigh more): the change is logged and counted (:attr:`bound_changes`).
        """
        known = self.profiles.get(client_id, {})
        merged = {**known, **profile}
        for key in self.BOUNDS:
            if key in known:
                if profile.get(key, known[key]) != known[key]:
                    self.bound_changes += 1
                    log(
                        WARNING,
                        "query: client %r now reports %s = %s; its bound stays %s (first reported)",
                        client_id,
                        key,
                        profile[key],
                        known[key],
                    )
                merged[key] = known[key]
        return merged

    @staticmethod
    def _profile(msg: Message, node: int) -> dict[str, Any]:
        """Return the validated capacity profile of a query reply (empty if absent or invalid)."""
        if PROFILE not in msg.content:
            return {}
        profile: dict[str, Any] = {}
        try:
            profile = CapacityProfile.from_dict(dict(msg.content[PROFILE])).to_dict()
        except ValueError as exc:
            log(WARNING, "query: node %s sent an invalid profile: %s", node, exc)
        for key in ("num-examples", "num-test-examples"):
            n = msg.content[PROFILE].get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                profile[key] = n
        return profile
