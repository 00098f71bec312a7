"""Differential privacy per aggregated group: clipping, noise, accounting, planning, config."""

import math

import numpy as np
import pytest
from conftest import make_spec
from fake_federation import FakeGrid
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from fedmoe_app.alignment import AlignmentState, enforce_min_trainers
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.maths.privacy import (
    clip_delta,
    delta_norm,
    local_reply_bound,
    private_mean,
    privatize,
    update_delta,
)
from fedmoe_app.models import build_model, model_costs, model_to_arrays
from fedmoe_app.server.accounting import GroupAccountant
from fedmoe_app.server.planner import Planner
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.tensors import parse_expert_key

SPEC = make_spec(num_experts=6, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Flower builds messages for the running ServerApp's run: give the test one."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def dp_config(**overrides):
    base = {
        "capacity": "fixed",
        "experts-per-client": 2,
        "num-experts": SPEC.num_experts,
        "top-k": SPEC.top_k,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "min-evaluate-nodes": 0,
        "dp": "central",
        "dp-clip-norm": 1.0,
        "dp-noise-multiplier": 0.0,
        "policy": "random",
    }
    return RunConfig.from_run_config({**base, **overrides})


def run_strategy(cfg, nodes, rounds=2, scale=10.0):
    strategy = FedMoE.from_run_config(cfg, SPEC, model_to_arrays(build_model(SPEC, seed=0)))
    grid = FakeGrid(nodes, num_experts=SPEC.num_experts, top_k=SPEC.top_k, scale=scale)
    rows = []

    def on_round(row, arrays):
        rows.append({**row, "model": dict(arrays)})

    strategy.start(grid, num_rounds=rounds, on_round=on_round)
    return strategy, grid, [r for r in rows if r["round"] > 0]


# --------------------------------------------------------------------------- clipping


def test_server_clips_every_client_update_to_the_norm_bound():
    """Central DP, no noise, one client at a time: the model moves by its clipped update only."""
    cfg = dp_config(**{"dp-min-trainers": 1, "min-train-nodes": 1, "dp-clip-norm": 0.5})
    strategy, grid, rows = run_strategy(cfg, nodes=1, rounds=3, scale=10.0)
    assert [r["dp_clipped"] for r in rows] == [1, 1, 1]
    # each round: new model - sent model = the client's clipped delta (norm <= C), and in
    # the direction of the client's own update
    for (_, sent), (_, replied), after in zip(grid.sent, grid.replied, [r["model"] for r in rows]):
        moved = update_delta(sent, {k: after[k] for k in replied})
        assert delta_norm(moved) == pytest.approx(0.5, rel=1e-5)
        raw = update_delta(sent, replied)
        cos = sum(float((moved[k] * raw[k]).sum()) for k in raw) / (0.5 * delta_norm(raw))
        assert cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 0.7, 5.0, 1e6])
def test_clip_delta_bounds_the_norm_and_keeps_small_updates(scale):
    rng = np.random.default_rng(1)
    delta = {"a": rng.normal(size=(30, 4)) * scale, "experts.0.w1": rng.normal(size=50) * scale}
    clipped, was = clip_delta(delta, 1.0)
    assert delta_norm(clipped) <= 1.0 + 1e-9
    assert was == (delta_norm(delta) > 1.0)
    if not was:
        assert all(np.array_equal(clipped[k], delta[k]) for k in delta)


def test_local_mode_client_clips_before_it_adds_noise():
    rng = np.random.default_rng(2)
    received = {"a": np.zeros((40, 5), np.float32), "experts.1.w1": np.ones(60, np.float32)}
    trained = {k: v + 100.0 for k, v in received.items()}
    out = privatize(received, trained, clip_norm=2.0, noise_multiplier=0.0, rng=rng)
    assert delta_norm(update_delta(received, out)) == pytest.approx(2.0, rel=1e-5)
    assert all(out[k].dtype == np.float32 for k in out)
    noisy = privatize(received, trained, clip_norm=2.0, noise_multiplier=0.5, rng=rng)
    residual = np.concatenate([(noisy[k] - out[k]).ravel() for k in out])
    assert residual.std() == pytest.approx(0.5 * 2.0, rel=0.1)


# --------------------------------------------------------------------------- noise


