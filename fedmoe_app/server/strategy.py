"""FedMoE: a Flower strategy that sends every client only the experts it is assigned.

One round, value in and value out (the loop, :func:`~.loop.run_rounds`, owns the arrays):
:meth:`FedMoE.plan_train` samples nodes, plans the assignment (:class:`~.planner.Planner`) and
builds one message per node with the shared part and *its* experts (a :class:`~.rounds.TrainRound`);
:meth:`FedMoE.aggregate_round` validates the replies, averages each expert over its trainers and
returns ``(arrays, outcome)``; :meth:`FedMoE.plan_evaluate` / :meth:`FedMoE.evaluate_round` let
clients evaluate their sparse view. Flower's ``configure_*`` / ``aggregate_*`` wrap these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..capacity import Adapters, ModelCosts
from ..config import RunConfig
from ..config.run import keyword_config
from ..models import AnySpec, model_adapters, model_costs
from ..tensors import Arrays, experts_in, moe_layers, parse_expert_key
from ..wire.holdings import EXPERT_IDS, LAYER_EXPERTS
from ..wire.records import from_record, to_record
from .loop import EvaluateFn, FlowerEvaluateFn, RoundCallback, RoundHooks, run_rounds, starting_arrays
from .messages import evaluate_messages, train_messages
from .planner import Planner
from .replies import ReplyLimits, collect_train_replies, evaluate_outcome
from .rounds import EvaluateOutcome, TrainOutcome, TrainRound, train_outcome
from .sampling import Sample, sample_nodes
from .state import ServerState
from .update import bounded_updates, updated_model

#: Run-config keys :class:`FedMoE` takes as keyword arguments (``snake_case``); their defaults and
#: checks are :class:`~fedmoe_app.config.RunConfig`'s. The rest of the run config is the clients'.
STRATEGY_KEYS = (
    # rounds: sampling, waiting, what every train message asks
    "num_server_rounds", "fraction_train", "min_train_nodes", "fraction_evaluate", "min_evaluate_nodes",
    "round_timeout_s", "min_replies", "query_retry_rounds", "discovery", "max_failed_rounds",
    "lr", "lr_schedule", "warmup_rounds", "lr_min", "local_epochs", "batch_size", "seed", "wire_dtype",
    # the model's shape
    "num_experts", "top_k", "tie_layers",
    # alignment and planning
    "policy", "experts_per_client", "capacity", "round_deadline_s", "under_capacity",
    "min_trained_experts", "fitness_ema", "fitness_decay", "usage_decay", "w_fitness", "w_usage",
    "fitness_loss_weight", "fitness_init", "load_slack", "approx_min_clients",
    # aggregation and privacy
    "update_bound", "weight_cap", "token_cap", "aggregation", "trim_fraction", "gate_aggregation",
    "route_loss_weight", "gate_balance_rate", "gate_balance_step",
    "dp", "dp_clip_norm", "dp_noise_multiplier", "dp_delta", "dp_min_trainers",
)  # fmt: skip

#: Config entries FedMoE writes into its own messages: a ``train_config`` / ``evaluate_config``
#: may not set them (``lr`` and ``local-epochs`` are the strategy's own arguments); a
#: ``server-round`` entry is overwritten, as Flower's ``FedAvg`` does.
RESERVED_CONFIG_KEYS = (
    LAYER_EXPERTS,
    EXPERT_IDS,
    "lr",
    "local-epochs",
    "seed",
    "frozen-experts",
    "max-samples",
)


def strategy_config(options: Mapping[str, Any]) -> RunConfig:
    """Return the validated :class:`RunConfig` of :class:`FedMoE` keyword ``options`` (snake_case).

    Raises
    ------
    TypeError
        For a key that is not one of :data:`STRATEGY_KEYS`.
    ConfigError
        Naming the run-config key, the bad value and what is allowed.

    """
    return keyword_config(options, STRATEGY_KEYS, "FedMoE")


def arrays_costs(arrays: Mapping[str, np.ndarray], top_k: int) -> ModelCosts:
    """Return the :class:`ModelCosts` the global ``arrays`` tell: parameters only.

    The shared part's and one expert's parameter counts (the mean over the experts) are read from
    the tensors (:mod:`fedmoe_app.tensors` names); activations and FLOPs are unknown (0), so a
    ``"profiled"`` capacity counts weights, gradients, momentum and transfers but not activations
    or compute time. Pass a model family's ``model_costs(spec)`` to :class:`FedMoE` for those.
    """
    shared = sum(int(v.size) for k, v in arrays.items() if parse_expert_key(k) is None)
    per_expert: dict[int, int] = {}
    for k, v in arrays.items():
        if (p := parse_expert_key(k)) is not None:
            per_expert[p[0]] = per_expert.get(p[0], 0) + int(v.size)
    expert = round(sum(per_expert.values()) / len(per_expert)) if per_expert else 0
    return ModelCosts(
        num_experts=len(per_expert),
        top_k=top_k,
        shared_params=shared,
        expert_params=expert,
        fixed_activation_values=0,
        fixed_activation_bytes=0,
        routed_activation_values=0,
        transient_activation_values=0,
        flops_shared=0.0,
        flops_experts=0.0,
        efficiency=(1.0, 1.0),
    )


def _experts_of(arrays: Mapping[str, np.ndarray]) -> int:
    """Return ``E``, the experts of global ``arrays`` (ids ``0..E-1``), else ValueError."""
    ids = experts_in(arrays)
    if not ids or ids != list(range(len(ids))):
        raise ValueError(
            "FedMoE initial_arrays must name experts 0..E-1 as 'experts.<e>.<name>' "
            f"(fedmoe_app.tensors); found expert ids {ids[:10]}"
        )
    return len(ids)


def config_entries(config: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """Return a caller's config entries for FedMoE's messages; ValueError for a reserved key."""
    entries = dict(config.items()) if config is not None else {}
    reserved = sorted(set(entries) & set(RESERVED_CONFIG_KEYS))
    if reserved:
        raise ValueError(
            f"{what} key(s) {reserved} are set by FedMoE itself; allowed: any key but "
            f"{', '.join(RESERVED_CONFIG_KEYS)} (the lr and local epochs are FedMoE's arguments)"
        )
    return entries


class FedMoE(Strategy):
    """Federated Mixture-of-Experts with client-expert alignment.

    Built from plain keyword arguments, as Flower's ``FedAvg`` is::

        strategy = FedMoE(top_k=2, policy="load_balanced", fraction_train=0.5, min_train_nodes=2)
        result = strategy.start(grid, initial_arrays=ArrayRecord(...), num_rounds=3,
                                train_config=ConfigRecord({"my-key": 1}))

    or by the fedmoe app from its run config (:meth:`from_run_config`). What the strategy needs
    of the model comes from the arrays (``experts.<e>.<name>`` for expert tensors,
    :mod:`fedmoe_app.tensors`): the experts, the MoE layers and, without ``costs``, the
    parameter counts capacity planning uses.

    Parameters
    ----------
    initial_arrays : Arrays, optional
        The global model :meth:`start` begins from unless given one; without it, the arrays
        first given to :meth:`start` or ``configure_train`` define the model.
    costs : ModelCosts, optional
        The model's counted costs (``fedmoe_app.models.model_costs(spec)``) for ``capacity =
        "profiled"``; default: the parameter counts of the arrays (:func:`arrays_costs`).
    routes_per_example : int
        Routing decisions per example and chosen expert, the bound on a reply's token counts: 1
        for an image classifier, tokens per sequence x MoE layers for a language model.
    adapters : Adapters, optional
        LoRA fine-tuning (``fedmoe_app.models.model_adapters(spec)``): ``capacity = "profiled"``
        prices a client by its frozen base and trained adapters, and its transfers by the
        adapters, instead of full training (give ``costs`` with them: the base model's).
    state : dict, optional
        What :meth:`state_dict` saved (a checkpoint's), to resume from.
    in_place : bool
        The caller hands ``initial_arrays`` over: each round's averages are written into the
        global tensors (:func:`~..maths.aggregation.aggregate` ``in_place``), so the server holds
        one model (a bf16 checkpoint: N bytes, not N for the old tensors plus N for the new).
        Default: new tensors each round, ``initial_arrays`` left as they are.
    **options
        Any of :data:`STRATEGY_KEYS`: the run-config key of that name with ``-`` as ``_``
        (``fraction_train=0.5``, ``policy="load_balanced"``, ``experts_per_client=2``), checked
        as the run config checks it; a key left out takes the run config's default.
        ``num_experts`` defaults to the experts of the arrays (given: it must match them).

    """

    def __init__(
        self,
        *,
        initial_arrays: Mapping[str, np.ndarray] | None = None,
        costs: ModelCosts | None = None,
        routes_per_example: int = 1,
        adapters: Adapters | None = None,
        state: dict[str, Any] | None = None,
        in_place: bool = False,
        **options: Any,
    ) -> None:
        if routes_per_example < 1:
            raise ValueError(f"FedMoE routes_per_example = {routes_per_example!r} is invalid; allowed: >= 1")
        self._options = dict(options)
        self._configure(strategy_config(options), costs, routes_per_example, state, in_place, adapters)
        if initial_arrays is not None:
            self._bind(initial_arrays)

    @classmethod
    def from_run_config(
        cls,
        cfg: RunConfig,
        spec: AnySpec,
        initial_arrays: Mapping[str, np.ndarray],
        state: dict[str, Any] | None = None,
        *,
        in_place: bool = False,
    ) -> FedMoE:
        """Build the strategy of a fedmoe run: its validated run config and model ``spec``.

        The model's shape (experts, top-k, routes per example, costs, and under ``peft = "lora"``
        its adapters) is the ``spec``'s; ``initial_arrays``, ``state`` and ``in_place`` are as in
        :class:`FedMoE`.
        """
        strategy = cls.__new__(cls)
        strategy._options = None  # the whole run config: nothing to infer from the arrays
        cfg = dataclasses.replace(cfg, num_experts=spec.num_experts, top_k=spec.top_k)
        costs, adapters = model_costs(spec), model_adapters(spec)
        strategy._configure(cfg, costs, spec.routes_per_example, state, in_place, adapters)
        strategy._bind(initial_arrays)
        return strategy

    def _configure(
        self,
        cfg: RunConfig,
        costs: ModelCosts | None,
        routes_per_example: int,
        state: dict[str, Any] | None,
        in_place: bool,
        adapters: Adapters | None = None,
    ) -> None:
        """Keep what does not depend on the model's arrays (see :meth:`_bind` for the rest)."""
        self.cfg = cfg
        self.rounds, self.rules, self.knobs = cfg.round, cfg.aggregation_rules, cfg.alignment
        self.in_place = in_place
        self.costs = costs
        self.adapters = adapters
        self.routes_per_example = routes_per_example
        self._saved_state = state
        self.initial_arrays: Arrays | None = None
        self._flower_round: tuple[Arrays, TrainRound] | None = None  # configure_train -> aggregate_train
        self._train_config: dict[str, Any] = {}
        self._evaluate_config: dict[str, Any] = {}

    def _bind(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take the model's shape from its global ``arrays``: experts, MoE layers, costs, state."""
        if self._options is not None:  # plain keyword arguments: the experts are the arrays'
            found = _experts_of(arrays)
            if "num_experts" in self._options and self._options["num_experts"] != found:
                raise ValueError(
                    f"FedMoE num_experts = {self._options['num_experts']} does not match the "
                    f"{found} experts of initial_arrays"
                )
            self.cfg = strategy_config({**self._options, "num_experts": found})
        cfg = self.cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.initial_arrays = dict(arrays)
        self.layers = moe_layers(arrays)  # MoE layers, the rows of every holding
        costs = self.costs if self.costs is not None else arrays_costs(arrays, cfg.top_k)
        self.planner = Planner(cfg.planning, costs, len(self.layers), self.adapters)
        sections = {"alignment": cfg.alignment, "rounds": cfg.round, "privacy": cfg.privacy}
        self.state = ServerState(cfg.num_experts, len(self.layers), tied=cfg.tie_layers, **sections)
        if self._saved_state is not None:
            self.state.load_state_dict(self._saved_state)
        limits = (cfg.num_experts, cfg.top_k, cfg.local_epochs, self.routes_per_example, len(self.layers))
        self.limits = ReplyLimits(*limits)

    def _bound(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Bind to ``arrays`` unless the strategy already knows its model."""
        if self.initial_arrays is None:
            self._bind(arrays)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        r, p, k = self.rounds, self.cfg.planning, self.knobs
        log(INFO, "\t├── Policy: %s, capacity: %s", p.policy, p.capacity)
        log(INFO, "\t├── Experts: %d, top-k: %d", self.cfg.num_experts, self.cfg.top_k)
        log(INFO, "\t├── Sampling: fraction-train %.2f (min %d)", r.fraction_train, r.min_train_nodes)
        decays = (k.fitness_ema, k.fitness_decay, k.usage_decay)
        log(INFO, "\t└── Fitness EMA %.2f, decay %.2f; usage decay %.2f", *decays)

    # ------------------------------------------------------------------ Flower's Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the round on ``arrays``; return one message per sampled node (classic ``configure_fit``).

        ``config``'s entries join every message's config (:data:`RESERVED_CONFIG_KEYS` excepted).
        """
        current = from_record(arrays)
        self._bound(current)
        train_round = self.plan_train(server_round, current, grid, config=config_entries(config, "config"))
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
        current = from_record(arrays)
        self._bound(current)
        return self.plan_evaluate(server_round, current, grid, config=config_entries(config, "config"))[0]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local test loss and accuracy (+ the worst 10 %)."""
        return self.evaluate_round(replies).metric_record()

    # ------------------------------------------------------------------ one round, by value
    def plan_train(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        grid: Grid,
        config: Mapping[str, Any] | None = None,
    ) -> TrainRound:
        """Sample nodes, plan the round on ``arrays`` and build its messages; return all of it.

        ``config`` entries (a ``train_config``'s) join every message's config.
        """
        sample = self._sample(grid, self.rounds.fraction_train, self.rounds.min_train_nodes, server_round)
        node_of = {self.state.nodes.client_of(n): n for n in sample.nodes}
        sampled = list(node_of)
        profiles = [self.state.profiles.get(c, {}) for c in sampled]
        plan = self.planner.plan(self.state.alignment, sampled, profiles, arrays, self.state.rng)
        at = {"layers": self.layers, "server_round": server_round, "rounds": self.rounds}
        policy, rng = self.planner.cfg.policy, self.state.rng
        extra = self._train_config if config is None else config
        built = train_messages(
            plan, arrays, node_of, self.state.profiles, **at, rng=rng, policy=policy, extra=extra
        )
        return TrainRound(
            server_round=server_round,
            plan=plan,
            messages=built.messages,
            sent=built.sent,
            bytes_down=built.bytes_down,
            dense_bytes_down=built.dense_bytes_down,
            query_failures=sample.query_failures,
            population=sample.population,
            bound_changes=self.state.nodes.bound_changes,
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
            self.state.learn(kept, bounded.routing)
        return new, train_outcome(got, bounded, self.limits, self.state.privacy_report())

    def plan_evaluate(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        grid: Grid,
        config: Mapping[str, Any] | None = None,
    ) -> tuple[list[Message], int]:
        """Return the evaluation messages of a round and the number of nodes whose query failed.

        ``config`` entries (an ``evaluate_config``'s) join every message's config.
        """
        if self.rounds.fraction_evaluate == 0.0:
            return [], 0
        sample = self._sample(
            grid, self.rounds.fraction_evaluate, self.rounds.min_evaluate_nodes, server_round
        )
        held = {n: self._evaluation_experts(self.state.nodes.client_of(n), arrays) for n in sample.nodes}
        messages = evaluate_messages(
            arrays,
            held,
            layers=self.layers,
            server_round=server_round,
            wire_dtype=self.rounds.wire_dtype,
            extra=self._evaluate_config if config is None else config,
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
        was built with) must have that model's tensor names and shapes, else ValueError; a
        strategy built without arrays takes its model from them. ``train_config`` /
        ``evaluate_config`` entries join every train / evaluate message's config, as in
        Flower's ``FedAvg`` (:data:`RESERVED_CONFIG_KEYS`, which FedMoE sets, raise ValueError).
        ``num_rounds`` is the last round (the ``lr`` schedule's too).
        ``evaluate_fn(round, arrays)`` runs before round 1 (as round 0) and after every round,
        its metrics kept in ``Result.evaluate_metrics_serverapp`` and the round's metrics row;
        ``central_eval`` does the same on numpy arrays; ``on_round(row, arrays)`` receives each
        round's metrics row (:func:`~.rounds.round_row`) and the arrays after it.
        """
        self._train_config = config_entries(train_config, "train_config")
        self._evaluate_config = config_entries(evaluate_config, "evaluate_config")
        if self.initial_arrays is None:
            if initial_arrays is None:
                raise ValueError("FedMoE.start needs initial_arrays: the strategy was built without a model")
            given = from_record(initial_arrays) if isinstance(initial_arrays, ArrayRecord) else initial_arrays
            self._bind(given)
        if num_rounds != self.rounds.num_server_rounds:
            self.rounds = dataclasses.replace(self.rounds, num_server_rounds=num_rounds)
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
