"""The round planner: capacities from profiles, the assignment, read-only experts, skipped clients."""

import dataclasses

import numpy as np
import pytest

from fedmoe_app import capacity as cap
from fedmoe_app.alignment import AlignmentState
from fedmoe_app.config import RunConfig
from fedmoe_app.models import REFERENCE_SPEC, build_model, model_costs, model_to_arrays
from fedmoe_app.server.planner import Planner

ARRAYS = model_to_arrays(build_model(REFERENCE_SPEC))
MEASURED = cap.CapacityProfile("m", "measured", 8 << 30, 2, 0.0, 100.0, 100.0, 100.0)


def profiles(*classes):
    costs = model_costs(REFERENCE_SPEC)
    return [
        cap.emulate(MEASURED, c, costs=costs, batch_size=32).to_dict() | {"num-examples": 500}
        for c in classes
    ]


def plan(cfg, classes, adapters=None):
    planner = Planner(cfg.planning, model_costs(REFERENCE_SPEC), adapters=adapters)
    state = AlignmentState(REFERENCE_SPEC.num_experts, **cfg.alignment_kwargs())
    ids = [f"c{i}" for i in range(len(classes))]
    return planner.plan(state, ids, profiles(*classes), ARRAYS, np.random.default_rng(0))


def test_capacity_follows_the_device_classes_capped_by_experts_per_client():
    p = plan(RunConfig(), ["tiny", "phone", "laptop", "edge"])
    assert p.capacity.tolist() == [0, 1, 4, 4]  # edge holds 8, experts-per-client caps it at 4
    assert p.assignment[:, 0].sum(1).tolist() == [1, 1, 4, 4]  # tiny gets one expert, read-only
    assert p.frozen.tolist() == [True, False, False, False]
    fixed = plan(RunConfig(capacity="fixed", experts_per_client=3), ["tiny", "phone", "laptop"])
    assert fixed.capacity.tolist() == [3, 3, 3] and not fixed.frozen.any()


def test_lora_clients_hold_more_experts_where_memory_binds():
    # the reference CNN (S = 38,152, X = 19,210) with made-up adapters of 1,000 shared values and
    # 500 per expert: an expert costs 8 X + 12 * 500 = 159,680 B under LoRA against 12 X = 230,520 B,
    # the shared part 4 S + 12 * 1,000 = 164,608 B against 12 S = 457,824 B. The budgets, midway
    # between 0|1, 1|2 and 4|5 experts of full training (5,788,139, 6,018,826 and 6,710,886 B, the
    # activations 5,219,840 B), then hold 2.5, 3.97 and 8.3 experts under LoRA
    cfg = RunConfig(experts_per_client=8)
    classes = ["tiny", "phone", "laptop", "edge"]
    full = plan(cfg, classes)
    lora = plan(cfg, classes, adapters=cap.Adapters(rank=4, shared=1000, expert=500))
    assert full.capacity.tolist() == [0, 1, 4, 8]
    assert lora.capacity.tolist() == [2, 3, 8, 8]
    assert lora.frozen.tolist() == [False, False, False, False]


@pytest.mark.parametrize(
    "policy, frozen", [("load_balanced", [True, True, False]), ("dense", [True, False, False])]
)
def test_min_trained_experts_makes_small_clients_train_the_shared_part_only(policy, frozen):
    p = plan(RunConfig(min_trained_experts=2, policy=policy), ["tiny", "phone", "laptop"])
    assert p.frozen.tolist() == frozen


def test_skip_leaves_out_clients_that_cannot_hold_an_expert():
    p = plan(RunConfig(under_capacity="skip"), ["tiny", "laptop", "tiny", "phone"])
    assert p.client_ids == ["c1", "c3"] and p.capacity.tolist() == [4, 1]
    assert p.assignment.shape == (2, 1, 8) and p.budgets.tolist() == [0, 0]


def test_deadline_budgets_and_virtual_time():
    cfg = dataclasses.replace(RunConfig(), round_deadline_s=0.7)
    p = plan(cfg, ["phone", "laptop", "edge"])
    assert cfg.batch_size < p.budgets[0] < 500  # the phone does part of its local work
    assert p.budgets[1:].tolist() == [0, 0]  # laptop and edge box do it all in time
    # the slowest client (the phone, on its budget) just meets the deadline
    assert 0.69 < p.virtual_round_time_s <= 0.7
    assert p.late_clients == 0  # profiled: nobody is past the deadline


