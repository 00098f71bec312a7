"""What travels between server and clients, and how every reply is checked before use.

Train message (server → client): ``arrays`` (ArrayRecord: shared + assigned experts),
``config`` (ConfigRecord: ``expert-ids``, ``server-round``, ``lr``, ``local-epochs``,
``seed``; with untied layers also ``layer-experts``, the flat ``[L, E]`` 0/1 mask of the
experts held per MoE layer). Train reply: ``arrays`` (the same keys, trained), ``metrics`` (MetricRecord:
``num-examples``, ``train-loss``, ``train-accuracy``, ``train-time-s``,
``samples-per-s``, ``peak-memory-bytes``), ``feedback`` (MetricRecord of length-E lists:
``tokens``, ``expert-loss``, ``gate-hist``, and the same per MoE layer as flat ``[L, E]``
lists of length ``L x E``: ``layer-tokens``, ``layer-expert-loss``, ``layer-gate-hist``) and
``client`` (ConfigRecord: ``client-id``; under Ray also ``ray-node-id``, the Ray node the client ran on).
Query reply: ``client`` (client id) and ``profile`` (ConfigRecord of CapacityProfile).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from ..maths.aggregation import ClientUpdate
from ..tensors import Arrays
from .records import from_record

ARRAYS, CONFIG, METRICS, FEEDBACK, CLIENT, PROFILE = (
    "arrays",
    "config",
    "metrics",
    "feedback",
    "client",
    "profile",
)
FEEDBACK_KEYS = ("tokens", "expert-loss", "gate-hist")
LAYER_FEEDBACK_KEYS = ("layer-tokens", "layer-expert-loss", "layer-gate-hist")
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
    expert_ids: list[int]
    shapes: dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype str)
    max_examples: int | None = None
    layer_held: np.ndarray | None = None  # bool [L, E] held per MoE layer (untied); None: tied


@dataclass
class TrainReply:
    """A validated training reply."""

    node_id: int
    client_id: str
    update: ClientUpdate
    expert_ids: list[int]
    loss: float
    accuracy: float
    expert_loss: np.ndarray
    gate_hist: np.ndarray
    layer_tokens: np.ndarray  # [L, E]
    layer_expert_loss: np.ndarray  # [L, E]
    layer_gate_hist: np.ndarray  # [L, E]
    layer_held: np.ndarray  # bool [L, E], the experts the client held per MoE layer
    metrics: dict[str, float] = field(default_factory=dict)
    ray_node: str | None = None  # the Ray node the client ran on (simulation), if it said


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


def parse_eval_reply(content: RecordDict, client_id: str | None, max_examples: int | None) -> EvalReply:
    """Validate an evaluation reply; raise :class:`ReplyRejected`.

    Checks: the metrics record exists; the reply names ``client_id`` (the client the server
    knows behind the replying node; ``None``: not known, so any named client is refused);
    ``num-examples`` is a positive integer, not above ``max_examples`` (the local test size
    the client reported when first queried) when known; the loss is finite and ``>= 0``; the
    accuracy is finite and in ``[0, 1]``.
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
    return EvalReply(client_id=cid, num_examples=n, loss=float(loss), accuracy=float(acc))


