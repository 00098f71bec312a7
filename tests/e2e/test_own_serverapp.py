"""examples/own_serverapp: a user's own ServerApp and ClientApp with FedMoE, under `flwr run`."""

import re

import pytest
from conftest import ROOT

from fedmoe_app.tools.launch import launch

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "own_serverapp"


def test_the_example_trains_under_flwr_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's fedmoe_app, not an installed one
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        code = launch(EXAMPLE, num_supernodes=2, flwr_home=tmp_path / "flwr-home", timeout=420, stream_to=log)
    log = log_path.read_text()
    first = log.find("Traceback")
    assert code == 0, log[first : first + 4000] if first >= 0 else log[-3000:]  # a failed run is 1
    accuracy = {int(r): float(a) for r, a in re.findall(r"own_serverapp: round (\d+) accuracy ([\d.]+)", log)}
    replies = {int(r): int(n) for r, n in re.findall(r"own_serverapp: round (\d+) valid-replies (\d+)", log)}
    assert sorted(accuracy) == [0, 1, 2, 3] and replies == {1: 2, 2: 2, 3: 2}, log[-3000:]
    assert accuracy[3] > accuracy[0] + 0.1, accuracy  # it trained (10 classes: chance is 0.1)
