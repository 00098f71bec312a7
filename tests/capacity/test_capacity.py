import dataclasses
import math
import time

import numpy as np
import psutil
import pytest
from conftest import make_spec

from fedmoe_app import capacity as cap
from fedmoe_app.capacity import probe
from fedmoe_app.config import RunConfig
from fedmoe_app.models import REFERENCE_SPEC, build_model, count_parameters, model_costs
from fedmoe_app.models.costs import expert_params, flops_per_sample, shared_params
from fedmoe_app.server.planner import capacity_for_profiles, virtual_round_time
from fedmoe_app.tensors import payload_nbytes

DEFAULT = REFERENCE_SPEC  # the app's default model on Fashion-MNIST
# A spec small enough to compute its memory by hand (see test_memory_model_hand_example).
TOY = make_spec(
    image_size=4, num_classes=2, num_experts=4, top_k=1, stem_channels=1, feature_dim=1, expert_hidden=1
)


def _profile(**kw):
    base = dict(
        client_id="c0",
        device_class="measured",
        memory_bytes=8 * 2**30,
        cpu_count=4,
        cpu_freq_mhz=2400.0,
        gflops=100.0,
        down_mbps=50.0,
        up_mbps=500.0,
    )
    base.update(kw)
    return cap.CapacityProfile(**base)


# --------------------------------------------------------------------------- measurement
def test_measure_profile_is_sane_and_quick():
    t0 = time.perf_counter()
    p = probe.measure_profile("client-3", benchmark_s=0.3)
    wall = time.perf_counter() - t0
    assert wall <= 0.5 + 0.4  # benchmark window <= 0.45 s plus psutil and one warm-up product
    assert p.client_id == "client-3" and p.device_class == "measured"
    assert 0 < p.memory_bytes <= psutil.virtual_memory().total
    assert p.cpu_count >= 1
    assert p.cpu_freq_mhz >= 0.0
    assert p.gflops > 0 and math.isfinite(p.gflops)
    assert p.down_mbps == p.up_mbps == probe.DEFAULT_MBPS
    assert p.gpu_memory_bytes == 0
    assert p.samples_per_s is None and p.train_time_s is None
    assert probe.measure_profile("x", gflops=5.0, last_exchange_mbps=12.5).down_mbps == 12.5


def test_benchmark_window_is_capped():
    t0 = time.perf_counter()
    assert probe.matmul_gflops("cpu", seconds=5.0) > 0  # clipped to MAX_BENCHMARK_S
    assert time.perf_counter() - t0 < probe.MAX_BENCHMARK_S + 0.4
    with pytest.raises(ValueError, match="benchmark_s"):
        probe.matmul_gflops("cpu", seconds=0)


# --------------------------------------------------------------------------- profile records
def test_profile_round_trip_through_flat_dict():
    p = _profile(samples_per_s=812.5, peak_memory_bytes=123456, num_examples=600)
    d = p.to_dict()
    assert d["memory-bytes"] == 8 * 2**30 and d["samples-per-s"] == 812.5
    assert "train-time-s" not in d  # None is left out
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in d.values())
    assert cap.CapacityProfile.from_dict(d) == p
    # underscore keys and extra keys (the client adds num-examples etc.) are accepted
    assert cap.CapacityProfile.from_dict({**dataclasses.asdict(p), "other": 1}) == p


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("memory-bytes", -1),
        ("memory-bytes", 1.5),
        ("memory-bytes", True),
        ("cpu-count", 0),
        ("cpu-count", "4"),
        ("gflops", 0.0),
        ("gflops", float("nan")),
        ("down-mbps", -3.0),
        ("up-mbps", float("inf")),
        ("client-id", ""),
        ("device-class", 3),
        ("samples-per-s", -1.0),
    ],
)
def test_profile_from_dict_names_the_bad_field(key, value):
    d = _profile().to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=f"'{key}'"):
        cap.CapacityProfile.from_dict(d)


