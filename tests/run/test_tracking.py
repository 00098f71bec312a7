"""Experiment tracking: a run's TensorBoard events and MLflow store hold the numbers of metrics.json."""

import json

import pytest
from conftest import IN_PROCESS_RUN, write_corpus
from fake_federation import FakeGrid

from fedmoe_app.config import ConfigError, RunConfig, TrackingSection
from fedmoe_app.run import tracking
from fedmoe_app.run.server import run_server

pytestmark = pytest.mark.usefixtures("serverapp_identity")

TINY_TEXT = {
    "dataset": "text",
    "model": "transformer-moe",
    "num-layers": 1,
    "d-model": 16,
    "context-length": 16,
    **IN_PROCESS_RUN,
    "num-server-rounds": 3,
}


def tiny_run(tmp_path, **keys):
    """Three rounds of a tiny transformer-moe run on a fake federation; the run folder and its rows."""
    corpus = tmp_path / "corpus"
    config = {
        **TINY_TEXT,
        "data-dir": str(corpus if corpus.exists() else write_corpus(corpus)),
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "tracked",
        **keys,
    }
    out = run_server(FakeGrid(2, num_experts=8, top_k=2, scale=0.5), config)
    return out, json.loads((out / "metrics.json").read_text())


def expected_numbers(rows):
    """Round -> the numbers a tracker must hold for it (metrics.json's finite numbers, flat maps)."""
    return {
        r["round"]: tracking.numeric_metrics({k: v for k, v in r.items() if k != "tracking_failures"})
        for r in rows
    }


def test_numeric_metrics_keeps_finite_numbers_and_flattens_mappings():
    row = {
        "round": 3,
        "accuracy": 0.5,
        "loss": float("nan"),
        "bytes_down": 10,
        "ok": True,
        "expert_load": [1.0, 2.0],
        "timing_s": {"clients": 1.5, "link": None},
        "note": "x",
    }
    assert tracking.numeric_metrics(row) == {"accuracy": 0.5, "bytes_down": 10.0, "timing_s/clients": 1.5}


def test_tensorboard_events_hold_every_number_of_metrics_json(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, rows = tiny_run(tmp_path, tracking="tensorboard")
    events = EventAccumulator(str(out / "tracking" / "tracked"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    want = expected_numbers(rows)
    tags = set(events.Tags()["scalars"])
    assert {"accuracy", "loss", "bytes_down", "timing_s/clients"} <= tags
    assert tags == {k for numbers in want.values() for k in numbers}
    for tag in tags:
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx({r: n[tag] for r, n in want.items() if tag in n}, rel=1e-6), tag
    assert sorted({e.step for e in events.Scalars("accuracy")}) == [0, 1, 2, 3]
    assert all(r["tracking_failures"] == 0 for r in rows)
    # the run config is there as hparams (the plugin's session-start summary) and as text
    config = json.loads((out / "config.json").read_text())
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == config["lr"] and hparams["model"].string_value == "transformer-moe"
    assert set(hparams) == set(config)
    text = events.Tensors("run-config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n"))["num-server-rounds"] == config["num-server-rounds"] == 3


@pytest.mark.slow
def test_mlflow_store_holds_every_number_and_the_run_config(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, rows = tiny_run(tmp_path, tracking="mlflow", **{"tracking-dir": str(tmp_path / "mlruns")})
    client = MlflowClient(tracking_uri=tracking.store_uri(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["lr"] == str(config["lr"]) and run.data.params["model"] == "transformer-moe"
    assert len(run.data.params) == len(config)
    want = expected_numbers(rows)
    keys = {k for numbers in want.values() for k in numbers}
    assert set(run.data.metrics) == keys
    for key in ("accuracy", "loss", "bytes_down", "bytes_up", "train_loss", "timing_s/clients"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({r: n[key] for r, n in want.items() if key in n}, rel=1e-12), key
    # a resumed run continues the same MLflow run
    out2, rows2 = tiny_run(
        tmp_path,
        tracking="mlflow",
        resume=True,
        **{"tracking-dir": str(tmp_path / "mlruns"), "num-server-rounds": 4},
    )
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and out2 == out
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")]
    assert sorted(steps) == [0, 1, 2, 3, 4] and rows2[-1]["round"] == 4


def test_a_failing_tracker_is_logged_and_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def broken(self, row):
        raise OSError("disk full")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_round", broken)
    out, rows = tiny_run(tmp_path, tracking="tensorboard")
    assert [r["tracking_failures"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["round"] == 3 and (out / "final_model.npz").exists()


def test_a_missing_tracker_package_is_a_start_up_error_naming_the_key_and_the_extra(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"'tracking' = 'mlflow'.*pip install 'fedmoe\[track\]'"):
        tiny_run(tmp_path, tracking="mlflow")
    assert not (tmp_path / "outputs" / "tracked" / "metrics.json").exists()
    assert tracking.tracking_problem(TrackingSection("none", "")) is None


def test_tracking_keys_are_validated_and_resolved(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'tracking' = 'wandb'.*'none', 'tensorboard', 'mlflow'"):
        RunConfig.from_run_config({"tracking": "wandb"})
    section = RunConfig.from_run_config({"tracking": "tensorboard"}).tracking_section
    assert tracking.tracking_dir(section, tmp_path / "run") == tmp_path / "run" / "tracking"
    monkeypatch.setenv("FEDMOE_OUTPUT_ROOT", str(tmp_path))
    section = RunConfig.from_run_config({"tracking-dir": "tb"}).tracking_section
    assert tracking.tracking_dir(section, tmp_path / "run") == tmp_path / "tb"
