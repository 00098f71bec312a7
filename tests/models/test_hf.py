"""Hugging Face MoE models (model = "hf"): meta-device sub-models, local weights, bad input, a run.

What every model family must do (slicing, masking, feedback, training, aggregation, bytes, costs)
is checked for each preset by tests/models/test_contract.py.
"""

import json

import numpy as np
import pytest
import torch
from conftest import text_run

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import HFSpec, build_model, load_arrays, model_spec, model_to_arrays
from fedmoe_app.models.memory_probe import LiveBytes
from fedmoe_app.tensors import is_gate_key, raw_nbytes, select

pytest.importorskip("transformers")

PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
HELD = [1, 5]
TINY = {"num-layers": 2, "d-model": 32, "expert-hidden": 48, "context-length": 16}


def hf_cfg(preset, **extra):
    return RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": preset, **TINY, **extra}
    )


def hf_spec(preset, **extra) -> HFSpec:
    cfg = hf_cfg(preset, **extra)
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


@pytest.mark.parametrize("preset", PRESETS)
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


@pytest.mark.parametrize("preset", PRESETS)
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
    got = read_rows(tmp_path / "m.safetensors", {"w": [6, 1, 5], "absent": [0]}, "test")
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
