"""The measured activation memory of every model family, and its on-disk cache."""

import json

import pytest
import torch

from fedmoe_app.capacity import MIB, REFERENCE_BATCH_SIZE, REFERENCE_COSTS, MemoryModel
from fedmoe_app.models import REFERENCE_SPEC, TransformerSpec, build_model, model_costs
from fedmoe_app.models import memory_probe as probe
from fedmoe_app.models.costs import expert_params, image_batches
from fedmoe_app.models.experts import Experts, grouped_supported

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


def test_cnn_probe_follows_the_expert_dispatch_that_runs(monkeypatch):
    """Gather dispatch copies each visited expert's weights per sample (and their gradient):
    the probe's routed bytes show it; grouped dispatch keeps no such copy."""
    spec = REFERENCE_SPEC

    def routed_bytes():
        return probe.activation_bytes_per_sample(
            lambda ids: build_model(spec, ids, seed=0), image_batches(spec), spec.num_experts
        )[1]

    copies = 2 * 4 * expert_params(spec)  # weights + their gradient, float32, per visit
    monkeypatch.setattr(Experts, "dispatch", "gather")
    assert routed_bytes() == pytest.approx(copies, rel=0.1)
    if grouped_supported(torch.device("cpu"), torch.float32):
        monkeypatch.setattr(Experts, "dispatch", "grouped")
        assert routed_bytes() < 0.05 * copies


def test_device_classes_are_calibrated_at_the_default_models_costs():
    got, want = model_costs(REFERENCE_SPEC), REFERENCE_COSTS
    counted = ("num_experts", "top_k", "shared_params", "expert_params", "flops_shared", "flops_experts")
    assert {k: getattr(got, k) for k in counted} == {k: getattr(want, k) for k in counted}

    # activations are measured (another torch version may allocate a little differently)
    got_mib, want_mib = (MemoryModel(c, REFERENCE_BATCH_SIZE).table() / MIB for c in (got, want))
    assert got_mib == pytest.approx(want_mib, rel=0.05)


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
