"""End-to-end: the real app through `flwr run` with a private SuperLink."""

import numpy as np
import psutil
import pytest
from conftest import read_metrics

from fedmoe_app.run.results import METRIC_KEYS

pytestmark = pytest.mark.slow


def flower_processes(flwr_home):
    """Processes still running that belong to the run using ``flwr_home``."""
    left = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
        except psutil.Error:
            continue
        if env.get("FLWR_HOME") == str(flwr_home):
            left.append(" ".join(p.info["cmdline"] or []))
    return left


def test_flwr_run_trains_sparse_moe_and_writes_outputs(run_app):
    code, out, log = run_app(
        {"num-server-rounds": 2, "policy": "random", "experts-per-client": 2}, num_supernodes=3
    )
    assert code == 0, log[-3000:]
    rounds = read_metrics(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for key in METRIC_KEYS:
        assert key in rounds[-1]
    last = rounds[-1]
    assert last["accuracy"] > rounds[0]["accuracy"]
    # every client got exactly shared + 2 experts: sparse download
    assert set(last["assignment"]) == {"0", "1", "2"}
    assert all(len(v) == 2 for v in last["assignment"].values())
    assert last["bytes_down"] <= 0.45 * last["dense_bytes_down"]
    assert last["bytes_up"] > 0 and last["failures"] == 0
    # tokens were trained exactly on the experts somebody was assigned
    assigned = {e for v in last["assignment"].values() for e in v}
    assert len(last["expert_load"]) == 8
    assert {e for e, load in enumerate(last["expert_load"]) if load > 0} == assigned
    for name in (
        "config.json",
        "metrics.csv",
        "accuracy_loss.png",
        "expert_load.png",
        "assignment.png",
        "final_model.npz",
        "checkpoint.npz",
    ):
        assert (out / name).is_file(), name
    assert not flower_processes(out.parents[1] / "flwr-home")


def test_policies_differ_and_never_exceed_capacity(run_app):
    """Real runs: each policy plans differently; no client is ever sent more than its capacity."""
    plans = {}
    for policy in ("random", "greedy", "load_balanced"):
        code, out, log = run_app(
            {
                "num-server-rounds": 3,
                "policy": policy,
                "experts-per-client": 4,
                "device-mix": "phone=0.5,laptop=0.5",
                "fraction-evaluate": 0.0,
                "max-samples-per-client": 200,
            },
            num_supernodes=4,
            run_name=f"policy-{policy}",
        )
        assert code == 0, log[-3000:]
        rounds = read_metrics(out)[1:]
        for r in rounds:
            assert r["assignment"] and len(r["expert_load"]) == 8
            clients_per_expert = np.bincount([e for v in r["assignment"].values() for e in v], minlength=8)
            assert r["assigned_clients"] == clients_per_expert.tolist()
            assert r["load_cv"] == pytest.approx(clients_per_expert.std() / clients_per_expert.mean())
            for cid, experts in r["assignment"].items():
                assert 1 <= len(experts) <= max(r["capacity"][cid], 1), (policy, r["round"], cid)
        assert {c for r in rounds for c in r["capacity"].values()} == {1, 4}  # phones and laptops
        plans[policy] = [r["assignment"] for r in rounds]
    assert plans["random"] != plans["greedy"] != plans["load_balanced"] != plans["random"]
