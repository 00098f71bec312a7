"""FedMoEClient: a user's ClientApp answers FedMoE with its own model and data, as the app's handlers do."""

import numpy as np
import pytest
from fake_federation import ClientGrid
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.client import FedMoEClient
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data import load_splits
from fedmoe_app.data.text import client_split
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.server import FedMoE
from fedmoe_app.wire.records import from_record

SERVER = {"num-experts": 4, "experts-per-client": 2, "capacity": "fixed", "fraction-train": 1.0}
SERVER |= {"fraction-evaluate": 1.0, "min-evaluate-nodes": 1, "lr": 0.05, "local-epochs": 1}
CLIENT = {"batch-size": 16, "optimizer": "adamw", "weight-decay": 0.01, "device": "cpu"}
DATA = {"dataset": "synthetic", "max-samples-per-client": 64}
MODEL = {"stem-channels": 4, "feature-dim": 16, "expert-hidden": 32}
KEYS = {**SERVER, **CLIENT, **DATA, **MODEL}
CFG = RunConfig.from_run_config(KEYS)
SPEC = model_spec(CFG, load_splits("synthetic", "", 0)[2])
N = 2


def snake(keys):
    return {k.replace("-", "_"): v for k, v in keys.items()}


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def my_data(context):
    """The user's data: this node's partition of the synthetic images."""
    train, test, _ = client_split(CFG, int(context.node_config["partition-id"]), N)
    return train, test


def test_the_helper_trains_as_the_app_handlers_do():
    arrays = model_to_arrays(build_model(SPEC, seed=0))
    app_grid = ClientGrid(KEYS, N)
    app = FedMoE.from_run_config(CFG, SPEC, arrays).start(app_grid, num_rounds=2)

    client = FedMoEClient(SPEC.build, my_data, num_experts=4, **snake(CLIENT))
    handlers = {"query": client.query, "train": client.train, "evaluate": client.evaluate}
    user_grid = ClientGrid({}, N, handlers)  # a user's run config: nothing of fedmoe's
    user = FedMoE(**snake(SERVER)).start(
        user_grid, initial_arrays=arrays, num_rounds=2, train_config=ConfigRecord({"mine": 1})
    )
    a, b = from_record(app.arrays), from_record(user.arrays)
    assert all(np.array_equal(a[k], b[k]) for k in arrays)
    assert not all(np.array_equal(a[k], arrays[k]) for k in arrays)  # it trained
    assert user.train_metrics_clientapp[2]["valid-replies"] == N
    assert user.evaluate_metrics_clientapp[2]["eval-accuracy"] >= 0
    assert all(c["mine"] == 1 for kind, c in user_grid.configs if kind == "train")


def test_client_knobs_are_checked_as_run_config_keys():
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['lr'\]"):
        FedMoEClient(SPEC.build, my_data, num_experts=4, lr=0.1)  # the server's message sets it
    with pytest.raises(ConfigError, match="'optimizer' = 'adam' is invalid"):
        FedMoEClient(SPEC.build, my_data, num_experts=4, optimizer="adam")
