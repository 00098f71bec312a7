"""fitness-init = routing: a pair without evidence its client did not train starts at the gate's share."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmoe_app.alignment import AlignmentState, LayeredAlignment, alignment_from_state_dict
from fedmoe_app.config import RunConfig
from fedmoe_app.server.state import ServerState

NAN = float("nan")


def new_state(fitness_init: str, num_experts: int = 3) -> AlignmentState:
    knobs = {**RunConfig().alignment_kwargs(), "fitness_ema": 0.5, "fitness_decay": 0.9, "loss_weight": 0.5}
    return AlignmentState(num_experts, **{**knobs, "fitness_init": fitness_init})


def round1(st: AlignmentState) -> AlignmentState:
    """a trains e0, e1; b trains e2 with an empty histogram; c trains e0; d trains e1, its gate all on e1."""
    st.update(
        ["a", "b", "c", "d"],
        held=np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=bool),
        tokens=np.array([[30.0, 10.0, 0.0], [0.0, 0.0, 20.0], [8.0, 0.0, 0.0], [0.0, 5.0, 0.0]]),
        expert_loss=np.array(
            [[0.0, math.log(2.0), NAN], [NAN, NAN, 1.0], [math.log(4.0), NAN, NAN], [NAN, 0.0, NAN]]
        ),
        gate_hist=np.array([[5.0, 3.0, 2.0], [0.0, 0.0, 0.0], [2.0, 6.0, 2.0], [0.0, 4.0, 0.0]]),
    )
    return st


def round2(st: AlignmentState) -> AlignmentState:
    """a trains e0 again; b trains e2 again, now with a histogram."""
    st.update(
        ["a", "b"],
        held=np.array([[1, 0, 0], [0, 0, 1]], dtype=bool),
        tokens=np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 5.0]]),
        expert_loss=np.array([[math.log(4.0), NAN, NAN], [NAN, NAN, 0.0]]),
        gate_hist=np.array([[0.0, 1.0, 1.0], [1.0, 3.0, 0.0]]),
    )
    return st


B_E2 = 0.5 * 1.0 + 0.5 * math.exp(-1.0)  # b's signal on e2 in round 1: share 1, score exp(-1)


def test_routing_seeds_untrained_pairs_with_the_gate_share_after_the_first_round() -> None:
    st = round1(new_state("routing"))
    expected = np.array(
        [
            [0.875, 0.375, 0.2],  # a: held pairs as always; e2 without evidence takes h = 2/10
            [0.0, 0.0, B_E2],  # b: an empty histogram seeds nothing (pure decay of 0)
            [0.625, 0.6, 0.2],  # c: e0 held (.5 * 1 + .5 * exp(-ln 4)); e1, e2 take 6/10, 2/10
            [0.0, 1.0, 0.0],  # d: e0 and e2 have gate share 0: still no evidence
        ]
    )
    np.testing.assert_allclose(st.fitness, expected, rtol=0, atol=1e-15)
    round2(st)
    expected2 = np.array(
        [
            [0.75, 0.9 * 0.375 + 0.1 * 0.5, 0.9 * 0.2 + 0.1 * 0.5],  # a: seeded pairs now decay and mix
            [0.25, 0.75, 0.5 * B_E2 + 0.5 * 1.0],  # b: e0, e1 had no evidence: the gate's 1/4, 3/4
            [0.625, 0.6, 0.2],  # c, d did not reply: unchanged
            [0.0, 1.0, 0.0],
        ]
    )
    np.testing.assert_allclose(st.fitness, expected2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(st.usage, [0.8 * 38 + 10, 0.8 * 15, 0.8 * 20 + 5], rtol=0, atol=1e-12)


def test_zero_keeps_the_indirect_rule_for_pairs_without_evidence() -> None:
    st = round1(new_state("zero"))
    expected = np.array(
        [[0.875, 0.375, 0.02], [0.0, 0.0, B_E2], [0.625, 0.06, 0.02], [0.0, 1.0, 0.0]],
    )
    np.testing.assert_allclose(st.fitness, expected, rtol=0, atol=1e-15)
    round2(st)
    np.testing.assert_allclose(st.fitness[0], [0.75, 0.3875, 0.068], rtol=0, atol=1e-15)
    np.testing.assert_allclose(st.fitness[1], [0.025, 0.075, 0.5 * B_E2 + 0.5], rtol=0, atol=1e-15)


def test_the_knob_is_saved_and_restored_with_the_state() -> None:
    st = round1(new_state("routing"))
    saved = json.loads(json.dumps(st.state_dict()))
    assert saved["fitness_init"] == "routing"
    back = AlignmentState.from_state_dict(saved)
    assert back.fitness_init == "routing" and back.state_dict() == st.state_dict()
    round2(back)
    np.testing.assert_allclose(back.fitness[1, :2], [0.25, 0.75], rtol=0, atol=1e-15)  # still seeds
    # a state saved before the knob existed restores as "zero"
    del saved["fitness_init"]
    assert AlignmentState.from_state_dict(saved).fitness_init == "zero"
    with pytest.raises(ValueError, match="fitness_init"):
        new_state("gate")


def test_every_layer_of_an_untied_state_seeds_from_its_own_gate() -> None:
    knobs = {
        **RunConfig.from_run_config({"fitness-init": "routing"}).alignment_kwargs(),
        "fitness_decay": 0.9,
    }
    st = LayeredAlignment(3, 2, **knobs)
    st.update(
        ["a"],
        held=np.array([[[1, 0, 0], [0, 1, 0]]], dtype=bool),
        tokens=np.array([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]]),
        expert_loss=np.full((1, 2, 3), NAN),
        gate_hist=np.array([[[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]]]),
    )
    # held pairs: share 1, no loss score: .5; the others take their layer's gate share
    np.testing.assert_allclose(st.fitness[:, 0], [[0.5, 0.25, 0.5], [0.75, 0.5, 0.0]], rtol=0, atol=1e-15)
    back = alignment_from_state_dict(json.loads(json.dumps(st.state_dict())))
    assert [s.fitness_init for s in back.layers] == ["routing", "routing"]
    np.testing.assert_array_equal(back.fitness, st.fitness)


@pytest.mark.parametrize("tied", [True, False])
def test_the_run_config_key_reaches_the_servers_state(tied) -> None:
    cfg = RunConfig.from_run_config({"fitness-init": "routing"})
    state = ServerState(4, 2, alignment=cfg.alignment, tied=tied, rounds=cfg.round, privacy=cfg.privacy)
    layers = [state.alignment] if tied else state.alignment.layers
    assert [s.fitness_init for s in layers] == ["routing"] * len(layers)
    assert RunConfig().alignment.fitness_init == "zero"
