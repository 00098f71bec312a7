"""ClientApp logic: identity, data, capacity profile, sparse training and evaluation.

``client_app.py`` only wires these handlers to Flower's ``@app.query``, ``@app.train``
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
from functools import lru_cache
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log as flwr_log

from ..capacity.probe import client_profile
from ..config import TEXT_DATASETS, RunConfig
from ..data.local import node_data
from ..data.text import client_split
from ..maths.privacy import privatize
from ..models import build_model, load_arrays, model_costs, model_spec, model_to_arrays
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
from ..wire.records import from_record, reply_record, to_record
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

    A node whose node config names a ``data-path`` trains on its own folder; otherwise it
    takes its partition of the run's dataset.
    """
    path = context.node_config.get("data-path")
    if path:
        train_split, test_split, info = node_data(str(path), cfg.dataset, **cfg.node_data_kwargs())
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


def handle_query(msg: Message, context: Context) -> RecordDict:
    """Reply with the client id and its (measured, maybe emulated) capacity profile.

    A ``"measured"`` node reports the link speed timed from its earlier train messages
    (:mod:`.link`), else the default.
    """
    cfg = run_config(context)
    cid = identity(context)
    link = link_estimate(context).down_mbps if measures_link(cfg, cid, context) else None
    train_split, test_split, info = local_data(cfg, context)
    device = str(resolve_device(cfg.device))
    profile = client_profile(
        cid,
        device_mix=cfg.device_mix,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        costs=model_costs(model_spec(cfg, info)),
        node_config=context.node_config,
        device=device,
        link_mbps=link,
    )
    content = profile.to_dict()
    content["num-examples"] = len(train_split)
    content["num-test-examples"] = len(test_split)
    return RecordDict({CLIENT: client_record(cid), PROFILE: ConfigRecord(content)})


def _sub_model(msg: Message, cfg: RunConfig, info: Any):
    held = held_from_config(msg.content[CONFIG], cfg.num_experts)
    model = build_model(model_spec(cfg, info), held)
    load_arrays(model, from_record(msg.content[ARRAYS]))  # bf16 on the wire: decoded to float32
    return model


def handle_train(msg: Message, context: Context) -> RecordDict:
    """Train the received sub-model (shared + assigned experts) on local data.

    The reply's arrays travel in run-config ``wire-dtype`` (bf16: their changes from what was
    received, :func:`~fedmoe_app.wire.records.reply_record`). A ``"measured"`` node times the
    message (:mod:`.link`) and reports its link estimate in the reply's metrics.
    """
    received_at = time.time()  # wall clock, compared with the server's ``sent-at``
    cfg = run_config(context)
    cid = identity(context)
    conf = msg.content[CONFIG]
    link = observe_train_message(conf, received_at, context) if measures_link(cfg, cid, context) else None
    train_split, _, info = local_data(cfg, context)
    model = _sub_model(msg, cfg, info)
    if cfg.grad_checkpointing:  # hf only (checked at start-up)
        model.enable_gradient_checkpointing()
    if cfg.gate_mode == "local" and LOCAL_GATE in context.state:
        gate = from_record(context.state[LOCAL_GATE])
        load_arrays(model, {**model_to_arrays(model), **gate})
    frozen = bool(conf["frozen-experts"])
    model.set_experts_trainable(not frozen)
    # the server's message decides the round's local work and learning rate (its schedule's value)
    knobs = dataclasses.replace(cfg.training, epochs=int(conf["local-epochs"]), lr=float(conf["lr"]))
    result = train(
        model,
        train_split,
        **dataclasses.asdict(knobs),
        device=resolve_device(cfg.device),
        seed=int(conf["seed"]),
        max_samples=int(conf["max-samples"]) or None,
    )
    model.cpu()
    arrays = model_to_arrays(model)
    if cfg.gate_mode == "local":
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
    dp = cfg.privacy
    received = from_record(msg.content[ARRAYS])
    if dp.mode == "local":  # clip and noise the update before it leaves (privacy.py)
        arrays = privatize(
            received,
            arrays,
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            rng=np.random.default_rng(),
        )
    record = reply_record(arrays, received, cfg.wire_dtype)
    content = train_reply_content(record, metrics, feedback, cid)
    node = ray_node_id()
    if node is not None:  # simulation: the Ray node this client ran on (placement.py)
        content[CLIENT][RAY_NODE] = node
    return content


def handle_evaluate(msg: Message, context: Context) -> RecordDict:
    """Evaluate the received sparse view on the local test split."""
    cfg = run_config(context)
    cid = identity(context)
    _, test_split, info = local_data(cfg, context)
    model = _sub_model(msg, cfg, info)
    device = resolve_device(cfg.device)
    if cfg.dataset in TEXT_DATASETS:  # per token, and in bits per byte of the text (any tokenizer)
        sums = evaluate_text_sums(model, test_split, batch_size=512, device=device, precision=cfg.precision)
        metrics = {"eval-loss": sums.loss, "eval-accuracy": sums.accuracy, "num-examples": len(test_split)}
        metrics |= {"eval-bpb": sums.bpb, "eval-bytes": int(sums.nbytes.sum())}
    else:
        loss, acc = evaluate(model, test_split, device=device, precision=cfg.precision)
        metrics = {"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(test_split)}
    return RecordDict({METRICS: MetricRecord(metrics), CLIENT: client_record(cid)})
