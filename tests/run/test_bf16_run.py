"""The ServerApp's job on a bf16 checkpoint (in-process federation): the model stays bf16 to the end."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import IN_PROCESS_RUN, write_corpus
from fake_federation import FakeGrid

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextInfo, server_split
from fedmoe_app.models import build_model, load_arrays, model_spec
from fedmoe_app.models.export import spec_from_document
from fedmoe_app.run.checkpoint import checkpoint_path, load_checkpoint, load_model
from fedmoe_app.run.evaluation import central_evaluator
from fedmoe_app.run.server import initial_arrays, run_server

pytest.importorskip("transformers")

SIZES = {
    "hf-config": "tiny-mixtral",
    "num-layers": 2,
    "d-model": 32,
    "expert-hidden": 48,
    "context-length": 16,
}


pytestmark = pytest.mark.usefixtures("serverapp_identity")


@pytest.mark.slow
def test_a_bf16_checkpoint_is_trained_checkpointed_saved_and_exported_in_bf16(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    corpus = write_corpus(tmp_path / "corpus")
    keys = {"dataset": "text", "data-dir": str(corpus), "model": "hf", **SIZES}
    spec = model_spec(RunConfig.from_run_config(keys), TextInfo(256, 16, ("en",)))
    state = build_model(spec, seed=5).net.state_dict()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(weights))
    config = keys | {
        "hf-weights": str(weights),
        **IN_PROCESS_RUN,
        "wire-dtype": "bf16",
        "output-dir": str(tmp_path / "outputs"),
        "run-name": "bf16",
    }
    out = run_server(FakeGrid(2, num_experts=8, top_k=2, scale=5.0), config)
    assert torch.get_default_dtype() == torch.float32  # the bf16 evaluation model was built in a block
    start = initial_arrays(model_spec(RunConfig.from_run_config(config), TextInfo(256, 16, ("en",))), 0)
    final = load_model(out / "final_model.npz")
    saved, ckpt = load_checkpoint(checkpoint_path(out))
    assert ckpt["round"] == 2 and set(final) == set(saved) == set(start)
    assert all(v.dtype == ml_dtypes.bfloat16 for d in (start, final, saved) for v in d.values())
    assert all(final[k].tobytes() == saved[k].tobytes() for k in final)  # the last round's model
    assert sum(not np.array_equal(final[k], start[k]) for k in final) > len(final) // 2  # it moved
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and all(np.isfinite(r["bpb"]) for r in rows)
    # the run evaluated the model in bf16 (its evaluation model was built in the global's dtype)
    cfg = RunConfig.from_run_config(config)
    test, info = server_split(cfg)
    spec16 = model_spec(cfg, info)
    in_bf16 = central_evaluator(cfg, spec16, test, info, dtype="bfloat16")(2, final)["bpb"]
    in_fp32 = central_evaluator(cfg, spec16, test, info)(2, final)["bpb"]
    assert rows[-1]["bpb"] == pytest.approx(in_bf16, rel=1e-9) and in_bf16 != in_fp32
    assert in_bf16 == pytest.approx(in_fp32, rel=0.02)
    # the export holds the final model (loaded into a float32 model: exact upcast)
    model = build_model(spec_from_document(json.loads((out / "model_spec.json").read_text())), seed=0).eval()
    load_arrays(model, final)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
        got = AutoModelForCausalLM.from_pretrained(out / "export").eval()(input_ids=x).logits
    assert torch.allclose(got.float(), want, atol=1e-3)
    # resumed for a third round: from the bf16 checkpoint (the files are not read as a model again)
    again = run_server(
        FakeGrid(2, num_experts=8, top_k=2, scale=5.0), config | {"resume": True, "num-server-rounds": 3}
    )
    assert again == out and [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [
        0,
        1,
        2,
        3,
    ]
    third = load_model(out / "final_model.npz")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in third.values())
    assert any(not np.array_equal(third[k], final[k]) for k in final)
