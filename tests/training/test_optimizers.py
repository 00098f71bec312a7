"""The local loop's optimizer knobs: AdamW, gradient accumulation, clipping, gradient checkpointing."""

import numpy as np
import pytest
import torch
from conftest import train_args

from fedmoe_app.data.text import TextInfo, TextSplit
from fedmoe_app.models import TransformerSpec, build_model, model_spec, model_to_arrays
from fedmoe_app.training import make_optimizer, train

SPEC = TransformerSpec(
    vocab_size=256, context_length=16, num_layers=2, d_model=32, num_heads=4, num_experts=4, top_k=2,
    expert_hidden=32,
)  # fmt: skip
HELD = [0, 2, 3]


def text(n=32, t=16, seed=0):
    raw = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 50, np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(raw) - t - 1, n)
    windows = torch.from_numpy(np.stack([raw[s : s + t + 1] for s in starts]).astype(np.int64))
    return TextSplit(windows, torch.zeros(n, dtype=torch.long))


def trained(data, **knobs):
    model = build_model(SPEC, HELD, seed=1)
    res = train(model, data, **train_args(**knobs))
    return model_to_arrays(model), res


def max_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_adamw_trains_a_tiny_model():
    data = text(64)
    before, _ = trained(data, epochs=1, batch_size=16, lr=1e-9, optimizer="adamw")
    model = build_model(SPEC, HELD, seed=1)
    first = train(model, data, **train_args(epochs=1, batch_size=16, lr=3e-3, optimizer="adamw"))
    last = train(model, data, **train_args(epochs=4, batch_size=16, lr=3e-3, optimizer="adamw", seed=1))
    assert last.loss < first.loss - 0.5, (first.loss, last.loss)
    assert max_diff(before, model_to_arrays(model)) > 1e-3


def test_make_optimizer_builds_adamw_with_the_knobs_and_refuses_others():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(p, "adamw", lr=0.1, momentum=0.9, weight_decay=0.01, betas=(0.8, 0.99))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (0.1, 0.01, (0.8, 0.99))
    assert isinstance(make_optimizer(p, "sgd", lr=0.1, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.9)),
                      torch.optim.SGD)  # fmt: skip
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        make_optimizer(p, "adam", lr=0.1, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.9))


@pytest.mark.parametrize("momentum", [0.9])
def test_accumulated_micro_batches_equal_one_step_on_the_big_batch(momentum):
    """4 micro-batches of 8 per step give the same weights as steps on batches of 32 (SGD)."""
    data = text(64)
    knobs = {"epochs": 2, "lr": 0.5, "momentum": momentum, "aux_weight": 0.0}
    big, res_big = trained(data, batch_size=32, **knobs)
    accumulated, res_acc = trained(data, batch_size=8, grad_accum_steps=4, **knobs)
    small, _ = trained(data, batch_size=8, **knobs)
    assert max_diff(big, accumulated) < 1e-6
    assert max_diff(big, small) > 1e-3  # without accumulation: four times the steps
    assert res_acc.loss == pytest.approx(res_big.loss, rel=1e-6)
    assert np.array_equal(res_acc.layer_tokens, res_big.layer_tokens)


def test_an_uneven_last_step_is_weighted_by_its_samples():
    """40 windows in steps of 32: the last step's 8 count as one batch of 8, and max-samples stops."""
    data = text(40)
    knobs = {"epochs": 1, "lr": 0.5, "momentum": 0.0, "aux_weight": 0.0}
    big, _ = trained(data, batch_size=32, **knobs)
    accumulated, _ = trained(data, batch_size=16, grad_accum_steps=2, **knobs)
    assert max_diff(big, accumulated) < 1e-6
    _, res = trained(data, batch_size=8, grad_accum_steps=2, max_samples=20, **knobs)
    assert (
        res.layer_tokens.sum() == 24 * 16 * 2 * 2
    )  # 3 micro-batches of 8 windows: 16 bytes, 2 layers, top-2


def test_clipping_bounds_the_step():
    data = text(32)
    knobs = {"epochs": 1, "batch_size": 32, "lr": 1.0, "momentum": 0.0, "aux_weight": 0.0}
    start = model_to_arrays(build_model(SPEC, HELD, seed=1))
    free, _ = trained(data, **knobs)
    clipped, _ = trained(data, max_grad_norm=0.01, **knobs)

    def step_norm(after):
        return float(np.sqrt(sum(((after[k] - start[k]) ** 2).sum() for k in start)))

    assert step_norm(free) > 0.1
    assert step_norm(clipped) == pytest.approx(0.01, rel=1e-3)  # one SGD step of lr x clipped gradient


def test_gradient_checkpointing_gives_the_same_training_on_hf():
    pytest.importorskip("transformers")
    from fedmoe_app.config import RunConfig

    cfg = RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": "tiny-mixtral", "num-layers": 2, "d-model": 32,
         "expert-hidden": 48, "context-length": 16, "grad-checkpointing": True}
    )  # fmt: skip
    spec = model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))
    data = text(16)
    out = []
    for checkpointing in (False, True):
        model = build_model(spec, [1, 5], seed=0)
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.net.is_activation_checkpointing
        res = train(model, data, **train_args(epochs=1, batch_size=8, lr=0.1))
        out.append((model_to_arrays(model), res))
    (plain, res_plain), (ckpt, res_ckpt) = out
    assert max_diff(plain, ckpt) < 1e-5
    assert np.array_equal(res_plain.layer_tokens, res_ckpt.layer_tokens)  # feedback counted once
