"""ClientApp logic: identity, data, capacity profile, sparse training and evaluation.

``client_app.py`` only wires these handlers to Flower's ``@app.query``, ``@app.train``
and ``@app.evaluate``. A client is known by a stable ``client-id``: node config
``client-id`` in deployment, else its ``partition-id`` (simulation).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..capacity.probe import client_profile
from ..config import RunConfig
from ..data import DatasetInfo, Split, client_data
from ..models import ModelSpec, build_model, load_arrays, model_costs, model_to_arrays
from ..training import evaluate, resolve_device, train
from .faults import corrupt, corruption_for, fault_for
from .privacy import privatize
from .protocol import ARRAYS, CLIENT, CONFIG, METRICS, PROFILE, client_record, train_reply_content
from .records import from_record, to_record

log = logging.getLogger(__name__)
LOCAL_GATE = "fedmoe.local-gate"


@lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_run_config(dict(items))


def run_config(context: Context) -> RunConfig:
    """Return the validated run config (cached per process)."""
    return _config(tuple(sorted(context.run_config.items())))


def identity(context: Context) -> tuple[str, int, int]:
    """``(client-id, partition-id, num-partitions)`` from the node config."""
    nc = context.node_config
    try:
        pid, num = int(nc["partition-id"]), int(nc["num-partitions"])
    except KeyError as exc:
        raise ValueError(f"node config needs 'partition-id' and 'num-partitions' (missing {exc})") from None
    return str(nc.get("client-id", pid)), pid, num


def local_data(cfg: RunConfig, context: Context) -> tuple[Split, Split, DatasetInfo]:
    """Return this client's ``(train, local test, dataset info)``."""
    _, pid, num = identity(context)
    return client_data(
        cfg.dataset,
        pid,
        num,
        **cfg.split_kwargs(),
    )


def handle_query(msg: Message, context: Context) -> RecordDict:
    """Reply with the client id and its (measured, maybe emulated) capacity profile."""
    cfg = run_config(context)
    cid, _, _ = identity(context)
    train_split, _, info = local_data(cfg, context)
    device = str(resolve_device(cfg.device))
    profile = client_profile(
        cid,
        device_mix=cfg.device_mix,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        costs=model_costs(ModelSpec.from_config(cfg, info)),
        node_config=context.node_config,
        device=device,
    )
    content = profile.to_dict()
    content["num-examples"] = len(train_split)
    return RecordDict({CLIENT: client_record(cid), PROFILE: ConfigRecord(content)})


def _sub_model(msg: Message, cfg: RunConfig, info: DatasetInfo):
    expert_ids = [int(e) for e in msg.content[CONFIG]["expert-ids"]]
    model = build_model(ModelSpec.from_config(cfg, info), expert_ids)
    load_arrays(model, from_record(msg.content[ARRAYS]))
    return model


def handle_train(msg: Message, context: Context) -> RecordDict:
    """Train the received sub-model (shared + assigned experts) on local data."""
    cfg = run_config(context)
    cid, _, _ = identity(context)
    conf = msg.content[CONFIG]
    server_round = int(conf.get("server-round", 0))
    fault = fault_for(
        cfg.seed, server_round, cid, cfg.fault_drop_prob, cfg.fault_slow_prob, cfg.fault_corrupt_prob
    )
    if fault == "drop":
        raise RuntimeError(f"injected fault: client {cid} drops out in round {server_round}")
    if fault == "slow":
        log.warning("injected fault: client %s stalls past the round timeout", cid)
        time.sleep(cfg.round_timeout_s + 5.0)
    train_split, _, info = local_data(cfg, context)
    model = _sub_model(msg, cfg, info)
    if cfg.gate_mode == "local" and LOCAL_GATE in context.state:
        gate = from_record(context.state[LOCAL_GATE])
        load_arrays(model, {**model_to_arrays(model), **gate})
    frozen = bool(conf.get("frozen-experts", False))
    model.experts.requires_grad_(not frozen)
    knobs = cfg.train_kwargs() | {
        "epochs": int(conf.get("local-epochs", cfg.local_epochs)),  # the server's word wins
        "lr": float(conf.get("lr", cfg.lr)),
    }
    result = train(
        model,
        train_split,
        **knobs,
        device=resolve_device(cfg.device),
        seed=int(conf.get("seed", cfg.seed)),
        max_samples=int(conf.get("max-samples", 0)) or None,
    )
    model.cpu()
    arrays = model_to_arrays(model)
    if cfg.gate_mode == "local":
        context.state[LOCAL_GATE] = to_record({k: v for k, v in arrays.items() if k.startswith("gate.")})
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "train-time-s": result.train_time_s,
        "samples-per-s": result.samples_per_s,
        "peak-memory-bytes": result.peak_memory_bytes,
    }
    feedback = {"tokens": result.tokens, "expert-loss": result.expert_loss, "gate-hist": result.gate_hist}
    if frozen:  # read-only experts are not sent back
        arrays = {k: v for k, v in arrays.items() if not k.startswith("experts.")}
    if cfg.dp == "local":  # clip and noise the update before it leaves (privacy.py)
        arrays = privatize(
            from_record(msg.content[ARRAYS]),
            arrays,
            clip_norm=cfg.dp_clip_norm,
            noise_multiplier=cfg.dp_noise_multiplier,
            rng=np.random.default_rng(),
        )
    content = train_reply_content(to_record(arrays), metrics, feedback, cid)
    if fault == "corrupt":
        kind = corruption_for(cfg.seed, server_round, cid)
        log.warning("injected fault: client %s sends a corrupt reply (%s)", cid, kind)
        content = corrupt(content, kind)
    return content


def handle_evaluate(msg: Message, context: Context) -> RecordDict:
    """Evaluate the received sparse view on the local test split."""
    cfg = run_config(context)
    cid, _, _ = identity(context)
    _, test_split, info = local_data(cfg, context)
    model = _sub_model(msg, cfg, info)
    loss, acc = evaluate(model, test_split, device=resolve_device(cfg.device))
    return RecordDict(
        {
            METRICS: MetricRecord({"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(test_split)}),
            CLIENT: client_record(cid),
        }
    )
