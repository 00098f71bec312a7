"""What a client holds: one boolean ``[L, E]`` holding, in plans, messages, replies and state.

Row ``l`` of a holding is the set of experts the client holds in MoE layer ``l`` (layers in the
order of :func:`fedmoe_app.tensors.moe_layers`). With run-config ``tie-layers = true`` (the
default) every row is the same; with ``tie-layers = false`` each layer has its own. Either way a
message carries exactly the (layer, expert) tensors of its holding
(:func:`~fedmoe_app.tensors.select_layers`), and its config names the holding twice:
``layer-experts``, the flat row-major ``[L, E]`` 0/1 mask, and ``expert-ids``, the union of its
rows (a convenience for readers). A client builds its sub-model from :func:`held_from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tensors import Arrays, select_layers

LAYER_EXPERTS = "layer-experts"
EXPERT_IDS = "expert-ids"


def union(held: np.ndarray) -> list[int]:
    """Return the experts a holding holds in any MoE layer."""
    return np.flatnonzero(np.asarray(held, dtype=bool).any(axis=0)).tolist()


def holding_lists(held: np.ndarray) -> list[list[int]]:
    """Return the expert ids of every row of a holding (its JSON form in metrics and checkpoints)."""
    return [np.flatnonzero(row).tolist() for row in np.asarray(held, dtype=bool)]


def holding_from_lists(
    rows: Sequence[int] | Sequence[Sequence[int]], num_layers: int, num_experts: int
) -> np.ndarray:
    """Return the bool ``[L, E]`` holding of :func:`holding_lists`' rows (one flat list: every layer)."""
    held = np.zeros((num_layers, num_experts), dtype=bool)
    if len(rows) and isinstance(rows[0], (int, np.integer)):
        held[:, [int(e) for e in rows]] = True
        return held
    for layer, ids in enumerate(rows):
        held[layer, [int(e) for e in ids]] = True
    return held


def holding_config(held: np.ndarray) -> dict[str, Any]:
    """Return the config entries that name a holding in a message."""
    return {EXPERT_IDS: union(held), LAYER_EXPERTS: np.asarray(held, dtype=np.int64).ravel().tolist()}


def held_from_config(conf: Mapping[str, Any], num_experts: int) -> np.ndarray:
    """Return the bool ``[L, E]`` holding a train or evaluate message asks a client to hold.

    Raises
    ------
    ValueError
        If ``layer-experts`` is missing or not a whole number of rows of ``num_experts`` 0/1 values.

    """
    flat = np.asarray(list(conf.get(LAYER_EXPERTS) or []), dtype=np.int64)
    if flat.size == 0 or flat.size % num_experts or not np.isin(flat, (0, 1)).all():
        raise ValueError(
            f"'{LAYER_EXPERTS}' must be rows of {num_experts} 0/1 values, got {flat.size} values"
        )
    return flat.reshape(-1, num_experts).astype(bool)


def payload(
    arrays: Mapping[str, np.ndarray], held: np.ndarray, layers: Sequence[str]
) -> tuple[Arrays, dict[str, Any]]:
    """Return what one client is sent: the shared part, its holding's experts, the config naming them."""
    return select_layers(arrays, held, layers), holding_config(held)
