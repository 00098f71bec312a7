"""What the server carries from one round to the next, and checkpoints.

The alignment state (fitness, usage), who is behind each node and their capacity profiles,
the experts each client last trained, the run's random generator and the DP accountant. The
strategy's round functions read it and fold each round's kept replies into it
(:meth:`ServerState.learn`); :meth:`ServerState.state_dict` is the checkpoint's ``strategy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..alignment import AlignmentState, LayeredAlignment, alignment_from_state_dict
from ..config import AlignmentSection, PrivacySection, RoundSection
from ..maths.aggregation import ClientUpdate
from ..wire.holdings import holding_from_lists, holding_lists
from ..wire.protocol import TrainReply
from .discovery import Discovery
from .feedback import feed_alignment
from .private_round import PrivateAggregation


class ServerState:
    """The server's memory of a run (everything but the model).

    Parameters
    ----------
    num_experts : int
        Experts per MoE layer.
    num_layers : int
        MoE layers (one alignment state each when layers are untied).
    alignment : AlignmentSection
        The alignment state's knobs.
    tied : bool
        One alignment state for every MoE layer (``tie-layers``), else one per layer.
    rounds : RoundSection
        The run's seed, reply timeout and query retry (discovery).
    privacy : PrivacySection
        DP settings; an accountant is kept unless ``dp = "off"``.

    """

    def __init__(
        self,
        num_experts: int,
        num_layers: int,
        *,
        alignment: AlignmentSection,
        tied: bool,
        rounds: RoundSection,
        privacy: PrivacySection,
    ) -> None:
        self.num_experts, self.num_layers = num_experts, num_layers
        knobs = dataclasses.asdict(alignment)
        self.alignment = (
            AlignmentState(num_experts, **knobs)
            if tied
            else LayeredAlignment(num_experts, num_layers, **knobs)
        )
        self.rng = np.random.default_rng(rounds.seed)
        self.nodes = Discovery(rounds.round_timeout_s, rounds.query_retry_rounds)
        self.last_held: dict[str, np.ndarray] = {}  # client id -> bool [L, E] holding it last trained
        self.privacy = PrivateAggregation(privacy, num_experts) if privacy.mode != "off" else None

    @property
    def profiles(self) -> dict[str, dict[str, Any]]:
        """Client id -> capacity profile (from queries, refreshed by training replies)."""
        return self.nodes.profiles

    def learn(self, kept: Sequence[TrainReply], updates: Sequence[ClientUpdate]) -> None:
        """Fold the replies that entered the model (and their bounded ``updates``) into the state."""
        feed_alignment(self.alignment, kept, updates)
        for r in kept:
            self.last_held[r.client_id] = r.held.copy()
            self.nodes.record_training(r.client_id, r.metrics, r.update.num_examples)

    def holding_of(self, client_id: str) -> np.ndarray | None:
        """Return the holding a client last trained (None if it never did)."""
        return self.last_held.get(client_id)

    def privacy_report(self) -> dict[str, Any] | None:
        """Return the round's ``dp_*`` metrics (None with ``dp = "off"``)."""
        return self.privacy.report() if self.privacy is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to resume (JSON-serializable)."""
        return {
            "alignment": self.alignment.state_dict(),
            "rng": self.rng.bit_generator.state,
            "profiles": self.profiles,
            "last_experts": {cid: holding_lists(h) for cid, h in self.last_held.items()},
            **({"accountant": self.privacy.accountant.state_dict()} if self.privacy is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.alignment = alignment_from_state_dict(state["alignment"])
        self.rng.bit_generator.state = state["rng"]
        self.nodes.restore_profiles(state["profiles"])
        shape = (self.num_layers, self.num_experts)
        self.last_held = {cid: holding_from_lists(v, *shape) for cid, v in state["last_experts"].items()}
        if self.privacy is not None and "accountant" in state:
            self.privacy.accountant.load_state_dict(state["accountant"])
