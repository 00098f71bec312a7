"""Client evaluation: the personalized view per client, its worst 10 %, and bad replies rejected."""

import math

import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedmoe_app.config import RunConfig
from fedmoe_app.models import REFERENCE_SPEC, build_model, model_to_arrays
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.wire.protocol import CLIENT, METRICS, client_record


def reply(node, client_id, n, loss, acc, **text):
    metrics = {"num-examples": n, "eval-loss": loss, "eval-accuracy": acc}
    metrics |= {f"eval-{k}": v for k, v in text.items()}  # bpb=..., bytes=...
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if client_id is not None:
        content[CLIENT] = client_record(client_id)
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="evaluate",
    )
    return Message(content=content, metadata=meta)


@pytest.fixture
def strategy():
    s = FedMoE.from_run_config(RunConfig(), REFERENCE_SPEC, model_to_arrays(build_model(REFERENCE_SPEC)))
    # as discovery leaves it: node i is client c<i> with a local test split of 500 examples
    s.state.nodes.clients = {i: f"c{i}" for i in range(20)}
    s.state.nodes.profiles = {f"c{i}": {"num-test-examples": 500} for i in range(20)}
    return s


def test_per_client_accuracy_and_worst_ten_percent(strategy):
    # 12 clients: accuracies 0.0, 0.1, ..., 1.1 capped below 1; worst 10 % of 12 = 2 clients
    replies = [reply(i, f"c{i}", 10 * (i + 1), 1.0 + i, min(i / 10, 1.0)) for i in range(12)]
    out = strategy.evaluate_round(replies)
    n = [10 * (i + 1) for i in range(12)]
    acc = [min(i / 10, 1.0) for i in range(12)]
    assert out.num_examples == sum(n)
    assert out.accuracy == pytest.approx(sum(a * k for a, k in zip(acc, n)) / sum(n))
    assert out.loss == pytest.approx(sum((1.0 + i) * k for i, k in enumerate(n)) / sum(n))
    assert out.worst10_accuracy == pytest.approx((0.0 + 0.1) / 2)
    assert out.by_client["c3"] == pytest.approx(0.3) and len(out.by_client) == 12
    record = out.metric_record()
    assert record["eval-accuracy-worst10"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ((None, 10, 0.5, 0.5), "client-id"),  # names no client
        (("c1", 10, 0.5, 0.5), "client-id"),  # another node's client (spoofed id)
        (("c2", 10, 0.5, 999999.9998), "metrics"),  # accuracy out of [0, 1]
        (("c2", 10, math.nan, 0.5), "metrics"),  # non-finite loss
        (("c2", 10, -1.0, 0.5), "metrics"),  # negative loss
        (("c2", 10, 0.5, [0.5]), "metrics"),  # a list, not a number
        (("c2", 0, 0.5, 0.5), "num-examples"),  # no examples
        (("c2", 10**12, 0.5, 0.5), "num-examples"),  # more than its test split: would outweigh all
    ],
)
def test_malformed_evaluation_replies_are_rejected_and_counted(strategy, bad, reason):
    good = reply(1, "c1", 20, 0.7, 0.8)
    out = strategy.evaluate_round([good, reply(2, *bad)])
    assert out.by_client == {"c1": 0.8} and out.accuracy == 0.8 and out.worst10_accuracy == 0.8
    assert out.rejected == {reason: 1}
    alone = strategy.evaluate_round([reply(2, *bad)])
    assert alone.by_client == {} and alone.metric_record() is None and alone.rejected == {reason: 1}
    assert math.isnan(alone.accuracy)


def test_rejections_reach_the_metrics_row(strategy):
    from fedmoe_app.server.rounds import EvaluateOutcome

    out = strategy.evaluate_round([reply(1, "c1", 20, 0.7, 0.8), reply(2, "c2", 20, 0.7, 2.0)])
    assert isinstance(out, EvaluateOutcome) and out.rejected == {"metrics": 1}
    assert out.metric_record()["eval-accuracy"] == pytest.approx(0.8)


def test_text_clients_bits_per_byte_are_weighted_by_their_bytes(strategy):
    # two text clients: 2.0 bits/byte over 1000 bytes and 4.0 over 3000 -> 3.5 bits/byte overall
    out = strategy.evaluate_round(
        [reply(1, "c1", 20, 3.0, 0.4, bpb=2.0, bytes=1000), reply(2, "c2", 20, 5.0, 0.3, bpb=4.0, bytes=3000)]
    )
    assert out.bpb == pytest.approx(3.5) and out.loss == pytest.approx(4.0)  # loss: per token, by windows
    images = strategy.evaluate_round([reply(1, "c1", 20, 3.0, 0.4)])
    assert math.isnan(images.bpb)


@pytest.mark.parametrize(
    "text",
    [
        {"bpb": 2.0},  # bits per byte without the bytes they weigh
        {"bytes": 100},  # bytes without bits
        {"bpb": 2.0, "bytes": 0},
        {"bpb": 2.0, "bytes": 10.5},
        {"bpb": math.inf, "bytes": 100},
        {"bpb": -1.0, "bytes": 100},
    ],
)
def test_malformed_text_evaluation_replies_are_rejected(strategy, text):
    out = strategy.evaluate_round(
        [reply(1, "c1", 20, 0.7, 0.8, bpb=1.0, bytes=50), reply(2, "c2", 20, 0.7, 0.5, **text)]
    )
    assert out.rejected == {"metrics": 1} and out.bpb == pytest.approx(1.0)
