"""The run loop of :meth:`~.strategy.FedMoE.start`, with Flower's ``Strategy.start`` semantics.

Flower's strategies (``flwr.serverapp.strategy.Strategy.start``) start from
``initial_arrays``, call ``evaluate_fn(round, arrays)`` on the global model before round 1
(as round 0) and after every round, and keep what it returns in
``Result.evaluate_metrics_serverapp``. :func:`run_rounds` does the same for FedMoE, whose
model lives in numpy arrays (``strategy.global_arrays``): :func:`adopt_initial_arrays`
replaces that model with ``initial_arrays`` when given (tensor names and shapes must match
the model the strategy was built with), and ``evaluate_fn``'s metrics join the metrics row
of the round next to those of ``central_eval`` (the numpy-arrays evaluation of the run layer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from logging import INFO
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from ..tensors import Arrays
from .records import from_record, to_record
from .rounds import log_round, round_row
from .timing import TimedGrid, server_time

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .strategy import FedMoE

EvaluateFn = Callable[[int, Arrays], dict[str, float] | None]
FlowerEvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundCallback = Callable[[dict[str, Any]], None]


class RunFailed(RuntimeError):
    """The run cannot train: ``max-failed-rounds`` rounds in a row kept the model."""


def check_same_tensors(arrays: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray], what: str) -> None:
    """Raise ValueError naming the first tensors whose names or shapes differ from ``model``'s."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    want = {k: tuple(v.shape) for k, v in model.items()}
    if shapes == want:
        return
    differ = sorted(set(shapes) ^ set(want)) or sorted(k for k in shapes if shapes[k] != want[k])
    raise ValueError(f"{what} does not match this model's tensors (e.g. {differ[:3]})")


def adopt_initial_arrays(strategy: FedMoE, initial_arrays: ArrayRecord | None) -> None:
    """Make ``initial_arrays`` (when given) the strategy's global model, dtypes kept as given."""
    if initial_arrays is None:
        return
    arrays = from_record(initial_arrays)
    check_same_tensors(arrays, strategy.global_arrays, "initial_arrays")
    strategy.global_arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}


def _server_eval(
    strategy: FedMoE, rnd: int, central_eval: EvaluateFn | None, evaluate_fn: FlowerEvaluateFn | None
) -> dict[str, float] | None:
    """Metrics of the server-side evaluations of round ``rnd`` (None when neither is set)."""
    if central_eval is None and evaluate_fn is None:
        return None
    res: dict[str, float] = {}
    if central_eval is not None:
        res.update(central_eval(rnd, strategy.global_arrays) or {})
    if evaluate_fn is not None:
        record = evaluate_fn(rnd, to_record(strategy.global_arrays))
        log(INFO, "evaluate_fn (round %d): %s", rnd, record)
        if record is not None:
            res.update({k: v for k, v in record.items()})
    return res


def run_rounds(
    strategy: FedMoE,
    grid: Grid,
    *,
    num_rounds: int,
    timeout: float,
    central_eval: EvaluateFn | None,
    evaluate_fn: FlowerEvaluateFn | None,
    on_round: RoundCallback | None,
    start_round: int,
) -> Result:
    """Run rounds ``start_round..num_rounds`` of ``strategy`` (see :meth:`.strategy.FedMoE.start`)."""
    result = Result()
    log(INFO, "Starting FedMoE (rounds %d..%d):", start_round, num_rounds)
    strategy.summary()
    if start_round == 1:
        res = _server_eval(strategy, 0, central_eval, evaluate_fn)
        if res is not None:
            log(
                INFO,
                "[ROUND 0] central accuracy %.4f loss %.4f",
                res.get("accuracy", math.nan),
                res.get("loss", math.nan),
            )
            result.evaluate_metrics_serverapp[0] = MetricRecord(_metric_values(res))
            if on_round:
                on_round({"round": 0, "failures": 0, **res})
    kept_in_a_row = 0
    grid = TimedGrid(grid)
    for rnd in range(start_round, num_rounds + 1):
        t0, clients_s, link_s = time.perf_counter(), grid.clients_s, grid.link_s
        log(INFO, "")
        log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
        train_round, configure_s = server_time(grid, strategy.plan_train, rnd, grid)
        replies = grid.send_and_receive(train_round.messages, timeout=timeout)
        outcome, aggregate_s = server_time(grid, strategy.aggregate_round, rnd, replies)
        result.arrays = to_record(strategy.global_arrays)
        result.train_metrics_clientapp[rnd] = outcome.metric_record()
        (ev_messages, ev_query_failures), ev_plan_s = server_time(grid, strategy.plan_evaluate, rnd, grid)
        ev_replies = grid.send_and_receive(ev_messages, timeout=timeout)
        ev, ev_aggregate_s = server_time(grid, strategy.evaluate_round, ev_replies)
        central, central_s = server_time(grid, _server_eval, strategy, rnd, central_eval, evaluate_fn)
        timing = {
            "configure": configure_s,
            "planning": train_round.plan.plan_s,
            "aggregate": aggregate_s,
            "evaluate_server": ev_plan_s + ev_aggregate_s,
            "central_eval": central_s,
            "clients": grid.clients_s - clients_s,
            "link": grid.link_s - link_s,
        }
        if ev.by_client:
            result.evaluate_metrics_clientapp[rnd] = ev.metric_record()
        if central is not None:
            result.evaluate_metrics_serverapp[rnd] = MetricRecord(_metric_values(central))
        strategy.failures_total += train_round.query_failures + outcome.failures + ev_query_failures
        row = round_row(
            train_round,
            outcome,
            evaluate_query_failures=ev_query_failures,
            client_eval=ev,
            central_eval=central,
            wall_time_s=time.perf_counter() - t0,
            timing_s=timing,
        )
        log_round(row)
        if on_round:
            on_round(row)
        kept_in_a_row = kept_in_a_row + 1 if outcome.valid_replies < strategy.cfg.min_replies else 0
        limit = strategy.cfg.max_failed_rounds
        if limit and kept_in_a_row >= limit:
            raise RunFailed(
                f"no round updated the model for {kept_in_a_row} rounds in a row (round {rnd}; "
                f"run-config 'max-failed-rounds' = {limit}): every client failed "
                "or was rejected, see the log"
            )
    return result


def _metric_values(res: Mapping[str, Any]) -> dict[str, float | int]:
    """Return the scalar numbers of ``res`` as MetricRecord values (floats; ints kept)."""
    out: dict[str, float | int] = {}
    for k, v in res.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        out[k] = int(v) if isinstance(v, (int, np.integer)) else float(v)
    return out
