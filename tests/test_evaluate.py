"""Client evaluation: the personalized view per client, its worst 10 %, and bad replies left out."""

import math

import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict

from fedmoe_app.config import RunConfig
from fedmoe_app.federation.protocol import CLIENT, METRICS, client_record
from fedmoe_app.federation.strategy import FedMoE
from fedmoe_app.models import REFERENCE_SPEC, build_model, model_to_arrays


def reply(node, client_id, n, loss, acc):
    content = RecordDict(
        {METRICS: MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": acc})}
    )
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


@pytest.fixture(scope="module")
def strategy():
    return FedMoE(RunConfig(), REFERENCE_SPEC, model_to_arrays(build_model(REFERENCE_SPEC)))


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
    "bad",
    [
        (None, 10, 0.5, 0.5),  # names no client
        ("x", 10, 0.5, 999999.9998),  # accuracy out of [0, 1]
        ("x", 10, math.nan, 0.5),  # non-finite loss
        ("x", 0, 0.5, 0.5),  # no examples
    ],
)
def test_malformed_evaluation_replies_are_left_out(strategy, bad):
    good = reply(1, "ok", 20, 0.7, 0.8)
    out = strategy.evaluate_round([good, reply(2, *bad)])
    assert out.by_client == {"ok": 0.8} and out.accuracy == 0.8 and out.worst10_accuracy == 0.8
    assert strategy.evaluate_round([reply(2, *bad)]) is None
