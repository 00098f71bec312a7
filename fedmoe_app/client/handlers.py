"""ClientApp logic: identity, data, capacity profile, sparse training and evaluation.

``fedmoe_app/client_app.py`` only wires these handlers to Flower's ``@app.query``, ``@app.train``
and ``@app.evaluate``. A client is known by a stable ``client-id``: node config
``client-id`` in deployment, else its ``partition-id`` (simulation). Its data is the
folder named by node config ``data-path`` (a deployed site's own files, see
:mod:`fedmoe_app.data.local`), else shard ``partition-id`` of ``num-partitions`` of the
run's dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log

from ..capacity import ModelCosts
from ..capacity.probe import client_profile
from ..config import OPTIMIZER_STATES, TEXT_DATASETS, PrivacySection, RunConfig, TrainingSection
from ..data.local import node_data, node_data_path
from ..data.source import client_split
from ..maths.privacy import privatize
from ..models import MoEModel, load_arrays, model_costs, model_spec, model_to_arrays
from ..tensors import is_gate_key, parse_expert_key
from ..training import TrainResult, evaluate, evaluate_text_sums, resolve_device, train
from ..wire.holdings import held_from_config
from ..wire.protocol import (
    ARRAYS,
    CLIENT,
    CONFIG,
    METRICS,
    PROFILE,
    RAY_NODE,
    client_record,
    train_reply_content,
)
from ..wire.records import from_record, record_wire_dtype, reply_record, to_record
from .context import identity, run_config
from .link import link_estimate, link_metrics, measures_link, observe_train_message
from .placement import ray_node_id

log = logging.getLogger(__name__)
LOCAL_GATE = "fedmoe.local-gate"


def partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    nc = context.node_config
    try:
        return int(nc["partition-id"]), int(nc["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            f"node config needs 'partition-id' and 'num-partitions' (missing {exc}), "
            "or 'data-path' naming the node's own data"
        ) from None


@lru_cache(maxsize=8)
def _announce(cid: str, path: str, n_train: int, n_test: int, labels: tuple[int, ...]) -> None:
    flwr_log(
        INFO,
        "client %s: %d train / %d local test examples from %s, labels %s",
        cid,
        n_train,
        n_test,
        path,
        list(labels),
    )


def local_data(cfg: RunConfig, context: Context) -> tuple[Any, Any, Any]:
    """Return this client's ``(train, local test, dataset info)`` (images or text windows).

    A node whose node config names a ``data-path`` (or its alias ``dataset-path``) trains on its
    own folder; otherwise it takes its partition of the run's dataset.
    """
    found = node_data_path(context.node_config)
    if found:
        key, path = found
        train_split, test_split, info = node_data(path, cfg.dataset, **cfg.node_data_kwargs(), key=key)
        labels = tuple(int(v) for v in train_split.labels.unique())
        _announce(identity(context), str(path), len(train_split), len(test_split), labels)
        return train_split, test_split, info
    pid, num = partition(context)
    return client_split(cfg, pid, num)


def result_feedback(result: TrainResult) -> dict[str, np.ndarray]:
    """Return the ``[L, E]`` feedback of a local training result (the reply's ``feedback``)."""
    return {
        "layer-tokens": result.layer_tokens,
        "layer-loss-sum": result.layer_loss_sum,
        "layer-gate-hist": result.layer_gate_hist,
    }


@dataclass(frozen=True)
class ClientTask:
    """What a client answers FedMoE's messages with: who it is, its model, its data, its knobs.

    The fedmoe ClientApp builds one from the run config and the node config (:func:`run_task`);
    a user's ClientApp builds one through :class:`~.api.FedMoEClient`.

    Attributes
    ----------
    client_id : str
        The stable id the client reports to the server.
    build : callable
        ``build(holding)``: the :class:`~fedmoe_app.models.MoEModel` holding the experts of a
        bool ``[L, E]`` holding (FedMoE's sub-model; its weights are then loaded from the message).
    train_data, test_data
        The local splits (``inputs_targets()``: :class:`~fedmoe_app.data.Split`, ``TextSplit``).
    num_experts : int
        ``E``, the experts of the global model (the columns of every holding).
    training : TrainingSection
        The local training knobs (the message sets the round's ``lr`` and epochs).
    device : str
        Run-config ``device``: ``auto``, ``cpu`` or ``cuda``.
    text : bool
        Evaluate per token and in bits per byte (a ``TextSplit``), else per example.
    wire_dtype : str or None
        The reply's float wire dtype (``fp32`` / ``bf16``); None: the received message's.
    privacy : PrivacySection or None
        Local differential privacy (``mode = "local"``: the update is clipped and noised here).
    local_gate : bool
        Keep this client's own router across rounds (run-config ``gate-mode = "local"``).
    grad_checkpointing : bool
        Recompute activations in backward (``hf`` models).
    costs : ModelCosts or None
        The model's counted costs, anchoring an emulated device class's budget (profile).
    device_mix, seed
        Emulated device classes of a simulation (run-config ``device-mix``, ``seed``).

    """

    client_id: str
    build: Callable[[np.ndarray], MoEModel]
    train_data: Any
    test_data: Any
    num_experts: int
    training: TrainingSection
    device: str = "auto"
    text: bool = False
    wire_dtype: str | None = None
    privacy: PrivacySection | None = None
    local_gate: bool = False
    grad_checkpointing: bool = False
    costs: ModelCosts | None = None
    device_mix: str = ""
    seed: int = 0


def run_task(context: Context, *, with_costs: bool = False) -> ClientTask:
    """Return the :class:`ClientTask` of the fedmoe ClientApp: run config, node config, its data.

    ``with_costs``: count the model's costs (what a ``query``'s profile needs, not training).
    """
    cfg = run_config(context)
    train_split, test_split, info = local_data(cfg, context)
    spec = model_spec(cfg, info)
    return ClientTask(
        client_id=identity(context),
        build=spec.build,
        train_data=train_split,
        test_data=test_split,
        num_experts=cfg.num_experts,
        training=cfg.training,
        device=cfg.device,
        text=cfg.dataset in TEXT_DATASETS,
        wire_dtype=cfg.wire_dtype,
        privacy=cfg.privacy if cfg.privacy.mode == "local" else None,
        local_gate=cfg.gate_mode == "local",
        grad_checkpointing=cfg.grad_checkpointing,
        costs=model_costs(spec) if with_costs else None,
        device_mix=cfg.device_mix,
        seed=cfg.seed,
    )


def handle_query(msg: Message, context: Context) -> RecordDict:
    """Reply with the client id and its (measured, maybe emulated) capacity profile."""
    return query_reply(run_task(context, with_costs=True), context)


def handle_train(msg: Message, context: Context) -> RecordDict:
    """Train the received sub-model (shared + assigned experts) on local data (:func:`train_reply`)."""
    received_at = time.time()  # wall clock, compared with the server's ``sent-at`` (link.py)
    return train_reply(msg, run_task(context), context, received_at)


def handle_evaluate(msg: Message, context: Context) -> RecordDict:
    """Evaluate the received sparse view on the local test split (:func:`evaluate_reply`)."""
    return evaluate_reply(msg, run_task(context))


def query_reply(task: ClientTask, context: Context) -> RecordDict:
    """Reply to a ``query``: the client id and its (measured, maybe emulated) capacity profile.

    A ``"measured"`` node reports the link speed timed from its earlier train messages
    (:mod:`.link`), else the default.
    """
    measured = measures_link(task.client_id, device_mix=task.device_mix, seed=task.seed, context=context)
    link = link_estimate(context).down_mbps if measured else None
    device = str(resolve_device(task.device))
    profile = client_profile(
        task.client_id,
        device_mix=task.device_mix,
        seed=task.seed,
        batch_size=task.training.batch_size,
        costs=task.costs,
        node_config=context.node_config,
        device=device,
        link_mbps=link,
        optimizer_states=OPTIMIZER_STATES[task.training.optimizer],
    )
    content = profile.to_dict()
    content["num-examples"] = len(task.train_data)
    content["num-test-examples"] = len(task.test_data)
    return RecordDict({CLIENT: client_record(task.client_id), PROFILE: ConfigRecord(content)})


def _sub_model(msg: Message, task: ClientTask) -> MoEModel:
    held = held_from_config(msg.content[CONFIG], task.num_experts)
    model = task.build(held)
    load_arrays(model, from_record(msg.content[ARRAYS]))  # bf16 on the wire: decoded to float32
    return model


def train_reply(
    msg: Message, task: ClientTask, context: Context, received_at: float | None = None
) -> RecordDict:
    """Train the received sub-model (shared + assigned experts) on ``task``'s data; return the reply.

    The reply's arrays travel in ``task.wire_dtype`` (bf16: their changes from what was
    received, :func:`~fedmoe_app.wire.records.reply_record`); a local gate is kept in
    ``context.state``. A ``"measured"`` node times the message (``received_at``: when its
    handler started; :mod:`.link`) and reports its link estimate in the reply's metrics.
    """
    cid, conf = task.client_id, msg.content[CONFIG]
    measured = measures_link(cid, device_mix=task.device_mix, seed=task.seed, context=context)
    link = observe_train_message(conf, received_at or time.time(), context) if measured else None
    model = _sub_model(msg, task)
    if task.grad_checkpointing:  # hf only (checked at start-up)
        model.enable_gradient_checkpointing()
    if task.local_gate and LOCAL_GATE in context.state:
        gate = from_record(context.state[LOCAL_GATE])
        load_arrays(model, {**model_to_arrays(model), **gate})
    frozen = bool(conf["frozen-experts"])
    model.set_experts_trainable(not frozen)
    # the server's message decides the round's local work and learning rate (its schedule's value)
    knobs = dataclasses.replace(task.training, epochs=int(conf["local-epochs"]), lr=float(conf["lr"]))
    result = train(
        model,
        task.train_data,
        **dataclasses.asdict(knobs),
        device=resolve_device(task.device),
        seed=int(conf["seed"]),
        max_samples=int(conf["max-samples"]) or None,
    )
    model.cpu()
    arrays = model_to_arrays(model)
    if task.local_gate:
        context.state[LOCAL_GATE] = to_record({k: v for k, v in arrays.items() if is_gate_key(k)})
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-time-s": result.train_time_s,
        "samples-per-s": result.samples_per_s,
        "peak-memory-bytes": result.peak_memory_bytes,
        **(link_metrics(link) if link is not None else {}),
    }
    feedback = result_feedback(result)
    if frozen:  # read-only experts are not sent back
        arrays = {k: v for k, v in arrays.items() if parse_expert_key(k) is None}
    dp = task.privacy
    received = from_record(msg.content[ARRAYS])
    if dp is not None and dp.mode == "local":  # clip and noise the update before it leaves (privacy.py)
        arrays = privatize(
            received,
            arrays,
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            rng=np.random.default_rng(),
        )
    wire = task.wire_dtype or record_wire_dtype(msg.content[ARRAYS])
    record = reply_record(arrays, received, wire)
    content = train_reply_content(record, metrics, feedback, cid)
    node = ray_node_id()
    if node is not None:  # simulation: the Ray node this client ran on (placement.py)
        content[CLIENT][RAY_NODE] = node
    return content


def evaluate_reply(msg: Message, task: ClientTask) -> RecordDict:
    """Evaluate the received sparse view on ``task``'s test split; return the reply."""
    model = _sub_model(msg, task)
    device = resolve_device(task.device)
    precision, test_split = task.training.precision, task.test_data
    if task.text:  # per token, and in bits per byte of the text (any tokenizer)
        sums = evaluate_text_sums(model, test_split, batch_size=512, device=device, precision=precision)
        metrics = {"eval-loss": sums.loss, "eval-accuracy": sums.accuracy, "num-examples": len(test_split)}
        metrics |= {"eval-bpb": sums.bpb, "eval-bytes": int(sums.nbytes.sum())}
    else:
        loss, acc = evaluate(model, test_split, device=device, precision=precision)
        metrics = {"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(test_split)}
    return RecordDict({METRICS: MetricRecord(metrics), CLIENT: client_record(task.client_id)})
