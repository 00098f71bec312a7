"""What one round sent, aggregated and evaluated, and the metrics row recorded from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common import log

from ..alignment import load_cv
from ..config import RoundSection
from ..maths.robust import Bounded
from ..wire.holdings import holding_lists
from ..wire.protocol import Sent
from .planner import RoundPlan

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .replies import ReplyLimits, TrainReplies


def round_lr(rounds: RoundSection, server_round: int) -> float:
    """Return the learning rate of round ``server_round`` (1-based), sent in its train messages.

    Warm-up: round ``r <= warmup-rounds`` (``W``) gets ``lr × r / W``. After it, ``constant``
    keeps ``lr``; ``cosine`` decays from ``lr`` to ``lr-min`` over the remaining rounds,
    ``lr-min + (lr - lr-min) × (1 + cos(π (r - W) / (N - W))) / 2`` with ``N =
    num-server-rounds``, so the last round gets ``lr-min`` (the FlowerTune schedule when ``W = 0``).
    Rounds past ``N`` (a resumed run given more rounds) keep ``lr-min``.
    """
    r, w, n = server_round, rounds.warmup_rounds, rounds.num_server_rounds
    if r <= w:
        return rounds.lr * r / w
    if rounds.lr_schedule == "constant":
        return rounds.lr
    if rounds.lr_schedule != "cosine":
        raise ValueError(f"lr-schedule must be 'constant' or 'cosine', got {rounds.lr_schedule!r}")
    progress = min(1.0, (r - w) / max(n - w, 1))
    return rounds.lr_min + (rounds.lr - rounds.lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainRound:
    """A planned training round: the plan, the messages and what each node was sent."""

    server_round: int
    plan: RoundPlan
    messages: list[Message]
    sent: dict[int, Sent]  # node id -> what it was sent (the yardstick of its reply)
    bytes_down: int
    dense_bytes_down: int  # what the same nodes would have downloaded with every expert
    query_failures: int  # nodes whose capacity query failed while sampling
    population: int = 0  # nodes the sample was drawn from (the DP accountant's K)
    bound_changes: int = 0  # queries so far whose example count differed from the kept bound


@dataclass(frozen=True)
class TrainOutcome:
    """What ``aggregate_train`` made of a round's replies."""

    failures: int  # sent nodes that failed or did not reply
    rejected: dict[str, int]  # rejection reason -> replies
    valid_replies: int
    num_examples: int
    bytes_up: int
    expert_load: np.ndarray  # [E] tokens trained per expert (zeros if the model was kept)
    train_loss: float  # example-weighted mean; NaN without valid replies
    dropped_updates: int = 0  # (client, group) updates left out for their size (robust.py)
    capped_weights: int = 0  # clients whose example count was capped
    clipped_updates: int = 0  # (client, group) updates scaled back onto the bound (robust.py)
    capped_tokens: int = 0  # (client, layer, expert) token weights capped at the fair share
    privacy: dict[str, Any] | None = None  # dp_* metrics (accounting.py); None with dp = "off"
    ray_nodes: dict[str, str] | None = None  # client id -> Ray node it trained on (simulation)
    expert_load_per_layer: np.ndarray | None = None  # [L, E] tokens trained per (MoE layer, expert)

    def metric_record(self) -> MetricRecord:
        """Return the outcome as Flower's ``train_metrics_clientapp`` record."""
        loss = float(self.train_loss) if self.num_examples else 0.0
        return MetricRecord(
            {"train-loss": loss, "valid-replies": self.valid_replies, "num-examples": self.num_examples}
        )


