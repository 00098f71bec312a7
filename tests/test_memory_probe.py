"""The measured activation memory of transformer-moe and hf, and its on-disk cache."""

import json

import pytest
import torch

from fedmoe_app.models import TransformerSpec, build_model, model_costs
from fedmoe_app.models import memory_probe as probe

SPEC = TransformerSpec(
    vocab_size=256, context_length=16, num_layers=2, d_model=32, num_heads=4, num_experts=4, top_k=2,
    expert_hidden=64,
)  # fmt: skip


def test_live_bytes_counts_what_a_step_creates_and_frees():
    with probe.LiveBytes() as mode:
        a = torch.ones(1024)  # 4 KiB alive at once with b
        b = a * 2
        del a, b
        c = torch.ones(256)  # 1 KiB after the others were freed
    assert mode.peak == 8192 and mode.live == 1024
    del c


def test_probe_grows_with_batch_and_with_held_experts():
    batch = probe.byte_windows(SPEC.context_length)
    peaks = {
        (n, len(ids)): probe.training_peak_bytes(build_model(SPEC, ids, seed=0), *batch(n))
        for n in (2, 4)
        for ids in ([0], [0, 1])
    }
    assert peaks[4, 1] > peaks[2, 1] and peaks[4, 2] > peaks[2, 2]  # activations per sample
    assert peaks[2, 2] > peaks[2, 1]  # a second expert: its gradient, momentum, activations
    fixed, routed = probe.activation_bytes_per_sample(
        lambda ids: build_model(SPEC, ids, seed=0), batch, SPEC.num_experts
    )
    slope_one = (peaks[4, 1] - peaks[2, 1]) / 2
    assert fixed > 0 and routed > 0
    assert fixed + routed == pytest.approx(slope_one, rel=0.05, abs=64)  # same measurement
    costs = model_costs(SPEC)  # the memory model's activations are the probe's, in fp32 values
    assert costs.fixed_activation_values * 4 + costs.fixed_activation_bytes == fixed
    assert costs.routed_activation_values == -(-routed // 4)


def test_probe_results_are_cached_on_disk_per_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 1000, 200

    assert probe.cached_activation_bytes("model A", measure) == (1000, 200)
    assert probe.cached_activation_bytes("model A", measure) == (1000, 200)
    assert len(calls) == 1  # the second process (or call) reads the file
    assert probe.cached_activation_bytes("model B", measure) == (1000, 200) and len(calls) == 2
    (path,) = [p for p in (tmp_path / "memory-probe").iterdir() if "model A" in p.read_text()]
    assert json.loads(path.read_text())["fixed"] == 1000
    path.write_text("{not json")  # a damaged file is measured again and rewritten
    assert probe.cached_activation_bytes("model A", measure) == (1000, 200) and len(calls) == 3
    assert json.loads(path.read_text())["routed"] == 200
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(blocker))  # unwritable: still the measurement
    assert probe.cached_activation_bytes("model C", measure) == (1000, 200)
