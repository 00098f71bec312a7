"""The run loop of :meth:`~.strategy.FedMoE.start`, with Flower's ``Strategy.start`` semantics.

Flower's strategies (``flwr.serverapp.strategy.Strategy.start``) start from
``initial_arrays``, call ``evaluate_fn(round, arrays)`` on the global model before round 1
(as round 0) and after every round, and keep what it returns in
``Result.evaluate_metrics_serverapp``. :func:`run_rounds` does the same for FedMoE, whose
model lives in numpy arrays: the loop owns them, hands them to each round function and takes
back the ones it returns; ``evaluate_fn``'s metrics join the metrics row of the round next to
those of ``central_eval`` (the numpy-arrays evaluation of the run layer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from ..config import RoundSection
from ..tensors import Arrays, check_same_tensors
from ..wire.records import from_record, model_record, to_record
from .rounds import EvaluateOutcome, TrainOutcome, TrainRound, log_round, round_row
from .timing import TimedGrid, server_time

EvaluateFn = Callable[[int, Arrays], dict[str, float] | None]
FlowerEvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundCallback = Callable[[dict[str, Any], Arrays], None]


class RoundFunctions(Protocol):
    """What the loop asks of a strategy: the round functions of :class:`~.strategy.FedMoE`."""

    def summary(self) -> None:
        """Log the strategy's configuration."""

    def plan_train(self, server_round: int, arrays: Arrays, grid: Grid) -> TrainRound:
        """Sample, plan and build the round's train messages."""

    def aggregate_round(
        self, arrays: Arrays, replies: list[Message], train_round: TrainRound
    ) -> tuple[Arrays, TrainOutcome]:
        """Validate and aggregate the replies; return the new arrays and the outcome."""

    def plan_evaluate(self, server_round: int, arrays: Arrays, grid: Grid) -> tuple[list[Message], int]:
        """Return the round's evaluate messages and failed queries."""

    def evaluate_round(self, replies: list[Message]) -> EvaluateOutcome:
        """Summarize the clients' evaluation replies."""


class RunFailed(RuntimeError):
    """The run cannot train: ``max-failed-rounds`` rounds in a row kept the model."""


def starting_arrays(given: ArrayRecord | Mapping[str, np.ndarray] | None, model: Arrays) -> Arrays:
    """Return the starting arrays: a copy of ``given`` (checked against ``model``), else ``model``."""
    if given is None:
        return model
    arrays = from_record(given) if isinstance(given, ArrayRecord) else given
    check_same_tensors(arrays, model, "initial_arrays")
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _server_eval(
    arrays: Arrays, rnd: int, central_eval: EvaluateFn | None, evaluate_fn: FlowerEvaluateFn | None
) -> dict[str, float] | None:
    """Metrics of the server-side evaluations of round ``rnd`` (None when neither is set)."""
    if central_eval is None and evaluate_fn is None:
        return None
    res: dict[str, float] = {}
    if central_eval is not None:
        res.update(central_eval(rnd, arrays) or {})
    if evaluate_fn is not None:
        record = evaluate_fn(rnd, to_record(arrays))
        log(INFO, "evaluate_fn (round %d): %s", rnd, record)
        if record is not None:
            res.update({k: v for k, v in record.items()})
    return res


@dataclass(frozen=True)
class RoundHooks:
    """What the caller of :func:`run_rounds` wants done around the rounds (each may be None)."""

    central_eval: EvaluateFn | None = None  # evaluate(round, arrays) -> metrics, on numpy arrays
    evaluate_fn: FlowerEvaluateFn | None = None  # Flower's evaluate_fn(round, ArrayRecord)
    on_round: RoundCallback | None = None  # on_round(metrics row, arrays) after every round