def train_outcome(
    got: TrainReplies, bounded: Bounded | None, limits: ReplyLimits, privacy: dict[str, Any] | None
) -> TrainOutcome:
    """Return what a round aggregated: ``got`` replies, of which ``bounded`` entered the model.

    ``bounded`` is None when the round kept the model.

    The training loss is that of the replies that entered the model, at the weights they entered
    with (of every valid reply when the model was kept).
    """
    updates = bounded.routing if bounded is not None else []
    tokens = np.stack([u.tokens for u in updates]).sum(axis=0) if updates else np.zeros(limits.num_experts)
    rows = [u.layer_tokens for u in updates if u.layer_tokens is not None]
    per_layer = (
        np.stack(rows).astype(np.float64).sum(axis=0)
        if rows
        else np.zeros((limits.num_layers, limits.num_experts))
    )
    if bounded is not None:
        pairs = [(got.valid[i].loss, u.num_examples) for i, u in zip(bounded.kept, bounded.updates)]
    else:
        pairs = [(r.loss, r.update.num_examples) for r in got.valid]
    n = sum(k for _, k in pairs)
    return TrainOutcome(
        failures=got.failures,
        rejected=got.rejected,
        valid_replies=len(got.valid),
        num_examples=n,
        bytes_up=got.bytes_up,
        expert_load=tokens,
        expert_load_per_layer=per_layer,
        train_loss=sum(loss * k for loss, k in pairs) / n if n else math.nan,
        dropped_updates=bounded.dropped if bounded else 0,
        capped_weights=bounded.capped if bounded else 0,
        clipped_updates=bounded.clipped if bounded else 0,
        capped_tokens=bounded.token_capped if bounded else 0,
        privacy=privacy,
        ray_nodes={r.client_id: r.ray_node for r in got.valid if r.ray_node is not None},
    )


@dataclass(frozen=True)
class EvaluateOutcome:
    """The clients' local test results of a round: each on its own experts (personalized view)."""

    loss: float  # example-weighted mean (NaN without a valid reply)
    accuracy: float  # example-weighted mean (NaN without a valid reply)
    worst10_accuracy: float  # mean accuracy of the worst 10 % of the evaluated clients (at least one)
    num_examples: int
    by_client: dict[str, float]  # client id -> accuracy
    rejected: dict[str, int]  # rejected replies by reason
    bpb: float = math.nan  # text: bits per byte over every valid text reply (byte-weighted)

    @classmethod
    def from_clients(
        cls,
        clients: dict[str, tuple[int, float, float]],
        rejected: dict[str, int],
        *,
        text: dict[str, tuple[float, int]] | None = None,
    ) -> EvaluateOutcome:
        """Summarize ``{client id: (examples, loss, accuracy)}`` and the rejections by reason.

        ``text`` (text runs): ``{client id: (bits per byte, target bytes)}``; their byte-weighted
        mean is the personalized bits per byte, exact whatever the tokenizer.
        """
        if not clients:
            return cls(math.nan, math.nan, math.nan, 0, {}, dict(rejected))
        bpb = math.nan
        if text:
            bits, nbytes = np.array(list(text.values()), dtype=np.float64).T
            bpb = float((bits * nbytes).sum() / nbytes.sum())
        n = np.array([c[0] for c in clients.values()], dtype=np.float64)
        loss = np.array([c[1] for c in clients.values()])
        acc = np.array([c[2] for c in clients.values()])
        worst = np.sort(acc)[: max(1, int(np.ceil(0.1 * len(acc))))]
        return cls(
            loss=float((n * loss).sum() / n.sum()),
            accuracy=float((n * acc).sum() / n.sum()),
            worst10_accuracy=float(worst.mean()),
            num_examples=int(n.sum()),
            by_client={cid: c[2] for cid, c in sorted(clients.items())},
            rejected=dict(rejected),
            bpb=bpb,
        )

    def metric_record(self) -> MetricRecord | None:
        """Return the outcome as Flower's ``evaluate_metrics_clientapp`` record (None if empty)."""
        if not self.by_client:
            return None
        return MetricRecord(
            {
                "eval-loss": self.loss,
                "eval-accuracy": self.accuracy,
                "eval-accuracy-worst10": self.worst10_accuracy,
                "num-examples": self.num_examples,
            }
        )


