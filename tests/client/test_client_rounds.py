"""Real client handlers answering the real server in process: the training knobs and bf16 wire end to end."""

import numpy as np
import pytest
from fake_federation import ClientGrid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.client.handlers import handle_evaluate, handle_query, handle_train
from fedmoe_app.config import RunConfig
from fedmoe_app.data import load_splits
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.server.strategy import FedMoE

HANDLERS = {"query": handle_query, "train": handle_train, "evaluate": handle_evaluate}
KEYS = {
    "dataset": "synthetic",
    "num-experts": 4,
    "experts-per-client": 2,
    "capacity": "fixed",
    "stem-channels": 4,
    "feature-dim": 16,
    "expert-hidden": 32,
    "max-samples-per-client": 96,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-evaluate-nodes": 1,
    "num-server-rounds": 2,
    "device": "cpu",
    "optimizer": "adamw",
    "lr": 0.01,
    "weight-decay": 0.01,
    "grad-accum-steps": 2,
    "batch-size": 16,
    "max-grad-norm": 1.0,
    "lr-schedule": "cosine",
    "lr-min": 0.001,
}


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def federate(wire):
    keys = {**KEYS, "wire-dtype": wire}
    cfg = RunConfig.from_run_config(keys)
    _, _, info = load_splits("synthetic", "", 0)
    spec = model_spec(cfg, info)
    grid, rows, model = ClientGrid(keys, 2), [], {}
    strategy = FedMoE.from_run_config(cfg, spec, model_to_arrays(build_model(spec, seed=0)))
    strategy.start(grid, num_rounds=2, on_round=lambda row, arrays: (rows.append(row), model.update(arrays)))
    return rows, model, grid, cfg


def test_real_clients_train_with_the_knobs_and_answer_in_bf16():
    rows32, model32, grid32, cfg = federate("fp32")
    rows16, model16, grid16, _ = federate("bf16")
    for r32, r16 in zip(rows32, rows16, strict=True):
        assert (
            r32["valid_replies"] == r16["valid_replies"] == 2 and not r32["rejected"] and not r16["rejected"]
        )
        assert r16["client_accuracy"] >= 0 and r16["eval_rejected"] == {}
        for key in ("bytes_down", "bytes_up"):  # tiny tensors: their .npy headers are 10 % of the bytes
            assert 0.5 < r16[key] / r32[key] < 0.6, key
    # the server's schedule reached the clients: cosine from lr (round 1 of 2) to lr-min
    lrs = [c["lr"] for kind, c in grid16.configs if kind == "train"]
    assert lrs == pytest.approx([0.0055, 0.0055, 0.001, 0.001])
    start = model_to_arrays(build_model(model_spec(cfg, load_splits("synthetic", "", 0)[2]), seed=0))

    def norm(a, b):
        return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in start)))

    assert all(v.dtype == np.float32 for v in model16.values())
    # trained from weights rounded to bf16 (AdamW's steps amplify that a little): close, not equal
    assert 0 < norm(model16, model32) < 0.25 * norm(model32, start), (
        norm(model16, model32),
        norm(model32, start),
    )
