"""What travels between server and clients, and how every reply is checked before use.

Train message (server → client): ``arrays`` (ArrayRecord: shared + the experts of its holding;
under run-config ``wire-dtype = "bf16"`` its float32 tensors bf16-encoded, :mod:`.records`),
``config`` (ConfigRecord: ``layer-experts``, the flat ``[L, E]`` 0/1 holding, and ``expert-ids``,
its union (:mod:`.holdings`); ``server-round``, ``lr``, ``local-epochs``, ``seed``,
``frozen-experts``, ``max-samples``, ``payload-bytes``: the arrays' wire size, ``sent-at``: the
server's wall clock when the round's messages were ready, Unix seconds). Train reply:
``arrays`` (the same keys, trained; under ``wire-dtype = "bf16"`` each float32 tensor's change
from what was sent, bf16-encoded),
``metrics`` (MetricRecord: ``num-examples``, ``train-loss``, ``train-accuracy``,
``train-time-s``, ``samples-per-s``, ``peak-memory-bytes``; a node that measures its link
also ``down-mbps`` and ``up-mbps``, capacity/link.py), ``feedback`` (MetricRecord of flat
``[L, E]`` lists, one row per MoE layer: ``layer-tokens`` routed to each held expert,
``layer-loss-sum`` its loss signal summed over those tokens, ``layer-gate-hist`` the unmasked
router's top-k choices) and ``client`` (ConfigRecord: ``client-id``; under Ray also
``ray-node-id``, the Ray node the client ran on).
Query reply: ``client`` (client id) and ``profile`` (ConfigRecord of CapacityProfile).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..capacity.link import MAX_MBPS, MIN_MBPS
from ..maths.aggregation import ClientUpdate
from ..tensors import Arrays
from .records import BF16, apply_changes, decode_array, wire_dtypes

ARRAYS, CONFIG, METRICS, FEEDBACK, CLIENT, PROFILE = (
    "arrays",
    "config",
    "metrics",
    "feedback",
    "client",
    "profile",
)
FEEDBACK_KEYS = ("layer-tokens", "layer-loss-sum", "layer-gate-hist")
RAY_NODE = "ray-node-id"
MAX_RAY_NODE_CHARS = 128


class ReplyRejected(ValueError):
    """A reply failed validation; ``reason`` is a short category for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Sent:
    """What the server sent one node for training: the yardstick for its reply."""

    client_id: str
    held: np.ndarray  # bool [L, E], the holding it was sent
    shapes: dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, wire dtype str) it must return
    max_examples: int | None = None
    # wire-dtype bf16: the server's float32 copies of the returned tensors, which the reply's
    # bf16 changes are added to (wire.records.apply_changes); None: the reply carries the tensors
    base: Mapping[str, np.ndarray] | None = None


