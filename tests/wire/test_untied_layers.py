"""Untied MoE layers (``tie-layers = false``): per-layer sub-models, wire, feedback, aggregation."""

import numpy as np
import pytest
import torch
from conftest import text_run, train_args

from fedmoe_app.alignment import AlignmentState, LayeredAlignment, alignment_from_state_dict
from fedmoe_app.client.handlers import result_feedback
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import TransformerSpec, build_model, expected_keys, load_arrays, model_to_arrays
from fedmoe_app.tensors import layer_holdings, moe_layers
from fedmoe_app.training import train
from fedmoe_app.wire.holdings import held_from_config, holding_from_lists, payload
from fedmoe_app.wire.protocol import (
    FEEDBACK,
    ReplyRejected,
    Sent,
    parse_train_reply,
    train_reply_content,
)
from fedmoe_app.wire.records import to_record

SPEC = TransformerSpec(
    vocab_size=256, context_length=16, num_layers=2, d_model=32, num_heads=4, num_experts=6, top_k=2,
    expert_hidden=32,
)  # fmt: skip
PER_LAYER = [[0, 3], [1, 4]]  # layer 0 holds experts 0 and 3, layer 1 experts 1 and 4
ALIGN = RunConfig().alignment_kwargs()


def held_matrix(rows, num_experts):
    return holding_from_lists(rows, len(rows), num_experts)


def tokens(n=8, t=16, seed=0):
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 50, np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(text) - t - 1, n)
    return torch.from_numpy(np.stack([text[s : s + t + 1] for s in starts]).astype(np.int64))


def test_absent_expert_of_a_layer_gets_no_token_and_no_gradient():
    model = build_model(SPEC, PER_LAYER, seed=1)
    x = tokens()
    out = model(x[:, :-1], x[:, 1:])
    assert out.layer_tokens.shape == (2, 6) and out.layer_gate_hist.shape == (2, 6)
    held = torch.from_numpy(held_matrix(PER_LAYER, 6))
    assert out.layer_tokens[~held].sum() == 0 and (out.layer_tokens[held] > 0).all()
    assert (out.layer_tokens.sum(dim=1) == 8 * 16 * 2).all()  # every token, top-2, in each layer
    assert torch.equal(out.tokens, out.layer_tokens.sum(dim=0))
    assert (out.layer_loss_sum[~held] == 0).all() and (out.layer_loss_sum[held] > 0).all()
    (model.task_loss(out.logits, x[:, 1:]) + 0.1 * out.aux_loss).backward()
    for layer, block in enumerate(model.blocks):
        grad = block.moe.gate.weight.grad
        absent = [e for e in range(6) if e not in PER_LAYER[layer]]
        assert grad[absent].abs().max() == 0, f"an absent expert's router row moved in layer {layer}"
        assert grad[PER_LAYER[layer]].abs().sum(dim=1).gt(0).all()
        assert (
            block.moe.experts.w1.shape[0] == 2 and block.moe.experts.w1.grad.abs().sum(dim=(1, 2)).gt(0).all()
        )


def test_slicing_round_trip_and_message_names():
    full = model_to_arrays(build_model(SPEC, seed=4))
    layers = moe_layers(full)
    assert layers == ["blocks.0.moe", "blocks.1.moe"]
    held = held_matrix(PER_LAYER, 6)
    sub_arrays, conf = payload(full, held, layers)
    assert np.array_equal(layer_holdings(sub_arrays, layers, 6), held)
    assert conf["expert-ids"] == [0, 1, 3, 4]
    assert np.array_equal(held_from_config(conf, 6), held)
    sub = build_model(SPEC, held_from_config(conf, 6), seed=9)
    assert set(expected_keys(sub)) == set(sub_arrays)
    assert "experts.0.blocks.0.moe.w1" in sub_arrays and "experts.0.blocks.1.moe.w1" not in sub_arrays
    load_arrays(sub, sub_arrays)
    back = model_to_arrays(sub)
    assert set(back) == set(sub_arrays) and all(np.array_equal(back[k], sub_arrays[k]) for k in back)
    # the sub-model computes what the full model computes with the same experts routable per layer
    masked = build_model(SPEC, seed=0)
    load_arrays(masked, full)
    masked.layer_held.copy_(torch.from_numpy(held))
    x = tokens(2)[:, :-1]
    torch.testing.assert_close(sub(x).logits, masked(x).logits, rtol=1e-4, atol=1e-5)
    # tied layers: one holding with equal rows, the same expert tensors in every layer
    tied, tied_conf = payload(full, holding_from_lists([0, 3], 2, 6), layers)
    assert tied_conf["layer-experts"] == [1, 0, 0, 1, 0, 0] * 2 and "experts.0.blocks.1.moe.w1" in tied
    assert set(tied) == {k for k in full if not k.startswith("experts.") or k.split(".")[1] in ("0", "3")}
    for bad in ({"expert-ids": [0], "layer-experts": [1, 0, 0]}, {"expert-ids": [0]}):
        with pytest.raises(ValueError, match="layer-experts"):
            held_from_config(bad, 6)


