"""Seeded fault injection for simulation: clients that drop, stall or send garbage.

Whether client ``c`` misbehaves in round ``r`` is a pure function of
``(seed, r, c)`` (:func:`fault_for`), so tests can predict every injected fault and
check the server's accounting against it.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from .protocol import ARRAYS, FEEDBACK, METRICS
from .records import from_record, to_record

FAULTS = ("drop", "slow", "corrupt")
CORRUPTIONS = ("nan", "shape", "extra-key", "missing-key", "dtype", "num-examples", "feedback")
# The reply-validation reason each corruption must be rejected with.
EXPECTED_REASON = {
    "nan": "non-finite",
    "shape": "shape",
    "extra-key": "keys",
    "missing-key": "keys",
    "dtype": "dtype",
    "num-examples": "num-examples",
    "feedback": "feedback",
}
# A corrupting client's evaluation reply: an impossible accuracy, or an example count that would
# outweigh every other client; each with the rejection reason it must get.
EVAL_CORRUPTIONS = {"accuracy": "metrics", "num-examples": "num-examples"}


def _unit(*parts: object) -> float:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def fault_for(
    seed: int, server_round: int, client_id: str, drop: float, slow: float, corrupt: float
) -> str | None:
    """Return the fault (``drop``, ``slow``, ``corrupt``) client ``client_id`` injects, or ``None``."""
    u = _unit("fault", seed, server_round, client_id)
    for name, p in zip(FAULTS, (drop, slow, corrupt)):
        if u < p:
            return name
        u -= p
    return None


def corruption_for(seed: int, server_round: int, client_id: str) -> str:
    """Which kind of garbage a corrupting client sends."""
    return CORRUPTIONS[int(_unit("kind", seed, server_round, client_id) * len(CORRUPTIONS))]


def eval_corruption_for(seed: int, server_round: int, client_id: str) -> str:
    """Which kind of garbage a corrupting client reports from evaluation."""
    kinds = list(EVAL_CORRUPTIONS)
    return kinds[int(_unit("eval-kind", seed, server_round, client_id) * len(kinds))]


def corrupt_eval(metrics: dict[str, float | int], kind: str) -> dict[str, float | int]:
    """Return a copy of evaluation metrics damaged in the way ``kind`` names."""
    if kind == "accuracy":
        return {**metrics, "eval-accuracy": 999999.9998}
    if kind == "num-examples":
        return {**metrics, "num-examples": 10**12}
    raise ValueError(f"unknown corruption {kind!r}; allowed: {', '.join(EVAL_CORRUPTIONS)}")


def corrupt(content: RecordDict, kind: str) -> RecordDict:
    """Return a copy of a train reply's content damaged in the way ``kind`` names."""
    arrays = from_record(content[ARRAYS])
    metrics = dict(content[METRICS])
    feedback = dict(content[FEEDBACK])
    key = next(k for k in arrays if k.startswith("experts."))
    if kind == "nan":
        arrays[key] = np.full_like(arrays[key], np.nan)
    elif kind == "shape":
        arrays[key] = np.zeros(arrays[key].shape[:-1] + (arrays[key].shape[-1] + 1,), arrays[key].dtype)
    elif kind == "extra-key":
        arrays["experts.999.w1"] = np.zeros(3, np.float32)
    elif kind == "missing-key":
        del arrays[key]
    elif kind == "dtype":
        arrays[key] = arrays[key].astype(np.float64)
    elif kind == "num-examples":
        metrics["num-examples"] = 10**12
    elif kind == "feedback":
        feedback["tokens"] = [-1.0] * len(feedback["tokens"])
    else:
        raise ValueError(f"unknown corruption {kind!r}; allowed: {', '.join(CORRUPTIONS)}")
    out = RecordDict({k: v for k, v in content.items() if k not in (ARRAYS, METRICS, FEEDBACK)})
    out[ARRAYS] = to_record(arrays) if arrays else ArrayRecord()
    out[METRICS] = MetricRecord(metrics)
    out[FEEDBACK] = MetricRecord(feedback)
    return out
