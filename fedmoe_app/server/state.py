"""What the server carries from one round to the next, and checkpoints.

The alignment state (fitness, usage), who is behind each node and their capacity profiles,
the experts each client last trained, the run's random generator and the DP accountant. The
strategy's round functions read it and fold each round's kept replies into it
(:meth:`ServerState.learn`); :meth:`ServerState.state_dict` is the checkpoint's ``strategy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..alignment import AlignmentState, LayeredAlignment, alignment_from_state_dict
from ..config import RunConfig
from ..maths.aggregation import ClientUpdate
from ..wire.holdings import plan_lists
from ..wire.protocol import TrainReply
from .discovery import Discovery
from .feedback import feed_alignment
from .private_round import PrivateAggregation


class ServerState:
    """The server's memory of a run (everything but the model).

    Parameters
    ----------
    cfg : RunConfig
        The run config: alignment knobs, ``tie-layers``, ``seed``, discovery and ``dp`` settings.
    num_experts : int
        Experts per MoE layer.
    num_layers : int
        MoE layers (one alignment state each when layers are untied).

    """

    def __init__(self, cfg: RunConfig, num_experts: int, num_layers: int) -> None:
        self.tied = cfg.tie_layers
        self.num_experts = num_experts
        self.alignment = (
            AlignmentState(num_experts, **cfg.alignment_kwargs())
            if cfg.tie_layers
            else LayeredAlignment(num_experts, num_layers, **cfg.alignment_kwargs())
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes = Discovery(cfg.round_timeout_s, cfg.query_retry_rounds)
        self.last_experts: dict[str, Any] = {}  # client id -> experts last trained (per layer: untied)
        self.privacy = PrivateAggregation(cfg, num_experts) if cfg.dp != "off" else None

    @property
    def profiles(self) -> dict[str, dict[str, Any]]:
        """Client id -> capacity profile (from queries, refreshed by training replies)."""
        return self.nodes.profiles

    def learn(self, kept: Sequence[TrainReply], updates: Sequence[ClientUpdate]) -> None:
        """Fold the replies that entered the model (and their bounded ``updates``) into the state."""
        feed_alignment(self.alignment, kept, updates, self.num_experts)
        for r in kept:
            self.last_experts[r.client_id] = r.expert_ids if self.tied else plan_lists(r.layer_held)
            self.nodes.record_training(r.client_id, r.metrics, r.update.num_examples)

    def privacy_report(self) -> dict[str, Any] | None:
        """Return the round's ``dp_*`` metrics (None with ``dp = "off"``)."""
        return self.privacy.report() if self.privacy is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to resume (JSON-serializable)."""
        return {
            "alignment": self.alignment.state_dict(),
            "rng": self.rng.bit_generator.state,
            "profiles": self.profiles,
            "last_experts": self.last_experts,
            **({"accountant": self.privacy.accountant.state_dict()} if self.privacy is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.alignment = alignment_from_state_dict(state["alignment"])
        self.rng.bit_generator.state = state["rng"]
        self.nodes.restore_profiles(state["profiles"])
        self.last_experts = {k: list(v) for k, v in state["last_experts"].items()}
        if self.privacy is not None and "accountant" in state:
            self.privacy.accountant.load_state_dict(state["accountant"])
