"""The exported global model: transformers loads an ``hf`` export, ``load_exported`` the app's families.

Each test builds the app's model holding every expert, perturbs its global arrays (so a tensor
left at its initial value, or an expert in the wrong slot, changes the logits), writes a run
folder as a run does (config.json, model_spec.json, metrics.json, checkpoint.npz), exports it
and compares the logits of the loaded model with the app's model on one batch.
"""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from conftest import make_spec

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import build_model, load_arrays, load_exported, model_spec, model_to_arrays
from fedmoe_app.models.export import MODEL_FILE, WEIGHTS_FILE
from fedmoe_app.run import export
from fedmoe_app.run.checkpoint import checkpoint_path, save_checkpoint
from fedmoe_app.run.export import SUMMARY_FILE, export_finished_run, export_run, write_run_spec

PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
TINY = {"num-layers": 2, "d-model": 32, "num-heads": 4, "expert-hidden": 48, "context-length": 16}
ROWS = [
    {"round": 0, "accuracy": 0.1, "loss": 5.5},
    {"round": 1, "accuracy": 0.2, "loss": 4.0, "bpb": 5.77, "expert_load": [1, 2]},
    {"round": 2, "accuracy": 0.25, "loss": 3.5, "bpb": 5.05, "expert_load": [2, 2]},
]


def text_config(**keys):
    return RunConfig.from_run_config({"dataset": "fortunes", **TINY, **keys})


def text_spec(cfg):
    return model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))


def perturbed(model, seed=0):
    """The model's global arrays plus noise (every tensor changed), loaded back into the model."""
    rng = np.random.default_rng(seed)
    arrays = {
        k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
        for k, v in model_to_arrays(model).items()
    }
    load_arrays(model, arrays)
    return arrays


