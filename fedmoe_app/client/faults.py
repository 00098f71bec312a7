"""Seeded fault injection for simulation: clients that drop, stall or send garbage.

Whether client ``c`` misbehaves in round ``r`` is a pure function of
``(seed, r, c)`` (:func:`fault_for`), so tests can predict every injected fault and
check the server's accounting against it. The faults wrap the production handlers from
outside (:func:`with_train_faults`, :func:`with_evaluate_faults`, used by ``fedmoe_app/client_app.py``);
with every ``fault-*-prob`` at 0 the wrapped handler runs unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from ..wire.protocol import ARRAYS, CONFIG, FEEDBACK, METRICS
from ..wire.records import from_record, record_wire_dtype, to_record
from .context import identity, run_config

Handler = Callable[[Message, Context], RecordDict]
log = logging.getLogger(__name__)

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
        feedback["layer-tokens"] = [-1.0] * len(feedback["layer-tokens"])
    else:
        raise ValueError(f"unknown corruption {kind!r}; allowed: {', '.join(CORRUPTIONS)}")
    out = RecordDict({k: v for k, v in content.items() if k not in (ARRAYS, METRICS, FEEDBACK)})
    wire = record_wire_dtype(content[ARRAYS])  # garbage in the reply's own wire dtype
    out[ARRAYS] = to_record(arrays, wire) if arrays else ArrayRecord()
    out[METRICS] = MetricRecord(metrics)
    out[FEEDBACK] = MetricRecord(feedback)
    return out


def _fault(msg: Message, context: Context) -> tuple[str | None, int, str]:
    """Return the fault this client injects for ``msg``, the round and the client id."""
    cfg = run_config(context)
    cid = identity(context)
    server_round = int(msg.content[CONFIG].get("server-round", 0))
    f = cfg.faults
    return fault_for(f.seed, server_round, cid, f.drop, f.slow, f.corrupt), server_round, cid


def with_train_faults(handler: Handler) -> Handler:
    """Wrap a train handler: drop (raise), stall past the round timeout, or corrupt its reply."""

    def handle(msg: Message, context: Context) -> RecordDict:
        fault, server_round, cid = _fault(msg, context)
        if fault == "drop":
            raise RuntimeError(f"injected fault: client {cid} drops out in round {server_round}")
        if fault == "slow":
            log.warning("injected fault: client %s stalls past the round timeout", cid)
            time.sleep(run_config(context).round_timeout_s + 5.0)
        content = handler(msg, context)
        if fault == "corrupt":
            kind = corruption_for(run_config(context).seed, server_round, cid)
            log.warning("injected fault: client %s sends a corrupt reply (%s)", cid, kind)
            content = corrupt(content, kind)
        return content

    return handle


def with_evaluate_faults(handler: Handler) -> Handler:
    """Wrap an evaluate handler: a corrupting client reports impossible metrics."""

    def handle(msg: Message, context: Context) -> RecordDict:
        fault, server_round, cid = _fault(msg, context)
        content = handler(msg, context)
        if fault == "corrupt":
            kind = eval_corruption_for(run_config(context).seed, server_round, cid)
            log.warning("injected fault: client %s reports corrupt evaluation metrics (%s)", cid, kind)
            content[METRICS] = MetricRecord(corrupt_eval(dict(content[METRICS]), kind))
        return content

    return handle
