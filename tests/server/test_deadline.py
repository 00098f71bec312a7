"""Deadline-aware local work: slow clients get a sample budget that fits the deadline."""

import dataclasses

import numpy as np
from conftest import make_spec, train_args

from fedmoe_app import capacity as cap
from fedmoe_app.config import RunConfig
from fedmoe_app.data import load_splits
from fedmoe_app.models import REFERENCE_SPEC, build_model, model_costs, model_to_arrays
from fedmoe_app.server.planner import deadline_sample_budget, planned_samples, virtual_round_time
from fedmoe_app.training import train

SPEC = REFERENCE_SPEC


def _profile(cls, n=600):
    measured = cap.CapacityProfile(
        client_id=cls,
        device_class=cap.MEASURED,
        memory_bytes=8 << 30,
        cpu_count=2,
        cpu_freq_mhz=2000.0,
        gflops=100.0,
        down_mbps=1000.0,
        up_mbps=1000.0,
    )
    d = cap.emulate(measured, cls, costs=model_costs(SPEC), batch_size=32).to_dict()
    d["num-examples"] = n
    return d


def test_budget_fits_deadline_for_slow_clients_only():
    profiles = [_profile("phone"), _profile("edge")]
    memory = cap.MemoryModel(model_costs(SPEC), 32)
    n_experts = np.array([1, 4])
    no_deadline = RunConfig().planning
    full = planned_samples(profiles, no_deadline)
    np.testing.assert_array_equal(deadline_sample_budget(profiles, n_experts, memory, no_deadline), full)
    t_full = [virtual_round_time([p], [n], memory, no_deadline) for p, n in zip(profiles, n_experts)]
    assert t_full[0] > t_full[1]  # the phone is the straggler
    cfg = dataclasses.replace(no_deadline, round_deadline_s=t_full[0] / 2)
    budget = deadline_sample_budget(profiles, n_experts, memory, cfg)
    assert 32 <= budget[0] < full[0] and budget[1] == full[1]
    t_phone = virtual_round_time([profiles[0]], [1], memory, cfg, samples=budget[:1])
    assert t_phone <= cfg.round_deadline_s * 1.001


def test_training_stops_at_max_samples():
    data, _, _ = load_splits("synthetic", "", 0)
    model = build_model(make_spec(image_size=12))
    res = train(
        model, data.subset(np.arange(200)), **train_args(epochs=2, batch_size=32, lr=0.01, max_samples=70)
    )
    assert res.tokens.sum() == 96 * 2  # three batches of 32 (top-2)
    res = train(model, data.subset(np.arange(200)), **train_args(epochs=2, batch_size=32, lr=0.01))
    assert res.tokens.sum() == 400 * 2


def test_a_bf16_wire_halves_the_transfer_time_the_planner_prices():
    profiles = [_profile("phone")]
    memory = cap.MemoryModel(model_costs(SPEC), 32)
    arrays = model_to_arrays(build_model(SPEC))
    fp32 = RunConfig().planning
    bf16 = dataclasses.replace(fp32, wire_dtype="bf16")
    none = np.zeros(1)
    t32 = virtual_round_time(profiles, [2], memory, fp32, arrays, samples=none)  # transfers only
    t16 = virtual_round_time(profiles, [2], memory, bf16, arrays, samples=none)
    assert t32 > 0 and abs(t16 / t32 - 0.5) < 0.01, (t32, t16)