def test_profile_from_dict_requires_fields():
    d = _profile().to_dict()
    del d["gflops"]
    with pytest.raises(ValueError, match="'gflops' is missing"):
        cap.CapacityProfile.from_dict(d)


def test_budget_prefers_gpu_memory():
    assert _profile(memory_bytes=100).budget_bytes == 100
    assert _profile(memory_bytes=100, gpu_memory_bytes=70).budget_bytes == 70


# --------------------------------------------------------------------------- device mix
def test_parse_device_mix_normalises_in_canonical_order():
    mix = cap.parse_device_mix(" edge=2, phone=5 ,laptop=3")
    assert list(mix) == ["phone", "laptop", "edge"]
    assert mix == pytest.approx({"phone": 0.5, "laptop": 0.3, "edge": 0.2})
    assert cap.parse_device_mix("") == {} and cap.parse_device_mix("  ") == {}
    assert cap.parse_device_mix("phone=1,tiny=0") == {"tiny": 0.0, "phone": 1.0}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("phone=0.5,watch=0.5", "unknown device class 'watch'"),
        ("phone=-1,edge=2", "negative"),
        ("phone=0,edge=0", "sum to 0"),
        ("phone", "not name=weight"),
        ("phone=x", "not a number"),
        ("phone=1,phone=2", "twice"),
    ],
)
def test_parse_device_mix_errors(text, fragment):
    with pytest.raises(ValueError) as err:
        cap.parse_device_mix(text)
    msg = str(err.value)
    assert "'device-mix'" in msg and repr(text) in msg and fragment in msg
    assert all(name in msg for name in cap.DEVICE_CLASSES)  # lists what is allowed


def test_device_class_for_is_deterministic_and_follows_the_mix():
    mix = cap.parse_device_mix("phone=0.5,laptop=0.3,edge=0.2")
    ids = [f"client-{i}" for i in range(2000)]
    first = [cap.device_class_for(c, mix, seed=7) for c in ids]
    assert first == [cap.device_class_for(c, mix, seed=7) for c in ids]
    share = {n: first.count(n) / len(ids) for n in mix}
    for name, weight in mix.items():
        assert abs(share[name] - weight) < 0.04, (name, share)
    other = [cap.device_class_for(c, mix, seed=8) for c in ids]
    assert np.mean([a != b for a, b in zip(first, other)]) > 0.3
    # pinned: blake2b, not Python's salted hash(), so every process agrees
    assert cap.devices._unit_hash("0", 0) == pytest.approx(0.9611675505049015)
    assert cap.device_class_for("0", mix, 0) == "edge"
    assert cap.device_class_for("0", {}, 0) == "measured"
    assert cap.device_class_for("x", {"tiny": 0.0, "laptop": 1.0}, 3) == "laptop"


# --------------------------------------------------------------------------- emulation
def test_emulated_class_fully_determines_the_profile():
    """Whatever the host measured (load, links, RAM), an emulated client's figures are its class's."""
    phone = cap.DEVICE_CLASSES["phone"]
    quiet = _profile(down_mbps=10.0, up_mbps=500.0, samples_per_s=800.0)
    loaded = _profile(client_id="c0", gflops=3.0, memory_bytes=2**20, down_mbps=1.0, samples_per_s=9.0)
    p, q = cap.emulate(quiet, "phone"), cap.emulate(loaded, "phone")
    assert p.device_class == "phone"
    assert p.memory_bytes == int(phone.memory_mb * cap.MIB)
    assert (p.gflops, p.down_mbps, p.up_mbps) == (phone.gflops, phone.down_mbps, phone.up_mbps)
    assert p.samples_per_s == 800.0  # the raw measurement is kept ...
    assert p.effective_samples_per_s is None  # ... but never used for round times
    assert dataclasses.replace(q, samples_per_s=800.0, cpu_count=4, cpu_freq_mhz=2400.0) == p
    assert quiet.effective_samples_per_s == 800.0  # measured hardware: its own throughput
    assert cap.emulate(quiet, "measured") == quiet
    with pytest.raises(ValueError, match="laptop"):
        cap.emulate(quiet, "mainframe")


