"""Routing feedback of a round's replies into the alignment state, tied or per MoE layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..alignment import AlignmentState, LayeredAlignment
from ..maths.aggregation import ClientUpdate
from ..wire.protocol import TrainReply


def feed_alignment(
    alignment: AlignmentState | LayeredAlignment,
    kept: Sequence[TrainReply],
    updates: Sequence[ClientUpdate],
    num_experts: int,
) -> None:
    """Update ``alignment`` with the feedback of the replies that entered the model.

    ``updates`` are the kept replies' bounded updates (same order): their token counts are
    the ones the model was aggregated with. A :class:`LayeredAlignment` gets each layer's
    feedback (``[R, L, E]``), an :class:`AlignmentState` the sums over the layers.
    """
    ids = [r.client_id for r in kept]
    if isinstance(alignment, LayeredAlignment):
        alignment.update(
            ids,
            np.stack([r.layer_held for r in kept]),
            np.stack([u.layer_tokens for u in updates]),
            np.stack([r.layer_expert_loss for r in kept]),
            np.stack([r.layer_gate_hist for r in kept]),
        )
        return
    held = np.zeros((len(kept), num_experts), dtype=bool)
    for i, r in enumerate(kept):
        held[i, r.expert_ids] = True
    alignment.update(
        ids,
        held,
        np.stack([u.tokens for u in updates]),
        np.stack([r.expert_loss for r in kept]),
        np.stack([r.gate_hist for r in kept]),
    )