def _update(glob, held, layer_tokens, shift):
    layers = moe_layers(glob)
    arrays = {k: v + shift for k, v in payload(glob, held, layers)[0].items()}
    return ClientUpdate(arrays, 10, layer_tokens.sum(axis=0), int(held.any(axis=0).sum()), layer_tokens, held)


def test_aggregation_per_layer_and_expert():
    glob = model_to_arrays(build_model(SPEC, seed=0))
    a_held = held_matrix([[0, 1], [1, 2]], 6)
    b_held = held_matrix([[0, 2], [0, 1]], 6)
    a_tok = np.where(a_held, 30.0, 0.0)
    b_tok = np.where(b_held, 10.0, 0.0)
    out = aggregate(
        glob,
        [_update(glob, a_held, a_tok, 1.0), _update(glob, b_held, b_tok, 2.0)],
        gate_from_all=False,
        per_layer=True,
    )
    w = "blocks.{}.moe.w1"
    delta = {
        (e, i): float((out[f"experts.{e}.{w.format(i)}"] - glob[f"experts.{e}.{w.format(i)}"]).mean())
        for e in range(3)
        for i in range(2)
    }
    assert delta[0, 0] == pytest.approx((30 * 1 + 10 * 2) / 40)  # both trained expert 0 in layer 0
    assert delta[1, 0] == pytest.approx(1.0)  # only a in layer 0
    assert delta[0, 1] == pytest.approx(2.0)  # only b in layer 1 (a held expert 0 in layer 0 only)
    assert delta[1, 1] == pytest.approx((30 * 1 + 10 * 2) / 40)
    assert np.array_equal(out[f"experts.3.{w.format(0)}"], glob[f"experts.3.{w.format(0)}"])  # nobody
    gate0 = out["blocks.0.moe.gate.weight"] - glob["blocks.0.moe.gate.weight"]
    assert gate0[1] == pytest.approx(np.ones_like(gate0[1]))  # row 1 of layer 0: a only
    assert gate0[2] == pytest.approx(2 * np.ones_like(gate0[2]))  # row 2 of layer 0: b only
    assert np.all(gate0[3] == 0)  # nobody routed to expert 3 in layer 0


def test_layered_alignment_plans_and_learns_each_layer():
    state = LayeredAlignment(6, 2, **ALIGN)
    ids = ["a", "b", "c"]
    plan = state.plan(ids, np.array([2, 2, 3]), "load_balanced", np.random.default_rng(0))
    assert plan.shape == (3, 2, 6) and (plan.sum(axis=2) == np.array([[2, 2], [2, 2], [3, 3]])).all()
    held = np.zeros((3, 2, 6), dtype=bool)
    held[:, 0, 0] = held[:, 1, 5] = True
    tok = np.where(held, 100.0, 0.0)
    state.update(ids, held, tok, np.where(held, 0.5, 0.0), np.full((3, 2, 6), 1.0))
    fit = state.fitness  # [L, C, E]
    assert fit[0, :, 0].min() > fit[0, :, 5].max() and fit[1, :, 5].min() > fit[1, :, 0].max()
    greedy = state.plan(ids, np.ones(3, dtype=int), "greedy", np.random.default_rng(0))
    assert greedy[:, 0, 0].all() and greedy[:, 1, 5].all()  # each layer its own best expert
    back = alignment_from_state_dict(state.state_dict())
    assert isinstance(back, LayeredAlignment) and np.array_equal(back.fitness, state.fitness)
    assert isinstance(alignment_from_state_dict(AlignmentState(6, **ALIGN).state_dict()), AlignmentState)
    with pytest.raises(ValueError, match="held must have shape"):
        state.update(ids, held[:, :1], tok, tok, tok)


@pytest.fixture(scope="module")
def reply():
    model = build_model(SPEC, PER_LAYER, seed=2)
    res = train(model, _text(), **train_args(epochs=1, batch_size=8, lr=0.1))
    arrays = model_to_arrays(model)
    metrics = {"num-examples": res.num_examples, "train-loss": res.loss}
    content = train_reply_content(to_record(arrays), metrics, result_feedback(res), "c1")
    held = held_matrix(PER_LAYER, 6)
    sent = Sent("c1", held, {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}, 16)
    return content, sent


