"""FedMoE.start honours initial_arrays and evaluate_fn like Flower's strategies."""

import numpy as np
import pytest
from conftest import make_spec
from fake_federation import FakeGrid
from flwr.app import MetricRecord
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import RunConfig
from fedmoe_app.models import build_model, model_to_arrays
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.wire.records import from_record, to_record

SPEC = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def strategy():
    cfg = RunConfig.from_run_config(
        {
            "capacity": "fixed",
            "experts-per-client": 2,
            "num-experts": 4,
            "fraction-train": 1.0,
            "fraction-evaluate": 0.0,
            "min-evaluate-nodes": 0,
        }
    )
    return FedMoE.from_run_config(cfg, SPEC, model_to_arrays(build_model(SPEC, seed=0)))


def test_initial_arrays_replace_the_model_and_evaluate_fn_is_called_each_round():
    s = strategy()
    initial = {k: np.full_like(v, 0.25) for k, v in s.initial_arrays.items()}
    seen, rows = [], []

    def evaluate_fn(rnd, record):
        arrays = from_record(record)
        seen.append((rnd, arrays))
        return MetricRecord({"mean-weight": float(np.mean(arrays["gate.weight"]))})

    grid = FakeGrid(3, num_experts=4, top_k=2, scale=0.0)  # clients send back what they got
    result = s.start(
        grid,
        initial_arrays=to_record(initial),
        num_rounds=2,
        evaluate_fn=evaluate_fn,
        on_round=lambda row, arrays: rows.append(row),
    )
    assert [r for r, _ in seen] == [0, 1, 2]
    assert all(np.array_equal(seen[0][1][k], initial[k]) for k in initial)  # round 0: the initial model
    for _, sent in grid.sent:  # and it is what clients were sent
        assert all(np.array_equal(v, initial[k]) for k, v in sent.items())
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert result.evaluate_metrics_serverapp[0]["mean-weight"] == pytest.approx(0.25)
    assert [r["mean-weight"] for r in rows] == pytest.approx([0.25, 0.25, 0.25])


def test_initial_arrays_of_another_shape_are_refused():
    s = strategy()
    bad = dict(s.initial_arrays)
    bad["gate.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="initial_arrays does not match .*gate.weight"):
        s.start(FakeGrid(2, num_experts=4, top_k=2), initial_arrays=to_record(bad), num_rounds=1)
