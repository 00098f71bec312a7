"""A round's replies checked against what each node was sent: valid ones kept, the rest counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common import log

from ..wire.protocol import ARRAYS, ReplyRejected, Sent, TrainReply, parse_eval_reply, parse_train_reply
from ..wire.records import wire_nbytes
from .rounds import EvaluateOutcome


@dataclass(frozen=True)
class ReplyLimits:
    """What a valid train reply may claim: the model's shape and the round's local work."""

    num_experts: int
    top_k: int
    local_epochs: int
    routes_per_example: int
    num_layers: int

    @classmethod
    def of(cls, spec: Any, local_epochs: int, num_layers: int) -> ReplyLimits:
        """Return the limits of a model ``spec`` (``num_experts``, ``top_k``, ``routes_per_example``)."""
        return cls(spec.num_experts, spec.top_k, local_epochs, spec.routes_per_example, num_layers)


@dataclass(frozen=True)
class TrainReplies:
    """The train replies of a round, sorted out."""

    valid: list[TrainReply]
    rejected: dict[str, int]  # rejection reason -> replies
    failures: int  # sent nodes that failed or did not reply
    bytes_up: int


def collect_train_replies(
    replies: Iterable[Message], sent: Mapping[int, Sent], limits: ReplyLimits
) -> TrainReplies:
    """Validate every reply against what its node was sent (:func:`~..wire.protocol.parse_train_reply`).

    A reply carrying an error counts as a failure of its node; a reply from a node that was not
    sent work, or one that fails validation, is logged and counted under its reason; a node
    that did not reply counts as a failure.
    """
    valid: list[TrainReply] = []
    rejected: Counter[str] = Counter()
    failures, bytes_up, received = 0, 0, set()
    for msg in replies:
        node = msg.metadata.src_node_id
        node_sent = sent.get(node)
        received.add(node)
        if msg.has_error():
            # An error the SuperLink raises for an unreachable node comes from the SuperLink,
            # not from that node: the node then stays in ``missing`` and is counted there once.
            failures += node_sent is not None
            cid = node_sent.client_id if node_sent else "?"
            log(WARNING, "aggregate_train: node %s (client %s) failed: %s", node, cid, msg.error.reason)
            continue
        if node_sent is None:
            rejected["unexpected-node"] += 1
            log(WARNING, "aggregate_train: reply from node %s that was not sent work", node)
            continue
        try:
            if msg.has_content() and ARRAYS in msg.content:
                bytes_up += wire_nbytes(msg.content[ARRAYS])
            valid.append(
                parse_train_reply(
                    msg.content,
                    node,
                    node_sent,
                    top_k=limits.top_k,
                    local_epochs=limits.local_epochs,
                    routes_per_example=limits.routes_per_example,
                )
            )
        except ReplyRejected as exc:
            rejected[exc.reason] += 1
            cid = node_sent.client_id
            log(WARNING, "aggregate_train: rejected reply of node %s (client %s): %s", node, cid, exc)
    missing = set(sent) - received
    if missing:
        log(WARNING, "aggregate_train: %d node(s) did not reply in time", len(missing))
    return TrainReplies(valid, dict(rejected), failures + len(missing), bytes_up)


def evaluate_outcome(
    replies: Iterable[Message], clients: Mapping[int, str], profiles: Mapping[str, Mapping[str, Any]]
) -> EvaluateOutcome:
    """Validate a round's evaluation replies and summarize the valid ones.

    Each reply is checked by :func:`~..wire.protocol.parse_eval_reply` against the client known
    behind its node (``clients``: node id -> client id) and the test size that client reported
    when first queried (``profiles[cid]["num-test-examples"]``); invalid replies are logged and
    counted by reason. Replies that carry an error (a failed client) are not counted here.
    """
    valid: dict[str, tuple[int, float, float]] = {}
    text: dict[str, tuple[float, int]] = {}
    rejected: dict[str, int] = {}
    for msg in replies:
        if msg.has_error() or not msg.has_content():
            continue
        node = msg.metadata.src_node_id
        cid = clients.get(node)
        try:
            r = parse_eval_reply(msg.content, cid, profiles.get(cid, {}).get("num-test-examples"))
        except ReplyRejected as exc:
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
            log(WARNING, "aggregate_evaluate: rejected reply from node %s: %s", node, exc)
            continue
        valid[r.client_id] = (r.num_examples, r.loss, r.accuracy)
        if r.bpb is not None:
            text[r.client_id] = (r.bpb, r.nbytes)
    return EvaluateOutcome.from_clients(valid, rejected, text=text)