def test_noise_has_the_configured_std_per_group():
    """std of group g's noise is z * C / n_g: shared over 10 replies, experts over 2 and 5."""
    rng = np.random.default_rng(123)
    glob = {"stem.w": np.zeros(20_000), "experts.0.w1": np.zeros(20_000), "experts.1.w1": np.zeros(20_000)}
    replies = []
    for i in range(10):
        r = {"stem.w": glob["stem.w"].copy()}
        if i < 2:
            r["experts.0.w1"] = glob["experts.0.w1"].copy()
        if i < 5:
            r["experts.1.w1"] = glob["experts.1.w1"].copy()
        replies.append(r)
    z, clip = 0.8, 1.5
    res = private_mean(glob, replies, 2, clip_norm=clip, noise_std=z * clip, rng=rng)
    assert res.shared_trainers == 10 and res.expert_trainers.tolist() == [2, 5]
    for key, n in (("stem.w", 10), ("experts.0.w1", 2), ("experts.1.w1", 5)):
        noise = res.arrays[key]
        assert abs(noise.mean()) < 4 * z * clip / n / math.sqrt(noise.size)
        # std of a sample std of 20k normals: ~0.5 %; 3 % is far from every other group's value
        assert noise.std() == pytest.approx(z * clip / n, rel=0.03), key


def test_an_expert_left_with_fewer_replies_than_the_minimum_is_not_released():
    glob = {"stem.w": np.zeros(10), "experts.0.w1": np.full(10, 3.0), "experts.1.w1": np.zeros(10)}
    replies = [{"stem.w": np.ones(10), "experts.0.w1": np.full(10, 4.0)}, {"stem.w": np.ones(10)}]
    replies[1]["experts.1.w1"] = np.ones(10)
    replies.append({"stem.w": np.ones(10), "experts.1.w1": np.ones(10)})
    rng = np.random.default_rng(0)
    res = private_mean(glob, replies, 2, clip_norm=None, noise_std=0.0, rng=rng, min_trainers=2)
    assert np.array_equal(res.arrays["experts.0.w1"], glob["experts.0.w1"])  # one reply: kept
    assert res.expert_trainers.tolist() == [0, 2]
    assert np.allclose(res.arrays["experts.1.w1"], 1.0)


def test_groups_without_trainers_keep_their_values_and_no_noise():
    glob = {"stem.w": np.ones(10), "experts.0.w1": np.full(10, 3.0)}
    res = private_mean(
        glob, [{"stem.w": np.ones(10)}], 1, clip_norm=1.0, noise_std=1.0, rng=np.random.default_rng(0)
    )
    assert np.array_equal(res.arrays["experts.0.w1"], glob["experts.0.w1"])


# --------------------------------------------------------------------------- accounting


def test_epsilon_matches_opacus_at_the_shared_rate_for_every_group():
    z, delta, population = 1.1, 1e-5, 20
    acc = GroupAccountant(3, "central", z, delta)
    shared, e2 = RDPAccountant(), RDPAccountant()
    for rnd in range(6):
        n0 = 2 + rnd % 3
        clients = [f"c{i}" for i in range(10)]
        acc.step({-1: clients, 0: clients[:n0], 2: clients[:4] if rnd % 2 else []}, population)
        shared.step(noise_multiplier=z, sample_rate=10 / population)
        if rnd % 2:
            e2.step(noise_multiplier=z, sample_rate=10 / population)  # released: at the shared rate
    assert acc.epsilon(-1) == pytest.approx(shared.get_epsilon(delta), rel=1e-12)
    assert acc.epsilon(0) == pytest.approx(shared.get_epsilon(delta), rel=1e-12)  # every round
    assert acc.epsilon(2) == pytest.approx(e2.get_epsilon(delta), rel=1e-12)
    assert acc.epsilon(1) == 0.0  # never trained
    swap = RDPAccountant()
    swap.history = [(z / 2, 10 / population, 6)]  # replace-one: sensitivity 2C
    assert acc.epsilon(-1, swap=True) == pytest.approx(swap.get_epsilon(delta), rel=1e-12)
    report = acc.report(10, np.array([2, 0, 4]))
    assert report["dp_epsilon_max_expert"] == max(report["dp_epsilon_experts"])
    assert report["dp_epsilon_swap_max_expert"] > report["dp_epsilon_max_expert"]
    assert report["dp_neighbouring"] == "add-remove"
    restored = GroupAccountant(3, "central", z, delta)
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon(0) == acc.epsilon(0)


