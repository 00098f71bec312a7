"""Federated fine-tuning of a pretrained MoE language model folder, end to end with ``flwr run``.

A tiny OLMoE and its byte-level BPE tokenizer are pretrained here by the pretraining tool's own
functions, on text unlike the clients' (sentences in four languages); the clients hold Python
code and licence text. Each run has two rounds, two clients holding 2 of 8 experts each, AdamW
and the model folder as ``hf-model``:

* full fine-tuning in fp32 and in bf16 on the wire: bits per byte fall (central and clients'),
  bf16 moves half the bytes both ways, and the export loads with ``from_pretrained`` with the
  logits of the app's global model;
* LoRA (``peft = "lora"``) with a bf16 wire: bits per byte fall, only the adapters travel (bytes
  exactly those of the adapters of 2 experts per client), and the export (base + PEFT adapter)
  loads with ``PeftModel`` with the logits of the app's global model.
"""

import dataclasses
import json

import pytest
import torch
from conftest import text_run
from llm_folder import TEXT, tiny_args

from fedmoe_app.models import build_model, load_arrays, model_to_arrays
from fedmoe_app.models.export import spec_from_document
from fedmoe_app.run.checkpoint import load_model
from fedmoe_app.run.export import FINAL_MODEL_FILE, SPEC_FILE
from fedmoe_app.tools.pretrain_llm import make_model_folder
from fedmoe_app.wire.records import to_record, wire_nbytes

pytestmark = pytest.mark.slow

CLIENT_TEXTS = {
    "code.py": "def add(a, b):\n    return a + b  # the sum of two numbers\n",
    "licence.txt": "Permission is hereby granted, free of charge, to any person obtaining a copy. ",
}
FINE_TUNE = {"model": "hf", "optimizer": "adamw", "lr": 3e-3, "context-length": 32}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A model folder pretrained for 40 steps on :data:`TEXT` (config, tokenizer, safetensors)."""
    root = tmp_path_factory.mktemp("pretrained")
    (root / "pretrain.txt").write_bytes(b"\n\n".join(TEXT))
    args = dataclasses.replace(tiny_args("olmoe"), text=(str(root / "pretrain.txt"),), batch=8, steps=40)
    folder, _ = make_model_folder(args, root / "model")
    return folder


def app_global_model(out):
    """The app's global model of a finished run: its spec, every expert, the final arrays."""
    spec = spec_from_document(json.loads((out / SPEC_FILE).read_text()))
    arrays = load_model(out / FINAL_MODEL_FILE)
    model = build_model(spec, seed=0)
    load_arrays(model, arrays)
    return model.eval(), spec, arrays


def token_batch(folder):
    """The clients' text through the folder's own tokenizer: one batch ``[2, 24]``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = [tok(text * 4)["input_ids"][:24] for text in CLIENT_TEXTS.values()]
    return torch.tensor(ids)


def fine_tune(run_app, tmp_path, folder, name, **keys):
    rows, out = text_run(
        run_app,
        tmp_path / f"corpus-{name}",
        CLIENT_TEXTS,
        {**FINE_TUNE, "hf-model": str(folder), **keys},
        num_supernodes=2,
        run_name=name,
    )
    first, last = rows[0], rows[-1]
    assert last["bpb"] < first["bpb"], (first["bpb"], last["bpb"])  # the held-out text, full model
    assert 1.0 < last["bytes_per_token"] < 8.0  # the folder's tokens, not bytes
    assert rows[1]["client_bpb"] > last["client_bpb"] > 0  # the clients' own experts, in bits per byte
    return rows, out


def test_full_fine_tuning_of_a_pretrained_folder_fp32_and_bf16_and_its_export(run_app, tmp_path, pretrained):
    from transformers import AutoModelForCausalLM

    runs = {
        wire: fine_tune(run_app, tmp_path, pretrained, f"full-{wire}", **{"wire-dtype": wire})
        for wire in ("fp32", "bf16")
    }
    for key in ("bytes_down", "bytes_up", "dense_bytes_down"):
        fp32, bf16 = (sum(r[key] for r in runs[w][0][1:]) for w in ("fp32", "bf16"))
        assert 0.49 < bf16 / fp32 < 0.52, (key, fp32, bf16)  # bf16 halves the bytes, both ways
    out = runs["fp32"][1]
    app, _, _ = app_global_model(out)
    exported = AutoModelForCausalLM.from_pretrained(out / "export").eval()
    x = token_batch(out / "export")  # the tokenizer travelled with the export
    with torch.no_grad():
        want = app(x).logits
        got = exported(input_ids=x).logits.float()
        before = AutoModelForCausalLM.from_pretrained(pretrained).eval()(input_ids=x).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (before - want).abs().max() > 1e-3  # fine-tuning moved the model


def test_lora_fine_tuning_sends_adapters_only_and_exports_a_peft_adapter(run_app, tmp_path, pretrained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows, out = fine_tune(
        run_app,
        tmp_path,
        pretrained,
        "lora-bf16",
        **{"peft": "lora", "lora-rank": 4, "wire-dtype": "bf16", "lr": 1e-2},
    )
    app, spec, arrays = app_global_model(out)
    assert arrays and all("lora" in k for k in arrays)  # the global model is the adapters
    client = wire_nbytes(to_record(model_to_arrays(build_model(spec, [0, 1], seed=0)), "bf16"))
    assert rows[-1]["bytes_down"] == 2 * client  # two clients, the adapters of 2 experts each, in bf16
    export = out / "export"
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), export / "adapter").eval()
    x = token_batch(export)
    with torch.no_grad():
        want = app(x).logits
        got = tuned(input_ids=x).logits.float()
        base = AutoModelForCausalLM.from_pretrained(pretrained).eval()(input_ids=x).logits.float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (base - want).abs().max() > 1e-4  # the adapters moved the model
