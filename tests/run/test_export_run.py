"""A run writes its export at the end: the ServerApp's job on an in-process federation, model = hf."""

import json

import numpy as np
import pytest
import torch
from conftest import IN_PROCESS_RUN, write_corpus
from fake_federation import FakeGrid

from fedmoe_app.models import build_model, load_arrays
from fedmoe_app.models.export import spec_from_document
from fedmoe_app.run.export import SUMMARY_FILE
from fedmoe_app.run.server import run_server

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("serverapp_identity")


@pytest.mark.slow
def test_a_finished_hf_run_writes_a_from_pretrained_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = write_corpus(tmp_path / "corpus")
    config = {
        "dataset": "text",
        "data-dir": str(corpus),
        "model": "hf",
        "hf-config": "tiny-mixtral",
        "num-layers": 2,
        "d-model": 32,
        "expert-hidden": 48,
        "context-length": 16,
        **IN_PROCESS_RUN,
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "hf-export",
    }
    grid = FakeGrid(2, num_experts=8, top_k=2, scale=0.5)
    out = run_server(grid, config)
    export = out / "export"
    summary = json.loads((export / SUMMARY_FILE).read_text())
    rows = json.loads((out / "metrics.json").read_text())
    assert summary["rounds"] == 2 and summary["metrics"]["bpb"] == rows[-1]["bpb"]
    # the export is the final global model, which the two rounds moved away from the initial one
    spec = spec_from_document(json.loads((out / "model_spec.json").read_text()))
    with np.load(out / "final_model.npz") as npz:
        final = {k: npz[k] for k in npz.files}
    model = build_model(spec, seed=0).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        initial = model(x).logits
        load_arrays(model, final)
        want = model(x).logits
        got = AutoModelForCausalLM.from_pretrained(export).eval()(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, initial, atol=1e-3)
