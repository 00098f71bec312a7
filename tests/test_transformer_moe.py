"""The transformer MoE through the model interface: names, slicing, aggregation, masking, feedback, bytes."""

import math

import numpy as np
import pytest
import torch
from conftest import text_run, train_args

from fedmoe_app.client.handlers import result_feedback
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import TextInfo, TextSplit
from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import (
    TransformerSpec,
    build_model,
    expected_keys,
    load_arrays,
    model_costs,
    model_spec,
    model_to_arrays,
)
from fedmoe_app.tensors import experts_in, is_gate_key, parse_expert_key, raw_nbytes, select
from fedmoe_app.training import evaluate, evaluate_text, train
from fedmoe_app.wire.holdings import holding_from_lists
from fedmoe_app.wire.protocol import Sent, parse_train_reply, train_reply_content
from fedmoe_app.wire.records import to_record, wire_nbytes

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


def text_split(n=48, t=16, seed=0):
    """Windows of a repetitive byte text (learnable), two groups."""
    text = np.frombuffer((b"the quick brown fox jumps over the lazy dog. " * 200), np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(text) - t - 1, n)
    tokens = np.stack([text[s : s + t + 1] for s in starts])
    return TextSplit(torch.from_numpy(tokens), torch.from_numpy(np.arange(n) % 2))


def test_every_layer_experts_travel_as_one_expert():
    arrays = model_to_arrays(build_model(SPEC, seed=0))
    assert experts_in(arrays) == list(range(8))
    one = sorted(k for k in arrays if (p := parse_expert_key(k)) and p[0] == 3)
    assert one == [f"experts.3.blocks.{layer}.moe.{w}" for layer in range(3) for w in ("w1", "w2", "w3")]
    assert arrays["experts.3.blocks.2.moe.w2"].shape == (48, 32)
    gates = [k for k in arrays if is_gate_key(k)]
    assert gates == [f"blocks.{layer}.moe.gate.weight" for layer in range(3)]
    assert all(arrays[k].shape == (8, 32) for k in gates)


def test_round_trip_and_sub_model_slicing():
    full = model_to_arrays(build_model(SPEC, seed=4))
    sub = build_model(SPEC, HELD, seed=99)
    view = select(full, HELD)
    assert set(view) == set(expected_keys(sub))
    load_arrays(sub, view)
    back = model_to_arrays(sub)
    assert set(back) == set(view) and all(np.array_equal(back[k], view[k]) for k in view)
    # the sub-model stacks the held experts by slot: slot 1 is expert 5
    assert torch.equal(sub.blocks[1].moe.experts.w1[1], torch.from_numpy(full["experts.5.blocks.1.moe.w1"]))
    with pytest.raises(KeyError):
        load_arrays(sub, select(full, [1]))
    other = build_model(SPEC, seed=5)
    load_arrays(other, full)
    assert all(np.array_equal(model_to_arrays(other)[k], v) for k, v in full.items())


def test_absent_experts_get_no_token_and_no_gradient_in_every_layer():
    model = build_model(SPEC, HELD, seed=1)
    data = text_split(8)
    x, y = data.tokens[:, :-1], data.tokens[:, 1:]
    out = model(x, y)
    absent = [e for e in range(8) if e not in HELD]
    assert out.tokens[absent].sum() == 0 and out.tokens[HELD].sum() == 8 * 16 * 2 * 3
    (model.task_loss(out.logits, y) + 0.1 * out.aux_loss).backward()
    for block in model.blocks:
        grad = block.moe.gate.weight.grad
        assert grad[absent].abs().max() == 0, "an absent expert's router row moved"
        assert grad[HELD].abs().min(dim=1).values.gt(0).all()
        assert block.moe.experts.w1.grad.abs().sum(dim=(1, 2)).gt(0).all()  # both held experts learn
    # the unmasked router still reports its choices over all experts
    assert out.gate_hist.sum() == 8 * 16 * 2 * 3 and out.gate_hist[absent].sum() > 0


