"""A user's own model (``model = "package.module:factory"``): the factory contract, its errors, its record.

The example (examples/own_model) passes the contract suite (tests/models/test_contract.py); here: how the
factory is called, what stops a run at start, the spec's record and export, and a short federated run.
"""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, OWN_MODEL, ROOT
from fake_federation import ClientGrid
from mlp_moe import MLPMoE
from torch import nn

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data import DatasetInfo
from fedmoe_app.models import build_model, load_exported, model_spec, model_to_arrays
from fedmoe_app.models.export import save_native_model, spec_document, spec_from_document
from fedmoe_app.models.measured_costs import counted_params, flops_per_example
from fedmoe_app.models.user_model import UserSpec
from fedmoe_app.run.server import run_server
from fedmoe_app.tools.launch import run_config_problem

INFO = DatasetInfo(1, 12, 10)
CALLS = []


def spec_of(model, **keys):
    return model_spec(RunConfig.from_run_config({"model": model, "dataset": "synthetic", **keys}), INFO)


def recording(**kwargs):
    """A factory taking every argument: records them, builds the example's model."""
    CALLS.append(kwargs)
    return MLPMoE(kwargs["num_experts"], kwargs["expert_ids"], kwargs["data_info"])


class Hinted(MLPMoE):
    """The example's model with its routes and FLOPs given, not measured."""

    routes_per_example = 3
    flops_per_example = (100.0, 60.0)


def hinted(num_experts, expert_ids, data_info):
    return Hinted(num_experts, expert_ids, data_info)


def returns_a_linear(num_experts):
    return nn.Linear(4, num_experts)


def raises(num_experts):
    raise RuntimeError("out of widgets")


class NoHold(MLPMoE):
    def __init__(self, *args):
        nn.Module.__init__(self)


def forgets_hold(num_experts, expert_ids, data_info):
    return NoHold()


def holds_everything(num_experts, data_info):  # ignores expert_ids
    return MLPMoE(num_experts, None, data_info)


class TensorOut(MLPMoE):
    def forward(self, x, y=None):
        return super().forward(x, y).logits


def returns_logits(num_experts, expert_ids, data_info):
    return TensorOut(num_experts, expert_ids, data_info)


NOT_A_FUNCTION = 3


def test_the_factory_gets_the_arguments_it_names_seeded_and_the_app_sets_the_spec():
    CALLS.clear()
    spec = spec_of(f"{__name__}:recording", **{"num-experts": 6, "top-k": 3, "seed": 4})
    assert isinstance(spec, UserSpec) and (spec.num_experts, spec.top_k, spec.routes_per_example) == (6, 3, 1)
    a, b, c = (build_model(spec, [1, 4], seed=s) for s in (7, 7, 8))
    assert set(CALLS[-1]) == {"num_experts", "top_k", "expert_ids", "seed", "data_info"}
    assert CALLS[-1]["seed"] == 8 and CALLS[-1]["expert_ids"] == [1, 4] and CALLS[-1]["top_k"] == 3
    info = CALLS[-1]["data_info"]
    assert (info.in_channels, info.image_size, info.num_classes) == (1, 12, 10)
    assert a.spec is spec and a.layer_ids == [[1, 4]] and a.top_k == 2
    wa, wb, wc = (model_to_arrays(m) for m in (a, b, c))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa) and not np.array_equal(
        wa["gate.weight"], wc["gate.weight"]
    )
    # the example's factory names three arguments only: it is called with those
    assert build_model(spec_of(OWN_MODEL), [2], seed=0).layer_ids == [[2]]


def test_routes_and_flops_the_model_gives_are_used_else_measured():
    spec = spec_of(f"{__name__}:hinted")
    assert spec.routes_per_example == 3
    assert flops_per_example(spec, build_model(spec, [0]), 1) == (100.0, 60.0)
    spec = spec_of(OWN_MODEL, **{"top-k": 1})  # one expert a route: 2 FLOPs per expert weight, x 3 to train
    one = build_model(spec, [0])
    shared, expert = counted_params(one)
    assert flops_per_example(spec, one, expert)[1] == 3 * 2 * expert


