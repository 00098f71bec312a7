"""``peft = "lora"`` on ``hf`` models: only adapters train and travel, experts' adapters by global id.

A client holding some experts trains LoRA adapters (peft) on the attention modules and on its
held experts' stacked tensors; the base (router included) stays frozen and is built alike on
every node. The experts' adapters travel as ``experts.<id>.*`` tensors, so the app's slicing and
aggregation average each expert's adapter over its trainers, and the global adapters export as a
PEFT adapter folder that ``PeftModel.from_pretrained`` loads.
"""

import numpy as np
import pytest
import torch
from conftest import text_split, train_args

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import build_model, expected_keys, load_arrays, model_spec, model_to_arrays
from fedmoe_app.tensors import experts_in, parse_expert_key, raw_nbytes, select
from fedmoe_app.training import evaluate, train

pytest.importorskip("peft")

E, R = 8, 4
TINY = {"num-layers": 2, "d-model": 32, "expert-hidden": 48, "context-length": 16}
LORA = {"peft": "lora", "lora-rank": R}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]


def spec_of(preset="tiny-mixtral", **extra):
    cfg = RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": preset, **TINY, **extra}
    )
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


def base_tensors(model):
    return {n: t.detach().clone() for n, t in model.net.state_dict().items() if ".lora_" not in n}


def random_adapters(spec, seed=1):
    """The global adapters with every tensor random (B non-zero: the adapters change the output)."""
    rng = np.random.default_rng(seed)
    glob = model_to_arrays(build_model(spec, seed=0))
    return {k: (0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in glob.items()}


def test_a_lora_client_trains_its_adapters_only():
    spec = spec_of(**LORA)
    model = build_model(spec, [2, 5], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for r in model.routers for p in r.parameters())  # router frozen
    base, before = base_tensors(model), model_to_arrays(model)
    data = text_split(48)
    loss_before = evaluate(model, data, batch_size=16)[0]
    train(model, data, **train_args(epochs=2, batch_size=8, lr=0.5))
    loss_after = evaluate(model, data, batch_size=16)[0]
    # 5.53 -> 5.41 nats: the frozen random head and final norm bound the logits of a random base
    assert loss_after < loss_before - 0.08
    after_base = base_tensors(model)
    assert all(torch.equal(t, after_base[n]) for n, t in base.items())  # base bit-identical
    after = model_to_arrays(model)
    assert set(after) == set(before)
    changed = [k for k in after if not np.array_equal(after[k], before[k])]
    assert set(changed) == set(after)  # every adapter of the held experts and of attention learned


def test_the_federated_tensors_are_the_adapters_experts_by_global_id():
    spec = spec_of(**LORA, **{"lora-dropout": 0.1})
    model = build_model(spec, [2, 5], seed=0)
    arrays = model_to_arrays(model)
    d, h = TINY["d-model"], TINY["expert-hidden"]
    shared = {
        f"net.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight": (R, d) if ab == "A" else (d, R)
        for i in range(2)
        for m in ATTENTION
        for ab in "AB"
    }
    per_expert = {
        "gate_up_proj_lora_A": (R, d),
        "gate_up_proj_lora_B": (2 * h, R),
        "down_proj_lora_A": (R, h),
        "down_proj_lora_B": (d, R),
    }
    experts = {
        f"experts.{e}.net.model.layers.{i}.mlp.{t}": s
        for e in (2, 5)
        for i in range(2)
        for t, s in per_expert.items()
    }
    assert {k: v.shape for k, v in arrays.items()} == {**shared, **experts}
    assert experts_in(arrays) == [2, 5] and sorted(expected_keys(model)) == sorted(arrays)
    assert all(float(np.abs(v).max()) == 0 for k, v in arrays.items() if "lora_B" in k)  # peft's init: B = 0
    assert all(float(np.abs(v).max()) > 0 for k, v in arrays.items() if "lora_A" in k)
    # the expert adapters are what a read-only holder freezes; dropout on the attention adapters only
    assert {id(p) for p in model.expert_parameters()} == {
        id(p) for n, p in model.named_parameters() if "experts" in n and ".lora_" in n
    }
    drops = [m for n, m in model.net.named_modules() if n.endswith("lora_dropout.default")]
    assert sum(isinstance(m, torch.nn.Dropout) for m in drops) == 2 * len(ATTENTION)


@pytest.mark.parametrize(
    "preset, held",
    [("tiny-mixtral", [2, 5]), ("tiny-mixtral", [3]), ("tiny-qwen2-moe", [1, 6]), ("tiny-olmoe", [0, 7])],
)
def test_a_sub_model_is_the_full_model_restricted_to_its_experts(preset, held):
    """Slot s of the sub-model's peft adapters is global expert held[s] of the full model's."""
    spec = spec_of(preset, **LORA)
    glob = random_adapters(spec)
    full = build_model(spec, seed=0)
    load_arrays(full, glob)
    np.testing.assert_array_equal(
        np.concatenate([v.ravel() for v in model_to_arrays(full).values()]),
        np.concatenate([v.ravel() for v in glob.values()]),
    )
    sub = build_model(spec, held, seed=3)  # another build seed: adapters differ, the base does not
    load_arrays(sub, select(glob, held))
    sent_back = model_to_arrays(sub)
    assert all(np.array_equal(v, glob[k]) for k, v in sent_back.items())  # load round trip
    mask = torch.zeros(E, dtype=torch.bool)
    mask[held] = True
    full.layer_held = mask.expand(2, E).clone()  # the full model routed to the same experts only
    full.layer_ids = [held, held]
    x = torch.from_numpy(text_split(4).tokens[:, :-1].numpy().astype(np.int64))
    with torch.no_grad():
        want, got = full(x).logits, sub(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_node_builds_the_same_base_for_the_run_seed(preset):
    spec = spec_of(preset, **LORA)
    full = base_tensors(build_model(spec, seed=0))
    for held, seed in (([2, 5], 0), ([5, 7], 9), ([0], 4)):
        sub = base_tensors(build_model(spec, held, seed=seed))
        for name, t in sub.items():
            want = full[name][held] if t.shape != full[name].shape else full[name]
            assert torch.equal(t, want), name
    other = base_tensors(build_model(spec_of(preset, **LORA, seed=1), seed=0))  # the run's seed sets the base
    q = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(other[q], full[q])


def test_local_weights_are_the_frozen_base(tmp_path):
    from safetensors.torch import save_file

    from fedmoe_app.models.hf_lora import base_state_dict

    src = build_model(spec_of(), seed=7).net.state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "model.safetensors"))
    sub = build_model(spec_of(**LORA, **{"hf-weights": str(tmp_path)}), [2, 5], seed=0)
    base = base_state_dict(sub)
    assert set(base) == set(src)
    for name, t in base.items():
        assert torch.equal(t, src[name][[2, 5]] if t.shape != src[name].shape else src[name]), name


