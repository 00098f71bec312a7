"""A model folder as users have it (run-config ``hf-model``): its config, weights and tokenizer.

The folder is written here (tests/llm_folder.py: a BPE tokenizer trained on a few KB, a tiny
MoE saved with ``save_pretrained``); nothing is downloaded.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from llm_folder import TEXT, tiny_model_folder

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data.text import load_text
from fedmoe_app.models import HFSpec, build_model, model_spec, model_to_arrays
from fedmoe_app.tensors import select

pytest.importorskip("transformers")

HELD = [1, 6]


def folder_cfg(folder, **extra) -> RunConfig:
    return RunConfig.from_run_config(
        {
            "dataset": "text",
            "data-dir": str(folder),
            "model": "hf",
            "hf-model": str(folder),
            "context-length": 16,
        }
        | extra
    )


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "mixed.txt").write_bytes(b"\n\n".join(TEXT))
    return root


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_a_model_folder_gives_config_weights_and_tokenizer(tmp_path, corpus, family):
    """Spec, tokens and weights come from the folder; 2 of 8 experts load as the full model's rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_folder(tmp_path / "model", family)
    cfg = RunConfig.from_run_config(
        {
            "dataset": "text",
            "data-dir": str(corpus),
            "model": "hf",
            "hf-model": str(folder),
            "context-length": 16,
        }
    )
    train, _, info = load_text("text", str(corpus), 16, 0, str(folder))
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert info.vocab_size == len(tok) == 320 and info.tokenizer == str(folder)
    assert train.tokens.dtype == torch.int32 and int(train.tokens.max()) < len(tok)
    spec = model_spec(cfg, info)
    assert isinstance(spec, HFSpec) and spec.weights == str(folder) and spec.weights_key == "hf-model"
    assert (
        spec.config["model_type"] == family
        and spec.vocab_size == json.loads((folder / "config.json").read_text())["vocab_size"]
    )

    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    full = build_model(spec).eval()
    x = train.tokens[:3, :-1]
    with torch.no_grad():
        want = reference(input_ids=x.long()).logits
        got = full(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    sub = build_model(spec, HELD)
    want_arrays = select(model_to_arrays(full), HELD)
    got_arrays = model_to_arrays(sub)
    assert set(got_arrays) == set(want_arrays)
    assert all(np.array_equal(got_arrays[k], want_arrays[k]) for k in want_arrays)


def test_bad_model_folders_stop_the_run_naming_the_key(tmp_path, corpus):
    folder = tiny_model_folder(tmp_path / "model", "mixtral")
    folder_cfg(folder)  # the good folder passes

    def variant(name, change):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        change(bad)
        return bad

    def edit_config(**updates):
        def change(bad):
            cfg = json.loads((bad / "config.json").read_text())
            (bad / "config.json").write_text(json.dumps(cfg | updates))

        return change

    no_config = variant("no-config", lambda b: (b / "config.json").unlink())
    no_tokenizer = variant("no-tok", lambda b: (b / "tokenizer.json").unlink())
    no_weights = variant("no-weights", lambda b: (b / "model.safetensors").unlink())
    small_vocab = variant("small-vocab", edit_config(vocab_size=300))
    llama = variant("llama", edit_config(model_type="llama"))
    four = variant("four", edit_config(num_local_experts=4))
    bad = [
        (no_config, {}, "'hf-model'.*no such file.*config.json"),
        (no_tokenizer, {}, "'hf-model'.*no tokenizer files"),
        (no_weights, {}, "'hf-model'.*no \\*.safetensors"),
        (small_vocab, {}, "'hf-model'.*320 token ids.*vocab_size is 300"),
        (llama, {}, "'hf-model'.*'llama' is not a supported MoE"),
        (four, {}, "'num-experts' = 8 is invalid for hf-model.*allowed: 4"),
        (folder, {"hf-weights": str(folder)}, "'hf-weights'.*with hf-model"),
        (folder, {"hf-config": "tiny-olmoe"}, "'hf-config' = 'tiny-olmoe' is invalid with hf-model"),
        (folder, {"context-length": 64}, "'context-length' = 64.*allowed: <= 32"),
        (tmp_path / "absent", {}, "'hf-model'.*not a folder"),
    ]
    for path, extra, match in bad:
        with pytest.raises(ConfigError, match=match):
            folder_cfg(path, **extra)
    with pytest.raises(ConfigError, match="'hf-model'.*for model 'transformer-moe'"):
        folder_cfg(folder, model="transformer-moe")
    # weights of another shape than the folder's config.json: the build names hf-model
    wide = variant("wide", edit_config(intermediate_size=48))
    with pytest.raises(ValueError, match="'hf-model'.*does not match its config.json"):
        build_model(HFSpec.from_folder(str(wide), 16, 320), HELD)
    # a tokenizer without tokenizer.json is checked when loaded, against the model's vocab_size
    with pytest.raises(ValueError, match="'hf-model'.*400 token ids.*vocab_size is 320"):
        HFSpec.from_folder(str(folder), 16, 400)


def test_lora_fine_tunes_adapters_on_the_folders_weights(tmp_path, corpus):
    """peft = "lora": the frozen base is the folder's model (zero adapters give its logits)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_folder(tmp_path / "model", "olmoe")
    cfg = folder_cfg(folder, **{"data-dir": str(corpus), "peft": "lora"})
    train, _, info = load_text("text", str(corpus), 16, 0, str(folder))
    spec = model_spec(cfg, info)
    assert spec.lora is not None and spec.weights_key == "hf-model"
    x = train.tokens[:2, :-1]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=x.long()).logits
        got = build_model(spec).eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
