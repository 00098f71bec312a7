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
) -> None:
    """Update ``alignment`` with the feedback of the replies that entered the model.

    ``updates`` are the kept replies' routing feedback after bounding (same order,
    :attr:`~fedmoe_app.maths.robust.Bounded.routing`): the reported token counts, zero for an
    expert copy that was left out. A :class:`LayeredAlignment` gets each layer's
    feedback (``[R, L, E]``), an :class:`AlignmentState` the sums over the layers.
    """
    held = np.stack([r.held for r in kept])  # [R, L, E]
    if isinstance(alignment, LayeredAlignment):  # one state per MoE layer: [R, L, E] each
        tokens = [u.layer_tokens for u in updates]
        loss, hist = [r.layer_expert_loss for r in kept], [r.layer_gate_hist for r in kept]
    else:  # one state for every layer: the feedback summed over the layers, [R, E] each
        held = held.any(axis=1)
        tokens = [u.tokens for u in updates]
        loss, hist = [r.expert_loss for r in kept], [r.gate_hist for r in kept]
    alignment.update([r.client_id for r in kept], held, np.stack(tokens), np.stack(loss), np.stack(hist))
