"""FedMoE: a Flower strategy that sends every client only the experts it is assigned.

Round ``r``:

1. ``configure_train`` (classic Flower: ``configure_fit``) samples nodes, asks new ones
   for their capacity profile (a ``query`` message), sizes each client's capacity,
   plans the client × expert assignment with :class:`~fedmoe_app.alignment.AlignmentState`
   and builds one fresh Message per node holding the shared tensors plus *its* experts.
2. ``aggregate_train`` (classic: ``aggregate_fit``) validates every reply, averages each
   expert over the clients that trained it (token-weighted) and the shared tensors over
   all (example-weighted), and feeds the routing feedback to the alignment state.
3. ``configure_evaluate`` / ``aggregate_evaluate``: clients evaluate their sparse view
   (shared + the experts they last trained) on their local test split.

:meth:`FedMoE.start` runs the rounds like :meth:`Strategy.start` and, after each
round, records metrics and writes an atomic checkpoint from which a run can resume.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from . import capacity as cap
from .aggregation import aggregate
from .alignment import AlignmentState
from .checkpoint import FILENAME as CHECKPOINT_FILE
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .model import ModelSpec
from .protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    PROFILE,
    ReplyRejected,
    Sent,
    TrainReply,
    parse_train_reply,
    reply_client_id,
)
from .records import Arrays, select, to_record, wire_nbytes
from .results import RunRecorder, load_cv

EvaluateFn = Callable[[int, Arrays], dict[str, float] | None]


class FedMoE(Strategy):
    """Federated Mixture-of-Experts with client-expert alignment.

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (policy, capacity, sampling, alignment knobs).
    spec : ModelSpec
        Model shape (number of experts, top-k, sizes).
    initial_arrays : Arrays
        Initial global model, global tensor names (see :mod:`fedmoe_app.records`).

    """

    def __init__(self, cfg: RunConfig, spec: ModelSpec, initial_arrays: Arrays) -> None:
        self.cfg = cfg
        self.spec = spec
        self.num_experts = spec.num_experts
        self.global_arrays: Arrays = dict(initial_arrays)
        self.alignment = AlignmentState(
            spec.num_experts,
            fitness_ema=cfg.fitness_ema,
            fitness_decay=cfg.fitness_decay,
            usage_decay=cfg.usage_decay,
            w_fitness=cfg.w_fitness,
            w_usage=cfg.w_usage,
            load_slack=cfg.load_slack,
            seed=cfg.seed,
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.clients: dict[int, str] = {}  # node id -> client id
        self.profiles: dict[str, dict[str, Any]] = {}  # client id -> capacity profile
        self.last_experts: dict[str, list[int]] = {}  # client id -> experts last trained
        self.failures_total = 0
        self._sent: dict[int, Sent] = {}
        self._round: dict[str, Any] = {}
        self._memory = cap.MemoryModel(spec, cfg.batch_size) if cfg.capacity == "profiled" else None

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
        self._sent = {}
        self._round = {"round": server_round, "failures": 0, "rejected": {}}
        nodes = self._sample(grid, self.cfg.fraction_train, self.cfg.min_train_nodes, server_round)
        if not nodes:
            log(WARNING, "configure_train: no node available in round %d", server_round)
            return []
        client_ids = [self.clients[n] for n in nodes]
        capacity = self.capacity(client_ids)
        keep = capacity > 0
        if self.cfg.under_capacity == "skip" and not keep.all():
            log(
                INFO, "configure_train: skipping %d client(s) that cannot hold one expert", int((~keep).sum())
            )
            nodes = [n for n, k in zip(nodes, keep) if k]
            client_ids = [c for c, k in zip(client_ids, keep) if k]
            capacity = capacity[keep]
        # "shared-only": a client that cannot hold one trainable expert gets its best expert
        # read-only (the smallest model with a head) and trains the shared tensors alone.
        frozen = capacity == 0
        plan = (
            self.alignment.plan(client_ids, np.maximum(capacity, 1), self.cfg.policy, self.rng)
            if nodes
            else np.zeros((0, self.num_experts), bool)
        )

        budgets = self._sample_budgets(client_ids, plan)
        dense_record_bytes = wire_nbytes(to_record(self.global_arrays))
        messages, bytes_down, assignment = [], 0, {}
        for node, cid, row, read_only, budget in zip(nodes, client_ids, plan, frozen, budgets):
            expert_ids = np.flatnonzero(row).tolist()
            sub = select(self.global_arrays, expert_ids)
            returned = select(sub, []) if read_only else sub
            record = to_record(sub)
            bytes_down += wire_nbytes(record)
            assignment[cid] = expert_ids
            profile = self.profiles.get(cid, {})
            self._sent[node] = Sent(
                client_id=cid,
                expert_ids=expert_ids,
                shapes={k: (tuple(v.shape), str(v.dtype)) for k, v in returned.items()},
                max_examples=profile.get("num-examples"),
            )
            cfg_record = ConfigRecord(
                {
                    "expert-ids": expert_ids,
                    "server-round": server_round,
                    "lr": self.cfg.lr,
                    "local-epochs": self.cfg.local_epochs,
                    "seed": int(self.rng.integers(2**31)),
                    "frozen-experts": bool(read_only),
                    "max-samples": int(budget),
                }
            )
            content = RecordDict({ARRAYS: record, CONFIG: cfg_record})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._round.update(
            bytes_down=bytes_down,
            dense_bytes_down=dense_record_bytes * len(nodes),
            assignment=assignment,
            assigned_clients=plan.sum(axis=0).tolist(),
            capacity={cid: int(c) for cid, c in zip(client_ids, capacity)},
            virtual_round_time_s=self._virtual_time(client_ids, plan, budgets),
            sample_budget={cid: int(b) for cid, b in zip(client_ids, budgets)},
        )
        log(
            INFO,
            "configure_train: %d nodes, %s plan, %.1f kB down (dense %.1f kB)",
            len(nodes),
            self.cfg.policy,
            bytes_down / 1e3,
            dense_record_bytes * len(nodes) / 1e3,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate experts sparsely and update the alignment state.

        This is the Message-API counterpart of the classic ``aggregate_fit``. Invalid
        replies are logged, counted under ``rejected`` and left out of both the model
        and the alignment update; a round with fewer than ``min-replies`` valid replies
        keeps the previous model.
        """
        valid: list[TrainReply] = []
        rejected: Counter[str] = Counter()
        bytes_up = 0
        received = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            sent = self._sent.get(node)
            received.add(node)
            if msg.has_error():
                # An error the SuperLink raises for an unreachable node comes from the SuperLink,
                # not from that node: the node then stays in ``missing`` and is counted there once.
                if sent is not None:
                    self._round["failures"] += 1
                log(
                    WARNING,
                    "aggregate_train: node %s (client %s) failed: %s",
                    node,
                    sent.client_id if sent else "?",
                    msg.error.reason,
                )
                continue
            if sent is None:
                rejected["unexpected-node"] += 1
                log(WARNING, "aggregate_train: reply from node %s that was not sent work", node)
                continue
            try:
                if msg.has_content() and ARRAYS in msg.content:
                    bytes_up += wire_nbytes(msg.content[ARRAYS])
                reply = parse_train_reply(
                    msg.content, node, sent, self.num_experts, self.spec.top_k, self.cfg.local_epochs
                )
            except ReplyRejected as exc:
                rejected[exc.reason] += 1
                log(
                    WARNING,
                    "aggregate_train: rejected reply of node %s (client %s): %s",
                    node,
                    sent.client_id,
                    exc,
                )
                continue
            valid.append(reply)
        missing = set(self._sent) - received
        self._round["failures"] += len(missing)
        if missing:
            log(WARNING, "aggregate_train: %d node(s) did not reply in time", len(missing))
        self.failures_total += self._round["failures"]

        tokens = np.zeros(self.num_experts)
        if len(valid) >= self.cfg.min_replies:
            self.global_arrays = aggregate(self.global_arrays, [r.update for r in valid])
            ids = [r.client_id for r in valid]
            held = np.zeros((len(valid), self.num_experts), dtype=bool)
            for i, r in enumerate(valid):
                held[i, r.expert_ids] = True
            fb_tokens = np.stack([r.update.tokens for r in valid])
            self.alignment.update(
                ids,
                held,
                fb_tokens,
                np.stack([r.expert_loss for r in valid]),
                np.stack([r.gate_hist for r in valid]),
            )
            tokens = fb_tokens.sum(axis=0)
            for r in valid:
                self.last_experts[r.client_id] = r.expert_ids
                self._refresh_profile(r)
        else:
            log(
                WARNING,
                "aggregate_train: %d valid repl(ies) < min-replies %d; keeping the model",
                len(valid),
                self.cfg.min_replies,
            )

        n = sum(r.update.num_examples for r in valid)
        train_loss = sum(r.loss * r.update.num_examples for r in valid) / n if n else math.nan
        self._round.update(
            bytes_up=bytes_up,
            expert_load=tokens.tolist(),
            load_cv=load_cv(np.asarray(self._round.get("assigned_clients", []))),
            token_load_cv=load_cv(tokens),
            rejected=dict(rejected),
            valid_replies=len(valid),
            train_loss=train_loss,
        )
        metrics = MetricRecord(
            {"train-loss": float(train_loss) if n else 0.0, "valid-replies": len(valid), "num-examples": n}
        )
        return to_record(self.global_arrays), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled known clients their sparse view (shared + last-trained experts)."""
        if self.cfg.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.cfg.fraction_evaluate, self.cfg.min_evaluate_nodes, server_round)
        messages = []
        for node in nodes:
            cid = self.clients[node]
            experts = self.last_experts.get(cid)
            if experts is None:
                experts = np.flatnonzero(
                    self.alignment.plan([cid], self.capacity([cid]), "greedy", self.rng)[0]
                ).tolist()
            if not experts:
                continue
            content = RecordDict(
                {
                    ARRAYS: to_record(select(self.global_arrays, experts)),
                    CONFIG: ConfigRecord({"expert-ids": experts, "server-round": server_round}),
                }
            )
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' local test loss and accuracy."""
        total, loss, acc = 0, 0.0, 0.0
        for msg in replies:
            if msg.has_error() or not msg.has_content() or METRICS not in msg.content:
                continue
            m = msg.content[METRICS]
            n, l_, a = m.get("num-examples"), m.get("eval-loss"), m.get("eval-accuracy")
            if not (
                isinstance(n, int)
                and n > 0
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (l_, a))
            ):
                log(
                    WARNING,
                    "aggregate_evaluate: ignoring malformed reply from node %s",
                    msg.metadata.src_node_id,
                )
                continue
            total, loss, acc = total + n, loss + n * l_, acc + n * a
        if total == 0:
            return None
        return MetricRecord({"eval-loss": loss / total, "eval-accuracy": acc / total, "num-examples": total})

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
        recorder: RunRecorder | None = None,
        central_eval: EvaluateFn | None = None,
        checkpoint_dir: Path | None = None,
        start_round: int = 1,
    ) -> Result:
        """Run rounds ``start_round..num_rounds``; record metrics and checkpoint each.

        Same loop as :meth:`flwr.serverapp.strategy.Strategy.start`, plus a metrics row
        per round (``recorder``), central evaluation on global numpy arrays
        (``central_eval``), and an atomic checkpoint after every round.
        """
        del initial_arrays, evaluate_fn  # the global model lives in self.global_arrays
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        log(INFO, "Starting FedMoE (rounds %d..%d):", start_round, num_rounds)
        self.summary()
        if start_round == 1 and central_eval is not None:
            res = central_eval(0, self.global_arrays) or {}
            log(
                INFO,
                "[ROUND 0] central accuracy %.4f loss %.4f",
                res.get("accuracy", math.nan),
                res.get("loss", math.nan),
            )
            if recorder:
                recorder.add({"round": 0, "failures": 0, **res})
        for rnd in range(start_round, num_rounds + 1):
            t0 = time.perf_counter()
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            arrays = to_record(self.global_arrays)
            replies = grid.send_and_receive(
                self.configure_train(rnd, arrays, train_config, grid), timeout=timeout
            )
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            row = dict(self._round)
            ev_replies = grid.send_and_receive(
                self.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout=timeout
            )
            ev = self.aggregate_evaluate(rnd, ev_replies)
            if ev is not None:
                result.evaluate_metrics_clientapp[rnd] = ev
                row.update(client_loss=ev["eval-loss"], client_accuracy=ev["eval-accuracy"])
            if central_eval is not None:
                res = central_eval(rnd, self.global_arrays) or {}
                row.update(res)
                result.evaluate_metrics_serverapp[rnd] = MetricRecord({k: float(v) for k, v in res.items()})
            row["wall_time_s"] = time.perf_counter() - t0
            self._log_round(row)
            if recorder:
                recorder.add(row)
            if checkpoint_dir is not None:
                self.save(Path(checkpoint_dir) / CHECKPOINT_FILE, rnd, recorder.rounds if recorder else [])
        return result

    # ------------------------------------------------------------------ capacity
    def capacity(self, client_ids: list[str]) -> np.ndarray:
        """Experts each client can hold this round (int array; 0 = cannot hold one)."""
        fixed = np.full(len(client_ids), self.cfg.experts_per_client, dtype=np.int64)
        if self._memory is None or not client_ids:
            return fixed
        profiles = [self.profiles.get(cid, {}) for cid in client_ids]
        measured = cap.capacity_for_profiles(profiles, self._memory, self.cfg, self.global_arrays)
        return np.minimum(measured, fixed)  # experts-per-client caps what one client is sent

    def _sample_budgets(self, client_ids: list[str], plan: np.ndarray) -> np.ndarray:
        """Training samples per client this round; 0 means no limit.

        With ``capacity = "profiled"`` and a ``round-deadline-s``, a slow client is asked for
        the samples it can process before the deadline (partial local work); the fixed,
        capacity-unaware baseline always trains full epochs.
        """
        budgets = np.zeros(len(client_ids), dtype=np.int64)
        if self._memory is None or self.cfg.round_deadline_s <= 0 or not client_ids:
            return budgets
        profiles = [self.profiles.get(c, {}) for c in client_ids]
        full = cap.planned_samples(profiles, self.cfg)
        budget = cap.deadline_sample_budget(
            profiles, plan.sum(axis=1), self._memory, self.cfg, self.global_arrays
        )
        limited = (full > 0) & (budget < full)
        budgets[limited] = budget[limited]
        return budgets

    def _virtual_time(self, client_ids: list[str], plan: np.ndarray, budgets: np.ndarray) -> float | None:
        if not client_ids or not all(self.profiles.get(c) for c in client_ids):
            return None
        profiles = [self.profiles[c] for c in client_ids]
        full = cap.planned_samples(profiles, self.cfg)
        samples = np.where(budgets > 0, np.minimum(budgets, full), full)
        return cap.virtual_round_time(
            profiles, plan.sum(axis=1), self._memory_or_fixed(), self.cfg, self.global_arrays, samples
        )

    def _memory_or_fixed(self) -> cap.MemoryModel:
        return self._memory or cap.MemoryModel(self.spec, self.cfg.batch_size)

    def _refresh_profile(self, reply: TrainReply) -> None:
        profile = self.profiles.setdefault(reply.client_id, {})
        for key in ("train-time-s", "samples-per-s", "peak-memory-bytes"):
            if key in reply.metrics:
                profile[key] = cap.ema_update(profile.get(key), reply.metrics[key], 0.5)
        profile["num-examples"] = max(int(profile.get("num-examples", 0)), reply.update.num_examples)

    # ------------------------------------------------------------------ nodes
    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int) -> list[int]:
        """Sample ``fraction`` of the connected nodes (at least ``minimum``), by client id.

        Nodes are identified first, and sampling runs over sorted client ids, so the
        same seed picks the same clients even when node ids change (a resumed run).
        """
        deadline = time.monotonic() + self.cfg.round_timeout_s
        while len(nodes := sorted(grid.get_node_ids())) < minimum and time.monotonic() < deadline:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum %d)", len(nodes), minimum)
            time.sleep(1.0)
        nodes = sorted(self._discover(grid, nodes, server_round), key=lambda n: self.clients[n])
        if not nodes:
            return []
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        return [nodes[i] for i in sorted(self.rng.choice(len(nodes), size=size, replace=False))]

    def _discover(self, grid: Grid, nodes: list[int], server_round: int) -> list[int]:
        """Ask nodes we have not met for their client id and capacity profile."""
        unknown = [n for n in nodes if n not in self.clients]
        connected = set(nodes)
        if unknown:
            queries = [
                Message(
                    content=RecordDict({CONFIG: ConfigRecord({"server-round": server_round})}),
                    message_type=MessageType.QUERY,
                    dst_node_id=n,
                )
                for n in unknown
            ]
            answered = set()
            for msg in grid.send_and_receive(queries, timeout=self.cfg.round_timeout_s):
                node = msg.metadata.src_node_id
                cid = None if msg.has_error() else reply_client_id(msg)
                if cid is None:
                    log(
                        WARNING,
                        "query: node %s gave no client id (%s)",
                        node,
                        msg.error.reason if msg.has_error() else "malformed",
                    )
                    continue
                profile = {}
                if PROFILE in msg.content:
                    try:
                        profile = cap.CapacityProfile.from_dict(dict(msg.content[PROFILE])).to_dict()
                    except ValueError as exc:
                        log(WARNING, "query: node %s sent an invalid profile: %s", node, exc)
                    n = msg.content[PROFILE].get("num-examples")
                    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                        profile["num-examples"] = n
                owner = next((n for n, c in self.clients.items() if c == cid), None)
                if owner is not None and owner in connected:
                    log(WARNING, "query: node %s claims client id %r of node %s; ignored", node, cid, owner)
                    continue
                if owner is not None:  # the client reconnected under a new node id
                    del self.clients[owner]
                self.clients[node] = cid
                self.profiles[cid] = {**self.profiles.get(cid, {}), **profile}
                answered.add(node)
            failed = len(unknown) - len(answered)
            self._round["failures"] = self._round.get("failures", 0) + failed
        return [n for n in nodes if n in self.clients]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to resume (JSON-serializable)."""
        return {
            "alignment": self.alignment.state_dict(),
            "rng": self.rng.bit_generator.state,
            "profiles": self.profiles,
            "last_experts": self.last_experts,
            "failures_total": self.failures_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.alignment = AlignmentState.from_state_dict(state["alignment"])
        self.rng.bit_generator.state = state["rng"]
        self.profiles = state["profiles"]
        self.last_experts = {k: list(v) for k, v in state["last_experts"].items()}
        self.failures_total = int(state["failures_total"])

    def save(self, path: Path, server_round: int, history: list[dict[str, Any]]) -> None:
        """Atomically checkpoint model, state, round and metrics history."""
        save_checkpoint(
            path,
            self.global_arrays,
            {"round": server_round, "strategy": self.state_dict(), "history": history},
        )

    def restore(self, path: Path) -> tuple[int, list[dict[str, Any]]]:
        """Load a checkpoint; return ``(last completed round, metrics history)``."""
        arrays, state = load_checkpoint(path)
        if set(arrays) != set(self.global_arrays):
            raise ValueError(f"checkpoint {path} does not match this model's tensors")
        self.global_arrays = arrays
        self.load_state_dict(state["strategy"])
        return int(state["round"]), state["history"]

    def _log_round(self, row: dict[str, Any]) -> None:
        acc = row.get("accuracy")
        down, dense = row.get("bytes_down", 0), row.get("dense_bytes_down", 0)
        log(
            INFO,
            "[ROUND %d] acc %s | down %.1f kB (%.0f%% of dense) up %.1f kB | load CV %.2f "
            "| failures %d rejected %s",
            row["round"],
            f"{acc:.4f}" if acc is not None else "n/a",
            down / 1e3,
            100 * down / dense if dense else 0.0,
            row.get("bytes_up", 0) / 1e3,
            row.get("load_cv") or 0.0,
            row.get("failures", 0),
            row.get("rejected") or {},
        )
