"""The node's measured link speed: timed from each train message, kept in the node's state.

A train message carries the server's wall-clock send time (``sent-at``) and its arrays' size
(``payload-bytes``); :func:`observe_train_message` turns the exchange into a down-link sample
(:func:`~fedmoe_app.capacity.link.exchange_mbps`) and folds it into the node's
:class:`~fedmoe_app.capacity.link.LinkEstimate`, kept in ``Context.state`` between messages.
Only a node of device class ``"measured"`` outside simulation measures: an emulated class
keeps its own link speeds, and a simulated message crosses no network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context

from ..capacity import MEASURED
from ..capacity.link import LinkEstimate, exchange_mbps
from ..capacity.probe import node_device_class
from .placement import ray_node_id

log = logging.getLogger(__name__)
#: Key of the node's :class:`LinkEstimate` in ``Context.state``.
LINK_STATE = "fedmoe.link"
#: Train-message config keys the server stamps (server/messages.py).
SENT_AT, PAYLOAD_BYTES = "sent-at", "payload-bytes"


def measures_link(client_id: str, *, device_mix: str, seed: int, context: Context) -> bool:
    """Whether this node measures its link: device class ``"measured"``, not in simulation.

    ``device_mix`` and ``seed`` are the run config's (emulated device classes of a simulation).
    """
    if ray_node_id() is not None:  # simulation: the message never left the machine
        return False
    device_class = node_device_class(
        client_id, device_mix=device_mix, seed=seed, node_config=context.node_config
    )
    return device_class == MEASURED


def link_estimate(context: Context) -> LinkEstimate:
    """Return the node's link estimate so far (empty before its first timed message)."""
    if LINK_STATE not in context.state:
        return LinkEstimate()
    return LinkEstimate.from_dict(dict(context.state[LINK_STATE]))


def observe_train_message(config: Mapping[str, Any], received_at: float, context: Context) -> LinkEstimate:
    """Time one train message (its ``sent-at`` and ``payload-bytes``); store and return the estimate.

    A message without ``sent-at`` (a server that does not stamp) leaves the estimate as it was;
    one whose timing is rejected (clock skew, a tiny payload, an absurd speed) counts as rejected.
    """
    estimate = link_estimate(context)
    if SENT_AT not in config:
        return estimate
    sample = exchange_mbps(config.get(PAYLOAD_BYTES), config.get(SENT_AT), received_at)
    if sample is None:
        log.debug(
            "link: train message not used (payload %r bytes, sent at %r, received at %.3f)",
            config.get(PAYLOAD_BYTES),
            config.get(SENT_AT),
            received_at,
        )
    estimate = estimate.update(sample)
    context.state[LINK_STATE] = ConfigRecord(estimate.to_dict())
    return estimate


def link_metrics(estimate: LinkEstimate) -> dict[str, float]:
    """Train-reply metrics for the estimate: ``down-mbps`` and ``up-mbps`` (equal), or none yet."""
    if estimate.down_mbps is None:
        return {}
    return {"down-mbps": estimate.down_mbps, "up-mbps": estimate.down_mbps}