@pytest.mark.parametrize(
    ("factory", "why"),
    [
        ("no_such_module_here:build", "module 'no_such_module_here' is not importable"),
        (
            "mlp_moe:make",
            "module 'mlp_moe' has no attribute 'make'; "
            "allowed: a callable of 'mlp_moe': MLPExperts, MLPMoE, build$",
        ),
        (f"{__name__}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not callable"),
        (f"{__name__}:returns_a_linear", "the factory returned a Linear, not a fedmoe_app.models.MoEModel"),
        (f"{__name__}:raises", "the factory raised RuntimeError: out of widgets"),
        (f"{__name__}:forgets_hold", r"the model did not call self._hold"),
        (
            f"{__name__}:holds_everything",
            r"the model holds experts \[\[0, 1, 2, 3, 4, 5, 6, 7\]\], asked for \[\[0\]\]",
        ),
        (f"{__name__}:returns_logits", "the model.s forward returned a Tensor, not an MoEOutput"),
    ],
)
def test_a_bad_model_stops_the_run_at_start_naming_the_key_the_value_and_what_is_allowed(factory, why):
    with pytest.raises(ConfigError, match=rf"run-config key 'model' = '{factory}' is invalid: {why}") as err:
        spec_of(factory)
    assert "; allowed: " in str(err.value)


def test_a_module_that_fails_while_imported_is_named_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "needs_more.py").write_text("import no_such_dependency_here\n")
    (tmp_path / "typo_moe.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, why in (
        ("needs_more", "ModuleNotFoundError: No module named 'no_such_dependency_here'"),
        ("typo_moe", "SyntaxError"),
    ):
        with pytest.raises(
            ConfigError, match=f"'{module}:build' is invalid: importing module '{module}' raised {why}"
        ):
            spec_of(f"{module}:build")


def test_the_config_and_the_launcher_refuse_a_bad_model_before_any_node_starts():
    for bad in ("mlp_moe", "mlp-moe:build", "mlp_moe:", "/tmp/mlp_moe.py:build"):
        with pytest.raises(
            ConfigError, match=rf"'model' = '{bad}' is invalid; allowed: .*'package.module:factory'"
        ):
            RunConfig.from_run_config({"model": bad})
    assert (
        RunConfig.from_run_config({"model": OWN_MODEL, "dataset": "fortunes"}).model == OWN_MODEL
    )  # any data
    assert "module 'nowhere' is not importable" in run_config_problem(ROOT, "model='nowhere:build'")
    assert "has no attribute 'make'" in run_config_problem(ROOT, "model='mlp_moe:make'")
    assert run_config_problem(ROOT, f"model='{OWN_MODEL}' dataset='synthetic'") is None


def test_the_spec_is_recorded_as_json_and_the_export_loads_back(tmp_path):
    spec = spec_of(OWN_MODEL)
    doc = json.loads(json.dumps(spec_document(spec)))
    assert doc["model"] == OWN_MODEL and spec_from_document(doc) == spec
    with pytest.raises(ValueError, match="expected"):
        spec_from_document({"model": OWN_MODEL, "spec": {"factory": OWN_MODEL}})
    arrays = model_to_arrays(build_model(spec, seed=3))
    save_native_model(spec, arrays, tmp_path)
    loaded = load_exported(tmp_path)
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(loaded(x).logits, build_model(spec, seed=3).eval()(x).logits)


@pytest.mark.usefixtures("serverapp_identity")
def test_a_short_federated_run_of_the_example_learns_and_exports_it(tmp_path):
    keys = {
        **FAST,
        "model": OWN_MODEL,
        "num-server-rounds": 3,
        "capacity": "fixed",
        "experts-per-client": 2,
        "max-samples-per-client": 256,
        "lr": 0.1,
        "device": "cpu",
        "output-dir": str(tmp_path),
        "run-name": "own",
        "central-eval-samples": 256,
    }
    out = run_server(ClientGrid(keys, 2), keys)
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["valid_replies"] == 2 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2, [r["accuracy"] for r in rows]
    assert json.loads((out / "model_spec.json").read_text())["model"] == OWN_MODEL
    assert isinstance(load_exported(out / "export"), MLPMoE)