def round_row(
    train_round: TrainRound,
    outcome: TrainOutcome,
    *,
    evaluate_query_failures: int,
    client_eval: EvaluateOutcome | None,
    central_eval: dict[str, float] | None,
    wall_time_s: float,
    timing_s: dict[str, float],
) -> dict[str, Any]:
    """Return the metrics row of one round (``metrics.json``; keys in the README, "Outputs").

    ``timing_s`` is where the round's wall time went (:mod:`.timing`): the server's own
    seconds per phase (``configure`` includes ``planning``), and the Grid's ``clients`` and
    ``link`` seconds.
    """
    plan = train_round.plan
    assigned_clients = plan.assignment.any(axis=1).sum(axis=0)
    row: dict[str, Any] = {
        "round": train_round.server_round,
        "failures": train_round.query_failures + outcome.failures + evaluate_query_failures,
        "rejected": outcome.rejected,
        "bytes_down": train_round.bytes_down,
        "dense_bytes_down": train_round.dense_bytes_down,
        "assignment": {cid: plan.experts_of(i) for i, cid in enumerate(plan.client_ids)},
        "assigned_clients": assigned_clients.tolist(),
        "capacity": {cid: int(c) for cid, c in zip(plan.client_ids, plan.capacity)},
        "virtual_round_time_s": plan.virtual_round_time_s,
        "late_clients": plan.late_clients,
        "sample_budget": {cid: int(b) for cid, b in zip(plan.client_ids, plan.budgets)},
        "partial_clients": int((plan.budgets > 0).sum()),
        "bytes_up": outcome.bytes_up,
        "expert_load": outcome.expert_load.tolist(),
        "load_cv": load_cv(assigned_clients),
        "token_load_cv": load_cv(outcome.expert_load),
        "valid_replies": outcome.valid_replies,
        "dropped_updates": outcome.dropped_updates,
        "capped_weights": outcome.capped_weights,
        "clipped_updates": outcome.clipped_updates,
        "capped_tokens": outcome.capped_tokens,
        "example_bound_changes": train_round.bound_changes,
        "train_loss": outcome.train_loss,
    }
    if outcome.expert_load_per_layer is not None:
        row["expert_load_per_layer"] = outcome.expert_load_per_layer.tolist()
    if not plan.tied:
        row["layer_assignment"] = {
            cid: holding_lists(plan.assignment[i]) for i, cid in enumerate(plan.client_ids)
        }
    if outcome.privacy is not None:
        row.update(outcome.privacy)
    if outcome.ray_nodes:
        row["ray_nodes"] = dict(sorted(outcome.ray_nodes.items()))
    if client_eval is not None:
        row["eval_rejected"] = client_eval.rejected
    if client_eval is not None and client_eval.by_client:
        row.update(
            client_loss=client_eval.loss,
            client_accuracy=client_eval.accuracy,
            client_accuracy_worst10=client_eval.worst10_accuracy,
            client_accuracies=client_eval.by_client,
        )
        if math.isfinite(client_eval.bpb):
            row["client_bpb"] = client_eval.bpb
    if central_eval:
        row.update(central_eval)
    row["wall_time_s"] = wall_time_s
    row["timing_s"] = timing_s
    return row


def log_round(row: dict[str, Any]) -> None:
    """Log a round's metrics row in one line."""
    acc = row.get("accuracy")
    down, dense = row.get("bytes_down", 0), row.get("dense_bytes_down", 0)
    log(
        INFO,
        "[ROUND %d] acc %s | down %.1f kB (%.0f%% of dense) up %.1f kB | load CV %.2f "
        "| failures %d rejected %s",
        row["round"],
        f"{acc:.4f}" if acc is not None and not math.isnan(acc) else "n/a",
        down / 1e3,
        100 * down / dense if dense else 0.0,
        row.get("bytes_up", 0) / 1e3,
        row.get("load_cv") or 0.0,
        row.get("failures", 0),
        row.get("rejected") or {},
    )
    if "dp_epsilon_shared" in row:
        log(
            INFO,
            "[ROUND %d] DP epsilon (delta %s): shared %.3g, experts max %.3g %s | trainers %s | clipped %d",
            row["round"],
            row.get("dp_delta"),
            row["dp_epsilon_shared"],
            row["dp_epsilon_max_expert"],
            [round(e, 3) for e in row["dp_epsilon_experts"]],
            row["dp_trainers_experts"],
            row.get("dp_clipped", 0),
        )
