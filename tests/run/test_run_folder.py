"""Run folders: plain names, no silent reuse, strict resume (config and checkpoint must match)."""

import dataclasses

import numpy as np
import pytest

from fedmoe_app.config import RunConfig
from fedmoe_app.run.checkpoint import checkpoint_path, save_checkpoint
from fedmoe_app.run.folder import RunFolderError, check_run_folder, config_changes, output_dir


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", ".", "x\\\\y"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(RunFolderError, match="'run-name'"):
        output_dir(RunConfig(run_name=name, output_dir="/tmp/o"))


def test_plain_run_name_and_relative_output_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMOE_OUTPUT_ROOT", str(tmp_path))
    assert output_dir(RunConfig(run_name="r1")) == tmp_path / "outputs" / "r1"


def finished_round(out, cfg):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text("[]")
    save_checkpoint(
        checkpoint_path(out), {"w": np.zeros(2, np.float32)}, {"round": 1, "config": cfg.to_dict()}
    )


def test_a_folder_with_a_finished_round_is_not_reused_without_resume(tmp_path):
    cfg = RunConfig(run_name="r")
    out = tmp_path / "r"
    assert check_run_folder(out, cfg) is None  # new folder
    (out).mkdir()
    (out / "metrics.json").write_text('[{"round": 0}]')
    assert check_run_folder(out, cfg) is None  # never finished a round: may be reused
    finished_round(out, cfg)
    with pytest.raises(RunFolderError, match="already holds a run"):
        check_run_folder(out, cfg)
    arrays, state = check_run_folder(out, dataclasses.replace(cfg, resume=True))
    assert state["round"] == 1 and set(arrays) == {"w"}


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(RunFolderError, match="'resume' = True .* nothing to resume"):
        check_run_folder(tmp_path / "none", RunConfig(resume=True))


def test_resume_refuses_a_changed_config_naming_the_keys():
    saved = RunConfig(num_server_rounds=2).to_dict()
    assert config_changes(saved, RunConfig(num_server_rounds=9, resume=True)) == {}  # may change
    changed = config_changes(saved, RunConfig(expert_hidden=64, lr=0.1))
    assert changed == {"expert-hidden": (256, 64), "lr": (0.02, 0.1)}


def test_a_key_added_after_the_checkpoint_resumes_only_at_its_default():
    saved = RunConfig().to_dict()
    del saved["gate-balance-rate"]  # a checkpoint written before the key existed
    assert config_changes(saved, RunConfig(resume=True)) == {}
    assert config_changes(saved, RunConfig(gate_balance_rate=0.3)) == {"gate-balance-rate": (None, 0.3)}


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path):
    from fedmoe_app.models import REFERENCE_SPEC, build_model, model_to_arrays
    from fedmoe_app.run.folder import Resumed, resumed_arrays

    model = model_to_arrays(build_model(REFERENCE_SPEC))
    other = model_to_arrays(build_model(dataclasses.replace(REFERENCE_SPEC, expert_hidden=64)))
    assert resumed_arrays(Resumed(model, {}, 3, []), model, tmp_path).keys() == model.keys()
    with pytest.raises(
        RunFolderError, match=r"checkpoint .*does not match this model's tensors \(e\.g\. \['experts\.0\.b1'"
    ):
        resumed_arrays(Resumed(other, {}, 3, []), model, tmp_path)
