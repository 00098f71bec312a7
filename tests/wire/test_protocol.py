"""Reply validation: every kind of malformed reply is rejected with its reason."""

import numpy as np
import pytest
import torch
from conftest import make_spec, train_args
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmoe_app.client import faults
from fedmoe_app.client.handlers import result_feedback
from fedmoe_app.data import load_splits
from fedmoe_app.models import build_model, model_to_arrays
from fedmoe_app.training import train
from fedmoe_app.wire.holdings import holding_from_lists
from fedmoe_app.wire.protocol import (
    CLIENT,
    FEEDBACK,
    METRICS,
    ReplyRejected,
    Sent,
    parse_train_reply,
    train_reply_content,
)
from fedmoe_app.wire.records import to_record

SPEC = make_spec(image_size=12)
EXPERTS = [1, 4]


@pytest.fixture(scope="module")
def reply():
    """A genuine train reply from a client that trained experts 1 and 4 on synthetic data."""
    torch.manual_seed(0)
    model = build_model(SPEC, EXPERTS)
    train_split, _, _ = load_splits("synthetic", "", 0)
    data = train_split.subset(np.arange(64))
    res = train(model, data, **train_args(epochs=1, batch_size=32, lr=0.05))
    arrays = model_to_arrays(model)
    metrics = {"num-examples": res.num_examples, "train-loss": res.loss}
    feedback = result_feedback(res)
    content = train_reply_content(to_record(arrays), metrics, feedback, "c7")
    held = holding_from_lists(EXPERTS, 1, SPEC.num_experts)
    sent = Sent("c7", held, {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}, max_examples=64)
    return content, sent


def parse(content, sent):
    return parse_train_reply(content, 11, sent, top_k=SPEC.top_k, local_epochs=1)


def test_genuine_reply_is_accepted(reply):
    content, sent = reply
    out = parse(content, sent)
    assert out.client_id == "c7" and out.update.num_examples == 64
    assert out.update.tokens.sum() == 64 * 2 and set(np.flatnonzero(out.update.tokens)) <= set(EXPERTS)


@pytest.mark.parametrize("kind", faults.CORRUPTIONS)
def test_each_corruption_is_rejected_with_its_reason(reply, kind):
    content, sent = reply
    with pytest.raises(ReplyRejected) as err:
        parse(faults.corrupt(content, kind), sent)
    assert err.value.reason == faults.EXPECTED_REASON[kind]


def _with(content, **records):
    out = RecordDict(dict(content.items()))
    for k, v in records.items():
        out[k] = v
    return out


def test_other_malformed_replies(reply):
    content, sent = reply
    metrics, fb = dict(content[METRICS]), dict(content[FEEDBACK])

    def with_metrics(**kv):
        return _with(content, **{METRICS: MetricRecord({**metrics, **kv})})

    def with_feedback(**kv):
        return _with(content, **{FEEDBACK: MetricRecord({**fb, **kv})})

    not_held = list(fb["layer-tokens"])
    not_held[0] = 5.0  # expert 0 was not sent
    cases = [
        ("malformed", RecordDict({CLIENT: content[CLIENT]})),
        ("client-id", _with(content, **{CLIENT: ConfigRecord({"client-id": "someone-else"})})),
        ("num-examples", with_metrics(**{"num-examples": 0})),
        ("num-examples", with_metrics(**{"num-examples": -3})),
        ("num-examples", with_metrics(**{"num-examples": 2.5})),
        ("num-examples", with_metrics(**{"num-examples": 65})),  # more than the client holds
        ("feedback", with_feedback(**{"layer-tokens": [1.0, 2.0]})),
        ("feedback", with_feedback(**{"layer-gate-hist": [float("nan")] * 8})),
        ("feedback", with_feedback(**{"layer-tokens": not_held})),
        ("feedback", with_feedback(**{"layer-tokens": [1e6 if i in EXPERTS else 0.0 for i in range(8)]})),
        ("feedback", with_feedback(**{"layer-loss-sum": [1.0] * 8})),  # loss where no tokens went
    ]
    for reason, bad in cases:
        with pytest.raises(ReplyRejected) as err:
            parse(bad, sent)
        assert err.value.reason == reason


