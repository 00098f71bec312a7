"""Discovery: client ids from queries; a node that never answers is not re-asked every time."""

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.server.discovery import Discovery
from fedmoe_app.wire.protocol import CLIENT, client_record


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Flower builds messages for the running ServerApp's run: give the test one."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class FakeGrid:
    """Nodes 1..n; nodes in ``silent`` never answer a query."""

    def __init__(self, n, silent=()):
        self.n, self.silent, self.asked = n, set(silent), []

    def get_node_ids(self):
        return list(range(1, self.n + 1))

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            self.asked.append(m.metadata.dst_node_id)
            if m.metadata.dst_node_id in self.silent:
                continue
            meta = Metadata(1, "m", m.metadata.dst_node_id, 0, "", "1", 0.0, 60.0, "query")
            content = RecordDict({CLIENT: client_record(f"c{10 - m.metadata.dst_node_id}")})
            replies.append(Message(content=content, metadata=meta))
        return replies


def test_known_nodes_sorted_by_client_id_and_silent_nodes_retried_later():
    grid = FakeGrid(4, silent={3})
    disco = Discovery(timeout_s=5.0, retry_rounds=3)
    nodes, failed = disco.known_nodes(grid, 1, server_round=1)
    assert nodes == [4, 2, 1] and failed == 1  # client ids c6, c8, c9
    assert sorted(grid.asked) == [1, 2, 3, 4]
    for rnd in (1, 2, 3):  # the same round (evaluation sampling) and the next two: not asked
        assert disco.known_nodes(grid, 1, server_round=rnd) == ([4, 2, 1], 0)
    assert grid.asked.count(3) == 1
    grid.silent.clear()
    nodes, failed = disco.known_nodes(grid, 1, server_round=4)  # 3 rounds later: asked again
    assert nodes == [4, 3, 2, 1] and failed == 0 and grid.asked.count(3) == 2  # c7 joins


class ClaimingGrid:
    """Connected nodes each answer for client ``c9`` with the example count of ``claims[node]``."""

    def __init__(self, claims):
        self.claims = claims

    def get_node_ids(self):
        return sorted(self.claims)

    def send_and_receive(self, messages, timeout):
        from flwr.app import ConfigRecord

        from fedmoe_app.wire.protocol import PROFILE

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            meta = Metadata(1, "m", node, 0, "", "1", 0.0, 60.0, "query")
            profile = ConfigRecord({"num-examples": self.claims[node], "num-test-examples": 50})
            out.append(
                Message(content=RecordDict({CLIENT: client_record("c9"), PROFILE: profile}), metadata=meta)
            )
        return out


def test_the_first_example_count_stays_the_bound_across_reconnects_and_resume():
    disco = Discovery(timeout_s=5.0, retry_rounds=1)
    assert disco.known_nodes(ClaimingGrid({1: 452}), 1, server_round=1) == ([1], 0)
    assert disco.profiles["c9"]["num-examples"] == 452
    # the client reconnects under node id 5 and claims 10^12 examples: the bound does not move
    assert disco.known_nodes(ClaimingGrid({5: 10**12}), 1, server_round=2) == ([5], 0)
    assert disco.profiles["c9"]["num-examples"] == 452 and disco.bound_changes == 1
    # the server resumes from a checkpoint (profiles restored, node ids learned anew)
    resumed = Discovery(timeout_s=5.0, retry_rounds=1)
    resumed.restore_profiles(disco.profiles)
    resumed.known_nodes(ClaimingGrid({7: 10**12}), 1, server_round=3)
    assert resumed.profiles["c9"]["num-examples"] == 452 and resumed.bound_changes == 1
    # the same count again is no change
    resumed.known_nodes(ClaimingGrid({7: 452, 8: 452}), 1, server_round=4)
    assert resumed.bound_changes == 1