def test_device_classes_hold_their_expert_counts_on_every_run_shape():
    expected = {"tiny": 0, "phone": 1, "laptop": 4, "edge": 8}
    mm = cap.MemoryModel(model_costs(DEFAULT), 32)
    for name, dc in cap.DEVICE_CLASSES.items():  # at the reference run: memory_mb itself
        assert mm.experts_that_fit(dc.memory_mb * cap.MIB) == expected[name]
    shapes = [
        (DEFAULT, 32),
        (make_spec(in_channels=3, image_size=32), 32),  # CIFAR-10
        (make_spec(image_size=12), 32),  # synthetic
        (dataclasses.replace(DEFAULT, feature_dim=256, expert_hidden=1024), 32),
        (DEFAULT, 8),
        (DEFAULT, 128),
    ]
    for spec, batch in shapes:
        mm = cap.MemoryModel(model_costs(spec), batch)
        got = {
            n: int(mm.experts_that_fit(dc.budget_bytes(model_costs(spec), batch)))
            for n, dc in cap.DEVICE_CLASSES.items()
        }
        assert got == expected, (spec, batch, got)
    e16 = dataclasses.replace(DEFAULT, num_experts=16)
    budget = cap.DEVICE_CLASSES["edge"].budget_bytes(model_costs(e16), 32)
    assert cap.MemoryModel(model_costs(e16), 32).experts_that_fit(budget) == 16


def test_client_profile_uses_mix_seed_and_node_config():
    run = {"device_mix": "phone=0.5,edge=0.5", "seed": 1, "batch_size": 32, "costs": model_costs(DEFAULT)}
    p = probe.client_profile("client-5", **run, node_config={})
    assert p.device_class == cap.device_class_for("client-5", {"phone": 0.5, "edge": 0.5}, 1)
    assert (
        probe.client_profile("client-5", **run, node_config={"device-class": "laptop"}).device_class
        == "laptop"
    )
    assert probe.client_profile("c", **{**run, "device_mix": ""}).device_class == "measured"
    with pytest.raises(ValueError, match="device-class"):
        probe.client_profile("c", **run, node_config={"device-class": "toaster"})


# --------------------------------------------------------------------------- memory model
@pytest.mark.parametrize(
    "spec",
    [
        DEFAULT,
        make_spec(in_channels=3, image_size=32),
        TOY,
        make_spec(image_size=12, feature_dim=32, expert_hidden=7),
    ],
)
def test_parameter_counts_match_the_model(spec):
    shared, experts = count_parameters(build_model(spec))
    assert shared_params(spec) == shared
    assert expert_params(spec) * spec.num_experts == experts


def test_memory_model_hand_example():
    # Costs of a toy CNN (1x4x4 input, c=1, d=1, h=1, C=2, E=4, top-1) at batch 1, float32,
    # SGD momentum, its activations counted by hand:
    #   shared params: conv1 9+1, conv2 18+2, proj 32+1, gate 4+4 = 71 -> 3*4*71 = 852 B
    #   expert params: d*h + h + h*C + C = 1+1+2+2 = 6                -> 3*4*6  =  72 B
    #   stem values: input 16 + relu1 16 + pool1 4 + relu2 8 + pool2 2 + avgpool 32 + d 1
    #                + 4E 16 = 95; pool indices (4 + 2) * 8 B = 48 B
    #   transient: max(routed k*(2*6 + d + 2h + 2C) = 19, conv1 grads 2*c*S^2 = 32) = 32
    #   activations: 4 * (95 + 32) + 48 = 556 B  (same for k = 0 and 1)
    #   => predict(n) = 852 + 556 + 72 n = 1408 + 72 n
    mm = cap.MemoryModel(_toy_costs(), 1)
    assert mm.table().tolist() == [1408, 1480, 1552, 1624, 1696]
    assert mm.predict_training_bytes(3) == 1624
    assert mm.expert_bytes() == 72 and mm.shared_bytes() == 1408 + 72 - 72
    assert mm.experts_that_fit(1551) == 1
    assert mm.experts_that_fit(1552) == 2
    assert mm.experts_that_fit(1407) == 0  # not even the shared part
    assert mm.experts_that_fit(10**12) == 4  # clipped to E
    assert mm.experts_that_fit(np.array([0, 1480, np.inf])).tolist() == [0, 1, 4]