def test_fixed_capacity_under_a_deadline_counts_its_stragglers():
    cfg = dataclasses.replace(RunConfig(capacity="fixed", experts_per_client=2), round_deadline_s=0.7)
    p = plan(cfg, ["phone", "laptop", "edge"])
    assert p.budgets.tolist() == [0, 0, 0]  # the fixed baseline always does its full local work
    assert p.late_clients == 1 and p.virtual_round_time_s > 0.7  # the phone; the round waits for it
    assert plan(dataclasses.replace(cfg, round_deadline_s=0.0), ["phone"]).late_clients == 0


def test_a_lora_run_plans_with_the_adapters_of_its_run_config():
    pytest.importorskip("peft")
    from fedmoe_app.data.text import TextInfo
    from fedmoe_app.models import model_spec
    from fedmoe_app.models.hf_costs import lora_param_counts
    from fedmoe_app.server.strategy import FedMoE

    keys = {"dataset": "fortunes", "model": "hf", "hf-config": "tiny-mixtral", "num-layers": 2, "d-model": 64}
    keys |= {"expert-hidden": 512, "context-length": 16, "batch-size": 4, "experts-per-client": 8}
    lora_keys = {"peft": "lora", "lora-rank": 4, "lora-target-modules": "q_proj,v_proj"}
    strategies = {}
    for name, extra in (("none", {}), ("lora", lora_keys)):
        cfg = RunConfig.from_run_config(keys | extra)
        spec = model_spec(cfg, TextInfo(256, cfg.context_length, ("en",)))
        strategies[name] = FedMoE.from_run_config(cfg, spec, model_to_arrays(build_model(spec, seed=0)))
    full, lora = strategies["none"].planner, strategies["lora"].planner
    want = lora_param_counts(spec.config, 4, ["q_proj", "v_proj"])
    assert full.memory.adapters is None
    assert lora.memory.adapters == cap.Adapters(4, *want) and lora.memory.costs == full.memory.costs
    # a client whose memory holds 2 experts under full training holds more under LoRA
    budget = int(full.memory.table()[2])
    client = [{"memory-bytes": budget, "gflops": 10.0, "down-mbps": 100.0, "up-mbps": 100.0}]
    held_full = full.capacity(client, {}).tolist()
    held_lora = lora.capacity(client, {}).tolist()
    assert held_full == [2] and held_lora[0] > 2
    assert lora.memory.predict_training_bytes(held_lora[0]) <= budget


def test_adamw_is_priced_with_two_states_per_parameter_and_emulated_classes_keep_their_experts():
    costs = model_costs(REFERENCE_SPEC)
    sgd, adamw = RunConfig(), RunConfig(optimizer="adamw")
    assert Planner(sgd.planning, costs).memory.optimizer_states == 1
    assert Planner(adamw.planning, costs).memory.optimizer_states == 2
    # a measured device with the memory to train 4 experts under SGD holds fewer under AdamW
    budget = Planner(sgd.planning, costs).memory.predict_training_bytes(4)
    device = [{**profiles("laptop")[0], "memory-bytes": int(budget)}]
    held = {
        name: Planner(c.planning, costs).capacity(device, ARRAYS)[0]
        for name, c in (("sgd", sgd), ("adamw", adamw))
    }
    assert held["sgd"] == 4 and held["adamw"] == 2
    # an emulated class is anchored on the run's optimizer: a phone still holds 1, a laptop 4
    emulated = [
        cap.emulate(MEASURED, c, costs=costs, batch_size=32, optimizer_states=2).to_dict()
        | {"num-examples": 500}
        for c in ("tiny", "phone", "laptop")
    ]
    assert Planner(adamw.planning, costs).capacity(emulated, ARRAYS).tolist() == [0, 1, 4]
    unanchored = profiles("tiny", "phone", "laptop")  # SGD's budgets: too small for AdamW's states
    assert Planner(adamw.planning, costs).capacity(unanchored, ARRAYS).tolist() == [0, 0, 2]
