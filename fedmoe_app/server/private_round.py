"""The strategy's DP step: private per-group means (:mod:`.privacy`) and their accounting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import PrivacySection
from ..maths.privacy import local_reply_bound, private_mean
from ..tensors import Arrays, experts_in
from ..wire.protocol import TrainReply
from .accounting import GroupAccountant


class PrivateAggregation:
    """DP aggregation of a run (``dp = "central"`` or ``"local"``), with its accountant.

    Parameters
    ----------
    privacy : PrivacySection
        ``dp``, ``dp-clip-norm``, ``dp-noise-multiplier``, ``dp-delta``, ``dp-min-trainers``.
    num_experts : int
        Experts in the model.

    """

    def __init__(self, privacy: PrivacySection, num_experts: int) -> None:
        self.central = privacy.mode == "central"
        self.clip_norm, self.noise_multiplier = privacy.clip_norm, privacy.noise_multiplier
        self.num_experts, self.min_trainers = num_experts, privacy.min_trainers
        self.accountant = GroupAccountant(num_experts, privacy.mode, privacy.noise_multiplier, privacy.delta)
        self.rng = np.random.default_rng()  # never the run's seed (privacy.py)
        self.last: dict[str, Any] | None = None

    def apply(
        self, global_arrays: Mapping[str, np.ndarray], kept: Sequence[TrainReply], population: int
    ) -> Arrays:
        """Return the new model from ``kept`` and account the round (``population``: clients known)."""
        replies = [r.update.arrays for r in kept]
        local = [
            local_reply_bound(sum(v.size for v in a.values()), self.clip_norm, self.noise_multiplier)
            for a in replies
        ]
        res = private_mean(
            global_arrays,
            replies,
            self.num_experts,
            clip_norm=self.clip_norm if self.central else local,
            noise_std=self.noise_multiplier * self.clip_norm if self.central else 0.0,
            rng=self.rng,
            min_trainers=self.min_trainers,
        )
        trainers: dict[int, list[str]] = {-1: [r.client_id for r in kept]}
        for r in kept:
            for e in experts_in(r.update.arrays):
                if res.expert_trainers[e] > 0:  # released this round
                    trainers.setdefault(e, []).append(r.client_id)
        self.accountant.step(trainers, population)
        self.last = {"shared": res.shared_trainers, "experts": res.expert_trainers, "clipped": res.clipped}
        return res.arrays

    def report(self) -> dict[str, Any]:
        """Return the ``dp_*`` metrics of the round last aggregated (trainers 0 if none was)."""
        last = self.last or {"shared": 0, "experts": np.zeros(self.num_experts, np.int64), "clipped": 0}
        self.last = None
        return {**self.accountant.report(last["shared"], last["experts"]), "dp_clipped": last["clipped"]}
