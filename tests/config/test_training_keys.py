"""The training and wire knobs of the run config: each bad value stops the run naming key, value, allowed."""

import pytest

from fedmoe_app.config import ConfigError, RunConfig


@pytest.mark.parametrize(
    ("keys", "named", "allowed"),
    [
        ({"optimizer": "adam"}, "'optimizer' = 'adam'", "'sgd', 'adamw'"),
        ({"weight-decay": -0.1}, "'weight-decay' = -0.1", ">= 0.0"),
        ({"adam-beta1": 1.0}, "'adam-beta1' = 1.0", ">= 0 and < 1"),
        ({"adam-beta2": -0.5}, "'adam-beta2' = -0.5", ">= 0 and < 1"),
        ({"lr-schedule": "linear"}, "'lr-schedule' = 'linear'", "'constant', 'cosine'"),
        ({"warmup-rounds": -1}, "'warmup-rounds' = -1", ">= 0"),
        ({"warmup-rounds": 5, "num-server-rounds": 5}, "'warmup-rounds' = 5", "fewer than num-server-rounds"),
        ({"lr-min": -1e-3}, "'lr-min' = -0.001", ">= 0.0"),
        ({"lr-min": 0.5, "lr": 0.1}, "'lr-min' = 0.5", "0..lr (0.1)"),
        ({"grad-accum-steps": 0}, "'grad-accum-steps' = 0", ">= 1"),
        ({"max-grad-norm": -1.0}, "'max-grad-norm' = -1.0", ">= 0.0"),
        ({"grad-checkpointing": True}, "'grad-checkpointing' = true", "model 'hf' only"),
        ({"grad-checkpointing": "yes"}, "'grad-checkpointing' = 'yes'", "type bool"),
        ({"wire-dtype": "fp16"}, "'wire-dtype' = 'fp16'", "'fp32', 'bf16'"),
        ({"optimizer": 1}, "'optimizer' = 1", "type str"),
    ],
)
def test_bad_training_keys_are_refused(keys, named, allowed):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(keys)
    assert named in str(err.value) and allowed in str(err.value)


def test_the_knobs_reach_the_client_and_the_server_sections():
    cfg = RunConfig.from_run_config(
        {
            "optimizer": "adamw",
            "weight-decay": 0.01,
            "adam-beta2": 0.95,
            "grad-accum-steps": 4,
            "max-grad-norm": 1.0,
            "lr-schedule": "cosine",
            "warmup-rounds": 2,
            "lr-min": 0.001,
            "wire-dtype": "bf16",
        }
    )
    t, r = cfg.train_kwargs(), cfg.round
    assert (t["optimizer"], t["weight_decay"], t["betas"]) == ("adamw", 0.01, (0.9, 0.95))
    assert (t["grad_accum_steps"], t["max_grad_norm"]) == (4, 1.0)
    assert (r.lr_schedule, r.warmup_rounds, r.lr_min, r.wire_dtype) == ("cosine", 2, 0.001, "bf16")
    default = RunConfig().train_kwargs()
    assert (default["optimizer"], default["grad_accum_steps"], default["max_grad_norm"]) == ("sgd", 1, 0.0)