def _mean(loss_sum: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.divide(loss_sum, tokens, out=np.zeros_like(tokens), where=tokens > 0)


@dataclass
class TrainReply:
    """A validated training reply; its feedback per (MoE layer, expert), totals over the layers derived."""

    node_id: int
    client_id: str
    update: ClientUpdate
    held: np.ndarray  # bool [L, E], the holding the client trained
    loss: float
    accuracy: float
    layer_tokens: np.ndarray  # [L, E] tokens routed to each held expert
    layer_loss_sum: np.ndarray  # [L, E] loss signal summed over those tokens
    layer_gate_hist: np.ndarray  # [L, E] top-k choices of the unmasked router
    metrics: dict[str, float] = field(default_factory=dict)
    ray_node: str | None = None  # the Ray node the client ran on (simulation), if it said

    @property
    def expert_ids(self) -> list[int]:
        """Experts held in any MoE layer."""
        return np.flatnonzero(self.held.any(axis=0)).tolist()

    @property
    def layer_expert_loss(self) -> np.ndarray:
        """``[L, E]`` mean loss signal per routed token (0 where no tokens)."""
        return _mean(self.layer_loss_sum, self.layer_tokens)

    @property
    def expert_loss(self) -> np.ndarray:
        """``[E]`` mean loss signal per routed token over all MoE layers (0 where no tokens)."""
        return _mean(self.layer_loss_sum.sum(axis=0), self.layer_tokens.sum(axis=0))

    @property
    def gate_hist(self) -> np.ndarray:
        """``[E]`` top-k choices of the unmasked router over all MoE layers."""
        return self.layer_gate_hist.sum(axis=0)


def client_record(client_id: str, **extra: str) -> ConfigRecord:
    """ConfigRecord naming the replying client."""
    return ConfigRecord({"client-id": client_id, **extra})


def train_reply_content(
    arrays_record, metrics: Mapping[str, float], feedback: Mapping[str, np.ndarray], client_id: str
) -> RecordDict:
    """Build a train reply's RecordDict on the client."""
    return RecordDict(
        {
            ARRAYS: arrays_record,
            METRICS: MetricRecord({k: float(v) if not isinstance(v, int) else v for k, v in metrics.items()}),
            FEEDBACK: MetricRecord(
                {k: [float(x) for x in np.asarray(v).ravel()] for k, v in feedback.items()}
            ),
            CLIENT: client_record(client_id),
        }
    )


def content_ray_node(content: RecordDict) -> str | None:
    """Return the Ray node id a reply names, if it names a plausible one (else None)."""
    try:
        node = content[CLIENT].get(RAY_NODE)
    except (KeyError, TypeError, AttributeError):
        return None
    return node if isinstance(node, str) and 0 < len(node) <= MAX_RAY_NODE_CHARS else None


def reply_client_id(msg: Message) -> str | None:
    """Return the client id a reply names, if it has one."""
    return content_client_id(msg.content) if msg.has_content() else None


def content_client_id(content: RecordDict) -> str | None:
    """Return the client id a reply's content names, if it has one."""
    try:
        cid = content[CLIENT]["client-id"]
    except (KeyError, TypeError, AttributeError):
        return None
    return cid if isinstance(cid, str) and cid else None


@dataclass(frozen=True)
class EvalReply:
    """A validated evaluation reply: one client's local test result."""

    client_id: str
    num_examples: int
    loss: float
    accuracy: float
    bpb: float | None = None  # text: bits per byte of its local test text
    nbytes: int = 0  # text: the UTF-8 bytes of that text's targets (the weight of ``bpb``)


def parse_eval_reply(content: RecordDict, client_id: str | None, max_examples: int | None) -> EvalReply:
    """Validate an evaluation reply; raise :class:`ReplyRejected`.

    Checks: the metrics record exists; the reply names ``client_id`` (the client the server
    knows behind the replying node; ``None``: not known, so any named client is refused);
    ``num-examples`` is a positive integer, not above ``max_examples`` (the local test size
    the client reported when first queried) when known; the loss is finite and ``>= 0``; the
    accuracy is finite and in ``[0, 1]``; a text client's ``eval-bpb`` (finite, ``>= 0``) comes
    with ``eval-bytes`` (a positive int), or neither is sent.
    """
    try:
        metrics = content[METRICS]
    except (KeyError, TypeError, AttributeError):
        raise ReplyRejected("malformed", "missing metrics record") from None
    cid = content_client_id(content)
    if cid is None or cid != client_id:
        raise ReplyRejected("client-id", f"expected {client_id!r}, got {cid!r}")
    n, loss, acc = metrics.get("num-examples"), metrics.get("eval-loss"), metrics.get("eval-accuracy")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ReplyRejected("num-examples", f"expected a positive int, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise ReplyRejected("num-examples", f"{n} exceeds the client's test size {max_examples}")
    for name, value, hi in (("eval-loss", loss, math.inf), ("eval-accuracy", acc, 1.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ReplyRejected("metrics", f"{name}: expected a finite number, got {value!r}")
        if not 0.0 <= value <= hi:
            raise ReplyRejected("metrics", f"{name}: {value!r} is outside [0, {hi}]")
    bpb, nbytes = metrics.get("eval-bpb"), metrics.get("eval-bytes")
    if bpb is None and nbytes is None:
        return EvalReply(client_id=cid, num_examples=n, loss=float(loss), accuracy=float(acc))
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ReplyRejected("metrics", f"eval-bytes: expected a positive int with eval-bpb, got {nbytes!r}")
    if not isinstance(bpb, (int, float)) or isinstance(bpb, bool) or not (math.isfinite(bpb) and bpb >= 0):
        raise ReplyRejected("metrics", f"eval-bpb: expected a finite number >= 0, got {bpb!r}")
    return EvalReply(cid, n, float(loss), float(acc), bpb=float(bpb), nbytes=nbytes)


def parse_train_reply(
    content: RecordDict,
    node_id: int,
    sent: Sent,
    *,
    top_k: int,
    local_epochs: int,
    routes_per_example: int = 1,
) -> TrainReply:
    """Validate a train reply against what was sent; raise :class:`ReplyRejected`.

    Checks: the records exist; the array keys are exactly those sent, with the sent
    shapes and dtypes and finite values; ``num-examples`` is a positive integer (not
    above ``sent.max_examples`` when known); the feedback is ``[L, E]`` like the holding sent,
    finite and non-negative, with no tokens (nor loss) where a layer does not hold the expert;
    the measured numbers it reports lie in :data:`TRAIN_METRIC_RANGES`;
    tokens stay under ``num-examples × routes-per-example × top-k × local-epochs`` in all
    (routes per example: 1 for an image through one MoE layer, tokens × MoE layers for a
    sequence), under each layer's share of it, and on any one expert under the layer's routes
    (a client cannot pile all its tokens onto one expert to weigh more there than a client
    whose every route chose it); the client id matches.
    """
    try:
        arrays_rec, metrics, fb = content[ARRAYS], content[METRICS], content[FEEDBACK]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReplyRejected("malformed", f"missing record {exc}") from None
    cid = content_client_id(content)
    if cid != sent.client_id:
        raise ReplyRejected("client-id", f"expected {sent.client_id!r}, got {cid!r}")
    arrays = _checked_arrays(arrays_rec, sent)
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ReplyRejected("num-examples", f"expected a positive int, got {n!r}")
    if sent.max_examples is not None and n > sent.max_examples:
        raise ReplyRejected("num-examples", f"{n} exceeds the client's data size {sent.max_examples}")
    feedback = _checked_feedback(fb, sent.held, n * routes_per_example * local_epochs, top_k)
    extra = _checked_train_metrics(metrics)
    tokens = feedback["layer-tokens"]
    held = np.array(sent.held, dtype=bool)
    return TrainReply(
        node_id=node_id,
        client_id=cid,
        update=ClientUpdate(
            arrays=arrays,
            num_examples=n,
            tokens=tokens.sum(axis=0),
            num_held=int(held.any(axis=0).sum()),
            layer_tokens=tokens,
            layer_held=held,
        ),
        held=held,
        loss=extra.get("train-loss", math.nan),
        accuracy=extra.get("train-accuracy", math.nan),
        layer_tokens=tokens,
        layer_loss_sum=feedback["layer-loss-sum"],
        layer_gate_hist=feedback["layer-gate-hist"],
        metrics=extra,
        ray_node=content_ray_node(content),
    )


#: the measured numbers a train reply may carry, each optional, and the range each must lie in
TRAIN_METRIC_RANGES = {
    "train-loss": (0.0, 1e6),
    "train-accuracy": (0.0, 1.0),
    "train-time-s": (0.0, 7 * 24 * 3600.0),  # a week
    "samples-per-s": (0.0, 1e7),
    "peak-memory-bytes": (0.0, float(2**50)),  # a pebibyte
    "down-mbps": (MIN_MBPS, MAX_MBPS),  # the client's measured link (capacity/link.py)
    "up-mbps": (MIN_MBPS, MAX_MBPS),
}


def _checked_train_metrics(metrics: MetricRecord) -> dict[str, float]:
    """Return the reply's measured numbers (:data:`TRAIN_METRIC_RANGES`); raise for one out of range.

    A number that is present but not finite or outside its range rejects the whole reply (a
    client that misreports its loss or speed would otherwise blank the round's mean or enter
    the capacity profiles the planner trusts); an absent one is left out.
    """
    extra: dict[str, float] = {}
    for key, (lo, hi) in TRAIN_METRIC_RANGES.items():
        value = metrics.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ReplyRejected("metrics", f"{key}: expected a finite number, got {value!r}")
        if not lo <= value <= hi:
            raise ReplyRejected("metrics", f"{key}: {value!r} is outside [{lo:g}, {hi:g}]")
        extra[key] = float(value)
    return extra


def _checked_arrays(record: ArrayRecord, sent: Sent) -> Arrays:
    """Return a reply's arrays if they are exactly the tensors sent (keys, shapes, dtypes), finite.

    Dtypes are compared as they travel (``"bfloat16"`` for a bf16-encoded tensor,
    :func:`~.records.wire_dtypes`), then decoded; a bf16 reply's changes are added to
    ``sent.base`` (:func:`~.records.apply_changes`) and the sums checked finite too.
    """
    keys = set(record.keys())
    if keys != set(sent.shapes):
        extra, missing = sorted(keys - set(sent.shapes)), sorted(set(sent.shapes) - keys)
        raise ReplyRejected("keys", f"extra={extra[:5]} missing={missing[:5]}")
    dtypes = wire_dtypes(record)
    for key, wire in dtypes.items():
        if wire != sent.shapes[key][1]:
            raise ReplyRejected("dtype", f"{key}: expected {sent.shapes[key][1]}, got {wire}")
    arrays: Arrays = {}
    for key, entry in record.items():  # one tensor at a time: a bf16 change is decoded, added, dropped
        try:
            value = decode_array(entry)
        except Exception as exc:  # noqa: BLE001 - undecodable payload
            raise ReplyRejected("malformed", f"cannot decode arrays: {exc}") from None
        shape, dtype = sent.shapes[key]
        if tuple(value.shape) != shape:
            raise ReplyRejected("shape", f"{key}: expected {shape}, got {tuple(value.shape)}")
        if str(value.dtype) != ("float32" if dtype == BF16 else dtype):
            raise ReplyRejected("dtype", f"{key}: expected {dtype}, got {value.dtype}")
        if not np.isfinite(value).all():
            raise ReplyRejected("non-finite", f"{key} has NaN or inf")
        if sent.base is not None:
            value = apply_changes({key: value}, {key: dtypes[key]}, sent.base)[key]
            if not np.isfinite(value).all():
                raise ReplyRejected("non-finite", f"{key} has NaN or inf once its change is applied")
        arrays[key] = value
    return arrays


def _checked_feedback(fb: MetricRecord, held: np.ndarray, routes: float, top_k: int) -> dict[str, np.ndarray]:
    """Check the ``[L, E]`` feedback of a reply (flat lists); return it reshaped.

    ``held`` is the bool ``[L, E]`` holding the client was sent, ``routes`` the routing decisions
    of its local work over all layers (examples x routes per example x epochs).
    """
    shape = held.shape
    out = {}
    for key in FEEDBACK_KEYS:
        raw = fb.get(key)
        if not isinstance(raw, list) or len(raw) != held.size:
            raise ReplyRejected(
                "feedback", f"{key}: expected a list of length {held.size} ({shape[0]} x {shape[1]})"
            )
        vec = np.asarray(raw, dtype=np.float64).reshape(shape)
        if not np.isfinite(vec).all() or (vec < 0).any():
            raise ReplyRejected("feedback", f"{key}: values must be finite and >= 0")
        out[key] = vec
    tokens, hist = out["layer-tokens"], out["layer-gate-hist"]
    if (tokens[~held] > 0).any() or (out["layer-loss-sum"][tokens == 0] > 0).any():
        raise ReplyRejected("feedback", "tokens or loss reported for experts a layer was not sent")
    k = min(top_k, int(held.any(axis=0).sum()))
    if tokens.sum() > routes * k * 1.0001 or hist.sum() > routes * top_k * 1.0001:
        raise ReplyRejected(
            "feedback", f"token counts exceed num-examples x top-k x epochs ({routes * k:.0f})"
        )
    per_layer, k_l = (
        routes / shape[0],
        np.minimum(top_k, held.sum(axis=1)),
    )  # top-k among each layer's experts
    if (tokens.sum(axis=1) > per_layer * k_l * 1.0001).any() or (
        hist.sum(axis=1) > per_layer * top_k * 1.0001
    ).any():
        raise ReplyRejected(
            "feedback", f"a layer's token counts exceed its routes x top-k ({per_layer * k_l.max():.0f})"
        )
    if tokens.max(initial=0.0) > per_layer * 1.0001 or hist.max(initial=0.0) > per_layer * 1.0001:
        raise ReplyRejected(  # top-k picks distinct experts: a route reaches an expert at most once
            "feedback", f"an expert's token count exceeds its layer's routes ({per_layer:.0f})"
        )
    return out
