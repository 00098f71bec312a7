"""The pretraining tool: a tiny run writes a folder that transformers and the app load, reused after."""

import json
import logging

import numpy as np
import pytest
import torch
from llm_folder import TEXT

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import load_text
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.tensors import select
from fedmoe_app.tools import pretrain_llm

pytest.importorskip("transformers")

TINY = ["--layers", "2", "--d-model", "32", "--expert-hidden", "32", "--context", "32", "--vocab", "320"]


def test_a_tiny_pretraining_writes_a_folder_the_app_fine_tunes(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_bytes(b"\n\n".join(TEXT))
    out = tmp_path / "model"
    argv = ["--text", str(text), "--steps", "5", "--minutes", "0", "--batch", "4", "--out", str(out), *TINY]
    with caplog.at_level(logging.INFO, logger=pretrain_llm.__name__):
        assert pretrain_llm.main(argv) == 0
    done = json.loads((out / "pretrain.json").read_text())
    assert done["steps"] == 5 and len(done["curve"]) == 2 and np.isfinite(done["eval_bpb"])
    assert f"model folder (run-config hf-model): {out}" in caplog.text
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reference.config.model_type == "olmoe" and len(AutoTokenizer.from_pretrained(out)) == 320

    # the app: hf-model = the folder, 2 of 8 experts are the full model's rows, all 8 its logits
    cfg = RunConfig.from_run_config(
        {
            "dataset": "text",
            "data-dir": str(tmp_path),
            "model": "hf",
            "hf-model": str(out),
            "context-length": 32,
        }
    )
    train, _, info = load_text("text", str(tmp_path), 32, 0, str(out))
    spec = model_spec(cfg, info)
    full = build_model(spec).eval()
    with torch.no_grad():
        x = train.tokens[:2, :-1]
        torch.testing.assert_close(full(x).logits, reference(input_ids=x.long()).logits, rtol=1e-5, atol=1e-5)
    sub = model_to_arrays(build_model(spec, [0, 3]))
    want = select(model_to_arrays(full), [0, 3])
    assert set(sub) == set(want) and all(np.array_equal(sub[k], want[k]) for k in want)

    # the same arguments again: the folder is reused, not retrained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pretrain_llm.__name__):
        assert pretrain_llm.main(argv) == 0
    assert "reusing" in caplog.text and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_corpus_holds_capped_text_groups_that_pretraining_never_saw(tmp_path):
    sizes = pretrain_llm.write_corpus(tmp_path / "corpus", 20_000)
    assert set(sizes) == {"python", "licenses", "man"}
    assert all(0 < n <= 20_000 for n in sizes.values())
    for name, n in sizes.items():
        files = list((tmp_path / "corpus" / name).iterdir())
        assert sum(f.stat().st_size for f in files) == n
        for f in files:
            f.read_bytes().decode("utf-8")
    man = "".join(f.read_text() for f in (tmp_path / "corpus" / "man").iterdir())
    assert '.\\"' not in man and "\\fB" not in man
    _, _, info = load_text("text", str(tmp_path / "corpus"), 64, 0)
    assert info.groups == ("licenses", "man", "python")


def test_troff_requests_and_font_escapes_are_stripped():
    source = (
        '.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\n.B bold words\n'
    )
    assert pretrain_llm.strip_troff(source) == "LS 1\nNAME\nls - list directory contents\nbold words\n"
