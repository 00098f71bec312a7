"""Hugging Face MoE models (model = "hf"): slicing, aggregation, masking, feedback, costs, bytes, errors."""

import json

import numpy as np
import pytest
import torch
from conftest import make_spec, text_run, train_args
from test_transformer_moe import text_split

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import (
    HFSpec,
    TransformerSpec,
    build_model,
    expected_keys,
    load_arrays,
    model_costs,
    model_spec,
    model_to_arrays,
)
from fedmoe_app.models.memory_probe import LiveBytes
from fedmoe_app.tensors import experts_in, is_gate_key, parse_expert_key, raw_nbytes, select
from fedmoe_app.training import evaluate, train
from fedmoe_app.wire.records import to_record, wire_nbytes

pytest.importorskip("transformers")

FAMILIES = ["tiny-mixtral", "tiny-qwen2-moe"]
HELD = [1, 5]
TINY = {"num-layers": 2, "d-model": 32, "expert-hidden": 48, "context-length": 16}


def hf_cfg(preset, **extra):
    return RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": preset, **TINY, **extra}
    )


def hf_spec(preset, **extra) -> HFSpec:
    cfg = hf_cfg(preset, **extra)
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


@pytest.fixture(params=FAMILIES)
def spec(request):
    return hf_spec(request.param)


def test_experts_of_every_layer_travel_as_one_expert_and_round_trip(spec):
    full = model_to_arrays(build_model(spec, seed=4))
    assert experts_in(full) == list(range(8))
    one = sorted(k for k in full if (p := parse_expert_key(k)) and p[0] == 3)
    assert one == [
        f"experts.3.net.model.layers.{i}.mlp.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")
    ]
    gates = [k for k in full if is_gate_key(k)]
    assert gates == [f"net.model.layers.{i}.mlp.gate.weight" for i in range(2)]
    sub = build_model(spec, HELD, seed=99)
    view = select(full, HELD)
    assert set(view) == set(expected_keys(sub))
    load_arrays(sub, view)
    back = model_to_arrays(sub)
    assert all(np.array_equal(back[k], view[k]) for k in view)
    experts = sub.net.model.layers[1].mlp.experts
    assert torch.equal(
        experts.gate_up_proj[1], torch.from_numpy(full["experts.5.net.model.layers.1.mlp.gate_up_proj"])
    )
    with pytest.raises(KeyError):
        load_arrays(sub, select(full, [1]))
    # the sub-model computes what the full model computes when only the held experts are routable
    x = text_split(2).tokens[:, :-1]
    masked_full = build_model(spec, seed=0)
    load_arrays(masked_full, full)
    masked_full.layer_held[:] = False
    masked_full.layer_held[:, HELD] = True
    torch.testing.assert_close(sub(x).logits, masked_full(x).logits, rtol=1e-4, atol=1e-5)


def test_absent_experts_get_no_token_and_no_gradient_in_every_layer(spec):
    model = build_model(spec, HELD, seed=1)
    data = text_split(8)
    x, y = data.tokens[:, :-1], data.tokens[:, 1:]
    out = model(x, y)
    absent = [e for e in range(8) if e not in HELD]
    assert out.tokens[absent].sum() == 0 and out.tokens[HELD].sum() == 8 * 16 * 2 * 2
    (model.task_loss(out.logits, y) + 0.1 * out.aux_loss).backward()
    for layer in model.net.model.layers:
        grad = layer.mlp.gate.weight.grad
        assert grad[absent].abs().max() == 0, "an absent expert's router row moved"
        assert grad[HELD].abs().sum(dim=1).gt(0).all()
        assert layer.mlp.experts.gate_up_proj.grad.abs().sum(dim=(1, 2)).gt(0).all()
    assert out.gate_hist.sum() == 8 * 16 * 2 * 2 and out.gate_hist[absent].sum() > 0


