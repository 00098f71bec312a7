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


def plan(cfg, classes):
    planner = Planner(cfg.planning, model_costs(REFERENCE_SPEC))
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
