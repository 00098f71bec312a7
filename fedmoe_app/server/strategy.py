"""FedMoE: a Flower strategy that sends every client only the experts it is assigned.

One round, value in and value out (the loop, :func:`~.loop.run_rounds`, owns the arrays):
:meth:`FedMoE.plan_train` samples nodes, plans the assignment (:class:`~.planner.Planner`) and
builds one message per node with the shared part and *its* experts (a :class:`~.rounds.TrainRound`);
:meth:`FedMoE.aggregate_round` validates the replies, averages each expert over its trainers and
returns ``(arrays, outcome)``; :meth:`FedMoE.plan_evaluate` / :meth:`FedMoE.evaluate_round` let
clients evaluate their sparse view. Flower's ``configure_*`` / ``aggregate_*`` wrap these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..config import RunConfig
from ..models import AnySpec, model_costs
from ..tensors import Arrays, moe_layers
from ..wire.records import from_record, to_record
from .loop import EvaluateFn, FlowerEvaluateFn, RoundCallback, RoundHooks, run_rounds, starting_arrays
from .messages import evaluate_messages, train_messages
from .planner import Planner
from .replies import ReplyLimits, collect_train_replies, evaluate_outcome
from .rounds import EvaluateOutcome, TrainOutcome, TrainRound, train_outcome
from .sampling import Sample, sample_nodes
from .state import ServerState
from .update import bounded_updates, updated_model


class FedMoE(Strategy):
    """Federated Mixture-of-Experts with client-expert alignment.

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (policy, capacity, sampling, alignment knobs).
    spec : AnySpec
        Model shape (number of experts, top-k, sizes) of the run's model.
    initial_arrays : Arrays
        The global model :meth:`start` begins from unless given one (:mod:`fedmoe_app.tensors` names).
    state : dict, optional
        What :meth:`state_dict` saved (a checkpoint's), to resume from.
    in_place : bool
        The caller hands ``initial_arrays`` over: each round's averages are written into the
        global tensors (:func:`~..maths.aggregation.aggregate` ``in_place``), so the server holds
        one model (a bf16 checkpoint: N bytes, not N for the old tensors plus N for the new).
        Default: new tensors each round, ``initial_arrays`` left as they are.

    """

    def __init__(
        self,
        cfg: RunConfig,
        spec: AnySpec,
        initial_arrays: Arrays,
        state: dict[str, Any] | None = None,
        *,
        in_place: bool = False,
    ) -> None:
        self.rounds, self.rules, self.knobs = cfg.round, cfg.aggregation_rules, cfg.alignment
        self.in_place = in_place
        self.spec = spec
        self.num_experts = spec.num_experts
        self.initial_arrays: Arrays = dict(initial_arrays)
        self.layers = moe_layers(initial_arrays)  # MoE layers, the rows of every holding
        self.planner = Planner(cfg.planning, model_costs(spec), len(self.layers))
        sections = {"alignment": cfg.alignment, "rounds": cfg.round, "privacy": cfg.privacy}
        self.state = ServerState(spec.num_experts, len(self.layers), tied=cfg.tie_layers, **sections)
        if state is not None:
            self.state.load_state_dict(state)
        self.limits = ReplyLimits.of(spec, cfg.local_epochs, len(self.layers))
        self._flower_round: tuple[Arrays, TrainRound] | None = None  # configure_train -> aggregate_train

    def summary(self) -> None:
        """Log the strategy's configuration."""
        r, p, k = self.rounds, self.planner.cfg, self.knobs
        log(INFO, "\t├── Policy: %s, capacity: %s", p.policy, p.capacity)
        log(INFO, "\t├── Experts: %d, top-k: %d", self.num_experts, self.spec.top_k)
        log(INFO, "\t├── Sampling: fraction-train %.2f (min %d)", r.fraction_train, r.min_train_nodes)
        decays = (k.fitness_ema, k.fitness_decay, k.usage_decay)
        log(INFO, "\t└── Fitness EMA %.2f, decay %.2f; usage decay %.2f", *decays)

    # ------------------------------------------------------------------ Flower's Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the round on ``arrays``; return one message per sampled node (classic ``configure_fit``)."""
        current = from_record(arrays)
        train_round = self.plan_train(server_round, current, grid)
        self._flower_round = (current, train_round)
        return train_round.messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies to the last ``configure_train`` (classic ``aggregate_fit``)."""
        if self._flower_round is None:
            log(WARNING, "aggregate_train: round %d was not configured; replies ignored", server_round)
            return None, None
        (current, train_round), self._flower_round = self._flower_round, None
        arrays, outcome = self.aggregate_round(current, replies, train_round)
        return to_record(arrays), outcome.metric_record()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled known clients their sparse view of ``arrays`` (shared + last-trained experts)."""
        return self.plan_evaluate(server_round, from_record(arrays), grid)[0]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local test loss and accuracy (+ the worst 10 %)."""
        return self.evaluate_round(replies).metric_record()

    # ------------------------------------------------------------------ one round, by value
    def plan_train(self, server_round: int, arrays: Mapping[str, np.ndarray], grid: Grid) -> TrainRound:
        """Sample nodes, plan the round on ``arrays`` and build its messages; return all of it."""
        sample = self._sample(grid, self.rounds.fraction_train, self.rounds.min_train_nodes, server_round)
        node_of = {self.state.nodes.client_of(n): n for n in sample.nodes}
        sampled = list(node_of)
        profiles = [self.state.profiles.get(c, {}) for c in sampled]
        plan = self.planner.plan(self.state.alignment, sampled, profiles, arrays, self.state.rng)
        at = {"layers": self.layers, "server_round": server_round, "rounds": self.rounds}
        policy, rng = self.planner.cfg.policy, self.state.rng
        built = train_messages(plan, arrays, node_of, self.state.profiles, **at, rng=rng, policy=policy)
        return TrainRound(
            server_round=server_round,
            plan=plan,
            messages=built.messages,
            sent=built.sent,
            bytes_down=built.bytes_down,
            dense_bytes_down=built.dense_bytes_down,
            query_failures=sample.query_failures,
            population=sample.population,
        )

    def aggregate_round(
        self, arrays: Mapping[str, np.ndarray], replies: Iterable[Message], train_round: TrainRound
    ) -> tuple[Arrays, TrainOutcome]:
        """Validate the replies to ``train_round``; return the new arrays and what was aggregated.

        Invalid replies are logged, counted under ``rejected`` and left out of the model and the
        alignment state; with fewer than ``min-replies`` valid replies the model is kept.
        """
        got = collect_train_replies(replies, train_round.sent, self.limits)
        if len(got.valid) < self.rounds.min_replies:
            few = (len(got.valid), self.rounds.min_replies)
            log(WARNING, "aggregate_train: %d valid repl(ies) < min-replies %d; keeping the model", *few)
            return dict(arrays), train_outcome(got, None, self.limits, self.state.privacy_report())
        priv = self.state.privacy
        bounded = bounded_updates(arrays, got.valid, self.rules, private=priv is not None)
        kept, new = [got.valid[i] for i in bounded.kept], dict(arrays)
        if kept:
            new = updated_model(
                arrays,
                kept,
                bounded,
                self.rules,
                privacy=priv,
                population=train_round.population,
                in_place=self.in_place,
            )
            self.state.learn(kept, bounded.updates)
        return new, train_outcome(got, bounded, self.limits, self.state.privacy_report())

    def plan_evaluate(
        self, server_round: int, arrays: Mapping[str, np.ndarray], grid: Grid
    ) -> tuple[list[Message], int]:
        """Return the evaluation messages of a round and the number of nodes whose query failed."""
        if self.rounds.fraction_evaluate == 0.0:
            return [], 0
        sample = self._sample(
            grid, self.rounds.fraction_evaluate, self.rounds.min_evaluate_nodes, server_round
        )
        held = {n: self._evaluation_experts(self.state.nodes.client_of(n), arrays) for n in sample.nodes}
        messages = evaluate_messages(
            arrays, held, layers=self.layers, server_round=server_round, wire_dtype=self.rounds.wire_dtype
        )
        return messages, sample.query_failures

    def evaluate_round(self, replies: Iterable[Message]) -> EvaluateOutcome:
        """Per-client local test results of a round; invalid replies rejected and counted."""
        return evaluate_outcome(replies, self.state.nodes.clients, self.state.profiles)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | Mapping[str, np.ndarray] | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: FlowerEvaluateFn | None = None,
        *,
        central_eval: EvaluateFn | None = None,
        on_round: RoundCallback | None = None,
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` as :meth:`flwr.serverapp.strategy.Strategy.start` does.

        ``initial_arrays`` (an ArrayRecord or named numpy arrays; default: the model the strategy
        was built with) must have that model's tensor names and shapes, else ValueError.
        ``evaluate_fn(round, arrays)`` runs before round 1 (as round 0) and after every round,
        its metrics kept in ``Result.evaluate_metrics_serverapp`` and the round's metrics row;
        ``central_eval`` does the same on numpy arrays; ``on_round(row, arrays)`` receives each
        round's metrics row (:func:`~.rounds.round_row`) and the arrays after it. Each message's
        config comes from the run config, not from ``train_config`` / ``evaluate_config``.
        """
        del train_config, evaluate_config  # every message's config is built from the run config
        arrays = starting_arrays(initial_arrays, self.initial_arrays)
        hooks = RoundHooks(central_eval=central_eval, evaluate_fn=evaluate_fn, on_round=on_round)
        span = range(start_round, num_rounds + 1)
        return run_rounds(self, grid, arrays, span, hooks, timeout=timeout, rounds=self.rounds)

    # ------------------------------------------------------------------ state
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int) -> Sample:
        return sample_nodes(
            self.state.nodes,
            grid,
            fraction=fraction,
            minimum=minimum,
            server_round=server_round,
            rng=self.state.rng,
            discovery=self.rounds.discovery,
        )

    def _evaluation_experts(self, client_id: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Return the holding a client evaluates: the one it last trained, else its policy's pick."""
        last = self.state.holding_of(client_id)
        if last is not None:
            return last
        capacity = self.planner.capacity([self.state.profiles.get(client_id, {})], arrays)
        unseen = self.planner.policy.evaluation_policy
        planned = self.state.alignment.plan([client_id], capacity, unseen, self.state.rng)[0]
        return planned if planned.ndim == 2 else np.repeat(planned[None, :], len(self.layers), axis=0)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to resume (:meth:`.state.ServerState.state_dict`)."""
        return self.state.state_dict()