def parse_train_reply(
    content: RecordDict,
    node_id: int,
    sent: Sent,
    num_experts: int,
    top_k: int,
    local_epochs: int,
    routes_per_example: int = 1,
    num_layers: int = 1,
) -> TrainReply:
    """Validate a train reply against what was sent; raise :class:`ReplyRejected`.

    Checks: the records exist; the array keys are exactly those sent, with the sent
    shapes and dtypes and finite values; ``num-examples`` is a positive integer (not
    above ``sent.max_examples`` when known); feedback vectors have length E, are finite
    and non-negative; tokens are zero for experts not held and consistent with
    ``num-examples × routes-per-example × top-k × local-epochs`` (routes per example: 1 for
    an image through one MoE layer, tokens × MoE layers for a sequence); the per-layer feedback
    (``num_layers`` x E) is finite and non-negative, has no tokens where its layer does not hold
    the expert, stays under the same bound per layer and sums over the layers to the totals;
    the client id matches.
    """
    try:
        arrays_rec, metrics, fb = content[ARRAYS], content[METRICS], content[FEEDBACK]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReplyRejected("malformed", f"missing record {exc}") from None
    cid = content_client_id(content)
    if cid != sent.client_id:
        raise ReplyRejected("client-id", f"expected {sent.client_id!r}, got {cid!r}")

    keys = set(arrays_rec.keys())
    if keys != set(sent.shapes):
        extra, missing = sorted(keys - set(sent.shapes)), sorted(set(sent.shapes) - keys)
        raise ReplyRejected("keys", f"extra={extra[:5]} missing={missing[:5]}")
    try:
        arrays: Arrays = from_record(arrays_rec)
    except Exception as exc:  # noqa: BLE001 - undecodable payload
        raise ReplyRejected("malformed", f"cannot decode arrays: {exc}") from None
    for key, value in arrays.items():
        shape, dtype = sent.shapes[key]
        if tuple(value.shape) != shape:
            raise ReplyRejected("shape", f"{key}: expected {shape}, got {tuple(value.shape)}")
        if str(value.dtype) != dtype:
            raise ReplyRejected("dtype", f"{key}: expected {dtype}, got {value.dtype}")
        if not np.isfinite(value).all():
            raise ReplyRejected("non-finite", f"{key} has NaN or inf")

    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ReplyRejected("num-examples", f"expected a positive int, got {n!r}")
    if sent.max_examples is not None and n > sent.max_examples:
        raise ReplyRejected("num-examples", f"{n} exceeds the client's data size {sent.max_examples}")

    vectors = {}
    for key in FEEDBACK_KEYS:
        raw = fb.get(key)
        if not isinstance(raw, list) or len(raw) != num_experts:
            raise ReplyRejected("feedback", f"{key}: expected a list of length {num_experts}")
        vec = np.asarray(raw, dtype=np.float64)
        if not np.isfinite(vec).all() or (vec < 0).any():
            raise ReplyRejected("feedback", f"{key}: values must be finite and >= 0")
        vectors[key] = vec
    tokens = vectors["tokens"]
    held = np.zeros(num_experts, dtype=bool)
    held[sent.expert_ids] = True
    if (tokens[~held] > 0).any():
        raise ReplyRejected("feedback", "tokens reported for experts the client was not sent")
    k = min(top_k, len(sent.expert_ids))
    bound = n * routes_per_example * k * local_epochs * 1.0001
    if (
        tokens.sum() > bound
        or vectors["gate-hist"].sum() > n * routes_per_example * top_k * local_epochs * 1.0001
    ):
        raise ReplyRejected("feedback", f"token counts exceed num-examples x top-k x epochs ({bound:.0f})")

    held_l = np.broadcast_to(held, (num_layers, num_experts)) if sent.layer_held is None else sent.layer_held
    layer = _layer_feedback(fb, vectors, held_l, n * (routes_per_example / num_layers) * local_epochs, top_k)

    extra = {}
    for key in ("train-loss", "train-accuracy", "train-time-s", "samples-per-s", "peak-memory-bytes"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            extra[key] = float(value)
    return TrainReply(
        node_id=node_id,
        client_id=cid,
        update=ClientUpdate(
            arrays=arrays,
            num_examples=n,
            tokens=tokens,
            num_held=len(sent.expert_ids),
            layer_tokens=layer["layer-tokens"],
            layer_held=np.array(held_l, dtype=bool),
        ),
        expert_ids=list(sent.expert_ids),
        loss=extra.get("train-loss", math.nan),
        accuracy=extra.get("train-accuracy", math.nan),
        expert_loss=vectors["expert-loss"],
        gate_hist=vectors["gate-hist"],
        layer_tokens=layer["layer-tokens"],
        layer_expert_loss=layer["layer-expert-loss"],
        layer_gate_hist=layer["layer-gate-hist"],
        layer_held=np.array(held_l, dtype=bool),
        metrics=extra,
        ray_node=content_ray_node(content),
    )


def _layer_feedback(
    fb: MetricRecord,
    totals: Mapping[str, np.ndarray],
    held: np.ndarray,
    routes: float,
    top_k: int,
) -> dict[str, np.ndarray]:
    """Check the per-layer feedback of a reply (``[L, E]`` flat lists); return it reshaped.

    ``held`` is the bool ``[L, E]`` the client was sent, ``routes`` the tokens one layer saw
    (examples x routes per example and layer x epochs).
    """
    shape = held.shape
    out = {}
    for key in LAYER_FEEDBACK_KEYS:
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
    if (tokens[~held] > 0).any():
        raise ReplyRejected("feedback", "layer-tokens reported for experts a layer was not sent")
    k = np.minimum(top_k, held.sum(axis=1))  # top-k among the experts each layer holds
    if (tokens.sum(axis=1) > routes * k * 1.0001).any() or (hist.sum(axis=1) > routes * top_k * 1.0001).any():
        raise ReplyRejected(
            "feedback", f"a layer's token counts exceed its routes x top-k ({routes * k.max():.0f})"
        )
    for key, total in (("layer-tokens", "tokens"), ("layer-gate-hist", "gate-hist")):
        if not np.allclose(out[key].sum(axis=0), totals[total], rtol=1e-6, atol=1e-3):
            raise ReplyRejected("feedback", f"{key} does not sum over the layers to {total}")
    return out
