"""Routing share per text group and expert: counts, the specialisation figure, the CLI and heat map."""

import json

import numpy as np
import pytest

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import server_split
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.tools import routing
from fedmoe_app.tools.routing_text import group_routing, routing_share, specialisation

TINY = {
    "dataset": "text",
    "model": "transformer-moe",
    "context-length": 16,
    "num-layers": 2,
    "d-model": 32,
    "num-heads": 2,
    "expert-hidden": 32,
    "num-experts": 4,
    "top-k": 2,
    "central-eval-samples": 0,
}


@pytest.fixture
def text_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "latin.txt").write_text("\n\n".join(f"the quick brown fox {i} jumps" for i in range(300)))
    (data / "cyrillic.txt").write_text("\n\n".join(f"съешь же ещё этих {i} булок" for i in range(300)))
    cfg = RunConfig.from_run_config({**TINY, "data-dir": str(data)})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    test, info = server_split(cfg)
    model = build_model(model_spec(cfg, info), seed=1)
    np.savez(run / "final_model.npz", **model_to_arrays(model))
    return run, model, test, info


def test_specialisation_of_known_shares():
    assert specialisation(np.eye(4)) == pytest.approx(1.0)
    assert specialisation(np.full((3, 4), 0.25)) == pytest.approx(0.0)
    half = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])  # 1 bit of the 2 bits of experts
    assert specialisation(half) == pytest.approx(0.5)
    assert specialisation(np.zeros((2, 4))) == 0.0


def test_every_token_of_every_group_is_routed_k_times_per_layer(text_run):
    _, model, test, info = text_run
    counts = group_routing(model, test, len(info.groups), batch_size=7)
    assert counts.shape[0] == len(info.groups) == 2 and counts.shape[-1] == 4
    per_group = counts.sum(axis=(1, 2))
    windows = np.bincount(test.groups.numpy(), minlength=2)
    assert windows.min() > 0
    np.testing.assert_allclose(per_group, windows * 16 * 2 * 2)  # T tokens x top-k x layers
    share = routing_share(counts)
    np.testing.assert_allclose(share.sum(axis=1), 1.0)


def test_cli_prints_the_share_and_draws_the_heat_map(text_run, capsys):
    run, *_ = text_run
    png = run / "routing.png"
    assert routing.main([str(run), "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("routing share per group and expert (%), specialisation")
    assert "latin.txt" in out and "cyrillic.txt" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_mode_reports_every_policy_over_its_seeds(text_run, tmp_path, capsys):
    from fedmoe_app.tools import experiments as ex

    run, model, *_ = text_run
    cfg = json.loads((run / "config.json").read_text())
    overrides = {k: cfg[k] for k in (*TINY, "data-dir")} | {"partitioner": "natural"}
    grid = ex.build_grid(rounds=1, policies=["random", "dense"], seeds=[0, 1], clients=2, overrides=overrides)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps(grid.to_dict()))
    for spec in grid.runs():
        if spec.policy == "dense" and spec.seed == 1:
            continue  # an unfinished run is left out
        out = ex.run_dir(exp, spec)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(dict(spec.run_config)))
        (out / "final_model.npz").write_bytes((run / "final_model.npz").read_bytes())
    png = exp / "routing.png"
    assert routing.main(["--grid", str(exp), "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| random | 2 |" in out and "| dense | 1 |" in out
    assert "random, mean over 2 seed(s):" in out and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        routing.main(["--grid", str(tmp_path)])  # no experiment.json