def run_rounds(
    strategy: RoundFunctions,
    grid: Grid,
    arrays: Arrays,
    span: range,
    hooks: RoundHooks,
    *,
    timeout: float,
    rounds: RoundSection,
) -> Result:
    """Run the rounds of ``span`` (``start_round..num_rounds``) from ``arrays`` (see ``FedMoE.start``).

    A round with fewer than ``rounds.min_replies`` valid replies keeps the model;
    ``rounds.max_failed_rounds`` such rounds in a row stop the run with :class:`RunFailed` (0: never).
    """
    central_eval, evaluate_fn, on_round = hooks.central_eval, hooks.evaluate_fn, hooks.on_round
    start_round, num_rounds = span.start, span.stop - 1
    result = Result()
    log(INFO, "Starting FedMoE (rounds %d..%d):", start_round, num_rounds)
    strategy.summary()
    res = _server_eval(arrays, 0, central_eval, evaluate_fn) if start_round == 1 else None
    if res is not None:
        acc_loss = (res.get("accuracy", math.nan), res.get("loss", math.nan))
        log(INFO, "[ROUND 0] central accuracy %.4f loss %.4f", *acc_loss)
        result.evaluate_metrics_serverapp[0] = MetricRecord(_metric_values(res))
        if on_round:
            on_round({"round": 0, "failures": 0, **res}, arrays)
    kept_in_a_row = 0
    grid = TimedGrid(grid)
    for rnd in span:
        log(INFO, "")
        log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
        done = _run_round(strategy, grid, arrays, rnd, timeout, central_eval, evaluate_fn)
        arrays = done.arrays
        result.train_metrics_clientapp[rnd] = done.outcome.metric_record()
        if done.client_eval.by_client:
            result.evaluate_metrics_clientapp[rnd] = done.client_eval.metric_record()
        if done.central is not None:
            result.evaluate_metrics_serverapp[rnd] = MetricRecord(_metric_values(done.central))
        log_round(done.row)
        if on_round:
            on_round(done.row, arrays)
        kept_in_a_row = kept_in_a_row + 1 if done.outcome.valid_replies < rounds.min_replies else 0
        if rounds.max_failed_rounds and kept_in_a_row >= rounds.max_failed_rounds:
            raise RunFailed(
                f"no round updated the model for {kept_in_a_row} rounds in a row (round {rnd}; "
                f"run-config 'max-failed-rounds' = {rounds.max_failed_rounds}): every client failed "
                "or was rejected, see the log"
            )
    result.arrays = model_record(arrays)
    return result


@dataclass(frozen=True)
class _RoundDone:
    """One round's results: the new arrays, what was aggregated and evaluated, its metrics row."""

    arrays: Arrays
    outcome: TrainOutcome
    client_eval: EvaluateOutcome
    central: dict[str, float] | None
    row: dict[str, Any]


def _run_round(
    strategy: RoundFunctions,
    grid: TimedGrid,
    arrays: Arrays,
    rnd: int,
    timeout: float,
    central_eval: EvaluateFn | None,
    evaluate_fn: FlowerEvaluateFn | None,
) -> _RoundDone:
    """Train, aggregate and evaluate round ``rnd``; time each phase of the server's own work."""
    t0, clients_s, link_s = time.perf_counter(), grid.clients_s, grid.link_s
    train_round, configure_s = server_time(grid, strategy.plan_train, rnd, arrays, grid)
    replies = grid.send_and_receive(train_round.messages, timeout=timeout)
    (arrays, outcome), aggregate_s = server_time(grid, strategy.aggregate_round, arrays, replies, train_round)
    (ev_messages, ev_query_failures), ev_plan_s = server_time(grid, strategy.plan_evaluate, rnd, arrays, grid)
    ev_replies = grid.send_and_receive(ev_messages, timeout=timeout)
    ev, ev_aggregate_s = server_time(grid, strategy.evaluate_round, ev_replies)
    central, central_s = server_time(grid, _server_eval, arrays, rnd, central_eval, evaluate_fn)
    timing = {
        "configure": configure_s,
        "planning": train_round.plan.plan_s,
        "aggregate": aggregate_s,
        "evaluate_server": ev_plan_s + ev_aggregate_s,
        "central_eval": central_s,
        "clients": grid.clients_s - clients_s,
        "link": grid.link_s - link_s,
    }
    row = round_row(
        train_round,
        outcome,
        evaluate_query_failures=ev_query_failures,
        client_eval=ev,
        central_eval=central,
        wall_time_s=time.perf_counter() - t0,
        timing_s=timing,
    )
    return _RoundDone(arrays, outcome, ev, central, row)


def _metric_values(res: Mapping[str, Any]) -> dict[str, float | int]:
    """Return the scalar numbers of ``res`` as MetricRecord values (floats; ints kept)."""
    out: dict[str, float | int] = {}
    for k, v in res.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        out[k] = int(v) if isinstance(v, (int, np.integer)) else float(v)
    return out