def _toy_costs():
    """The hand example's costs (test_memory_model_hand_example): S = 71, X = 6, activations 556 B."""
    return cap.ModelCosts(
        num_experts=4,
        top_k=1,
        shared_params=71,
        expert_params=6,
        fixed_activation_values=95,
        fixed_activation_bytes=48,
        routed_activation_values=19,
        transient_activation_values=32,
        flops_shared=0.0,
        flops_experts=0.0,
        efficiency=(1.0, 1.0),
    )


def test_lora_memory_model_hand_example():
    # LoRA adapters of 5 shared values and 1 per expert on the hand example's toy (S = 71, X = 6,
    # activations 556 B at batch 1, float32, SGD momentum):
    #   frozen base     4 * (71 + 6 n)            = 284 + 24 n
    #   merged experts  4 * 6 n                   =        24 n   (W + s B A, kept for backward)
    #   adapters        3 * 4 * (5 + 1 n)         =  60 + 12 n
    #   => predict(n) = 284 + 60 + 556 + 60 n = 900 + 60 n  (full training: 1408 + 72 n)
    toy = _toy_costs()
    lora = cap.MemoryModel(toy, 1, adapters=cap.Adapters(rank=1, shared=5, expert=1))
    full = cap.MemoryModel(toy, 1)
    assert lora.table().tolist() == [900, 960, 1020, 1080, 1140]
    assert full.table().tolist() == [1408, 1480, 1552, 1624, 1696]  # unchanged without adapters
    assert lora.expert_bytes() == 60 and lora.shared_bytes() == 900
    assert lora.wire_values() == (5, 1) and full.wire_values() == (71, 6)
    frozen_base_alone = 4 * (71 + 6 * np.arange(5)) + 556
    assert (frozen_base_alone < lora.table()).all() and (lora.table() < full.table()).all()
    # Adam keeps two states per trained value: only the adapters' term grows
    adam = cap.MemoryModel(toy, 1, optimizer_states=2, adapters=cap.Adapters(1, 5, 1))
    assert (adam.table() - lora.table()).tolist() == [4 * (5 + n) for n in range(5)]
    with pytest.raises(ValueError, match="rank >= 1"):
        cap.Adapters(rank=0, shared=5, expert=1)


def test_lora_fits_more_experts_where_full_training_fits_k():
    toy = _toy_costs()
    full = cap.MemoryModel(toy, 1)
    lora = cap.MemoryModel(toy, 1, adapters=cap.Adapters(1, 5, 1))
    budget = full.table()[2]  # full training fits exactly 2 experts (1552 B)
    assert full.experts_that_fit(budget) == 2 and lora.experts_that_fit(budget) == 4  # 1140 B <= 1552 B
    assert full.experts_that_fit(1407) == 0 and lora.experts_that_fit(1407) == 4
    kw = dict(costs=toy, batch_size=1, samples=0)
    args = ([budget, 1000.0], [1.0, 1.0], [100.0, 100.0], [100.0, 100.0])
    assert cap.capacity_from_profiles(*args, **kw).tolist() == [2, 0]
    assert cap.capacity_from_profiles(*args, **kw, memory_model=lora).tolist() == [4, 1]