@pytest.mark.parametrize("z", [0.3, 1.0])
def test_an_experts_epsilon_bounds_the_client_assigned_it_whenever_sampled(z):
    """Client c0 gets expert 0 every time it is sampled (10 of 20, 40 rounds): its true rate is 1/2.

    The expert has 2 trainers a round; accounting it at n_e / K = 0.1 understated c0's epsilon.
    """
    delta, population, rounds = 1e-5, 20, 40
    rng = np.random.default_rng(0)
    acc = GroupAccountant(1, "central", z, delta)
    sampled_c0 = 0
    for _ in range(rounds):
        sample = [f"c{i}" for i in rng.choice(population, 10, replace=False)]
        sampled_c0 += "c0" in sample
        trainers = ["c0", sample[0] if sample[0] != "c0" else sample[1]] if "c0" in sample else sample[:2]
        acc.step({-1: sample, 0: trainers}, population)
    true_rate = RDPAccountant()
    true_rate.history = [(z, 10 / population, rounds)]  # c0's participation rate in expert 0
    understated = RDPAccountant()
    understated.history = [(z, 2 / population, rounds)]
    assert acc.epsilon(0) >= true_rate.get_epsilon(delta) * (1 - 1e-12)
    assert true_rate.get_epsilon(delta) > 1.5 * understated.get_epsilon(delta)  # what n_e / K gave
    assert 10 <= sampled_c0 <= 30


def test_local_epsilon_is_the_busiest_clients_composition_at_sensitivity_2c():
    z, delta = 2.0, 1e-6
    acc = GroupAccountant(2, "local", z, delta)
    acc.step({-1: ["a", "b"], 0: ["a"], 1: ["b"]}, 10)
    acc.step({-1: ["a"], 0: ["a"]}, 10)
    acc.step({-1: ["a", "b"], 1: ["b"]}, 10)
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=z / 2, sample_rate=1.0)  # a reply may move anywhere in its 2C ball
    assert acc.epsilon(-1) == pytest.approx(ref.get_epsilon(delta), rel=1e-12)  # client a: 3 rounds
    two = RDPAccountant()
    for _ in range(2):
        two.step(noise_multiplier=z / 2, sample_rate=1.0)
    assert acc.epsilon(0) == pytest.approx(two.get_epsilon(delta), rel=1e-12)


def test_a_run_reports_epsilon_per_group_each_round():
    cfg = dp_config(**{"dp-noise-multiplier": 1.0, "dp-min-trainers": 2})
    _, _, rows = run_strategy(cfg, nodes=6, rounds=3)
    eps = [r["dp_epsilon_shared"] for r in rows]
    assert eps[0] > 0 and eps == sorted(eps) and len(set(eps)) == 3  # composes over rounds
    for r in rows:
        assert len(r["dp_epsilon_experts"]) == SPEC.num_experts
        assert r["dp_epsilon_max_expert"] == max(r["dp_epsilon_experts"]) <= r["dp_epsilon_shared"]
        assert r["dp_trainers_shared"] == 6


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("policy", ["random", "greedy", "load_balanced", "dense"])
def test_no_expert_is_planned_to_fewer_than_min_trainers(policy):
    cfg = dp_config(**{"policy": policy, "dp-min-trainers": 3, "experts-per-client": 1})
    planner = Planner(cfg.planning, model_costs(SPEC))
    state = AlignmentState(SPEC.num_experts, **cfg.alignment_kwargs())
    glob = model_to_arrays(build_model(SPEC, seed=0))
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(7)]
    for _ in range(20):
        plan = planner.plan(state, ids, [{}] * len(ids), glob, rng)
        held = plan.assignment.any(axis=1)  # [C, E]: the experts of every client (layers tied)
        counts = held[~plan.frozen].sum(axis=0)
        assert ((counts == 0) | (counts >= 3)).all(), counts
        assert (held.sum(axis=1) >= 1).all()
        assert (held.sum(axis=1) <= 1).all() or policy == "dense"
    off = Planner(
        dp_config(**{"policy": policy, "dp": "off", "experts-per-client": 1}).planning, model_costs(SPEC)
    )
    plans = [
        off.plan(state, ids, [{}] * len(ids), glob, rng).assignment.any(axis=1).sum(axis=0) for _ in range(20)
    ]
    if policy != "dense":  # without the bound some expert does get 1 or 2 trainers
        assert any(((c > 0) & (c < 3)).any() for c in plans)


