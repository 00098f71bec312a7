"""Many clients: discovery asks only sampled nodes, once; server state grows with clients seen.

The in-process federation (``fake_federation.FakeGrid``) counts the messages every node is
sent, so these tests count what discovery costs at 200 nodes of which a few never answer.
"""

import json

import pytest
from conftest import make_spec
from fake_federation import FakeGrid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import RunConfig
from fedmoe_app.models import build_model, model_to_arrays
from fedmoe_app.server.strategy import FedMoE

SPEC = make_spec(num_experts=4, top_k=2, stem_channels=2, feature_dim=4, expert_hidden=8)
NODES, SILENT, ROUNDS = 200, {7, 50, 123, 199}, 6


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def run(discovery, rounds=ROUNDS):
    cfg = RunConfig.from_run_config(
        {
            "capacity": "fixed",
            "experts-per-client": 2,
            "num-experts": 4,
            "fraction-train": 0.05,
            "min-train-nodes": 2,
            "fraction-evaluate": 0.0,
            "min-evaluate-nodes": 0,
            "discovery": discovery,
            "round-timeout-s": 1.0,
        }
    )
    s = FedMoE.from_run_config(cfg, SPEC, model_to_arrays(build_model(SPEC, seed=0)))
    grid = FakeGrid(NODES, num_experts=4, top_k=2, scale=0.1, silent=SILENT)
    rows = []
    s.start(grid, num_rounds=rounds, on_round=lambda row, arrays: rows.append(row))
    return s, grid, rows


def test_sampled_discovery_queries_only_sampled_nodes_and_each_once():
    s, grid, rows = run("sampled")
    queries, trained = grid.asked["query"], grid.asked["train"]
    assert len(rows) == ROUNDS
    assert all(n == 1 for node, n in queries.items() if node not in SILENT)  # asked once, ever
    assert set(trained) <= set(queries) and not set(trained) & SILENT  # only sampled nodes asked
    per_round = int(NODES * 0.05)
    assert sum(queries.values()) <= per_round * ROUNDS < NODES  # not the whole federation
    assert s.state.nodes.queries_sent == sum(queries.values())
    # every round trains its sample minus the silent nodes drawn into it
    assert sum(r["valid_replies"] for r in rows) == sum(trained.values())
    assert all(per_round - len(SILENT) <= r["valid_replies"] <= per_round for r in rows)
    # state on the server: the clients seen, not the federation
    seen = {f"c{n}" for n in queries if n not in SILENT}
    assert set(s.state.profiles) <= seen and set(s.state.alignment.client_ids) <= seen
    assert set(s.state.last_held) == {f"c{n}" for n in trained}


def test_all_discovery_queries_everyone_first_and_backs_off_silent_nodes():
    s, grid, rows = run("all", rounds=9)
    queries = grid.asked["query"]
    assert set(queries) == set(range(1, NODES + 1))
    assert all(queries[n] == 1 for n in queries if n not in SILENT)
    # a silent node is asked in rounds 1, 2, 4 and 8 (waits 1, 2, 4 rounds), not in all 9
    assert all(queries[n] == 4 for n in SILENT)
    assert all(r["failures"] == (len(SILENT) if r["round"] in (1, 2, 4, 8) else 0) for r in rows)


def test_checkpoint_state_grows_with_clients_seen_not_with_the_federation():
    sizes = {}
    for rounds in (2, 6):
        s, grid, _ = run("sampled", rounds=rounds)
        seen = len([n for n in grid.asked["query"] if n not in SILENT])
        sizes[rounds] = (seen, len(json.dumps(s.state_dict())))
    (seen2, size2), (seen6, size6) = sizes[2], sizes[6]
    assert seen6 > seen2
    per_client = (size6 - size2) / (seen6 - seen2)
    assert 0 < per_client < 2000  # bytes of JSON per client seen (fitness row, profile, experts)
    assert size6 < 2000 * seen6 + 20000  # nothing per unseen node


def test_rounds_record_where_the_server_time_went():
    _, _, rows = run("sampled", rounds=2)
    for row in rows:
        timing = row["timing_s"]
        assert set(timing) == {
            "configure",
            "planning",
            "aggregate",
            "evaluate_server",
            "central_eval",
            "clients",
            "link",
        }
        assert all(v >= 0 for v in timing.values())
        assert timing["planning"] <= timing["configure"]
        assert sum(timing.values()) - timing["planning"] <= row["wall_time_s"] + 1e-6


def test_timed_grid_takes_the_wait_out_of_the_server_time():
    import time

    from fedmoe_app.server.timing import TimedGrid, server_time

    class SlowGrid:
        def send_and_receive(self, messages, *, timeout=None):
            time.sleep(0.3)
            return iter(messages)

        def get_node_ids(self):
            time.sleep(0.2)
            return [1, 2]

    grid = TimedGrid(SlowGrid())

    def phase():
        return grid.send_and_receive(["m"]), grid.get_node_ids()

    (replies, nodes), own = server_time(grid, phase)
    assert replies == ["m"] and nodes == [1, 2]
    assert grid.clients_s >= 0.3 and grid.link_s >= 0.2
    assert own < 0.15  # the 0.5 s of waiting is not the server's


@pytest.mark.slow
def test_scale_benchmark_writes_every_figure_and_the_plot(tmp_path, capsys):
    from fedmoe_app.tools import bench

    argv = ["scale", "--supernodes", "4", "--sampled", "2", "--rounds", "2", "--dataset", "synthetic"]
    assert bench.main([*argv, "--out", str(tmp_path), "--timeout", "400"]) == 0
    (res,) = json.loads((tmp_path / "scale.json").read_text())
    assert res["supernodes"] == 4 and res["sampled_per_round"] == 2 and res["rounds"] == 2
    assert 0 < res["startup_s"] < res["total_s"]
    assert 0 < res["planning_s"] <= res["configure_s"] and res["aggregate_s"] > 0
    assert all(res["peak_rss_bytes"][g] > 0 for g in ("superlink", "serverapp", "ray"))
    assert res["checkpoint_bytes"] > 0 and res["checkpoint_save_s"] > 0
    assert res["checkpoint_clients_seen"] <= 4
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert "    4       2" in capsys.readouterr().out