def test_lora_transfers_are_priced_by_the_adapters():
    # 8 bit/s each way (8e-6 Mbit/s), no compute: full training moves 4 (71 + 6 n) B down and up,
    # LoRA 4 (5 + 1 n) B (the base model is on the device already)
    toy, adapters = _toy_costs(), cap.Adapters(1, 5, 1)
    n = np.arange(5)
    t_full = cap.round_time_s(n, 1.0, 8e-6, 8e-6, costs=toy, samples=0)
    t_lora = cap.round_time_s(n, 1.0, 8e-6, 8e-6, costs=toy, samples=0, adapters=adapters)
    assert t_full == pytest.approx(2 * (284 + 24 * n)) and t_lora == pytest.approx(2 * (20 + 4 * n))
    lora = cap.MemoryModel(toy, 1, adapters=adapters)
    kw = dict(costs=toy, batch_size=1, samples=0, deadline_s=70.0)
    args = ([np.inf], [1.0], [8e-6], [8e-6])
    # within 70 s: full training not even the shared part (568 s), LoRA 40 + 8 n -> n <= 3
    assert cap.capacity_from_profiles(*args, **kw).tolist() == [0]
    assert cap.capacity_from_profiles(*args, **kw, memory_model=lora).tolist() == [3]


def test_memory_model_structure_at_default_spec():
    mm = cap.MemoryModel(model_costs(DEFAULT), 32)
    t = mm.table()
    assert (np.diff(t) > 0).all()
    # beyond top_k only weights + grads + momentum of the extra experts add up
    assert np.diff(t[2:]).tolist() == [mm.expert_bytes()] * 6
    assert mm.expert_bytes() == 12 * expert_params(DEFAULT)
    assert mm.shared_bytes() == t[2] - 2 * mm.expert_bytes()
    # activations scale with the batch, not with the experts held
    big = cap.MemoryModel(model_costs(DEFAULT), 64)
    assert big.expert_bytes() == mm.expert_bytes() and big.shared_bytes() > 1.9 * mm.shared_bytes() - 1e6
    with pytest.raises(ValueError):
        mm.predict_training_bytes(-1)


# --------------------------------------------------------------------------- capacity model
def test_flops_per_sample_default():
    # stem fwd: 2*1*9*16*28^2 + 2*16*9*32*14^2 + 2*512*64 + 2*64*8 = 2,098,688  (x3)
    # experts fwd (top-2): 2 * (2*64*256 + 2*256*10) = 75,776                (x3)
    assert flops_per_sample(DEFAULT) == (6_296_064.0, 227_328.0)


# Hand example for the deadline: shared 1 MB = 8 Mbit, one expert 0.25 MB = 2 Mbit,
# down 8 Mbit/s, up 2 Mbit/s -> transfer(n) = (8 + 2n)/8 + (8 + 2n)/2 = 5 + 1.25 n s.
# Compute: 1000 samples x (1e6 + 2e6 * min(n, 2) / 2) FLOP at 1 GFLOP/s, efficiency 1
# -> 1 s (n=0), 2 s (n=1), 3 s (n>=2). Round time: 6, 8.25, 10.5, 11.75, 13.0, 14.25, ...
HAND = dict(
    costs=model_costs(DEFAULT),
    samples=1000,
    shared_nbytes=1_000_000,
    expert_nbytes=250_000,
    flops_per_sample_shared=1e6,
    flops_per_sample_expert=2e6,
    efficiency=(1.0, 1.0),
)


def test_round_time_hand_example():
    t = cap.round_time_s(np.arange(6), 1.0, 8.0, 2.0, **HAND)
    assert t == pytest.approx([6.0, 8.25, 10.5, 11.75, 13.0, 14.25])
    # a measured throughput (500 samples/s -> 2 s) replaces the FLOP estimate; NaN = unknown
    t = cap.round_time_s(4, np.array([1.0, 1.0]), 8.0, 2.0, samples_per_s=np.array([500.0, np.nan]), **HAND)
    assert t == pytest.approx([10.0 + 2.0, 13.0])
    assert cap.virtual_round_time_s([3.0, 9.5, 1.0]) == 9.5 and cap.virtual_round_time_s([]) == 0.0