def _text():
    from fedmoe_app.data.text import TextSplit

    return TextSplit(tokens(16), torch.zeros(16, dtype=torch.long))


def _parse(content, sent):
    return parse_train_reply(
        content, 1, sent, top_k=2, local_epochs=1, routes_per_example=SPEC.routes_per_example
    )


def test_per_layer_reply_is_accepted_and_bad_ones_rejected(reply):
    content, sent = reply
    ok = _parse(content, sent)
    assert ok.layer_tokens.shape == (2, 6) and np.array_equal(ok.held, sent.held)
    assert ok.layer_tokens[0, 1] == 0 and ok.layer_tokens[0, 0] > 0
    assert ok.expert_ids == [0, 1, 3, 4] and np.array_equal(ok.update.tokens, ok.layer_tokens.sum(axis=0))
    assert np.allclose(ok.layer_expert_loss * ok.layer_tokens, ok.layer_loss_sum)
    bad_cases = {
        "short": lambda fb: fb.__setitem__("layer-tokens", fb["layer-tokens"][:-1]),
        "negative": lambda fb: fb.__setitem__("layer-gate-hist", [-1.0] + fb["layer-gate-hist"][1:]),
        "not-held-in-layer": lambda fb: _move(fb, 0, 1),  # layer 0 reports expert 1 (held in layer 1 only)
        "too-many": lambda fb: fb.__setitem__("layer-tokens", [1e9 * v for v in fb["layer-tokens"]]),
        "loss-not-held": lambda fb: fb.__setitem__("layer-loss-sum", [1.0] * len(fb["layer-loss-sum"])),
        "old-totals-only": lambda fb: fb.pop("layer-loss-sum"),
    }
    for name, spoil in bad_cases.items():
        fb = {k: list(v) for k, v in content[FEEDBACK].items()}
        spoil(fb)
        from flwr.app import MetricRecord, RecordDict

        broken = RecordDict({**dict(content.items()), FEEDBACK: MetricRecord(fb)})
        with pytest.raises(ReplyRejected) as err:
            _parse(broken, sent)
        assert err.value.reason == "feedback", name


def _move(fb, layer, expert):
    tok = list(fb["layer-tokens"])
    tok[layer * 6 + expert] += 1.0
    tok[layer * 6 + 0] -= 1.0
    fb["layer-tokens"] = tok


def test_tie_layers_is_validated():
    with pytest.raises(ConfigError, match="'tie-layers'"):
        RunConfig.from_run_config({"tie-layers": "no"})
    with pytest.raises(ConfigError, match="'tie-layers'"):
        RunConfig.from_run_config({"tie-layers": False, "dp": "central"})
    assert RunConfig.from_run_config({"tie-layers": False}).tie_layers is False


@pytest.mark.slow
def test_flwr_run_with_untied_layers(run_app, tmp_path):
    rows, out = text_run(
        run_app,
        tmp_path / "corpus",
        {
            "en.txt": "The cat sat on the mat. ",
            "de.txt": "Der Hund sitzt im Gras. ",
            "es.txt": "El gato duerme. ",
        },
        {
            "model": "transformer-moe",
            "num-layers": 2,
            "d-model": 32,
            "expert-hidden": 64,
            "tie-layers": False,
            "num-server-rounds": 3,
            "fraction-evaluate": 1.0,
        },
        num_supernodes=3,
        run_name="untied-e2e",
    )
    assert rows[-1]["bpb"] < rows[0]["bpb"] - 1.0
    plans = [p for r in rows[1:] for p in r["layer_assignment"].values()]
    assert all(len(p) == 2 and len(p[0]) == len(p[1]) == 2 for p in plans)
    # each layer's load lies on the experts that layer was sent (the per-layer plans of a
    # 3-round run may coincide; tests above hold different sets per layer)
    for r in rows[1:]:
        load = np.array(r["expert_load_per_layer"])
        for layer in range(2):
            sent = {e for p in r["layer_assignment"].values() for e in p[layer]}
            assert set(np.flatnonzero(load[layer] > 0)) <= sent, (r["round"], layer)
    assert all(sum(r["rejected"].values()) == 0 for r in rows[1:])
    load = np.array(rows[-1]["expert_load_per_layer"])
    assert load.shape == (2, 8) and (load.sum(axis=1) > 0).all()
    assert (out / "expert_load_per_layer.png").stat().st_size > 0
