"""``hf`` costs from the config alone (fedmoe_app/models/hf_costs.py) against the built, trained model.

Parameters are counted on the meta device and activations and FLOPs on fake-tensor twins; here
they are checked against what the real tiny models hold and use: the memory model's prediction
within ±30 % of a measured training step (full and LoRA), the parameter counts exact, LoRA counts as
peft makes them.
"""

import pytest

from fedmoe_app.capacity import MemoryModel
from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import build_model, model_costs, model_spec
from fedmoe_app.models.memory_probe import activation_bytes_per_sample, byte_windows, training_peak_bytes

pytest.importorskip("transformers")

from fedmoe_app.models.hf import build_hf  # noqa: E402
from fedmoe_app.models.hf_costs import hf_costs, lora_param_counts, param_counts, twin_config  # noqa: E402

PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
SIZE = {"num-layers": 3, "d-model": 64, "expert-hidden": 128, "context-length": 32}


def spec_of(preset, **extra):
    cfg = RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": preset, **SIZE, **extra}
    )
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


@pytest.mark.parametrize(
    "preset", [PRESETS[0], *(pytest.param(p, marks=pytest.mark.slow) for p in PRESETS[1:])]
)
def test_predicted_training_memory_is_within_30_percent_of_a_measured_step(preset):
    spec = spec_of(preset)
    costs = hf_costs(spec)
    batch = 8
    x, y = byte_windows(spec.context_length)(batch)
    for held in ([0], [1, 5], [0, 2, 4, 6]):
        model = build_model(spec, held, seed=0)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        measured = weights + training_peak_bytes(model, x, y)  # + gradients, momentum, activations
        predicted = MemoryModel(costs, batch).predict_training_bytes(len(held))
        assert 0.7 < predicted / measured < 1.3, (preset, held, predicted, measured)


@pytest.mark.parametrize(
    "sizes, held_sets",
    [
        ({}, ([0], [1, 5], [0, 2, 4, 6])),
        # experts 16 x larger: their merged weights (W + s B A, kept for backward) weigh as much as the
        # activations, and leaving them out of the prediction would miss this step by more than 30 %
        ({"d-model": 128, "expert-hidden": 1024}, ([0, 2, 4, 6],)),
    ],
)
def test_lora_predicted_training_memory_is_within_30_percent_of_a_measured_step(sizes, held_sets):
    pytest.importorskip("peft")
    spec = spec_of("tiny-mixtral", peft="lora", **sizes)
    memory = MemoryModel(model_costs(spec), 8, adapters=spec.adapters())
    full = MemoryModel(model_costs(spec), 8)
    x, y = byte_windows(spec.context_length)(8)
    for held in held_sets:
        model = build_model(spec, held, seed=0)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())  # frozen base + adapters
        measured = weights + training_peak_bytes(model, x, y)  # + the adapters' gradients, momentum
        predicted = memory.predict_training_bytes(len(held))
        assert 0.7 < predicted / measured < 1.3, (sizes, held, predicted, measured)
        assert predicted < full.predict_training_bytes(len(held))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_twin_activations_match_the_probe_on_the_built_model(preset):
    spec = spec_of(preset)
    costs = hf_costs(spec)
    fixed, routed = activation_bytes_per_sample(
        lambda ids: build_hf(spec, ids, seed=0), byte_windows(spec.context_length), spec.num_experts
    )
    assert 0.7 < 4 * costs.fixed_activation_values / fixed < 1.3
    assert 0.7 < 4 * costs.routed_activation_values / routed < 1.3


def test_counts_on_the_meta_device_equal_the_built_model_and_qwen_shared_expert_is_shared():
    spec = spec_of("tiny-qwen2-moe")
    counts = param_counts(spec.config)
    net = build_hf(spec, seed=0).net
    stacked = {n for n, _ in net.named_parameters() if ".experts." in n and "shared_expert" not in n}
    assert stacked and all(".mlp.experts." in n for n in stacked)
    total = sum(p.numel() for p in net.parameters())
    assert counts.total == total
    assert counts.expert * spec.num_experts == sum(
        p.numel() for n, p in net.named_parameters() if n in stacked
    )
    shared_expert = sum(p.numel() for n, p in net.named_parameters() if "shared_expert" in n)
    assert shared_expert > 0 and counts.shared >= shared_expert


def test_a_twin_keeps_the_widths_and_cuts_the_layers():
    cfg = dict(spec_of("tiny-qwen2-moe").config, mlp_only_layers=[1], decoder_sparse_step=1)
    twin = twin_config(cfg, moe=2, dense_after=1, top_k=1)
    assert (twin["num_hidden_layers"], twin["mlp_only_layers"], twin["num_experts_per_tok"]) == (3, [2], 1)
    assert twin["hidden_size"] == cfg["hidden_size"] and twin["num_experts"] == cfg["num_experts"]


def test_lora_counts_equal_the_adapters_peft_makes():
    peft = pytest.importorskip("peft")
    spec = spec_of("tiny-mixtral")
    rank, targets = 4, ["q_proj", "v_proj"]
    shared, expert = lora_param_counts(spec.config, rank, targets)
    net = build_hf(spec, seed=0).net
    lora = peft.LoraConfig(
        r=rank, target_modules=targets, target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    model = peft.get_peft_model(net, lora)
    adapters = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n}
    on_experts = sum(v for n, v in adapters.items() if ".experts." in n or ".mlp." in n)
    assert sum(adapters.values()) == shared + spec.num_experts * expert
    assert on_experts == spec.num_experts * expert
    assert shared == sum(v for n, v in adapters.items() if "self_attn" in n)
