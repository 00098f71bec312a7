"""The routing report of a run folder: shares, single-expert accuracies, routed vs best, oracle."""

import json

import numpy as np

from fedmoe_app.config import RunConfig
from fedmoe_app.data import server_test_data
from fedmoe_app.models import ModelSpec, build_model, model_to_arrays
from fedmoe_app.tools import routing


def test_report_of_a_run_folder(tmp_path, capsys):
    cfg = RunConfig.from_run_config({"dataset": "synthetic", "num-experts": 4})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    _, info = server_test_data("synthetic", max_samples=0, data_dir="", seed=0)
    np.savez(
        tmp_path / "final_model.npz", **model_to_arrays(build_model(ModelSpec.from_config(cfg, info), seed=3))
    )
    model, test, classes = routing.load_run(tmp_path)
    report = routing.routing_report(model, test, classes)
    assert report.share.shape == (10, 4) and report.expert_accuracy.shape == (4, 10)
    np.testing.assert_allclose(report.share.sum(axis=1), 1.0)  # top-k choices of every class
    assert np.all(report.routed_accuracy <= report.best_accuracy + 1e-12)
    assert 0.0 <= report.accuracy <= 1.0 and 0.0 <= report.oracle <= 1.0
    assert routing.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("global accuracy") and "class  routed  best" in out