def test_feedback_shapes_and_costs_are_measured(spec):
    model = build_model(spec, seed=2)
    data = text_split(6)
    out = model(data.tokens[:, :-1], data.tokens[:, 1:])
    assert out.logits.shape == (6, 16, 256)
    for vec in (out.tokens, out.expert_loss_sum, out.gate_hist):
        assert vec.shape == (8,) and not vec.requires_grad
    assert out.tokens.sum() == 6 * 16 * 2 * 2
    assert (out.expert_loss_sum[out.tokens > 0] > 0).all() and (
        out.expert_loss_sum[out.tokens == 0] == 0
    ).all()
    assert spec.routes_per_example == 16 * 2
    costs = model_costs(spec)
    glob = model_to_arrays(model)
    assert costs.shared_params == sum(v.size for k, v in glob.items() if parse_expert_key(k) is None)
    assert costs.expert_params == sum(v.size for k, v in glob.items() if k.startswith("experts.0."))
    # SwiGLU experts: 3 d h multiply-adds per (token, expert), 2 FLOPs each, fwd + bwd = 3x fwd
    assert costs.flops_experts == pytest.approx(3 * 2 * 3 * 32 * 48 * 16 * 2 * 2, rel=0.01)
    assert costs.flops_shared > 0 and costs.routed_activation_values > 0 and costs.fixed_activation_values > 0


def test_fedavg_of_two_clients_equals_the_manual_average(spec):
    glob = model_to_arrays(build_model(spec, seed=0))
    rng = np.random.default_rng(0)

    def update(held):
        arrays = {k: v + rng.normal(size=v.shape).astype(v.dtype) for k, v in select(glob, held).items()}
        tok = np.zeros(8)
        tok[held] = 20.0
        return ClientUpdate(arrays, num_examples=10, tokens=tok, num_held=len(held))

    a, b = update([1, 5]), update([1, 2])
    out = aggregate(glob, [a, b], gate_from_all=False)
    for key in ("experts.1.net.model.layers.1.mlp.down_proj", "net.model.layers.0.input_layernorm.weight"):
        np.testing.assert_allclose(out[key], (a.arrays[key] + b.arrays[key]) / 2, rtol=1e-5)
    np.testing.assert_array_equal(
        out["experts.5.net.model.layers.0.mlp.gate_up_proj"],
        a.arrays["experts.5.net.model.layers.0.mlp.gate_up_proj"],
    )
    np.testing.assert_array_equal(
        out["experts.7.net.model.layers.1.mlp.down_proj"], glob["experts.7.net.model.layers.1.mlp.down_proj"]
    )
    gate = "net.model.layers.1.mlp.gate.weight"
    np.testing.assert_array_equal(out[gate][7], glob[gate][7])
    np.testing.assert_allclose(out[gate][1], (a.arrays[gate][1] + b.arrays[gate][1]) / 2, rtol=1e-5)


def test_local_training_lowers_the_loss(spec):
    model = build_model(spec, HELD, seed=3)
    data = text_split(48)
    before, _ = evaluate(model, data)
    res = train(model, data, **train_args(epochs=3, batch_size=16, lr=0.05))
    after, _ = evaluate(model, data)
    assert after < before - 0.5
    assert res.tokens.sum() == 48 * 3 * 16 * 2 * 2


@pytest.mark.parametrize("preset", [*FAMILIES, "tiny-olmoe"])
def test_a_client_model_never_allocates_the_experts_it_does_not_hold(preset):
    """Built on the meta device, then the held experts and the shared part materialised."""
    spec = hf_spec(preset)
    with LiveBytes() as full_build:
        full = build_model(spec, seed=0)
    with LiveBytes() as sub_build:
        sub = build_model(spec, HELD, seed=0)
    held = model_to_arrays(sub)
    held_bytes = raw_nbytes(held) + sum(b.nbytes for b in sub.net.buffers())
    assert sub_build.peak <= held_bytes + 4096  # never more than the tensors it keeps
    assert full_build.peak > 2 * sub_build.peak  # 2 of 8 experts: well under the full model
    assert all(np.isfinite(a).all() for a in held.values())
    # the model's own init ran: rotary buffers as in the full model, norms at 1, weights N(0, 0.02)
    full_buffers = dict(full.net.named_buffers())
    assert all(torch.equal(b, full_buffers[n]) for n, b in sub.net.named_buffers())
    norms = [k for k in held if k.endswith("norm.weight")]
    assert norms and all((held[k] == 1).all() for k in norms)
    for key in [k for k in held if is_gate_key(k)] + [k for k in held if k.endswith("gate_up_proj")]:
        assert 0.015 < held[key].std() < 0.025, key
    load_arrays(sub, select(model_to_arrays(full), HELD))  # and it takes the server's weights


