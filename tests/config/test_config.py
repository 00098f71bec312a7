import tomllib
from pathlib import Path

import pytest

from fedmoe_app.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[2]


def pyproject_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_key_with_the_dataclass_default():
    cfg = pyproject_config()
    assert list(cfg) == RunConfig.keys()
    assert RunConfig.from_run_config(cfg) == RunConfig()


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("dataset", "mnist", "'fashion-mnist', 'cifar10', 'synthetic'"),
        ("partitioner", "shards", "'dirichlet', 'pathological', 'iid'"),
        ("policy", "best", "'load_balanced'"),
        ("top-k", 9, "num-experts (8)"),
        ("num-server-rounds", 0, ">= 1"),
        ("fraction-train", 0.0, "> 0.0"),
        ("lr", "fast", "type float"),
        ("num-experts", 2.5, "type int"),
        ("resume", 1, "type bool"),
        ("fault-drop-prob", 1.5, "<= 1.0"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    msg = str(err.value)
    assert f"'{key}'" in msg and repr(value) in msg and expected in msg


def test_unknown_key_is_reported():
    with pytest.raises(ConfigError, match="num-server-round"):
        RunConfig.from_run_config({"num-server-round": 3})


def test_ints_accepted_for_floats():
    assert RunConfig.from_run_config({"lr": 1}).lr == 1.0


def test_readme_table_is_the_config():
    """The README's table is generated from RunConfig: every key, default and allowed range."""
    readme = (ROOT / "README.md").read_text()
    assert RunConfig.markdown_table() in readme


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("device-mix", "phone=abc", "is not a number"),
        ("device-mix", "toaster=1", "unknown device class"),
        ("lr", float("nan"), "a finite number"),
        ("round-timeout-s", float("inf"), "a finite number"),
    ],
)
def test_values_that_would_fail_every_client_are_rejected_at_start(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert f"'{key}'" in str(err.value) and expected in str(err.value)


def test_gate_balance_is_applied_by_default_where_the_router_has_a_bias():
    """cnn-moe's and a user model's gate have a bias the server steps; transformer-moe's and hf's do not."""
    assert RunConfig().aggregation_rules.gate_balance_rate == 0.1
    own = RunConfig.from_run_config({"model": "my_pkg.my_model:build"})
    assert own.aggregation_rules.gate_balance_rate == 0.1
    for model in ("transformer-moe", "hf"):
        cfg = RunConfig.from_run_config({"dataset": "fortunes", "model": model})
        assert cfg.gate_balance_rate == 0.1 and cfg.aggregation_rules.gate_balance_rate == 0, model
    off = RunConfig.from_run_config({"gate-balance-rate": 0.0})
    assert off.aggregation_rules.gate_balance_rate == 0
