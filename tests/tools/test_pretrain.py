"""fedmoe-pretrain: central pretraining on the public share, and a run starting from it (init-weights)."""

import json
import logging
import re

import numpy as np
import pytest
from conftest import IN_PROCESS_RUN
from fake_federation import FakeGrid

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.source import server_split
from fedmoe_app.models import model_spec
from fedmoe_app.run.init_weights import read_init_weights, write_init_weights
from fedmoe_app.run.server import initial_arrays, run_server
from fedmoe_app.tools import pretrain

pytestmark = pytest.mark.usefixtures("serverapp_identity")

#: A small cnn-moe on synthetic data with a public tenth; the tool and the runs share these keys.
KEYS = {
    "dataset": "synthetic",
    "model": "cnn-moe",
    "num-experts": 4,
    "top-k": 2,
    "stem-channels": 4,
    "feature-dim": 16,
    "expert-hidden": 16,
    "optimizer": "adamw",
    "public-fraction": 0.1,
    "central-eval-samples": 200,
}


def sets(keys):
    return [item for k, v in keys.items() for item in ("--set", f"{k}={v}")]


def run_config(tmp_path, **changes):
    config = {**IN_PROCESS_RUN, **KEYS, "partitioner": "dirichlet", "dirichlet-alpha": 0.5}
    return (
        config | {"output-dir": str(tmp_path / "outputs"), "run-name": "r", "num-server-rounds": 1} | changes
    )


def small_arrays(**changes):
    cfg = RunConfig.from_run_config({**KEYS, **changes})
    return initial_arrays(model_spec(cfg, server_split(cfg)[1]), cfg.seed)


@pytest.mark.slow
def test_a_run_from_the_pretrained_file_starts_at_the_reported_accuracy(tmp_path):
    out = tmp_path / "pre" / "synthetic.safetensors"
    argv = [*sets(KEYS), "--epochs", "2", "--lr", "0.02", "--batch-size", "16", "--out", str(out)]
    assert pretrain.main(argv) == 0
    done = json.loads(out.with_suffix(".json").read_text())
    assert done["public_examples"] == 240 and done["test_examples"] == 200
    assert [e["epoch"] for e in done["epochs"]] == [1, 2]
    assert done["epochs"][-1]["test_accuracy"] == done["test_accuracy"] > 0.25  # chance: 0.1
    share = np.array(done["expert_class_share"])  # [layer][expert][class]
    assert share.shape == (1, 4, 10)
    routes = np.array(done["expert_routes"])
    assert routes.sum() == 200 * 2  # every test example routed to top-k = 2 experts
    np.testing.assert_allclose(share.sum(axis=2)[routes > 0], 1.0, atol=1e-3)
    figures = done["specialisation"]
    assert 0.1 <= figures["chance_max_class_share"] <= figures["mean_max_class_share"] <= 1.0
    assert 0.0 <= figures["class_expert_nmi"] <= 1.0

    # a run naming the file starts from it: round 0's central accuracy is the tool's
    config = run_config(tmp_path, **{"init-weights": str(out)})
    rows = json.loads(
        (run_server(FakeGrid(2, num_experts=4, top_k=2, scale=0.1), config) / "metrics.json").read_text()
    )
    assert rows[0]["round"] == 0 and rows[0]["accuracy"] == done["test_accuracy"]
    assert rows[0]["loss"] == done["test_loss"]
    # without it the seeded random model starts (near chance)
    seeded = run_config(tmp_path, **{"run-name": "seeded"})
    rows = json.loads(
        (run_server(FakeGrid(2, num_experts=4, top_k=2, scale=0.1), seeded) / "metrics.json").read_text()
    )
    assert rows[0]["accuracy"] != done["test_accuracy"]

    # a resumed run starts from its checkpoint, not from the file (which it no longer reads)
    out.unlink()
    again = run_server(
        FakeGrid(2, num_experts=4, top_k=2, scale=0.1), {**config, "resume": True, "num-server-rounds": 2}
    )
    assert [r["round"] for r in json.loads((again / "metrics.json").read_text())] == [0, 1, 2]


