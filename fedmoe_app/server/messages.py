"""The messages of a round: one fresh record per node, holding the shared part and its experts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log

from ..config import RoundSection
from ..tensors import select
from ..wire.holdings import payload
from ..wire.protocol import ARRAYS, CONFIG, Sent
from ..wire.records import to_record, wire_dtype_of, wire_nbytes
from .planner import RoundPlan
from .rounds import round_lr


@dataclass(frozen=True)
class TrainMessages:
    """A round's train messages and what each node was sent (the yardstick of its reply)."""

    messages: list[Message]
    sent: dict[int, Sent]  # node id -> what it was sent
    bytes_down: int
    dense_bytes_down: int  # what the same nodes would have downloaded with every expert


def train_messages(
    plan: RoundPlan,
    arrays: Mapping[str, np.ndarray],
    nodes: Mapping[str, int],
    profiles: Mapping[str, Mapping[str, Any]],
    *,
    layers: Sequence[str],
    server_round: int,
    rounds: RoundSection,
    rng: np.random.Generator,
    policy: str,
    extra: Mapping[str, Any] | None = None,
) -> TrainMessages:
    """Build one train message per planned client (``nodes``: client id -> node id).

    Each message holds the shared tensors and the client's holding (its experts in every MoE
    layer) in ``wire-dtype``, the round's ``lr`` (:func:`~.rounds.round_lr`) and ``local-epochs``
    (``rounds``), a training seed drawn from ``rng``, whether its experts are read-only and its
    sample budget, and for the client's link measurement its arrays' size (``payload-bytes``)
    and the wall-clock time the messages were ready to send (``sent-at``, Unix seconds).
    A read-only client returns the shared part only. Logs the round's bytes down next to the
    dense model's in the same wire dtype (``policy``: the plan). ``extra`` entries (a caller's
    ``train_config``) join every message's config; FedMoE's own keys win.
    """
    messages, sent, bytes_down = [], {}, 0
    wire, lr = rounds.wire_dtype, round_lr(rounds, server_round)
    for row, cid in enumerate(plan.client_ids):
        node, held, read_only = nodes[cid], plan.assignment[row], bool(plan.frozen[row])
        sub, names = payload(arrays, held, layers)
        returned = select(sub, []) if read_only else sub
        record = to_record(sub, wire)
        nbytes = wire_nbytes(record)
        bytes_down += nbytes
        sent[node] = Sent(
            client_id=cid,
            held=held,
            shapes={k: (tuple(v.shape), wire_dtype_of(v, wire)) for k, v in returned.items()},
            max_examples=profiles.get(cid, {}).get("num-examples"),
            base=returned if wire == "bf16" else None,
        )
        config = ConfigRecord(
            {
                **(extra or {}),
                **names,
                "server-round": server_round,
                "lr": lr,
                "local-epochs": rounds.local_epochs,
                "seed": int(rng.integers(2**31)),
                "frozen-experts": read_only,
                "max-samples": int(plan.budgets[row]),
                "payload-bytes": nbytes,
            }
        )
        content = RecordDict({ARRAYS: record, CONFIG: config})
        messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
    sent_at = time.time()  # once every record is built: the clients time their link from here
    for message in messages:
        message.content[CONFIG]["sent-at"] = sent_at
    dense = wire_nbytes(to_record(arrays, wire)) * len(plan.client_ids)
    if not messages:
        log(WARNING, "configure_train: no node available in round %d", server_round)
    log(
        INFO,
        "configure_train: %d nodes, %s plan, %.1f kB down (dense %.1f kB)",
        len(messages),
        policy,
        bytes_down / 1e3,
        dense / 1e3,
    )
    return TrainMessages(messages, sent, bytes_down, dense)


def evaluate_messages(
    arrays: Mapping[str, np.ndarray],
    held: Mapping[int, np.ndarray],
    *,
    layers: Sequence[str],
    server_round: int,
    wire_dtype: str,
    extra: Mapping[str, Any] | None = None,
) -> list[Message]:
    """Return one evaluate message per node of ``held`` (node id -> its holding), skipping empty ones.

    Each holds the shared part and the node's experts, its sparse (personalized) view, in
    ``wire_dtype`` (run-config ``wire-dtype``); ``extra`` entries (a caller's ``evaluate_config``)
    join every message's config, FedMoE's own keys winning.
    """
    messages = []
    for node, holding in held.items():
        if not holding.any():
            continue
        sub, names = payload(arrays, holding, layers)
        config = ConfigRecord({**(extra or {}), **names, "server-round": server_round})
        content = RecordDict({ARRAYS: to_record(sub, wire_dtype), CONFIG: config})
        messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
    return messages
