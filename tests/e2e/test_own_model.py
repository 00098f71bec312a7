"""End-to-end: a user's own model (examples/own_model) through `flwr run`, imported on every node."""

import pytest
from conftest import OWN_MODEL, ROOT, read_metrics

pytestmark = pytest.mark.slow


def test_flwr_run_trains_the_example_model_imported_on_every_node(run_app, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "examples" / "own_model"))  # as examples/own_model/README.md
    code, out, log = run_app(
        {"model": OWN_MODEL, "num-server-rounds": 3, "capacity": "fixed", "experts-per-client": 2},
        num_supernodes=3,
        run_name="own-model",
    )
    assert code == 0, log[-3000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[-1]["failures"] == 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2
    assert rows[-1]["bytes_down"] < rows[-1]["dense_bytes_down"]
    assert (out / "export" / "model.safetensors").is_file()