def test_enforce_min_trainers_keeps_a_valid_plan_and_refills():
    a = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]], dtype=bool)
    pref = np.tile([0.0, 1.0, 2.0, 3.0], (4, 1))
    out = enforce_min_trainers(a, np.ones(4, bool), pref, 2)
    counts = out.sum(axis=0)
    assert ((counts == 0) | (counts >= 2)).all()
    assert (out.sum(axis=1) == a.sum(axis=1)).all()  # every client refilled to what it held
    assert np.array_equal(enforce_min_trainers(a, np.ones(4, bool), pref, 1), a)
    lone = np.eye(4, dtype=bool)  # every expert with one trainer: all fall back to the favourite
    assert enforce_min_trainers(lone, np.ones(4, bool), pref, 3)[:, 3].all()


def test_a_dp_run_never_trains_an_expert_below_the_minimum():
    cfg = dp_config(**{"dp-min-trainers": 3, "experts-per-client": 1, "policy": "greedy"})
    _, grid, rows = run_strategy(cfg, nodes=5, rounds=3)
    for r in rows:
        n = np.array(r["dp_trainers_experts"])
        assert ((n == 0) | (n >= 3)).all() and np.array_equal(n, r["assigned_clients"])
    for _, arrays in grid.replied:
        assert {parse_expert_key(k)[0] for k in arrays if parse_expert_key(k)} <= {
            e for r in rows for e, n in enumerate(r["dp_trainers_experts"]) if n >= 3
        }


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value",
    [
        ("dp-clip-norm", -1.0),
        ("dp-clip-norm", 0.0),
        ("dp-noise-multiplier", -0.5),
        ("dp-delta", 1.0),
        ("dp-delta", 0.0),
        ("dp", "on"),
        ("aggregation", "median"),
    ],
)
def test_bad_dp_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_run_config({"dp": "central", key: value})


def test_gate_balance_rate_is_not_applied_under_dp():
    """The router-bias step would read the clients' raw routing histograms, unaccounted: rate 0."""
    cfg = RunConfig.from_run_config({"dp": "central", "gate-balance-rate": 0.1})
    assert cfg.gate_balance_rate == 0.1 and cfg.aggregation_rules.gate_balance_rate == 0
    assert RunConfig.from_run_config({"dp": "local"}).aggregation_rules.gate_balance_rate == 0


def test_min_trainers_above_the_clients_per_round_stops_the_run_at_start():
    cfg = dp_config(**{"dp-min-trainers": 5})
    with pytest.raises(ConfigError, match="'dp-min-trainers' = 5"):
        run_strategy(cfg, nodes=3, rounds=2)


def test_dp_off_takes_no_dp_path():
    strategy = FedMoE.from_run_config(dp_config(dp="off"), SPEC, model_to_arrays(build_model(SPEC, seed=0)))
    assert strategy.state.privacy is None and "accountant" not in strategy.state_dict()


class OneHugeReply(FakeGrid):
    """Node 1 adds 1e30 times a unit direction to what it was sent (finite in float32)."""

    def _train(self, node, m):
        content = super()._train(node, m)
        if node == 1:
            from fedmoe_app.wire.protocol import ARRAYS
            from fedmoe_app.wire.records import from_record, to_record

            arrays = from_record(content[ARRAYS])
            sent = from_record(m.content[ARRAYS])
            content[ARRAYS] = to_record(
                {
                    k: (sent[k] + np.sign(v - sent[k] + 1e-12) * 1e30).astype(v.dtype)
                    for k, v in arrays.items()
                }
            )
        return content


@pytest.mark.parametrize("huge", [False, True])
def test_local_dp_keeps_a_server_side_bound_an_honest_reply_never_reaches(huge):
    cfg = dp_config(**{"dp": "local", "dp-noise-multiplier": 1.0})
    start = model_to_arrays(build_model(SPEC, seed=0))
    strategy = FedMoE.from_run_config(cfg, SPEC, start)
    grid_class = OneHugeReply if huge else FakeGrid
    grid = grid_class(4, num_experts=SPEC.num_experts, top_k=SPEC.top_k, scale=0.5)
    rows = []
    strategy.start(grid, num_rounds=1, on_round=lambda row, arrays: rows.append((row, dict(arrays))))
    row, model = rows[-1]
    moved = delta_norm(update_delta(start, model))
    d = sum(v.size for v in start.values())
    assert np.isfinite(moved)
    if huge:  # clipped to what an honest noised reply can weigh, shared among the 4 replies
        assert row["dp_clipped"] == 1 and moved <= local_reply_bound(d, 1.0, 1.0) / 4 + 2 * 0.5
    else:  # honest replies (norm 0.5 here) are never scaled
        assert row["dp_clipped"] == 0 and moved <= 0.5
