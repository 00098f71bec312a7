"""FedMoE built from plain keyword arguments, as a user's ServerApp builds Flower's FedAvg."""

import numpy as np
import pytest
from conftest import make_spec
from fake_federation import FakeGrid
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.models import build_model, model_costs, model_to_arrays
from fedmoe_app.server.strategy import FedMoE, arrays_costs
from fedmoe_app.wire.protocol import CONFIG
from fedmoe_app.wire.records import from_record, to_record

SPEC = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)
ARRAYS = model_to_arrays(build_model(SPEC, seed=0))
KNOBS = {"capacity": "fixed", "experts_per_client": 2, "fraction_train": 1.0, "fraction_evaluate": 1.0}


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class RecordingGrid(FakeGrid):
    """A FakeGrid that keeps the config of every message it is sent, by message type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configs = {"train": [], "evaluate": []}

    def send_and_receive(self, messages, timeout):
        messages = list(messages)
        for m in messages:
            kind = m.metadata.message_type
            if kind in self.configs:
                self.configs[kind].append(dict(m.content[CONFIG].items()))
        return super().send_and_receive(messages, timeout)


def test_plain_arguments_take_the_model_from_start_and_forward_the_configs():
    strategy = FedMoE(**KNOBS, min_evaluate_nodes=1)  # no model yet: start's arrays are the model
    grid = RecordingGrid(3, num_experts=4, top_k=2, scale=0.5)
    result = strategy.start(
        grid,
        initial_arrays=to_record(ARRAYS),
        num_rounds=2,
        train_config=ConfigRecord({"my-key": 7, "server-round": 99}),
        evaluate_config=ConfigRecord({"eval-key": "x"}),
    )
    assert strategy.num_experts == 4 and strategy.layers == [""]  # from the arrays' names
    train, evaluate = grid.configs["train"], grid.configs["evaluate"]
    assert len(train) == 6 and len(evaluate) == 6  # 3 nodes, 2 rounds
    assert all(c["my-key"] == 7 and c["lr"] == RunConfig().lr for c in train)
    assert [c["server-round"] for c in train] == [1, 1, 1, 2, 2, 2]  # FedMoE's own value wins
    assert all(c["eval-key"] == "x" and "my-key" not in c for c in evaluate)
    assert all(len(c["expert-ids"]) == 2 for c in train)  # experts_per_client
    final = from_record(result.arrays)
    assert any(not np.array_equal(final[k], ARRAYS[k]) for k in ARRAYS)  # the clients' updates landed


def test_plain_arguments_run_as_the_run_config_does():
    plain = FedMoE(**KNOBS, initial_arrays=ARRAYS)
    cfg = RunConfig.from_run_config({k.replace("_", "-"): v for k, v in KNOBS.items()} | {"num-experts": 4})
    app = FedMoE.from_run_config(cfg, SPEC, ARRAYS)
    runs = [s.start(RecordingGrid(4, num_experts=4, top_k=2), num_rounds=2) for s in (plain, app)]
    a, b = (from_record(r.arrays) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in ARRAYS)
    assert not all(np.array_equal(a[k], ARRAYS[k]) for k in ARRAYS)


def test_flower_api_on_a_strategy_without_a_model():
    strategy = FedMoE(**{**KNOBS, "fraction_evaluate": 0.0})
    grid = RecordingGrid(2, num_experts=4, top_k=2, scale=0.5)
    messages = list(strategy.configure_train(1, to_record(ARRAYS), ConfigRecord({"k": 1}), grid))
    assert len(messages) == 2 and all(m.content[CONFIG]["k"] == 1 for m in messages)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=10))
    assert arrays is not None and metrics["valid-replies"] == 2
    assert not all(np.array_equal(from_record(arrays)[k], ARRAYS[k]) for k in ARRAYS)


def test_costs_default_to_the_parameters_of_the_arrays():
    costs, counted = arrays_costs(ARRAYS, top_k=2), model_costs(SPEC)
    assert (costs.num_experts, costs.shared_params, costs.expert_params) == (
        counted.num_experts,
        counted.shared_params,
        counted.expert_params,
    )


def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(TypeError, match="unknown keyword argument.*'momentum'"):
        FedMoE(momentum=0.5)  # a client's knob, not the strategy's
    with pytest.raises(ConfigError, match="'fraction-train' = 2.0 is invalid"):
        FedMoE(fraction_train=2.0)
    with pytest.raises(ValueError, match="num_experts = 8 does not match the 4 experts"):
        FedMoE(num_experts=8, initial_arrays=ARRAYS)
    with pytest.raises(ConfigError, match="'experts-per-client' = 4 is invalid"):  # default 4 > 2 experts
        FedMoE(initial_arrays=model_to_arrays(build_model(make_spec(num_experts=2, top_k=1), seed=0)))
    with pytest.raises(ValueError, match=r"train_config key\(s\) \['lr'\] are set by FedMoE"):
        FedMoE(**KNOBS).start(
            RecordingGrid(2, num_experts=4, top_k=2), initial_arrays=ARRAYS, train_config={"lr": 0.1}
        )
    with pytest.raises(ValueError, match="needs initial_arrays"):
        FedMoE(**KNOBS).start(RecordingGrid(2, num_experts=4, top_k=2))