BYTE_SPECS = {
    "cnn-moe": lambda: make_spec(num_experts=8, top_k=2),
    "transformer-moe": lambda: TransformerSpec(256, 64, 2, 64, 4, num_experts=8, top_k=2, expert_hidden=256),
    "hf-mixtral": lambda: hf_spec(
        "tiny-mixtral", **{"d-model": 64, "expert-hidden": 256, "context-length": 64}
    ),
    "hf-qwen2-moe": lambda: hf_spec(
        "tiny-qwen2-moe", **{"d-model": 64, "expert-hidden": 256, "context-length": 64}
    ),
}


@pytest.mark.parametrize("family", list(BYTE_SPECS))
def test_download_of_two_experts_is_within_5_percent_of_raw_bytes(family):
    glob = model_to_arrays(build_model(BYTE_SPECS[family](), seed=0))
    view = select(glob, [2, 6])
    shared = {k: v for k, v in glob.items() if parse_expert_key(k) is None}
    mine = {k: v for k, v in glob.items() if (p := parse_expert_key(k)) and p[0] in (2, 6)}
    assert raw_nbytes(view) == raw_nbytes(shared) + raw_nbytes(mine)
    assert wire_nbytes(to_record(view)) <= 1.05 * raw_nbytes(view)


def test_local_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    spec = hf_spec("tiny-olmoe")
    src = build_model(spec, seed=7)
    save_file(
        {k: v.contiguous() for k, v in src.net.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    loaded = build_model(hf_spec("tiny-olmoe", **{"hf-weights": str(tmp_path)}), seed=0)
    assert all(np.array_equal(a, model_to_arrays(src)[k]) for k, a in model_to_arrays(loaded).items())
    # a client holding 2 of 8 experts reads those rows only (experts: most of the weights here)
    big = {"expert-hidden": 512}
    src = build_model(hf_spec("tiny-mixtral", **big), seed=7)
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(tmp_path / "big.safetensors"))
    spec = hf_spec("tiny-mixtral", **big, **{"hf-weights": str(tmp_path / "big.safetensors")})
    with LiveBytes() as full_load:
        build_model(spec, seed=0)
    with LiveBytes() as sub_load:
        sub = build_model(spec, HELD, seed=0)
    want = select(model_to_arrays(src), HELD)
    got = model_to_arrays(sub)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert sub_load.peak < 0.35 * full_load.peak
    # a ninth expert of a model with eight: the run stops, naming the tensor
    save_file(
        {"model.layers.0.mlp.experts.8.w1.weight": torch.zeros(512, 32)}, str(tmp_path / "x.safetensors")
    )
    extra = hf_spec("tiny-mixtral", **big, **{"hf-weights": str(tmp_path)})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"'hf-weights'.*unexpected \['model.layers.0.mlp.experts.8.w1.weight"
    ):
        build_model(extra, HELD, seed=0)
    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(ValueError, match="'hf-weights'"):
        build_model(hf_spec("tiny-olmoe", **{"hf-weights": str(tmp_path / "other")}))


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"])
def test_a_save_pretrained_folder_loads_as_transformers_loads_it(tmp_path, preset):
    """Published checkpoints' per-expert layout, sharded: the tensors of from_pretrained, held rows only."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    big = {"expert-hidden": 512}  # the experts are most of the weights
    config = hf_spec(preset, **big).config
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    ).save_pretrained(tmp_path, max_shard_size="1MB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.7." in n for n in names) and not any("gate_up_proj" in n for n in names)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    spec = hf_spec(preset, **big, **{"hf-weights": str(tmp_path)})
    with LiveBytes() as full_load:
        full = build_model(spec, seed=0).net.state_dict()
    assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
    with LiveBytes() as sub_load:
        sub = build_model(spec, HELD, seed=0).net.state_dict()
    assert set(sub) == set(ref)
    for k, t in ref.items():
        assert torch.equal(sub[k], t[HELD] if k.endswith(("gate_up_proj", "down_proj")) else t), k
    assert sub_load.peak < 0.35 * full_load.peak
    folder = hf_spec(str(tmp_path), **{"hf-weights": str(tmp_path)})  # the folder as config and weights
    assert all(torch.equal(t, ref[k]) for k, t in build_model(folder, seed=0).net.state_dict().items())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "stray.safetensors"))  # not in the index: not read
    assert all(torch.equal(t, ref[k]) for k, t in build_model(spec, seed=0).net.state_dict().items())
    shards[-1].unlink()  # a shard lost: the run stops naming the key and the shard
    with pytest.raises(ValueError, match=f"'hf-weights'.*missing: \\['{shards[-1].name}'\\]"):
        build_model(spec, HELD, seed=0)
    (tmp_path / "model.safetensors.index.json").unlink()  # no index: every file, the stray one too
    with pytest.raises(ValueError, match=r"'hf-weights'.*unexpected \['x'\]"):
        build_model(spec, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expert_rows_are_read_from_the_safetensors_bytes(tmp_path, dtype):
    from safetensors.torch import save_file

    from fedmoe_app.models.hf_weights import read_rows

    w = torch.randn(8, 6, 4).to(dtype)
    save_file({"a": torch.zeros(3), "w": w, "b": torch.ones(2, 2)}, str(tmp_path / "m.safetensors"))
    got = read_rows(tmp_path / "m.safetensors", {"w": [6, 1, 5], "absent": [0]})
    assert set(got) == {"w"} and got["w"].dtype == dtype
    assert torch.equal(got["w"], w[[6, 1, 5]])


def test_bad_hf_input_stops_the_run_naming_the_key(tmp_path):
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "vocab_size": 256}))
    moe = {
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 256,
    }
    (tmp_path / "k5.json").write_text(json.dumps({**moe, "num_experts_per_tok": 5}))
    (tmp_path / "e4.json").write_text(json.dumps(moe))
    (tmp_path / "v100.json").write_text(json.dumps({**moe, "num_local_experts": 8, "vocab_size": 100}))
    bad = [
        ({"hf-config": str(llama)}, "'hf-config'.*'llama'"),
        ({"hf-config": str(tmp_path / "k5.json")}, "'hf-config'.*num_experts_per_tok = 5"),
        ({"hf-config": str(tmp_path / "e4.json")}, "'num-experts' = 8.*allowed: 4"),
        ({"hf-config": str(tmp_path / "v100.json")}, "'hf-config'.*vocab_size"),
        ({"hf-config": str(tmp_path / "missing.json")}, "'hf-config'.*no such file"),
        ({"hf-config": "tiny-llama"}, "'hf-config'.*unknown preset"),
        ({"hf-weights": str(tmp_path / "nope")}, "'hf-weights'"),
    ]
    for extra, match in bad:
        with pytest.raises(ConfigError, match=match):
            hf_cfg("tiny-mixtral", **extra)
    with pytest.raises(ConfigError, match="'model'"):
        RunConfig.from_run_config({"dataset": "synthetic", "model": "hf"})
    with pytest.raises(ConfigError, match="'top-k'"):
        hf_cfg("tiny-qwen2-moe", **{"top-k": 9})


@pytest.mark.slow
def test_flwr_run_trains_tiny_mixtral_on_text_files(run_app, tmp_path):
    rows, _ = text_run(
        run_app,
        tmp_path / "corpus",
        {"en.txt": "The cat sat on the mat. ", "de.txt": "Der Hund sitzt im Gras. "},
        {"model": "hf", "hf-config": "tiny-mixtral", **TINY, "context-length": 32},
        num_supernodes=2,
        run_name="hf-e2e",
    )
    assert rows[-1]["bpb"] < rows[0]["bpb"] - 0.5
