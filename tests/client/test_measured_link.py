"""Measured link speed: real handlers time the server's train messages, the server's profile follows.

The grid delivers each train message as if it had been in flight for a known time (it moves the
server's ``sent-at`` stamp back), so the expected estimate is exact up to the handler's first
milliseconds. The tiny model's payload is under the real minimum sample size, which the tests
lower to 1 byte.
"""

import time

import pytest
from fake_federation import ClientGrid
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_client_rounds import KEYS

from fedmoe_app.capacity import DEVICE_CLASSES, link
from fedmoe_app.capacity.probe import DEFAULT_MBPS
from fedmoe_app.client.link import LINK_STATE, link_estimate, observe_train_message
from fedmoe_app.config import RunConfig
from fedmoe_app.data import load_splits
from fedmoe_app.models import build_model, model_spec, model_to_arrays
from fedmoe_app.server.strategy import FedMoE

MEASURED_NODE, PHONE_NODE = 1, 2


@pytest.fixture(autouse=True)
def _small_payloads_count(monkeypatch):
    monkeypatch.setattr(link, "MIN_SAMPLE_BYTES", 1)
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # messages of a ServerApp run
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def _mbps(nbytes, seconds):
    return 8 * nbytes / seconds / 1e6


def test_a_timed_message_is_stored_and_a_skewed_one_rejected():
    context = Context(0, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), {})
    now = time.time()
    est = observe_train_message(
        ConfigRecord({"payload-bytes": 2_500_000, "sent-at": now - 2.0}), now, context
    )
    assert est.down_mbps == pytest.approx(10.0) and est.samples == 1
    assert link_estimate(context) == est and LINK_STATE in context.state
    skewed = ConfigRecord({"payload-bytes": 2_500_000, "sent-at": now + 3.0})  # the server's clock is ahead
    assert observe_train_message(skewed, now, context) == type(est)(est.down_mbps, 1, 1)
    unstamped = ConfigRecord({"payload-bytes": 2_500_000})  # a server that does not stamp: no change
    assert observe_train_message(unstamped, now, context) == link_estimate(context)


class DelayingGrid(ClientGrid):
    """Node 1 (measured) and node 2 (a phone) answering through the real handlers.

    Round ``r``'s train messages look ``delays[r]`` seconds old on arrival (``None``: stamped
    in the client's future, a skewed clock).
    """

    def __init__(self, run_config, delays):
        super().__init__(run_config, 2, node_configs={PHONE_NODE: {"device-class": "phone"}})
        self.delays = delays
        self.samples = []  # expected down-link samples of node 1
        self.query_mbps = {}  # node -> down-mbps its query reply reported

    def send_and_receive(self, messages, timeout):
        for m in messages:
            if m.metadata.message_type == "train":
                conf = m.content["config"]
                delay = self.delays[conf["server-round"]]
                conf["sent-at"] = time.time() - delay if delay is not None else time.time() + 30.0
                if m.metadata.dst_node_id == MEASURED_NODE and delay is not None:
                    self.samples.append(_mbps(conf["payload-bytes"], delay))
        replies = super().send_and_receive(messages, timeout)
        for r in replies:
            if r.metadata.message_type == "query":
                self.query_mbps[r.metadata.src_node_id] = r.content["profile"]["down-mbps"]
        return replies


def test_the_measured_link_reaches_the_servers_profile_and_a_phone_keeps_its_own():
    keys = {**KEYS, "num-server-rounds": 3, "fraction-evaluate": 0.0}
    cfg = RunConfig.from_run_config(keys)
    spec = model_spec(cfg, load_splits("synthetic", "", 0)[2])
    grid = DelayingGrid(keys, {1: 1.0, 2: 0.25, 3: None})
    strategy = FedMoE.from_run_config(cfg, spec, model_to_arrays(build_model(spec, seed=0)))
    rows = []
    strategy.start(grid, num_rounds=3, on_round=lambda row, arrays: rows.append(row))
    assert [r["valid_replies"] for r in rows] == [2, 2, 2]
    # first round: nothing measured yet, the default; the phone plays its class
    phone = DEVICE_CLASSES["phone"]
    assert grid.query_mbps == {MEASURED_NODE: DEFAULT_MBPS, PHONE_NODE: phone.down_mbps}
    # node 1 timed rounds 1 and 2 (round 3's skewed stamp rejected): an EMA of the two
    est = link_estimate(grid.contexts[MEASURED_NODE])
    assert (est.samples, est.rejected) == (2, 1)
    expected = link.LINK_EMA * grid.samples[1] + (1 - link.LINK_EMA) * grid.samples[0]
    assert est.down_mbps == pytest.approx(expected, rel=0.02)
    profiles = strategy.state.profiles
    measured, phone_profile = profiles["0"], profiles["1"]
    assert measured["down-mbps"] == measured["up-mbps"] == est.down_mbps
    assert (phone_profile["down-mbps"], phone_profile["up-mbps"]) == (phone.down_mbps, phone.up_mbps)
    assert link_estimate(grid.contexts[PHONE_NODE]).samples == 0  # an emulated class does not measure
