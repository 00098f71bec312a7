"""The model contract: what every MoE model family (``FAMILIES``: ``cnn-moe``, ``transformer-moe``, each
``hf`` preset, the example of a user's own model in examples/own_model, all small) offers the app, through
the interface only. What one family alone does (configs, weights files, bf16, runs) is tested in
tests/models/test_cnn.py, test_transformer.py, test_hf*.py and test_user_model.py.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import OWN_MODEL, text_split, train_args

from fedmoe_app.client.handlers import result_feedback
from fedmoe_app.config import RunConfig
from fedmoe_app.data import DatasetInfo, make_synthetic, to_split
from fedmoe_app.data.text import TextInfo, TextSplit
from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import build_model, expected_keys, load_arrays, model_costs, model_to_arrays
from fedmoe_app.models.registry import model_spec
from fedmoe_app.tensors import experts_in, is_gate_key, parse_expert_key, raw_nbytes, select
from fedmoe_app.training import evaluate, evaluate_text, train
from fedmoe_app.wire.holdings import holding_from_lists
from fedmoe_app.wire.protocol import Sent, parse_train_reply, train_reply_content
from fedmoe_app.wire.records import to_record, wire_nbytes

E, K, D, H = 8, 2, 32, 48  # experts, top-k, model width and expert width of every family below
HELD = [1, 5, 6]  # a client's experts: top-2 of 3 is a real routing choice
ABSENT = [e for e in range(E) if e not in HELD]
BYTES = TextInfo(256, 16, ("en",))  # byte-level text, context 16


@dataclass(frozen=True)
class Family:
    """A small model of one family and what the contract expects of it."""

    spec: Any
    data: Callable[[int], Any]  # n learnable examples (a Split or a TextSplit)
    outputs: int  # the logits' last axis: classes or vocabulary
    layers: int  # MoE layers
    expert_3: dict[str, tuple[int, ...]]  # expert 3's tensors, every MoE layer: global name -> shape
    gates: dict[str, tuple[int, ...]]  # the routers' tensors in layer order: name -> shape
    expert_flops: float  # training FLOPs of the routed experts per example (3 x forward, 2 per MAC)
    lr: float  # learns within 3 epochs of ``examples`` at this rate
    examples: int = 48


def spec_of(run_config, info=BYTES):
    """The spec a run of ``run_config`` builds on a dataset ``info``."""
    sizes = {"num-experts": E, "top-k": K, "d-model": D, "feature-dim": D, "expert-hidden": H}
    return model_spec(RunConfig.from_run_config({**sizes, "context-length": 16, **run_config}), info)


def images(n):
    return to_split(*make_synthetic(0, n_train=n, n_test=0)["train"], "synthetic")


def cnn():
    spec = spec_of({"model": "cnn-moe", "dataset": "synthetic", "stem-channels": 8}, DatasetInfo(1, 12, 10))
    expert_3 = {"experts.3.w1": (D, H), "experts.3.b1": (H,), "experts.3.w2": (H, 10), "experts.3.b2": (10,)}
    flops = 3 * K * 2 * (D * H + H * 10)
    return Family(spec, images, 10, 1, expert_3, {"gate.weight": (E, D), "gate.bias": (E,)}, flops, 0.1, 192)


def own_model():
    """The example of a user's model (examples/own_model/mlp_moe.py): the CNN's experts and gate, no conv."""
    spec = spec_of({"model": OWN_MODEL, "dataset": "synthetic"}, DatasetInfo(1, 12, 10))
    cnn_family = cnn()
    return Family(
        spec, images, 10, 1, cnn_family.expert_3, cnn_family.gates, cnn_family.expert_flops, 0.1, 192
    )


def text_family(run_config, mlps, shapes, lr):
    """A byte-level LM: SwiGLU experts (``shapes``) and a router in each of the MoE layers ``mlps``."""
    spec = spec_of({"dataset": "fortunes", "num-layers": len(mlps), **run_config})
    expert_3 = {f"experts.3.{m}.{w}": shape for m in mlps for w, shape in shapes.items()}
    gates = {f"{m}.gate.weight": (E, D) for m in mlps}
    flops = 3 * 2 * 3 * D * H * 16 * len(mlps) * K  # 3 d h MACs per (token, expert), T L k of them
    return Family(spec, text_split, 256, len(mlps), expert_3, gates, flops, lr)


def transformer():
    blocks = [f"blocks.{i}.moe" for i in range(3)]
    swiglu = {"w1": (D, H), "w3": (D, H), "w2": (H, D)}
    return text_family({"model": "transformer-moe"}, blocks, swiglu, lr=0.3)


def hf(preset):
    def family():
        pytest.importorskip("transformers")
        mlps = [f"net.model.layers.{i}.mlp" for i in range(2)]
        fused = {"gate_up_proj": (2 * H, D), "down_proj": (D, H)}
        return text_family({"model": "hf", "hf-config": preset}, mlps, fused, lr=0.05)

    return family


FAMILIES = {
    "cnn-moe": cnn,
    "transformer-moe": transformer,
    **{f"hf-{p}": hf(p) for p in ("tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe")},
    "own-model": own_model,
}
SEQUENCE_FAMILIES = ["transformer-moe", *(f for f in FAMILIES if f.startswith("hf-"))]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]()


def batch(fam, n):
    """Inputs and targets of ``n`` examples."""
    data = fam.data(n)
    if isinstance(data, TextSplit):
        return data.tokens[:, :-1], data.tokens[:, 1:]
    return data.images, data.labels


def routes(fam, n, model=None):
    """(token, expert) routes of ``n`` examples in one MoE layer: examples x routes per layer x top-k."""
    k = K if model is None else model.top_k
    return n * fam.spec.routes_per_example // fam.layers * k


def test_each_expert_travels_as_one_unit_over_every_moe_layer(family):
    model = build_model(family.spec, seed=0)
    arrays = model_to_arrays(model)
    assert experts_in(arrays) == list(range(E)) and len(model.layer_ids) == family.layers
    assert [(k, v.shape) for k, v in arrays.items() if is_gate_key(k)] == list(family.gates.items())
    for e in range(E):
        mine = {k: v.shape for k, v in arrays.items() if (p := parse_expert_key(k)) and p[0] == e}
        assert mine == {k.replace("experts.3.", f"experts.{e}.", 1): v for k, v in family.expert_3.items()}
    stacked = model.expert_tensor_names()
    assert sorted(stacked.values()) == sorted(parse_expert_key(k)[1] for k in family.expert_3)
    state = model.state_dict()
    for name, suffix in stacked.items():  # slot e of the stacked tensor is expert e
        assert all(np.array_equal(arrays[f"experts.{e}.{suffix}"], state[name][e]) for e in range(E))
    assert set(expected_keys(model)) == set(arrays)


def test_arrays_round_trip_and_a_sub_model_takes_its_experts_slice(family):
    full = model_to_arrays(build_model(family.spec, seed=4))
    sub = build_model(family.spec, HELD, seed=99)
    view = select(full, HELD)
    assert set(view) == set(expected_keys(sub))
    assert all(sub.state_dict()[n].shape[0] == len(HELD) for n in sub.expert_tensor_names())
    load_arrays(sub, view)
    back = model_to_arrays(sub)
    assert set(back) == set(view) and all(np.array_equal(back[k], view[k]) for k in view)
    state = sub.state_dict()
    for name, suffix in sub.expert_tensor_names().items():  # slot s holds the s-th held expert
        for slot, e in enumerate(HELD):
            assert torch.equal(state[name][slot], torch.from_numpy(full[f"experts.{e}.{suffix}"]))
    for ids in (HELD[:2], [*HELD, 7]):  # an expert missing, an expert too many
        with pytest.raises(KeyError):
            load_arrays(sub, select(full, ids))
    wrong, gate = dict(view), next(iter(family.gates))
    wrong[gate] = np.zeros((E + 1, *view[gate].shape[1:]), np.float32)
    with pytest.raises(ValueError, match=gate.rpartition(".")[0]):
        load_arrays(sub, wrong)
    other = build_model(family.spec, seed=5)
    load_arrays(other, full)
    assert all(np.array_equal(model_to_arrays(other)[k], v) for k, v in full.items())


def test_a_sub_model_computes_what_the_full_model_computes_with_only_its_experts_routable(family):
    weights = model_to_arrays(build_model(family.spec, seed=2))
    sub = build_model(family.spec, HELD, seed=0)
    load_arrays(sub, select(weights, HELD))
    masked = build_model(family.spec, seed=0)
    load_arrays(masked, weights)
    for held in (masked.held, masked.layer_held):  # the buffers its MoE layers mask the routers with
        held[...] = False
        held[..., HELD] = True
    x, y = batch(family, 8)
    got, want = sub(x, y), masked(x, y)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.layer_tokens, want.layer_tokens)


def test_absent_experts_get_no_token_and_no_gradient_in_any_moe_layer(family):
    model = build_model(family.spec, HELD, seed=1)
    x, y = batch(family, 16)
    out = model(x, y)
    assert (out.layer_tokens[:, ABSENT] == 0).all() and (out.tokens[ABSENT] == 0).all()
    for counts in (out.layer_tokens[:, HELD], out.layer_gate_hist):  # the unmasked routers choose among all
        assert counts.sum(dim=1).tolist() == [routes(family, 16)] * family.layers
    assert out.gate_hist[ABSENT].sum() > 0
    (model.task_loss(out.logits, y) + 0.1 * out.aux_loss).backward()
    params = dict(model.named_parameters())
    for gate in family.gates:
        grad = params[gate].grad
        assert grad[ABSENT].abs().max() == 0, f"{gate}: an absent expert's router row moved"
        moved = grad[HELD] != 0  # every held row, from every input feature any held row sees
        assert moved.any() and (moved == moved.any(dim=0)).all(), gate
    for name, layer in model.expert_tensor_layers().items():  # a held expert learns where it served
        served = out.layer_tokens[layer, model.layer_ids[layer]] > 0
        assert served.sum() >= K
        assert torch.equal(params[name].grad.abs().reshape(len(HELD), -1).sum(dim=1) > 0, served), name


def test_a_single_held_expert_takes_every_route_and_held_ids_must_be_the_models(family):
    model = build_model(family.spec, [3], seed=0)
    assert model.top_k == 1
    out = model(*batch(family, 8))
    assert out.layer_tokens[:, 3].tolist() == [routes(family, 8, model)] * family.layers
    assert out.tokens.sum() == out.tokens[3]
    for bad in ([E], [], [-1], [[1]] * (family.layers + 1)):
        with pytest.raises(ValueError):
            build_model(family.spec, bad)


def test_feedback_shapes_and_sums(family):
    model = build_model(family.spec, seed=2)
    x, y = batch(family, 6)
    out = model(x, y)
    assert out.logits.shape == (*y.shape, family.outputs)
    for total, per_layer in zip(out[3:6], out[6:9]):  # tokens, loss sums, choices: totals and per layer
        assert total.shape == (E,) and per_layer.shape == (family.layers, E)
        assert not total.requires_grad and not per_layer.requires_grad
        torch.testing.assert_close(per_layer.sum(dim=0), total)
    for counts in (out.layer_tokens, out.layer_gate_hist):  # examples x routes x top-k in every layer
        assert counts.sum(dim=1).tolist() == [routes(family, 6)] * family.layers
    served = out.tokens > 0
    mean_loss = out.expert_loss_sum[served] / out.tokens[served]
    assert (mean_loss > 0).all() and (mean_loss < 2 * math.log(family.outputs)).all()
    assert (out.expert_loss_sum[~served] == 0).all()
    assert 0 < out.aux_loss.item() < E and out.route_loss.item() == 0
    unlabelled = model(x)  # without targets: the same routes, no loss signal
    assert torch.equal(unlabelled.layer_tokens, out.layer_tokens) and (unlabelled.expert_loss_sum == 0).all()


def test_local_training_lowers_the_loss_and_its_reply_is_accepted(family):
    model = build_model(family.spec, HELD[:2], seed=3)
    n = family.examples
    data = family.data(n)
    before, _ = evaluate(model, data)
    res = train(model, data, **train_args(epochs=3, batch_size=16, lr=family.lr))
    after, acc = evaluate(model, data)
    assert after < before - 0.5 and 0 < acc <= 1, (before, after)
    assert res.tokens.sum() == 3 * family.layers * routes(family, n)
    assert evaluate(model, data, batch_size=7)[0] == pytest.approx(after, rel=1e-6)
    arrays = model_to_arrays(model)
    held = holding_from_lists(HELD[:2], family.layers, E)
    sent = Sent("c1", held, {k: (v.shape, str(v.dtype)) for k, v in arrays.items()}, max_examples=n)
    metrics = {"num-examples": res.num_examples, "train-loss": res.loss}
    content = train_reply_content(to_record(arrays), metrics, result_feedback(res), "c1")
    reply = parse_train_reply(
        content, 1, sent, top_k=K, local_epochs=3, routes_per_example=family.spec.routes_per_example
    )
    np.testing.assert_array_equal(reply.update.tokens, res.tokens)  # totals derived from [L, E] feedback
    np.testing.assert_array_equal(reply.layer_tokens, res.layer_tokens)
    np.testing.assert_allclose(reply.expert_loss, res.expert_loss, rtol=1e-6)
    np.testing.assert_array_equal(reply.gate_hist, res.gate_hist)
    assert all(np.array_equal(reply.update.arrays[k], v) for k, v in arrays.items())


def test_aggregation_averages_each_expert_and_router_row_over_its_holders(family):
    glob = model_to_arrays(build_model(family.spec, seed=0))
    rng = np.random.default_rng(0)

    def update(held, tokens, examples):
        arrays = {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in select(glob, held).items()}
        tok = np.bincount(held, tokens, minlength=E)
        return ClientUpdate(arrays, num_examples=examples, tokens=tok, num_held=len(held))

    updates = [update([1, 5], [30.0, 10.0], 10), update([1, 2], [10.0, 30.0], 30)]
    out = aggregate(glob, updates, gate_from_all=False)
    assert set(out) == set(glob)

    def mean(key, weights, rows=...):
        return sum(w * u.arrays[key][rows] for u, w in zip(updates, weights) if w) / sum(weights)

    for key, old in glob.items():
        assert out[key].shape == old.shape and out[key].dtype == old.dtype
        parsed = parse_expert_key(key)
        if parsed is not None:  # over the clients holding the expert, by the tokens they routed to it
            w = [u.tokens[parsed[0]] for u in updates]
            np.testing.assert_allclose(out[key], mean(key, w) if sum(w) else old, rtol=1e-5, atol=1e-6)
        elif is_gate_key(key):  # row e over the holders of expert e, by their tokens; no holder: kept
            for e in range(E):
                w = [u.tokens[e] for u in updates]
                want = mean(key, w, e) if sum(w) else old[e]
                np.testing.assert_allclose(out[key][e], want, rtol=1e-5, atol=1e-6, err_msg=f"{key}[{e}]")
        else:  # every other tensor over every client, by its examples
            np.testing.assert_allclose(out[key], mean(key, [10, 30]), rtol=1e-5, atol=1e-6, err_msg=key)


def test_download_of_two_experts_is_within_5_percent_of_raw_bytes_and_costs_count_them(family):
    glob = model_to_arrays(build_model(family.spec, seed=0))
    view = select(glob, [2, 6])
    shared = {k: v for k, v in glob.items() if parse_expert_key(k) is None}
    expert_0 = {k: v for k, v in glob.items() if k.startswith("experts.0.")}
    assert wire_nbytes(to_record(view)) <= 1.05 * raw_nbytes(view)
    costs = model_costs(family.spec)
    assert (costs.num_experts, costs.top_k) == (E, K)
    assert costs.shared_params == sum(v.size for v in shared.values())
    assert costs.expert_params == sum(v.size for v in expert_0.values())
    assert raw_nbytes(view) == raw_nbytes(shared) + 2 * raw_nbytes(expert_0)
    assert raw_nbytes(view) == 4 * (costs.shared_params + 2 * costs.expert_params)
    assert costs.flops_experts == pytest.approx(family.expert_flops, rel=0.01)
    assert costs.flops_shared > 0 and costs.fixed_activation_values > 0 and costs.routed_activation_values > 0


@pytest.mark.parametrize("family", SEQUENCE_FAMILIES, indirect=True)  # the byte-level LMs
def test_a_sequence_model_refuses_a_longer_context_and_scores_each_group(family):
    model = build_model(family.spec, HELD, seed=0)
    with pytest.raises(ValueError, match="context-length"):
        model(torch.zeros(1, family.spec.context_length + 1, dtype=torch.long))
    data = family.data(12)  # windows of the context length, groups 0 and 1 alternating
    loss, acc, per_group = evaluate_text(model, data, batch_size=5, device="cpu")
    assert per_group.shape == (2,) and loss == pytest.approx(per_group.mean(), rel=1e-9)
    assert (loss, acc) == pytest.approx(evaluate(model, data), rel=1e-9)
