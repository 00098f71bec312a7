"""FedMoE: a Flower strategy that sends every client only the experts it is assigned.

Round ``r``:

1. ``configure_train`` (classic Flower: ``configure_fit``) samples nodes, asks new ones
   for their capacity profile (a ``query`` message), asks the :class:`~.planner.Planner`
   for a :class:`~.planner.RoundPlan` (capacities, assignment, sample budgets, virtual time)
   and builds one fresh Message per node holding the shared tensors plus *its* experts.
2. ``aggregate_train`` (classic: ``aggregate_fit``) validates every reply, averages each
   expert over the clients that trained it (token-weighted) and the shared tensors over
   all (example-weighted), and feeds the routing feedback to the alignment state.
3. ``configure_evaluate`` / ``aggregate_evaluate``: clients evaluate their sparse view
   (shared + the experts they last trained) on their local test split.

:meth:`FedMoE.start` runs the rounds like :meth:`Strategy.start`. Each round's metrics row
(:func:`~.rounds.round_row`) is made from the values these steps return -- the
:class:`~.rounds.TrainRound` sent and the :class:`~.rounds.TrainOutcome` aggregated -- and
handed to the ``on_round`` callback (the run layer records it and writes a checkpoint).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..alignment import AlignmentState, LayeredAlignment, alignment_from_state_dict
from ..capacity import ema_update
from ..config import RunConfig
from ..models import AnySpec, model_costs
from ..tensors import Arrays, moe_layers, select
from .aggregation import aggregate, balance_gate_bias
from .discovery import Discovery
from .feedback import feed_alignment, layer_load
from .layers import payload, plan_lists, stored_payload
from .loop import EvaluateFn, RoundCallback, adopt_initial_arrays, check_same_tensors, run_rounds
from .planner import Planner
from .private_round import PrivateAggregation
from .protocol import (
    ARRAYS,
    CONFIG,
    ReplyRejected,
    Sent,
    TrainReply,
    parse_train_reply,
)
from .records import to_record, wire_nbytes
from .robust import Bounded, bound_updates
from .rounds import EvaluateOutcome, TrainOutcome, TrainRound, evaluate_outcome


class FedMoE(Strategy):
    """Federated Mixture-of-Experts with client-expert alignment.

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (policy, capacity, sampling, alignment knobs).
    spec : AnySpec
        Model shape (number of experts, top-k, sizes) of the run's model.
    initial_arrays : Arrays
        Initial global model, global tensor names (see :mod:`fedmoe_app.tensors`).

    """

    def __init__(self, cfg: RunConfig, spec: AnySpec, initial_arrays: Arrays) -> None:
        self.cfg = cfg
        self.spec = spec
        self.num_experts = spec.num_experts
        self.global_arrays: Arrays = dict(initial_arrays)
        self.layers = moe_layers(initial_arrays)  # MoE layers, rows of per-layer feedback
        self.alignment = (
            AlignmentState(spec.num_experts, **cfg.alignment_kwargs())
            if cfg.tie_layers
            else LayeredAlignment(spec.num_experts, len(self.layers), **cfg.alignment_kwargs())
        )
        self.planner = Planner(cfg, model_costs(spec))
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes = Discovery(cfg.round_timeout_s, cfg.query_retry_rounds)
        self.last_experts: dict[str, Any] = {}  # client id -> experts last trained (per layer: untied)
        self.failures_total = 0
        self._pending: TrainRound | None = None  # sent by configure_train, awaiting replies
        self.population = 0  # clients known when nodes were last sampled (the DP accountant's K)
        self.privacy = PrivateAggregation(cfg, spec.num_experts) if cfg.dp != "off" else None

    @property
    def profiles(self) -> dict[str, dict[str, Any]]:
        """Client id -> capacity profile (from queries, refreshed by training replies)."""
        return self.nodes.profiles

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        """Log the strategy's configuration."""
        c = self.cfg
        log(INFO, "\t├── Policy: %s, capacity: %s", c.policy, c.capacity)
        log(INFO, "\t├── Experts: %d, top-k: %d", self.num_experts, self.spec.top_k)
        log(INFO, "\t├── Sampling: fraction-train %.2f (min %d)", c.fraction_train, c.min_train_nodes)
        log(
            INFO,
            "\t└── Fitness EMA %.2f, decay %.2f; usage decay %.2f",
            c.fitness_ema,
            c.fitness_decay,
            c.usage_decay,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the client × expert assignment and build one message per sampled node.

        This is the Message-API counterpart of the classic ``configure_fit``.
        """
        return self.plan_train(server_round, grid).messages

    def plan_train(self, server_round: int, grid: Grid) -> TrainRound:
        """Sample nodes, plan the round and build its messages; return all of it.

        The returned round is also kept until :meth:`aggregate_train` checks the replies
        against what each node was sent.
        """
        nodes, query_failures = self._sample(
            grid, self.cfg.fraction_train, self.cfg.min_train_nodes, server_round
        )
        node_of = {self.nodes.client_of(n): n for n in nodes}
        sampled = list(node_of)
        plan = self.planner.plan(
            self.alignment,
            sampled,
            [self.profiles.get(c, {}) for c in sampled],
            self.global_arrays,
            self.rng,
        )
        if len(plan.client_ids) < len(sampled):
            log(
                INFO,
                "configure_train: skipping %d client(s) that cannot hold one expert",
                len(sampled) - len(plan.client_ids),
            )
        dense_record_bytes = wire_nbytes(to_record(self.global_arrays))
        messages, sent, bytes_down = [], {}, 0
        for row, cid in enumerate(plan.client_ids):
            node, expert_ids, held = node_of[cid], plan.experts_of(row), plan.layer_experts_of(row)
            read_only = bool(plan.frozen[row])
            sub, names = payload(self.global_arrays, expert_ids, held, self.layers)
            returned = select(sub, []) if read_only else sub
            record = to_record(sub)
            bytes_down += wire_nbytes(record)
            sent[node] = Sent(
                client_id=cid,
                expert_ids=expert_ids,
                shapes={k: (tuple(v.shape), str(v.dtype)) for k, v in returned.items()},
                max_examples=self.profiles.get(cid, {}).get("num-examples"),
                layer_held=held,
            )
            cfg_record = ConfigRecord(
                {
                    **names,
                    "server-round": server_round,
                    "lr": self.cfg.lr,
                    "local-epochs": self.cfg.local_epochs,
                    "seed": int(self.rng.integers(2**31)),
                    "frozen-experts": read_only,
                    "max-samples": int(plan.budgets[row]),
                }
            )
            content = RecordDict({ARRAYS: record, CONFIG: cfg_record})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        if not messages:
            log(WARNING, "configure_train: no node available in round %d", server_round)
        train_round = TrainRound(
            server_round=server_round,
            plan=plan,
            messages=messages,
            sent=sent,
            bytes_down=bytes_down,
            dense_bytes_down=dense_record_bytes * len(plan.client_ids),
            query_failures=query_failures,
        )
        self._pending = train_round
        log(
            INFO,
            "configure_train: %d nodes, %s plan, %.1f kB down (dense %.1f kB)",
            len(messages),
            self.cfg.policy,
            bytes_down / 1e3,
            train_round.dense_bytes_down / 1e3,
        )
        return train_round

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate experts sparsely and update the alignment state.

        This is the Message-API counterpart of the classic ``aggregate_fit``. Invalid
        replies are logged, counted under ``rejected`` and left out of both the model
        and the alignment update; a round with fewer than ``min-replies`` valid replies
        keeps the previous model.
        """
        outcome = self.aggregate_round(server_round, replies)
        return to_record(self.global_arrays), outcome.metric_record()

    def aggregate_round(self, server_round: int, replies: Iterable[Message]) -> TrainOutcome:
        """Do :meth:`aggregate_train`'s work and return what was aggregated."""
        sent = self._pending.sent if self._pending is not None else {}
        self._pending = None
        valid: list[TrainReply] = []
        rejected: Counter[str] = Counter()
        failures, bytes_up, received = 0, 0, set()
        for msg in replies:
            node = msg.metadata.src_node_id
            node_sent = sent.get(node)
            received.add(node)
            if msg.has_error():
                # An error the SuperLink raises for an unreachable node comes from the SuperLink,
                # not from that node: the node then stays in ``missing`` and is counted there once.
                failures += node_sent is not None
                log(
                    WARNING,
                    "aggregate_train: node %s (client %s) failed: %s",
                    node,
                    node_sent.client_id if node_sent else "?",
                    msg.error.reason,
                )
                continue
            if node_sent is None:
                rejected["unexpected-node"] += 1
                log(WARNING, "aggregate_train: reply from node %s that was not sent work", node)
                continue
            try:
                if msg.has_content() and ARRAYS in msg.content:
                    bytes_up += wire_nbytes(msg.content[ARRAYS])
                reply = parse_train_reply(
                    msg.content,
                    node,
                    node_sent,
                    self.num_experts,
                    self.spec.top_k,
                    self.cfg.local_epochs,
                    self.spec.routes_per_example,
                    len(self.layers),
                )
            except ReplyRejected as exc:
                rejected[exc.reason] += 1
                log(
                    WARNING,
                    "aggregate_train: rejected reply of node %s (client %s): %s",
                    node,
                    node_sent.client_id,
                    exc,
                )
                continue
            valid.append(reply)
        missing = set(sent) - received
        failures += len(missing)
        if missing:
            log(WARNING, "aggregate_train: %d node(s) did not reply in time", len(missing))

        tokens, bounded = np.zeros(self.num_experts), None
        if len(valid) >= self.cfg.min_replies:
            bounded = self._apply(valid)
            if bounded.updates:
                tokens = np.stack([u.tokens for u in bounded.updates]).sum(axis=0)
        else:
            log(
                WARNING,
                "aggregate_train: %d valid repl(ies) < min-replies %d; keeping the model",
                len(valid),
                self.cfg.min_replies,
            )
        per_layer = layer_load(bounded.updates if bounded else [], len(self.layers), self.num_experts)
        # the loss of the replies that entered the model, at the weights they entered with
        if bounded is not None:
            pairs = [(valid[i].loss, u.num_examples) for i, u in zip(bounded.kept, bounded.updates)]
        else:
            pairs = [(r.loss, r.update.num_examples) for r in valid]
        n = sum(k for _, k in pairs)
        return TrainOutcome(
            failures=failures,
            rejected=dict(rejected),
            valid_replies=len(valid),
            num_examples=n,
            bytes_up=bytes_up,
            expert_load=tokens,
            expert_load_per_layer=per_layer,
            train_loss=sum(loss * k for loss, k in pairs) / n if n else math.nan,
            dropped_updates=bounded.dropped if bounded else 0,
            capped_weights=bounded.capped if bounded else 0,
            privacy=self.privacy.report() if self.privacy is not None else None,
            ray_nodes={r.client_id: r.ray_node for r in valid if r.ray_node is not None},
        )

    def _apply(self, valid: list[TrainReply]) -> Bounded:
        """Bound the valid replies, fold them into the model, alignment state and profiles."""
        if self.privacy is not None:  # DP: clipping bounds every update (privacy.py)
            bounded = Bounded([r.update for r in valid], list(range(len(valid))), 0, 0)
        else:
            bounded = bound_updates(
                self.global_arrays,
                [r.update for r in valid],
                bound=self.cfg.update_bound,
                weight_cap=self.cfg.weight_cap,
            )
        kept = [valid[i] for i in bounded.kept]
        if not kept:
            return bounded
        if self.privacy is not None:
            self.global_arrays = self.privacy.apply(self.global_arrays, kept, self.population)
        else:
            self.global_arrays = aggregate(
                self.global_arrays,
                bounded.updates,
                gate_from_all=self.cfg.gate_from_all,
                single_holders=self.cfg.route_loss_weight > 0,
                method=self.cfg.aggregation,
                trim_fraction=self.cfg.trim_fraction,
                per_layer=not self.cfg.tie_layers,
            )
        hist = np.stack([r.gate_hist for r in kept])
        self.global_arrays = balance_gate_bias(self.global_arrays, hist, self.cfg.gate_balance_rate)
        feed_alignment(self.alignment, kept, bounded.updates, self.num_experts)
        for r in kept:
            self.last_experts[r.client_id] = r.expert_ids if self.cfg.tie_layers else plan_lists(r.layer_held)
            profile = self.profiles.setdefault(r.client_id, {})
            for key in ("train-time-s", "samples-per-s", "peak-memory-bytes"):
                if key in r.metrics:
                    profile[key] = ema_update(profile.get(key), r.metrics[key], 0.5)
            # the bound on a client's example count is what it first reported: a reply may
            # stay under it but never raise it
            profile.setdefault("num-examples", r.update.num_examples)
        return bounded

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled known clients their sparse view (shared + last-trained experts)."""
        return self.plan_evaluate(server_round, grid)[0]

    def plan_evaluate(self, server_round: int, grid: Grid) -> tuple[list[Message], int]:
        """Return the evaluation messages of a round and the number of nodes whose query failed."""
        if self.cfg.fraction_evaluate == 0.0:
            return [], 0
        nodes, query_failures = self._sample(
            grid, self.cfg.fraction_evaluate, self.cfg.min_evaluate_nodes, server_round
        )
        messages = []
        for node in nodes:
            cid = self.nodes.client_of(node)
            experts = self.last_experts.get(cid)
            if experts is None:
                capacity = self.planner.capacity([self.profiles.get(cid, {})], self.global_arrays)
                experts = plan_lists(self.alignment.plan([cid], capacity, "greedy", self.rng)[0])
            if not experts:
                continue
            sub, names = stored_payload(self.global_arrays, experts, self.num_experts, self.layers)
            content = RecordDict(
                {ARRAYS: to_record(sub), CONFIG: ConfigRecord({**names, "server-round": server_round})}
            )
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages, query_failures

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local test loss and accuracy (+ the worst 10 %)."""
        return self.evaluate_round(replies).metric_record()

    def evaluate_round(self, replies: Iterable[Message]) -> EvaluateOutcome:
        """Per-client local test results of a round; invalid replies rejected and counted."""
        return evaluate_outcome(replies, self.nodes.clients, self.profiles)

    # ------------------------------------------------------------------ run loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        central_eval: EvaluateFn | None = None,
        on_round: RoundCallback | None = None,
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds``; hand each round's metrics row to ``on_round``.

        Same loop and semantics as :meth:`flwr.serverapp.strategy.Strategy.start`
        (:func:`~.loop.run_rounds`): ``initial_arrays``, when given, replaces the model the
        strategy was built with (same tensor names and shapes, else ValueError);
        ``evaluate_fn(round, arrays)`` runs before round 1 (as round 0) and after every round,
        its metrics kept in ``Result.evaluate_metrics_serverapp`` and the round's metrics row.
        Besides: ``central_eval`` evaluates the global numpy arrays the same way, and a
        metrics row per round (:func:`~.rounds.round_row`) is given to ``on_round`` after
        the round (the run layer records it and writes a checkpoint). ``train_config`` and
        ``evaluate_config`` are not used: each message's config comes from the run config.
        """
        del train_config, evaluate_config  # every message's config is built from the run config
        adopt_initial_arrays(self, initial_arrays)
        return run_rounds(
            self,
            grid,
            num_rounds=num_rounds,
            timeout=timeout,
            central_eval=central_eval,
            evaluate_fn=evaluate_fn,
            on_round=on_round,
            start_round=start_round,
        )

    # ------------------------------------------------------------------ nodes
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int) -> tuple[list[int], int]:
        """Sample ``fraction`` of the connected nodes (at least ``minimum``), by client id.

        Nodes are identified first (:class:`~.discovery.Discovery`), and sampling runs over
        sorted client ids, so the same seed picks the same clients even when node ids change
        (a resumed run). With run-config ``discovery = "sampled"`` the draw runs over the
        connected nodes (known ones by client id, new ones by node id) and only the sampled
        new nodes are queried; a sampled node that does not answer sits the round out.
        Returns the sampled nodes and the number of failed queries.
        """
        if self.cfg.discovery == "sampled":  # sample first, then query only the sampled new nodes
            nodes = self.nodes.ordered(self.nodes.connected(grid, minimum))
            self.population = len(nodes)
            return self.nodes.identify(grid, self._pick(nodes, fraction, minimum), server_round)
        nodes, failed = self.nodes.known_nodes(grid, minimum, server_round)
        self.population = len(nodes)
        return self._pick(nodes, fraction, minimum), failed

    def _pick(self, nodes: list[int], fraction: float, minimum: int) -> list[int]:
        """Draw ``fraction`` of ``nodes`` (at least ``minimum``), keeping their order."""
        if not nodes:
            return []
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        return [nodes[i] for i in sorted(self.rng.choice(len(nodes), size=size, replace=False))]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to resume (JSON-serializable)."""
        return {
            "alignment": self.alignment.state_dict(),
            "rng": self.rng.bit_generator.state,
            "profiles": self.profiles,
            "last_experts": self.last_experts,
            "failures_total": self.failures_total,
            **({"accountant": self.privacy.accountant.state_dict()} if self.privacy is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.alignment = alignment_from_state_dict(state["alignment"])
        self.rng.bit_generator.state = state["rng"]
        self.nodes.profiles = state["profiles"]
        self.last_experts = {k: list(v) for k, v in state["last_experts"].items()}
        self.failures_total = int(state["failures_total"])
        if self.privacy is not None and "accountant" in state:
            self.privacy.accountant.load_state_dict(state["accountant"])

    def load(self, arrays: Arrays, state: dict[str, Any]) -> None:
        """Restore the global model and :meth:`state_dict` from a checkpoint's contents."""
        check_same_tensors(arrays, self.global_arrays, "the checkpoint")
        self.global_arrays = dict(arrays)
        self.load_state_dict(state)