def test_fault_plan_is_deterministic_and_follows_probabilities():
    ids = [str(i) for i in range(4000)]
    plan = [faults.fault_for(0, 3, c, 0.3, 0.1, 0.2) for c in ids]
    assert plan == [faults.fault_for(0, 3, c, 0.3, 0.1, 0.2) for c in ids]
    share = {k: plan.count(k) / len(ids) for k in ("drop", "slow", "corrupt")}
    assert (
        abs(share["drop"] - 0.3) < 0.03
        and abs(share["slow"] - 0.1) < 0.03
        and abs(share["corrupt"] - 0.2) < 0.03
    )
    assert plan != [faults.fault_for(0, 4, c, 0.3, 0.1, 0.2) for c in ids]
    assert all(faults.fault_for(0, r, "x", 0, 0, 0) is None for r in range(100))
    kinds = {faults.corruption_for(0, r, c) for r in range(20) for c in ids[:50]}
    assert kinds == set(faults.CORRUPTIONS)


def test_ray_node_id_is_read_when_plausible_and_ignored_otherwise(reply):
    from fedmoe_app.client.placement import ray_node_id
    from fedmoe_app.wire.protocol import RAY_NODE

    content, sent = reply
    assert parse(content, sent).ray_node is None  # outside Ray a client names no node
    assert ray_node_id() is None  # this test process is no Ray worker
    for value, expected in (("ab12", "ab12"), ("", None), ("x" * 129, None), (7, None)):
        record = ConfigRecord({"client-id": "c7", RAY_NODE: value})
        tampered = RecordDict({**{k: content[k] for k in content}, CLIENT: record})
        assert parse(tampered, sent).ray_node == expected, value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train-loss", float("nan")),
        ("train-loss", -0.5),
        ("train-loss", float("inf")),
        ("train-accuracy", 1.5),
        ("train-time-s", -1.0),
        ("samples-per-s", 1e300),
        ("peak-memory-bytes", 1e300),
    ],
)
def test_a_measured_number_out_of_range_rejects_the_reply(reply, key, value):
    content, sent = reply
    bad = _with(content, **{METRICS: MetricRecord({**dict(content[METRICS]), key: value})})
    with pytest.raises(ReplyRejected, match=key) as err:
        parse(bad, sent)
    assert err.value.reason == "metrics"


def test_measured_numbers_in_range_are_kept_and_absent_ones_left_out(reply):
    content, sent = reply
    measured = {"train-accuracy": 0.5, "train-time-s": 2.0, "samples-per-s": 32.0, "peak-memory-bytes": 1e8}
    out = parse(_with(content, **{METRICS: MetricRecord({**dict(content[METRICS]), **measured})}), sent)
    assert out.metrics == {"train-loss": pytest.approx(out.loss), **measured} and np.isfinite(out.loss)
    assert set(parse(content, sent).metrics) == {"train-loss"}


def test_all_tokens_piled_on_one_expert_are_refused(reply):
    """k = 2 of 2 held experts on 64 examples: each expert can take at most 64 routes, not 128."""
    content, sent = reply
    fb = dict(content[FEEDBACK])
    honest = list(fb["layer-tokens"])
    assert max(honest) == 64 and sum(honest) == 128  # every route reached both held experts
    piled = [128.0 if i == EXPERTS[0] else 0.0 for i in range(len(honest))]
    loss = [1.0 if i == EXPERTS[0] else 0.0 for i in range(len(honest))]
    bad = _with(content, **{FEEDBACK: MetricRecord({**fb, "layer-tokens": piled, "layer-loss-sum": loss})})
    with pytest.raises(ReplyRejected, match="an expert's token count exceeds its layer's routes") as err:
        parse(bad, sent)
    assert err.value.reason == "feedback"
