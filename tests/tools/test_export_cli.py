"""``fedmoe-export RUN_DIR [--out FOLDER]`` on a run folder."""

import json

import numpy as np
import pytest
import torch
from conftest import make_spec

from fedmoe_app.config import RunConfig
from fedmoe_app.models import build_model, load_arrays, load_exported, model_to_arrays
from fedmoe_app.run.checkpoint import checkpoint_path, save_checkpoint
from fedmoe_app.run.export import write_run_spec
from fedmoe_app.tools.export import main

SPEC = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)


def run_folder(path):
    model = build_model(SPEC, seed=0).eval()
    rng = np.random.default_rng(0)
    arrays = {
        k: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in model_to_arrays(model).items()
    }
    load_arrays(model, arrays)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(RunConfig(num_experts=4).to_dict()))
    (path / "metrics.json").write_text(
        json.dumps([{"round": 0, "accuracy": 0.1}, {"round": 3, "accuracy": 0.4}])
    )
    write_run_spec(path, SPEC)
    save_checkpoint(checkpoint_path(path), arrays, {"round": 3, "history": []})
    return model


def test_the_cli_exports_a_run_folder(tmp_path, capsys):
    model = run_folder(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "exported")
    summary = json.loads((tmp_path / "exported" / "fedmoe_export.json").read_text())
    assert summary["rounds"] == 3 and summary["metrics"] == {"accuracy": 0.4}
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_exported(tmp_path / "exported")(x).logits, model(x).logits, atol=1e-4)
    assert main([str(tmp_path / "run")]) == 0  # default: RUN_DIR/export
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_the_cli_names_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "config.json is missing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "holds no model" in capsys.readouterr().err
