"""The transformer MoE's own checks: config, bf16, a run on text files.

What every model family must do is checked by tests/models/test_contract.py.
"""

import numpy as np
import pytest
import torch
from conftest import text_run, text_split, train_args

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import TransformerSpec, build_model, model_spec, model_to_arrays
from fedmoe_app.training import evaluate, train

SPEC = TransformerSpec(
    vocab_size=256, context_length=16, num_layers=3, d_model=32, num_heads=4, num_experts=8, top_k=2,
    expert_hidden=48,
)  # fmt: skip
HELD = [1, 5]
TEXTS = {
    "en.txt": "The cat sat on the mat. The dog sat on the log. ",
    "de.txt": "Der Hund sitzt auf dem Baum. Die Katze liegt im Gras. ",
    "ru.txt": "Кошка сидит на окне. Собака спит у двери. ",
}


def test_config_selects_and_validates_the_transformer():
    cfg = RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "transformer-moe", "num-layers": 3, "d-model": 48, "num-heads": 4}
    )
    spec = model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))
    assert isinstance(spec, TransformerSpec) and spec.num_layers == 3 and spec.d_model == 48
    bad = [
        ({"dataset": "fortunes", "model": "transformer-moe", "top-k": 9}, "'top-k'"),
        ({"dataset": "fortunes"}, "'model'"),
        ({"model": "transformer-moe"}, "'model'"),
        ({"dataset": "fortunes", "model": "transformer-moe", "d-model": 50, "num-heads": 4}, "'d-model'"),
        ({"dataset": "text", "model": "transformer-moe"}, "'data-dir'"),
        ({"partitioner": "natural"}, "'partitioner'"),
        (
            {"dataset": "fortunes", "model": "transformer-moe", "route-loss-weight": 0.1},
            "'route-loss-weight'",
        ),
    ]
    for run_config, key in bad:
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_run_config(run_config)


@pytest.mark.slow
def test_flwr_run_trains_the_transformer_on_text_files(run_app, tmp_path):
    rows, out = text_run(
        run_app,
        tmp_path / "corpus",
        TEXTS,
        {"model": "transformer-moe", "num-layers": 2, "d-model": 32, "expert-hidden": 64},
        num_supernodes=3,
        run_name="text-e2e",
    )
    assert rows[-1]["bpb"] < rows[0]["bpb"] - 1.0
    assert {"bpb_en.txt", "bpb_de.txt", "bpb_ru.txt"} <= set(rows[-1])
    assert np.array(rows[-1]["expert_load_per_layer"]).shape == (2, 8)
    assert (out / "expert_load_per_layer.png").stat().st_size > 0


def test_bf16_autocast_trains_on_cpu_and_keeps_fp32_weights():
    from fedmoe_app.training import autocast

    model = build_model(SPEC, HELD, seed=0)
    data = text_split(64)
    with autocast(torch.device("cpu"), "bf16"):  # the context really computes in bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    before, _ = evaluate(model, data, precision="bf16")
    res = train(model, data, **train_args(epochs=3, batch_size=16, lr=0.3, precision="bf16"))
    after, _ = evaluate(model, data, precision="bf16")
    assert np.isfinite(res.loss) and after < before - 0.3, (before, after)
    assert {v.dtype for v in model_to_arrays(model).values()} == {np.dtype(np.float32)}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="'precision'"):
        RunConfig.from_run_config({"precision": "fp16"})
