"""The server's initial global model read from safetensors tensor by tensor, in the checkpoint's dtype."""

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import text_split, train_args

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.models.hf_global import hf_global_arrays
from fedmoe_app.run.server import initial_arrays
from fedmoe_app.training import train

pytest.importorskip("transformers")

TINY = {"num-layers": 2, "d-model": 32, "expert-hidden": 48, "context-length": 16}


def spec_of(preset, **extra):
    cfg = RunConfig.from_run_config(
        {"dataset": "fortunes", "model": "hf", "hf-config": preset, **TINY, **extra}
    )
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


def write(folder, preset, layout, dtype):
    """Write seeded weights in ``dtype``: transformers' stacked state, or save_pretrained's per expert."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir()
    if layout == "stacked":
        state = build_model(spec_of(preset), seed=7).net.state_dict()
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        config = spec_of(preset).config
        torch.manual_seed(7)
        net = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        net.to(dtype).save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_files_give_the_built_models_arrays_in_their_own_dtype(tmp_path, preset, layout, dtype):
    folder = write(tmp_path / "w", preset, layout, dtype)
    if layout == "per-expert":
        assert not any(
            "gate_up_proj" in p.read_bytes()[:4096].decode("latin1") for p in folder.glob("*.safetensors")
        )
    spec = spec_of(preset, **{"hf-weights": str(folder)})
    got = initial_arrays(spec, seed=0)
    want = model_to_arrays(build_model(spec, seed=0))  # built in float32 from the same files
    assert list(got) == list(want)
    kept = np.float32 if dtype == torch.float32 else ml_dtypes.bfloat16
    for k, v in want.items():
        assert got[k].dtype == kept and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k].astype(np.float32), v, err_msg=k)
    if dtype == torch.bfloat16:
        assert sum(a.nbytes for a in got.values()) * 2 == sum(a.nbytes for a in want.values())


def test_lora_and_presets_are_built_and_foreign_or_missing_tensors_stop_the_run_naming_the_key(tmp_path):
    folder = write(tmp_path / "w", "tiny-mixtral", "stacked", torch.bfloat16)
    lora = spec_of("tiny-mixtral", **{"hf-weights": str(folder), "peft": "lora"})
    adapters = initial_arrays(lora, seed=0)  # the adapters, built as before (float32)
    assert adapters and all("lora" in k and v.dtype == np.float32 for k, v in adapters.items())
    preset = initial_arrays(spec_of("tiny-mixtral"), seed=3)
    built = model_to_arrays(build_model(spec_of("tiny-mixtral"), seed=3))
    assert all(np.array_equal(preset[k], v) for k, v in built.items())
    from safetensors.torch import load_file, save_file

    save_file({"model.layers.0.mlp.experts.8.w1.weight": torch.zeros(48, 32)}, str(folder / "x.safetensors"))
    with pytest.raises(ValueError, match=r"'hf-weights'.*experts\.8\.w1.*not a tensor of this model"):
        hf_global_arrays(spec_of("tiny-mixtral", **{"hf-weights": str(folder)}))
    save_file({"x": torch.zeros(1)}, str(folder / "x.safetensors"))
    with pytest.raises(ValueError, match=r"'hf-weights'.*x.safetensors: tensor 'x' is not a tensor of"):
        hf_global_arrays(spec_of("tiny-mixtral", **{"hf-weights": str(folder)}))
    (folder / "x.safetensors").unlink()
    per_expert = write(tmp_path / "p", "tiny-mixtral", "per-expert", torch.bfloat16)
    removed = 0
    for shard in per_expert.glob("*.safetensors"):  # the up halves of expert 3, gone from the files
        tensors = load_file(shard)
        kept = {k: v for k, v in tensors.items() if ".experts.3.w3." not in k}
        if len(kept) < len(tensors):
            save_file(kept, str(shard), metadata={"format": "pt"})
            removed += len(tensors) - len(kept)
    assert removed == 2  # one per layer
    with pytest.raises(ValueError, match=r"'hf-weights'.*missing \['experts\.3\..*gate_up_proj'"):
        hf_global_arrays(spec_of("tiny-mixtral", **{"hf-weights": str(per_expert)}))


def test_a_client_of_a_bf16_checkpoint_trains_bf16_weights(tmp_path):
    """A config naming bfloat16 builds the sub-model in bfloat16 (transformers follows the config's dtype)."""
    folder = write(tmp_path / "bf16", "tiny-mixtral", "per-expert", torch.bfloat16)
    spec = spec_of(str(folder / "config.json"), **{"hf-weights": str(folder)})
    client = build_model(spec, [0, 3], seed=0)
    assert {p.dtype for p in client.parameters()} == {torch.bfloat16}  # N/2 bytes of fp32's
    data = text_split(96)
    first = train(client, data, **{**train_args(epochs=1, batch_size=16, lr=0.01), "optimizer": "adamw"})
    later = train(client, data, **{**train_args(epochs=3, batch_size=16, lr=0.01), "optimizer": "adamw"})
    assert later.loss < first.loss and {p.dtype for p in client.parameters()} == {torch.bfloat16}
