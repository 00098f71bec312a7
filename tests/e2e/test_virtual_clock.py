"""In simulation the virtual clock is deterministic: emulated classes alone set it."""

import pytest
from conftest import read_metrics

pytestmark = pytest.mark.slow

CONFIG = {
    "num-server-rounds": 2,
    "device-mix": "phone=0.4,laptop=0.3,edge=0.3",
    "round-deadline-s": 0.4,
    "fraction-evaluate": 0.0,
    "max-samples-per-client": 300,
}


def test_same_config_and_seed_give_the_same_virtual_times_and_budgets(run_app):
    runs = []
    for name in ("clock-a", "clock-b"):
        code, out, log = run_app(CONFIG, num_supernodes=4, run_name=name)
        assert code == 0, log[-3000:]
        runs.append(read_metrics(out)[1:])
    keys = ("virtual_round_time_s", "sample_budget", "capacity", "assignment")
    first, second = ([{k: r[k] for k in keys} for r in rows] for rows in runs)
    assert first == second
    times = [r["virtual_round_time_s"] for r in first]
    assert all(t is not None and t > 0 for t in times), times
    # the deadline shrank someone's local work: the budgets are in play, not all zero
    assert any(b > 0 for r in first for b in r["sample_budget"].values()), first