def test_two_clients_average_each_experts_adapter_over_its_trainers():
    spec = spec_of(**LORA)
    glob = model_to_arrays(build_model(spec, seed=0))
    updates = []
    for held, seed, n in (([1, 5], 0, 16), ([1, 2], 1, 24)):
        model = build_model(spec, held, seed=0)
        load_arrays(model, select(glob, held))
        res = train(model, text_split(n, seed=seed), **train_args(epochs=1, batch_size=8, lr=0.3, seed=seed))
        updates.append(ClientUpdate(model_to_arrays(model), res.num_examples, res.tokens, num_held=len(held)))
    out = aggregate(glob, updates, gate_from_all=False)
    assert set(out) == set(glob)
    for key, old in glob.items():
        parsed = parse_expert_key(key)
        if parsed is None:  # attention adapters over both clients, by examples
            want = (16 * updates[0].arrays[key] + 24 * updates[1].arrays[key]) / 40
        elif parsed[0] == 1:  # expert 1 over both of its trainers, by the tokens they routed to it
            w = [u.tokens[1] for u in updates]
            assert min(w) > 0
            want = (w[0] * updates[0].arrays[key] + w[1] * updates[1].arrays[key]) / sum(w)
        elif parsed[0] in (5, 2):  # one trainer each: its adapter
            want = updates[0 if parsed[0] == 5 else 1].arrays[key]
        else:  # nobody trained it
            want = old
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-7, err_msg=key)
    assert not np.array_equal(
        out["experts.5.net.model.layers.0.mlp.down_proj_lora_B"],
        glob["experts.5.net.model.layers.0.mlp.down_proj_lora_B"],
    )


def test_lora_arrays_are_the_adapters_bytes_a_small_share_of_the_full_arrays():
    """At the run config's default sizes (d 64, expert width 256, 2 layers) and rank 8."""
    d, h, layers, r = 64, 256, 2, 8
    sizes = {"num-layers": layers, "d-model": d, "expert-hidden": h, "context-length": 64}
    for held in ([1, 5], [0, 2, 4, 6], list(range(E))):
        full = raw_nbytes(model_to_arrays(build_model(spec_of(**sizes), held, seed=0)))
        lora = raw_nbytes(model_to_arrays(build_model(spec_of(**sizes, peft="lora"), held, seed=0)))
        attention = layers * len(ATTENTION) * 2 * r * d  # A [r, d] and B [d, r] per module
        experts = len(held) * layers * r * ((d + 2 * h) + (h + d))  # gate_up: A [r, d] B [2h, r]; down
        assert lora == 4 * (attention + experts)  # float32, adapters only
        assert lora < 0.15 * full, (held, lora, full)


@pytest.mark.parametrize("preset", PRESETS)
def test_write_adapter_loads_in_peft_with_the_app_models_logits(tmp_path, preset):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmoe_app.models.hf_lora import base_state_dict, write_adapter_from_arrays

    spec = spec_of(preset, **LORA)
    glob = random_adapters(spec)
    app = build_model(spec, seed=0)
    load_arrays(app, glob)
    config = spec.config
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    base.load_state_dict(base_state_dict(app), strict=True)
    base.save_pretrained(tmp_path / "base")
    folder = write_adapter_from_arrays(tmp_path / "adapter", spec, glob)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), folder
    ).eval()
    x = torch.from_numpy(text_split(4).tokens[:, :-1].numpy().astype(np.int64))
    with torch.no_grad():
        want = app.eval()(x).logits
        got = peft_model(input_ids=x).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-2  # the adapters matter: the base alone differs


@pytest.mark.parametrize(
    "extra, key, says",
    [
        ({"model": "transformer-moe", "peft": "lora"}, "peft", "LoRA is for model 'hf'"),
        ({"peft": "qlora"}, "peft", "one of 'none', 'lora'"),
        ({"peft": "lora", "lora-rank": 0}, "lora-rank", ">= 1"),
        ({"peft": "lora", "lora-alpha": 0}, "lora-alpha", "> 0"),
        ({"peft": "lora", "lora-dropout": 1.0}, "lora-dropout", "< 1"),
        ({"peft": "lora", "lora-target-modules": "q_proj;v_proj"}, "lora-target-modules", "comma-separated"),
        (
            {"peft": "lora", "lora-target-modules": "q_proj,qkv"},
            "lora-target-modules",
            "['qkv'] match no linear",
        ),
    ],
)
def test_bad_lora_settings_stop_the_run_naming_the_key(extra, key, says):
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        spec_of(**extra)
    assert says in str(err.value)
