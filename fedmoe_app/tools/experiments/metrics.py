"""One run's ``metrics.json``: reading it and the per-run figures the summary is made of.

A run writes one row per round (round 0: the initial model) with its central accuracy,
bytes sent, expert load and times. These functions read those rows and reduce them to
numbers (final, best and last-rounds accuracy, rounds to a target and the bytes and virtual
time spent reaching it, per-run totals); they ignore values that are missing, not numbers or
not finite. Pure Python and numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class FinishedRun:
    """Metrics of one finished run of a grid (``metrics.json`` rows, round 0 included).

    Attributes
    ----------
    setting : str
        Name of the run's data setting.
    policy : str
        Alignment policy.
    seed : int
        Seed.
    rounds : list of dict
        The run's ``metrics.json`` rows, sorted by round.

    """

    setting: str
    policy: str
    seed: int
    rounds: list[dict[str, Any]]


def read_metrics(run_dir: Path) -> list[dict[str, Any]] | None:
    """Read the ``metrics.json`` of ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        A run's output folder.

    Returns
    -------
    list of dict or None
        Its rows that have a ``round``, sorted by round; None if the file is absent or
        unreadable.

    """
    path = Path(run_dir) / "metrics.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rows, list):
        return None
    return sorted((r for r in rows if isinstance(r, dict) and "round" in r), key=lambda r: r["round"])


def rounds_done(rows: Sequence[Mapping[str, Any]] | None) -> int:
    """Return the highest training round recorded (0 if none)."""
    return max((int(r["round"]) for r in rows or ()), default=0)


def is_complete(rows: Sequence[Mapping[str, Any]] | None, num_rounds: int) -> bool:
    """Return whether ``rows`` hold every training round ``1..num_rounds``."""
    have = {int(r["round"]) for r in rows or ()}
    return all(r in have for r in range(1, num_rounds + 1))


def finite_or_none(value: Any) -> float | None:
    """Return ``value`` as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _training_rounds(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((r for r in rows if int(r["round"]) >= 1), key=lambda r: r["round"])


def _accuracies(rows: Sequence[Mapping[str, Any]], key: str = "accuracy") -> list[tuple[int, float]]:
    out = []
    for r in _training_rounds(rows):
        a = finite_or_none(r.get(key))
        if a is not None:
            out.append((int(r["round"]), a))
    return out


def accuracy_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return the run's accuracy key: ``accuracy`` (central), else ``client_accuracy`` (no central eval)."""
    return "accuracy" if _accuracies(rows) else "client_accuracy"


def final_accuracy(rows: Sequence[Mapping[str, Any]], key: str = "accuracy") -> float | None:
    """Return ``key`` (the accuracy) of the last training round that has one (None if none has)."""
    acc = _accuracies(rows, key)
    return acc[-1][1] if acc else None


def best_accuracy(rows: Sequence[Mapping[str, Any]], key: str = "accuracy") -> float | None:
    """Return the best ``key`` (the accuracy) of any training round (None if none has one)."""
    return max((a for _, a in _accuracies(rows, key)), default=None)


def last_n_mean(rows: Sequence[Mapping[str, Any]], n: int = 5, key: str = "accuracy") -> float | None:
    """Return the mean of ``key`` over the last ``n`` training rounds that have it.

    ``key`` is ``accuracy`` (the global view: central test, full model) by default;
    ``client_accuracy`` and ``client_accuracy_worst10`` give the personalized view (clients'
    own experts on their local test) and its worst 10 % of clients.
    """
    acc = [a for _, a in _accuracies(rows, key)][-n:]
    return float(np.mean(acc)) if acc else None


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float, key: str = "accuracy") -> int | None:
    """Return the first training round whose ``key`` (the accuracy) is ``>= target``; None if never."""
    return next((rnd for rnd, a in _accuracies(rows, key) if a >= target), None)


@dataclass(frozen=True)
class Reached:
    """Where a run first reached a target: the round, and what it had spent by then.

    Attributes
    ----------
    round : int
        First training round whose accuracy is at or above the target.
    bytes_down : float or None
        ``bytes_down`` summed over rounds ``1..round`` (None if no round recorded it).
    virtual_time_s : float or None
        ``virtual_round_time_s`` summed over rounds ``1..round``, rounds without it skipped
        (None if none has it).

    """

    round: int
    bytes_down: float | None
    virtual_time_s: float | None


def reach(rows: Sequence[Mapping[str, Any]], target: float, key: str = "accuracy") -> Reached | None:
    """Return where ``key`` (an accuracy) first reaches ``target``, with the bytes and time spent.

    Parameters
    ----------
    rows : sequence of mapping
        A run's ``metrics.json`` rows.
    target : float
        Accuracy to reach (a fraction).
    key : str
        ``accuracy`` (global view) or ``client_accuracy`` (personalized view).

    Returns
    -------
    Reached or None
        None if no round reaches ``target``.

    """
    hit = rounds_to_target(rows, target, key)
    if hit is None:
        return None
    spent = [r for r in _training_rounds(rows) if int(r["round"]) <= hit]
    return Reached(hit, round_total(spent, "bytes_down"), round_total(spent, "virtual_round_time_s"))


def _round_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    vals = [finite_or_none(r.get(key)) for r in _training_rounds(rows)]
    return [v for v in vals if v is not None]


def round_total(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Return the sum of ``key`` over the training rounds that have it (None if none has)."""
    vals = _round_values(rows, key)
    return float(sum(vals)) if vals else None


def round_mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Return the mean of ``key`` over the training rounds that have it (None if none has)."""
    vals = _round_values(rows, key)
    return float(np.mean(vals)) if vals else None


def window_mean(rows: Sequence[Mapping[str, Any]], key: str, first: int, last: int) -> float | None:
    """Return the mean of ``key`` over rounds ``first..last`` that have it (None if none has)."""
    vals = [a for rnd, a in _accuracies(rows, key) if first <= rnd <= last]
    return float(np.mean(vals)) if vals else None