def test_capacity_hand_example_with_deadline_and_clipping():
    kw = {k: v for k, v in HAND.items() if k != "costs"}
    mem = cap.MemoryModel(model_costs(DEFAULT), 32).table()
    memory = np.array([np.inf, np.inf, mem[3] + 1, mem[0] - 1, np.inf])
    gflops = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    down = np.array([8.0, 8.0, 8.0, 8.0, 1e6])
    up = np.array([2.0, 2.0, 2.0, 2.0, 1e6])
    sps = np.array([np.nan, 500.0, np.nan, np.nan, np.nan])

    def fit(**extra):
        return cap.capacity_from_profiles(
            memory, gflops, down, up, costs=model_costs(DEFAULT), batch_size=32, **{**kw, **extra}
        )

    cap_ = fit(deadline_s=13.5, samples_per_s=sps)
    # 0: deadline -> 13.0 <= 13.5 < 14.25 -> 4;  1: measured 2 s -> 7 + 1.25 n <= 13.5 -> 5
    # 2: memory fits 3 (deadline would allow 4) -> 3;  3: not even the shared part -> 0
    # 4: fast links, 3 s compute -> every expert (clipped to E = 8)
    assert cap_.tolist() == [4, 5, 3, 0, 8]
    assert cap_.dtype == np.int64
    no_deadline = fit()
    assert no_deadline.tolist() == [8, 8, 3, 0, 8]
    assert (fit(deadline_s=0) == no_deadline).all()
    # a deadline nobody meets, and min_experts turning too-small capacities into 0
    assert fit(deadline_s=5.0).tolist() == [0, 0, 0, 0, 8]
    # client 1 without its measured speed: 4, like client 0
    assert fit(deadline_s=13.5, min_experts=4).tolist() == [4, 4, 0, 0, 8]
    with pytest.raises(ValueError, match="min_experts"):
        fit(samples=1, min_experts=9)


def test_capacity_for_profiles_and_virtual_round_time_on_stored_dicts():
    mm = cap.MemoryModel(model_costs(DEFAULT), 32)
    measured = _profile(gflops=200.0)
    phone = cap.emulate(measured, "phone").to_dict() | {"num-examples": 600}
    edge = cap.emulate(measured, "edge").to_dict()
    cfg = RunConfig(experts_per_client=3).planning
    assert capacity_for_profiles([phone, edge, {}], mm, cfg).tolist() == [1, 8, 3]
    assert capacity_for_profiles([], mm, cfg).shape == (0,)
    t = virtual_round_time([phone, edge], np.array([1, 8]), mm, cfg)
    # the slowest participant: the phone (600 samples at 1/8 of the speed, 5 Mbit/s uplink)
    each = [
        cap.round_time_s(n, p["gflops"], p["down-mbps"], p["up-mbps"], costs=model_costs(DEFAULT), samples=s)
        for n, p, s in ((1, phone, 600), (8, edge, 0))
    ]
    assert t == pytest.approx(max(each)) and each[0] > each[1] > 0
    assert virtual_round_time([phone, {}], np.array([1, 1]), mm, cfg) is None
    arrays = cap.profile_arrays([cap.CapacityProfile.from_dict(phone | {"samples-per-s": 800.0})])
    assert math.isnan(arrays["samples_per_s"][0])  # emulated: the class's GFLOP/s decide
    arrays = cap.profile_arrays([measured.to_dict() | {"samples-per-s": 800.0}])
    assert arrays["samples_per_s"][0] == 800.0
    assert math.isnan(cap.profile_arrays([{}])["gflops"][0])


def test_payload_nbytes():
    f32 = np.float32
    arrays = {
        "stem.0.weight": np.zeros(10, f32),
        "gate.bias": np.zeros(2, f32),
        "experts.0.w1": np.zeros(5, f32),
        "experts.0.b1": np.zeros(1, f32),
        "experts.3.w1": np.zeros(5, f32),
        "experts.3.b1": np.zeros(1, f32),
    }
    assert payload_nbytes(arrays) == (48, 24)


def test_ema_update():
    assert cap.ema_update(None, 4.0, 0.5) == 4.0
    assert cap.ema_update(2.0, 4.0, 0.25) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        cap.ema_update(1.0, 2.0, 0.0)
    with pytest.raises(ValueError):
        cap.ema_update(1.0, float("nan"), 0.5)
