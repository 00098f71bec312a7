"""The round planner: capacity per client -> expert assignment -> sample budgets -> virtual time.

``FedMoE.configure_train`` asks :meth:`Planner.plan` for a :class:`RoundPlan` and builds its
messages from it; the metrics row of the round is recorded from that plan and from what
``aggregate_train`` aggregated. The functions below apply the capacity model
(:mod:`fedmoe_app.capacity`) to the profiles the strategy stores, with the run config's
deadline, epochs and batch size.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.common import log

from ..alignment import AlignmentState, enforce_min_trainers, get_policy
from ..capacity import (
    Adapters,
    CapacityProfile,
    MemoryModel,
    ModelCosts,
    capacity_from_profiles,
    profile_arrays,
    round_time_s,
    virtual_round_time_s,
)
from ..config import ConfigError, PlanningSection
from ..tensors import payload_nbytes

Profiles = Sequence[CapacityProfile | Mapping[str, Any]]


@dataclass(frozen=True)
class RoundPlan:
    """One training round's plan.

    Attributes
    ----------
    client_ids : list of str
        The round's clients, in message order (clients skipped for capacity left out).
    capacity : np.ndarray
        int64 ``[C]``: experts each client can hold (0: none, it trains the shared part
        against one read-only expert).
    assignment : np.ndarray
        bool ``[C, L, E]``: each client's holding, the experts it receives in every MoE layer
        (equal rows when layers are tied).
    frozen : np.ndarray
        bool ``[C]``: clients that hold their experts read-only and train the shared part
        only (capacity 0, or below ``min-trained-experts`` except under ``dense``).
    budgets : np.ndarray
        int64 ``[C]``: training samples asked of each client; 0 means its full local work.
    virtual_round_time_s : float or None
        Simulated duration of the round (slowest client); None when a profile is incomplete.
    late_clients : int or None
        Clients whose simulated round time exceeds ``round-deadline-s`` (stragglers the
        round waits for; 0 without a deadline); None when a profile is incomplete.
    tied : bool
        Whether every client holds the same experts in every layer (``tie-layers``).
    plan_s : float
        Seconds the alignment took to plan (the policy's assignment, incl. ``dp`` checks).

    """

    client_ids: list[str]
    capacity: np.ndarray
    assignment: np.ndarray
    frozen: np.ndarray
    budgets: np.ndarray
    virtual_round_time_s: float | None
    late_clients: int | None = None
    tied: bool = True
    plan_s: float = 0.0

    def experts_of(self, row: int) -> list[int]:
        """Global expert ids assigned to client row ``row`` (in any MoE layer)."""
        return np.flatnonzero(self.assignment[row].any(axis=0)).tolist()


class Planner:
    """Plans training rounds for a run: capacities, assignment, budgets and virtual time.

    Parameters
    ----------
    cfg : PlanningSection
        ``policy``, ``capacity``, ``experts-per-client``, ``under-capacity``,
        ``round-deadline-s``, ``min-trained-experts``, ``local-epochs``, ``batch-size`` and
        the least trainers of a planned expert (``dp-min-trainers`` under DP, else 0).
    costs : ModelCosts
        The model's counted costs (memory and time models).
    num_layers : int
        MoE layers of the model: the rows of every holding.
    adapters : Adapters, optional
        The run's LoRA adapters (``peft = "lora"``: ``fedmoe_app.models.model_adapters(spec)``):
        capacity is then planned with LoRA's memory (the base frozen, the adapters trained) and
        transfers (the adapters only); None: full training.

    """

    def __init__(
        self, cfg: PlanningSection, costs: ModelCosts, num_layers: int = 1, adapters: Adapters | None = None
    ) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.memory = MemoryModel(
            costs, cfg.batch_size, optimizer_states=cfg.optimizer_states, adapters=adapters
        )
        if adapters is not None:
            log(
                INFO,
                "capacity: LoRA pricing, frozen base + rank-%d adapters (%d shared values, %d per expert)",
                adapters.rank,
                adapters.shared,
                adapters.expert,
            )
        self.profiled = cfg.capacity == "profiled"
        self.policy = get_policy(cfg.policy)

    def capacity(self, profiles: Profiles, global_arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Experts each client can hold this round (int64; 0 = cannot hold one).

        ``experts-per-client`` for every client under ``capacity = "fixed"``; measured from
        the profiles and capped by ``experts-per-client`` under ``"profiled"``.
        """
        fixed = np.full(len(profiles), self.cfg.experts_per_client, dtype=np.int64)
        if not self.profiled or not len(profiles):
            return fixed
        measured = capacity_for_profiles(profiles, self.memory, self.cfg, global_arrays)
        return np.minimum(measured, fixed)

    def plan(
        self,
        alignment: AlignmentState,
        client_ids: Sequence[str],
        profiles: Profiles,
        global_arrays: Mapping[str, np.ndarray],
        rng: np.random.Generator,
    ) -> RoundPlan:
        """Plan one round for ``client_ids`` (with their stored ``profiles``, same order).

        Clients that cannot hold one expert are left out under ``under-capacity = "skip"``;
        under ``"shared-only"`` they get their best expert read-only (the smallest model
        with a head) and train the shared tensors alone.
        """
        ids, profiles = list(client_ids), list(profiles)
        capacity = self.capacity(profiles, global_arrays)
        if self.cfg.under_capacity == "skip":
            keep = capacity > 0
            ids = [c for c, k in zip(ids, keep) if k]
            profiles = [p for p, k in zip(profiles, keep) if k]
            capacity = capacity[keep]
            if not keep.all():
                log(INFO, "configure_train: skipping %d client(s) that cannot hold one expert", (~keep).sum())
        num_experts = self.memory.costs.num_experts
        t0 = time.perf_counter()
        if ids:
            planned = alignment.plan(ids, np.maximum(capacity, 1), self.policy, rng)
        else:
            planned = np.zeros((0, num_experts), dtype=bool)
        tied = planned.ndim == 2  # one plan for every MoE layer, else [C, L, E]
        frozen = self.policy.frozen(capacity, self.cfg.min_trained_experts)
        if self.cfg.min_trainers > 0 and ids:  # dp runs are tied (config)
            planned = self._min_trainers(alignment, ids, planned, frozen)
        holding = np.repeat(planned[:, None, :], self.num_layers, axis=1) if tied else planned
        held = holding.sum(axis=2).max(axis=1, initial=0)  # experts held in the fullest layer
        plan_s = time.perf_counter() - t0
        budgets = self._sample_budgets(profiles, held, global_arrays)
        times = self._client_times(profiles, held, budgets, global_arrays)
        deadline = float(self.cfg.round_deadline_s)
        return RoundPlan(
            client_ids=ids,
            capacity=capacity,
            assignment=holding,
            frozen=frozen,
            budgets=budgets,
            virtual_round_time_s=None if times is None else virtual_round_time_s(times),
            late_clients=None if times is None else int((times > deadline).sum()) if deadline > 0 else 0,
            tied=tied,
            plan_s=plan_s,
        )

    def _min_trainers(
        self, alignment: AlignmentState, ids: list[str], assignment: np.ndarray, frozen: np.ndarray
    ) -> np.ndarray:
        """Plan no expert to fewer than ``dp-min-trainers`` trainers (:func:`enforce_min_trainers`)."""
        m = self.cfg.min_trainers
        try:
            return enforce_min_trainers(assignment, ~frozen, alignment.desirability(ids), m)
        except ValueError as exc:
            raise ConfigError(
                f"run-config key 'dp-min-trainers' = {m} is invalid; allowed: at most the clients "
                f"that train experts in a round ({exc})"
            ) from None

    def _sample_budgets(
        self, profiles: Profiles, held: np.ndarray, global_arrays: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """Training samples per client this round; 0 means no limit.

        With ``capacity = "profiled"`` and a ``round-deadline-s``, a slow client is asked for
        the samples it can process before the deadline (partial local work); the fixed,
        capacity-unaware baseline always trains full epochs.
        """
        budgets = np.zeros(len(profiles), dtype=np.int64)
        if not self.profiled or self.cfg.round_deadline_s <= 0 or not len(profiles):
            return budgets
        full = planned_samples(profiles, self.cfg)
        budget = deadline_sample_budget(profiles, held, self.memory, self.cfg, global_arrays)
        limited = (full > 0) & (budget < full)
        budgets[limited] = budget[limited]
        return budgets

    def _client_times(
        self,
        profiles: Profiles,
        held: np.ndarray,
        budgets: np.ndarray,
        global_arrays: Mapping[str, np.ndarray],
    ) -> np.ndarray | None:
        """Each client's simulated round seconds at its budget; None when a profile is incomplete."""
        if not len(profiles) or not all(profiles):
            return None
        full = planned_samples(profiles, self.cfg)
        samples = np.where(budgets > 0, np.minimum(budgets, full), full)
        return _client_times(profiles, held, self.memory, global_arrays, samples, self.cfg.wire_dtype)


def capacity_for_profiles(
    profiles: Profiles,
    memory: MemoryModel,
    cfg: PlanningSection,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Capacities for the strategy: :func:`capacity_from_profiles` on stored profiles.

    Uses ``cfg.round_deadline_s`` (0: none) with one batch of samples (the rest of the
    local work shrinks to fit the deadline, see :func:`deadline_sample_budget`; 0 when
    ``num-examples`` is unknown: only the bytes count), wire sizes from ``global_arrays``
    when given (under LoRA the global model is the adapters, so they are the adapters' sizes;
    without arrays, ``memory``'s :meth:`~fedmoe_app.capacity.MemoryModel.wire_values`),
    ``min_experts = 1``. ``memory`` prices training: full, or LoRA with its adapters.
    A client whose profile lacks memory, compute or link figures (it never answered a
    query) gets the fixed ``cfg.experts_per_client``.
    """
    n = len(profiles)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    a = profile_arrays(profiles)
    known = np.isfinite(a["memory_bytes"]) & (a["gflops"] > 0) & (a["down_mbps"] > 0)
    known &= a["up_mbps"] > 0
    fixed = min(int(cfg.experts_per_client), memory.costs.num_experts)
    out = np.full(n, fixed, dtype=np.int64)
    if not known.any():
        return out
    shared_nb, expert_nb = wire_payload_nbytes(global_arrays, cfg.wire_dtype)
    # Against a deadline only the transfers and one batch must fit: the strategy shrinks a
    # slow client's local work to its sample budget (deadline_sample_budget).
    samples = np.minimum(cfg.local_epochs * np.nan_to_num(a["num_examples"], nan=0.0), cfg.batch_size)
    out[known] = capacity_from_profiles(
        a["memory_bytes"][known],
        a["gflops"][known],
        a["down_mbps"][known],
        a["up_mbps"][known],
        costs=memory.costs,
        batch_size=memory.batch_size,
        samples=samples[known],
        deadline_s=float(cfg.round_deadline_s) or None,
        shared_nbytes=shared_nb,
        expert_nbytes=expert_nb or None,
        samples_per_s=a["samples_per_s"][known],
        memory_model=memory,
    )
    return out


def wire_payload_nbytes(
    global_arrays: Mapping[str, np.ndarray] | None, wire_dtype: str
) -> tuple[int | None, int | None]:
    """``(shared bytes, bytes of one expert)`` as the wire carries them (bf16: half of float32).

    ``(None, None)`` without arrays (the planner then prices transfers from the model's costs).
    """
    if not global_arrays:
        return None, None
    shared, expert = payload_nbytes(global_arrays)
    if wire_dtype == "bf16":  # every array is float32 on the server; bf16 sends 2 of its 4 bytes
        shared, expert = shared // 2, expert // 2
    return shared, expert


def _client_times(
    profiles: Profiles,
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    global_arrays: Mapping[str, np.ndarray] | None,
    samples: np.ndarray,
    wire_dtype: str,
) -> np.ndarray | None:
    """Per-client round seconds, or None when a profile lacks compute or link figures."""
    a = profile_arrays(profiles)
    if not ((a["gflops"] > 0) & (a["down_mbps"] > 0) & (a["up_mbps"] > 0)).all():
        return None
    shared_nb, expert_nb = wire_payload_nbytes(global_arrays, wire_dtype)
    return round_time_s(
        np.asarray(n_experts),
        a["gflops"],
        a["down_mbps"],
        a["up_mbps"],
        costs=memory.costs,
        samples=samples,
        shared_nbytes=shared_nb,
        expert_nbytes=expert_nb or None,
        samples_per_s=a["samples_per_s"],
        adapters=memory.adapters,
    )


def planned_samples(profiles: Profiles, cfg: PlanningSection) -> np.ndarray:
    """Training samples each client would process in a full round (epochs x its examples)."""
    a = profile_arrays(profiles)
    return cfg.local_epochs * np.nan_to_num(a["num_examples"], nan=0.0)


def deadline_sample_budget(
    profiles: Profiles,
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    cfg: PlanningSection,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Training samples each client can process within ``round-deadline-s``.

    Round time is linear in samples, ``t(s) = t(0) + s * (t(1) - t(0))`` where ``t(0)`` is
    the transfer time, so the budget is ``floor((deadline - t(0)) / (t(1) - t(0)))``,
    clipped to ``[batch-size, epochs x examples]``: a slow client does partial local work
    instead of holding the round up. Without a deadline, or for clients whose profile is
    incomplete, the budget is the full ``epochs x examples``.
    """
    full = planned_samples(profiles, cfg)
    deadline = float(cfg.round_deadline_s)
    if deadline <= 0 or len(profiles) == 0:
        return full
    t0 = _client_times(profiles, n_experts, memory, global_arrays, np.zeros(len(profiles)), cfg.wire_dtype)
    t1 = _client_times(profiles, n_experts, memory, global_arrays, np.ones(len(profiles)), cfg.wire_dtype)
    if t0 is None or t1 is None:
        return full
    per_sample = np.maximum(t1 - t0, 1e-12)
    budget = np.floor(np.maximum(deadline - t0, 0.0) / per_sample)
    return np.minimum(full, np.maximum(budget, cfg.batch_size))


def virtual_round_time(
    profiles: Profiles,
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    cfg: PlanningSection,
    global_arrays: Mapping[str, np.ndarray] | None = None,
    samples: np.ndarray | None = None,
) -> float | None:
    """Return the simulated duration of a round whose clients hold ``n_experts`` (slowest one).

    ``samples`` are the training samples each client processes (default: a full round,
    :func:`planned_samples`). None when a participant's profile lacks compute or link figures.
    """
    if len(profiles) == 0:
        return 0.0
    samples = planned_samples(profiles, cfg) if samples is None else np.asarray(samples, np.float64)
    times = _client_times(profiles, n_experts, memory, global_arrays, samples, cfg.wire_dtype)
    return None if times is None else virtual_round_time_s(times)