def test_pretraining_is_seeded_and_deterministic(tmp_path, caplog):
    keys = {**KEYS, "public-fraction": 0.05}
    files = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        argv = [*sets(keys), "--epochs", "1", "--batch-size", "32", "--out", str(out)]
        with caplog.at_level(logging.INFO, logger=pretrain.__name__):
            assert pretrain.main(argv) == 0
        files.append(read_init_weights(out, small_arrays()))
        assert "init-weights" in caplog.text and "NMI" in caplog.text
    assert list(files[0]) == list(small_arrays())  # the model's names, in its order
    assert all(np.array_equal(files[0][k], files[1][k]) for k in files[0])
    assert any(not np.array_equal(files[0][k], v) for k, v in small_arrays().items())  # it trained


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "dataset=synthetic"], r"'public-fraction' = 0\.0 is invalid for fedmoe-pretrain"),
        (
            ["--set", "dataset=synthetic", "--set", "public-fraction=0"],
            r"'public-fraction' = 0\.0 is invalid",
        ),
        (
            ["--set", "public-fraction=0.1", "--set", "init-weights=x.safetensors"],
            r"'init-weights' is not for",
        ),
        (["--set", "public-fraction=0.1", "--epochs", "0"], r"--epochs 0 is invalid"),
        (
            ["--set", "dataset=fortunes", "--set", "model=transformer-moe", "--set", "public-fraction=0.1"],
            r"'public-fraction' = 0\.1 is invalid for",
        ),
    ],
)
def test_the_tool_refuses_what_it_cannot_pretrain_on(tmp_path, caplog, argv, message):
    out = tmp_path / "m.safetensors"
    with caplog.at_level(logging.ERROR, logger=pretrain.__name__):
        assert pretrain.main([*argv, "--out", str(out)]) == 2
    assert caplog.records and re.search(message, caplog.text), caplog.text
    assert not out.exists()


def test_a_missing_file_stops_the_run_at_start_naming_the_key(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(
        ConfigError, match=r"'init-weights' = '.*nowhere\.safetensors' is invalid: no such file"
    ):
        run_server(
            FakeGrid(2, num_experts=4, top_k=2), run_config(tmp_path, **{"init-weights": str(missing)})
        )
    assert not (tmp_path / "outputs" / "r" / "metrics.json").exists()


def test_a_file_of_another_model_stops_the_run_at_start_naming_the_tensor(tmp_path):
    wrong = write_init_weights(tmp_path / "wide.safetensors", small_arrays(**{"expert-hidden": 24}), {})
    with pytest.raises(
        ConfigError,
        match=r"'init-weights' = .*tensor 'experts\.0\.w1' has shape \(16, 24\), the model's is \(16, 16\)",
    ):
        run_server(FakeGrid(2, num_experts=4, top_k=2), run_config(tmp_path, **{"init-weights": str(wrong)}))


def test_missing_extra_unreadable_and_non_finite_tensors_are_named(tmp_path):
    model = small_arrays()
    fewer = {k: v for k, v in model.items() if k != "gate.bias"}
    path = write_init_weights(tmp_path / "fewer.safetensors", fewer, {})
    with pytest.raises(ConfigError, match=r"lacks tensor 'gate\.bias' of shape \(4,\) \(1 of the model's"):
        read_init_weights(path, model)
    path = write_init_weights(
        tmp_path / "more.safetensors", {**model, "extra.w": np.zeros(2, np.float32)}, {}
    )
    with pytest.raises(ConfigError, match=r"holds tensor 'extra\.w', which the model does not have"):
        read_init_weights(path, model)
    bad = {**model, "gate.bias": np.full(4, np.nan, np.float32)}
    with pytest.raises(ConfigError, match=r"tensor 'gate\.bias' holds NaN or inf"):
        read_init_weights(write_init_weights(tmp_path / "nan.safetensors", bad, {}), model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(
        ConfigError, match=r"'init-weights' = '.*junk\.safetensors' is invalid: it cannot be read"
    ):
        read_init_weights(tmp_path / "junk.safetensors", model)
    back = read_init_weights(write_init_weights(tmp_path / "ok.safetensors", model, {"note": "x"}), model)
    assert list(back) == list(model) and all(np.array_equal(back[k], model[k]) for k in model)


def test_a_runs_export_folder_starts_another_run(tmp_path):
    from fedmoe_app.models.export import save_native_model

    cfg = RunConfig.from_run_config({**KEYS, "seed": 7})
    spec = model_spec(cfg, server_split(cfg)[1])
    exported = initial_arrays(spec, 7)  # another seed's model, saved as a finished run exports it
    save_native_model(spec, exported, tmp_path / "export")
    model = small_arrays()
    assert not all(np.array_equal(exported[k], model[k]) for k in model)
    back = read_init_weights(tmp_path / "export", model)
    assert list(back) == list(model) and all(np.array_equal(back[k], exported[k]) for k in model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match=r"a folder without fedmoe_model\.json \(not a run's export folder\)"
    ):
        read_init_weights(tmp_path / "empty", model)
    wide = RunConfig.from_run_config({**KEYS, "expert-hidden": 24})
    wide_spec = model_spec(wide, server_split(wide)[1])
    save_native_model(wide_spec, initial_arrays(wide_spec, 0), tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"tensor 'experts\.0\.w1' has shape \(16, 24\)"):
        read_init_weights(tmp_path / "wide", model)


def test_init_weights_is_refused_for_hf_at_start():
    with pytest.raises(
        ConfigError, match=r"'init-weights' = 'm\.safetensors' is invalid for model 'hf'; allowed: ''"
    ):
        RunConfig.from_run_config({"dataset": "fortunes", "model": "hf", "init-weights": "m.safetensors"})