def write_run(run_dir, config, spec, arrays, rows=ROWS):
    """A run folder as run_server leaves it after the last round (the checkpoint holds the model)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(rows))
    write_run_spec(run_dir, spec)
    state = {"round": rows[-1]["round"], "config": config, "strategy": {}, "history": rows}
    save_checkpoint(checkpoint_path(run_dir), arrays, state)
    return run_dir


def tokens(vocab=256, seed=1):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_an_hf_export_loads_with_from_pretrained_and_gives_the_apps_logits(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    cfg = text_config(model="hf", **{"hf-config": preset})
    spec = text_spec(cfg)
    model = build_model(spec, seed=0).eval()
    arrays = perturbed(model)
    run = write_run(tmp_path / "run", cfg.to_dict(), spec, arrays)
    out = export_run(run)
    assert out == run / "export"
    net, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
        got = net.eval()(input_ids=x).logits
        back = load_exported(out)(x).logits  # the app's model read back from the folder
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(back, want, atol=1e-4)
    assert next(net.parameters()).dtype == torch.float32  # the preset names no dtype: fp32
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["run"] == "run" and summary["model"] == "hf" and summary["rounds"] == 2
    assert summary["metrics"] == {"accuracy": 0.25, "loss": 3.5, "bpb": 5.05}
    assert summary["source"] == "checkpoint.npz (round 2)"
    assert {"config.json", "model.safetensors", MODEL_FILE} <= set(summary["files"])
    assert "from_pretrained" in (out / "README.md").read_text()


def test_an_hf_export_is_written_in_the_dtype_the_config_names(tmp_path):
    from safetensors import safe_open

    cfg = text_config(model="hf")
    spec = text_spec(cfg)
    arrays = perturbed(build_model(spec, seed=0))  # the server's arrays are float32
    bf16 = dataclasses.replace(spec, config_json=json.dumps(spec.config | {"dtype": "bfloat16"}))
    out = export_run(write_run(tmp_path / "run", cfg.to_dict(), bf16, arrays), tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        expert = f.get_tensor(
            "model.layers.1.block_sparse_moe.experts.5.w2.weight"
        )  # published per-expert layout
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert dtypes == {"BF16"} and len(names) > 10
    assert torch.equal(embed, torch.from_numpy(arrays["net.model.embed_tokens.weight"]).bfloat16())
    want = torch.from_numpy(arrays["experts.5.net.model.layers.1.mlp.down_proj"]).bfloat16()
    assert torch.equal(expert, want)


def test_the_tokenizer_of_the_hf_model_folder_is_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(special_tokens=["<unk>"]))
    source = tmp_path / "base"
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(source)
    (source / "notes.txt").write_text("not a tokenizer file")
    cfg = text_config(model="hf")
    spec = text_spec(cfg)
    config = cfg.to_dict() | {"hf-model": str(source)}
    arrays = perturbed(build_model(spec, seed=0))
    out = export_run(write_run(tmp_path / "run", config, spec, arrays))
    assert (out / "tokenizer.json").is_file() and not (out / "notes.txt").exists()
    want = AutoTokenizer.from_pretrained(source)("the cat sat").input_ids
    assert AutoTokenizer.from_pretrained(out)("the cat sat").input_ids == want
    # without hf-model (a preset run): no tokenizer
    plain = export.write_export(tmp_path / "plain", spec, arrays, cfg.to_dict(), ROWS, run_name="run")
    assert not list(plain.glob("tokenizer*"))


@pytest.mark.parametrize("family", ["cnn-moe", "transformer-moe"])
def test_load_exported_gives_the_apps_model_with_every_expert(tmp_path, family):
    if family == "cnn-moe":
        spec = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)
        config = RunConfig(num_experts=4, stem_channels=2, feature_dim=4, expert_hidden=8).to_dict()
        x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    else:
        cfg = text_config(model="transformer-moe")
        spec, config, x = text_spec(cfg), cfg.to_dict(), tokens()
    model = build_model(spec, seed=0).eval()
    arrays = perturbed(model)
    out = export_run(write_run(tmp_path / "run", config, spec, arrays))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", MODEL_FILE, SUMMARY_FILE, WEIGHTS_FILE]
    )
    from safetensors.torch import load_file

    assert set(load_file(str(out / WEIGHTS_FILE))) == set(model.state_dict())  # the class's own names
    loaded = load_exported(out)
    assert type(loaded) is type(model) and loaded.expert_ids.tolist() == list(range(spec.num_experts))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-4)
    # experts restacked in global order: swapping two experts' arrays changes the export
    swapped = dict(arrays)
    for key in [k for k in arrays if k.startswith("experts.0.")]:
        other = "experts.1." + key.removeprefix("experts.0.")
        swapped[key], swapped[other] = arrays[other], arrays[key]
    again = export.write_export(tmp_path / "swapped", spec, swapped, config, ROWS, run_name="run")
    with torch.no_grad():
        assert not torch.allclose(load_exported(again)(x).logits, model(x).logits, atol=1e-4)


def test_an_export_replaces_an_earlier_one_but_never_another_folder(tmp_path):
    spec = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)
    arrays = model_to_arrays(build_model(spec, seed=0))
    run = write_run(tmp_path / "run", RunConfig().to_dict(), spec, arrays)
    out = export_run(run)
    (out / "stale.txt").write_text("from an earlier export")
    export_run(run)
    assert not (out / "stale.txt").exists() and (out / WEIGHTS_FILE).is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="not a fedmoe export"):
        export_run(run, other)
    assert (other / "keep.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # no partial folder left


def test_a_lora_run_exports_its_base_and_a_peft_adapter_with_the_app_models_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    keys = {"model": "hf", "peft": "lora", "lora-rank": 4, "seed": 3}
    cfg = text_config(**keys)
    spec = text_spec(cfg)
    app = build_model(spec, seed=0)
    arrays = perturbed(app)  # adapters only: B moved off zero, so they change the logits
    assert all("lora" in k for k in arrays)
    run = tmp_path / "run"
    write_run(run, {"dataset": "fortunes", **TINY, **keys}, spec, arrays)
    out = export_run(run)
    assert (out / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    x = torch.randint(0, 256, (2, cfg.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = app.eval()(x).logits
        got = tuned(input_ids=x).logits.float()
        plain = base(input_ids=x).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (plain - want).abs().max() > 1e-3  # the exported adapters matter
    files = json.loads((out / SUMMARY_FILE).read_text())["files"]
    assert "adapter/adapter_model.safetensors" in files and "model.safetensors" in files


def test_a_failed_export_at_the_end_of_a_run_is_logged_not_raised(tmp_path, caplog):
    spec = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)
    arrays = model_to_arrays(build_model(spec, seed=0))
    del arrays["gate.weight"]
    with caplog.at_level(logging.ERROR, logger="fedmoe_app.run.export"):
        assert export_finished_run(tmp_path, spec, arrays, {}, ROWS) is None
    assert "exporting the model" in caplog.text and "missing=['gate.weight']" in caplog.text
    assert not (tmp_path / "export").exists()


def test_a_run_folder_without_its_spec_rebuilds_it_from_the_config(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_text("\n\n".join("The cat sat on the mat. " * 3 for _ in range(40)))
    cfg = RunConfig.from_run_config(
        {"dataset": "text", "data-dir": str(corpus), "model": "transformer-moe", **TINY}
    )
    spec = text_spec(cfg)
    model = build_model(spec, seed=0).eval()
    arrays = perturbed(model)
    run = write_run(tmp_path / "run", cfg.to_dict(), spec, arrays)
    (run / "model_spec.json").unlink()
    np.savez(run / "final_model.npz", **arrays)  # a finished run: its final model is read first
    save_checkpoint(checkpoint_path(run), {}, {"round": 2, "history": ROWS})
    out = export_run(run)
    assert json.loads((out / SUMMARY_FILE).read_text())["source"] == "final_model.npz"
    with torch.no_grad():
        assert torch.allclose(load_exported(out)(tokens()).logits, model(tokens()).logits, atol=1e-4)