def test_feedback_shapes_and_sums():
    model = build_model(SPEC, seed=2)
    data = text_split(6)
    out = model(data.tokens[:, :-1], data.tokens[:, 1:])
    assert out.logits.shape == (6, 16, 256)
    for vec in (out.tokens, out.expert_loss_sum, out.gate_hist):
        assert vec.shape == (8,) and not vec.requires_grad
    assert out.tokens.sum() == 6 * 16 * 2 * 3  # tokens x top-k x layers
    mean_loss = out.expert_loss_sum[out.tokens > 0] / out.tokens[out.tokens > 0]
    assert (mean_loss > 0).all() and (mean_loss < 2 * math.log(256)).all()
    assert (out.expert_loss_sum[out.tokens == 0] == 0).all()
    assert 0 < out.aux_loss < 8
    with pytest.raises(ValueError, match="context-length"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_local_training_lowers_the_loss_and_its_reply_is_accepted():
    model = build_model(SPEC, HELD, seed=3)
    data = text_split(48)
    before, _ = evaluate(model, data)
    res = train(model, data, **train_args(epochs=3, batch_size=16, lr=0.3))
    after, acc = evaluate(model, data)
    assert after < before - 0.5 and 0 < acc <= 1
    assert res.tokens.sum() == 48 * 3 * 16 * 3 * 2  # examples x epochs x tokens x layers x top-k
    arrays = model_to_arrays(model)
    metrics = {"num-examples": res.num_examples, "train-loss": res.loss}
    feedback = result_feedback(res)
    held = holding_from_lists(HELD, SPEC.num_layers, 8)
    sent = Sent("c1", held, {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}, max_examples=48)
    content = train_reply_content(to_record(arrays), metrics, feedback, "c1")
    reply = parse_train_reply(
        content, 1, sent, top_k=2, local_epochs=3, routes_per_example=SPEC.routes_per_example
    )
    assert reply.update.tokens.sum() == res.tokens.sum()
    loss, _, per_group = evaluate_text(model, data, batch_size=7, device="cpu")
    assert loss == pytest.approx(after, rel=1e-9) and per_group.shape == (2,)


def test_aggregation_per_expert_and_gate_rows_in_every_layer():
    glob = model_to_arrays(build_model(SPEC, seed=0))
    rng = np.random.default_rng(0)

    def update(held, tokens):
        arrays = {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in select(glob, held).items()}
        tok = np.zeros(8)
        tok[held] = tokens
        return ClientUpdate(arrays, num_examples=10, tokens=tok, num_held=len(held))

    a, b = update([1, 5], [30.0, 10.0]), update([1, 2], [10.0, 30.0])
    out = aggregate(glob, [a, b], gate_from_all=False)
    key = "experts.1.blocks.2.moe.w3"
    np.testing.assert_allclose(out[key], (30 * a.arrays[key] + 10 * b.arrays[key]) / 40, rtol=1e-5)
    np.testing.assert_array_equal(out["experts.5.blocks.0.moe.w1"], a.arrays["experts.5.blocks.0.moe.w1"])
    np.testing.assert_array_equal(out["experts.7.blocks.1.moe.w2"], glob["experts.7.blocks.1.moe.w2"])
    for layer in range(3):
        gate = f"blocks.{layer}.moe.gate.weight"
        np.testing.assert_array_equal(out[gate][7], glob[gate][7])  # nobody held expert 7
        np.testing.assert_allclose(out[gate][5], a.arrays[gate][5], rtol=1e-6)
        np.testing.assert_allclose(
            out[gate][1], (30 * a.arrays[gate][1] + 10 * b.arrays[gate][1]) / 40, rtol=1e-5
        )
    norm = "blocks.0.attn_norm.weight"
    np.testing.assert_allclose(out[norm], (a.arrays[norm] + b.arrays[norm]) / 2, rtol=1e-5)


def test_download_of_two_experts_is_within_5_percent_of_raw_bytes():
    spec = TransformerSpec(256, 64, 2, 64, 4, num_experts=8, top_k=2, expert_hidden=256)
    glob = model_to_arrays(build_model(spec, seed=0))
    view = select(glob, [2, 6])
    assert wire_nbytes(to_record(view)) <= 1.05 * raw_nbytes(view)
    costs = model_costs(spec)
    shared = sum(v.size for k, v in glob.items() if parse_expert_key(k) is None)
    assert costs.shared_params == shared
    assert costs.expert_params == sum(v.size for k, v in glob.items() if k.startswith("experts.0."))
    assert raw_nbytes(view) == 4 * (costs.shared_params + 2 * costs.expert_params)


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
