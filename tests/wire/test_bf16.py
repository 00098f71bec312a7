"""The bf16 wire: encoding (as torch rounds), decoding, bytes, and bf16 replies checked like fp32 ones."""

import dataclasses
from io import BytesIO

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedmoe_app.client import faults
from fedmoe_app.wire.holdings import holding_from_lists
from fedmoe_app.wire.protocol import ARRAYS, ReplyRejected, Sent, parse_train_reply, train_reply_content
from fedmoe_app.wire.records import (
    BF16,
    bf16_decode,
    bf16_encode,
    from_record,
    record_wire_dtype,
    reply_record,
    to_record,
    wire_dtype_of,
    wire_dtypes,
    wire_nbytes,
)

E = 4


def values(seed=0, n=20000):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n) * np.exp(rng.uniform(-30, 30, size=n))
    return x.astype(np.float32)


def test_encoding_rounds_as_torch_and_the_round_trip_is_within_2_to_the_minus_8():
    x = values()
    bits = bf16_encode(x)
    assert bits.dtype == np.uint16
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, torch_bits)  # round to nearest, ties to even
    back = bf16_decode(bits)
    assert back.dtype == np.float32
    assert (np.abs(back - x) <= 2**-8 * np.abs(x)).all()
    assert (np.abs(back - x) > 2**-10 * np.abs(x)).any()  # it did round
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)  # halfway: to the even neighbour
    assert bf16_decode(bf16_encode(ties)).tolist() == [1.0, 1 + 2**-6]
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38], np.float32)
    out = bf16_decode(bf16_encode(special))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == 0 and out[5] == np.inf


def test_a_bf16_record_is_marked_half_the_bytes_and_decodes_to_float32():
    arrays = {"w": values(1, 4096).reshape(64, 64), "ids": np.arange(10, dtype=np.int64)}
    fp32, bf16 = to_record(arrays), to_record(arrays, "bf16")
    assert wire_dtypes(bf16) == {"w": BF16, "ids": "int64"} and record_wire_dtype(bf16) == "bf16"
    assert wire_dtypes(fp32) == {"w": "float32", "ids": "int64"} and record_wire_dtype(fp32) == "fp32"
    assert bf16["w"].shape == (64, 64)
    assert wire_nbytes(ArrayRecord({"w": bf16["w"]})) == pytest.approx(
        wire_nbytes(ArrayRecord({"w": fp32["w"]})) / 2, rel=0.02
    )
    back = from_record(bf16)
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], bf16_decode(bf16_encode(arrays["w"])))
    assert np.array_equal(back["ids"], arrays["ids"])
    assert wire_dtype_of(arrays["w"], "bf16") == BF16 and wire_dtype_of(arrays["ids"], "bf16") == "int64"
    with pytest.raises(ValueError, match="wire dtype"):
        to_record(arrays, "fp16")


@pytest.fixture
def reply():
    """A bf16 train reply of a client that held experts 1 and 3, and what the server sent it."""
    rng = np.random.default_rng(0)
    sent_arrays = {
        "gate.weight": rng.normal(size=(E, 8)).astype(np.float32),
        "experts.1.w1": rng.normal(size=(8, 16)).astype(np.float32),
        "experts.3.w1": rng.normal(size=(8, 16)).astype(np.float32),
    }
    received = from_record(to_record(sent_arrays, "bf16"))  # what the client decodes
    trained = {k: v + 1e-3 * rng.normal(size=v.shape).astype(np.float32) for k, v in received.items()}
    held = holding_from_lists([1, 3], 1, E)
    tokens = np.where(held, 10.0, 0.0)
    feedback = {"layer-tokens": tokens, "layer-loss-sum": tokens, "layer-gate-hist": np.full((1, E), 5.0)}
    content = train_reply_content(
        reply_record(trained, received, "bf16"), {"num-examples": 20}, feedback, "c1"
    )
    shapes = {k: (v.shape, wire_dtype_of(v, "bf16")) for k, v in sent_arrays.items()}
    return content, Sent("c1", held, shapes, max_examples=20, base=sent_arrays), trained, sent_arrays


def parse(content, sent):
    return parse_train_reply(content, 1, sent, top_k=2, local_epochs=1)


def test_a_bf16_reply_is_its_change_added_to_the_servers_float32_copy(reply):
    content, sent, trained, sent_arrays = reply
    assert set(wire_dtypes(content[ARRAYS]).values()) == {BF16}
    out = parse(content, sent).update.arrays
    for k, v in out.items():
        change = trained[k] - from_record(to_record(sent_arrays, "bf16"))[k]
        expected = sent_arrays[k] + change  # the client's change on the server's unrounded weights
        assert v.dtype == np.float32
        assert np.abs(v - expected).max() <= 2**-8 * np.abs(change).max()
        assert np.abs(v - trained[k]).max() > 1e-4  # not the client's bf16-rounded start


def _with_arrays(content, arrays_record):
    return RecordDict({**{k: content[k] for k in content}, ARRAYS: arrays_record})


def _npy(value):
    buf = BytesIO()
    np.save(buf, value)
    return buf.getvalue()


def test_malformed_bf16_replies_are_rejected(reply):
    content, sent, trained, _ = reply
    good = content[ARRAYS]
    key = "experts.1.w1"
    lying = dict(good.items())
    lying[key] = Array(
        dtype=BF16, shape=(8, 16), stype=good[key].stype, data=_npy(np.zeros((8, 16), np.float32))
    )
    short = dict(good.items())
    short[key] = Array(
        dtype=BF16, shape=(8, 16), stype=good[key].stype, data=_npy(np.zeros((8, 15), np.uint16))
    )
    garbage = dict(good.items())
    garbage[key] = Array(dtype=BF16, shape=(8, 16), stype=good[key].stype, data=b"not an npy")
    huge = {k: from_record(ArrayRecord({k: v}))[k] for k, v in good.items()}
    huge[key] = np.full((8, 16), 3e38, np.float32)  # finite as bf16, infinite once added to the weights
    large = dataclasses.replace(sent, base={**sent.base, key: np.full((8, 16), 3e38, np.float32)})
    cases = [
        ("dtype", to_record(trained)),  # fp32 reply where bf16 was sent
        ("malformed", ArrayRecord(lying)),  # marked bf16, carries float32
        ("malformed", ArrayRecord(short)),  # payload of another shape than the Array names
        ("malformed", ArrayRecord(garbage)),
    ]
    for reason, record in cases:
        with pytest.raises(ReplyRejected) as err:
            parse(_with_arrays(content, record), sent)
        assert err.value.reason == reason, reason
    parse(_with_arrays(content, to_record(huge, "bf16")), sent)  # finite where the weights are small
    with pytest.raises(ReplyRejected, match="once its change is applied") as err:
        parse(_with_arrays(content, to_record(huge, "bf16")), large)
    assert err.value.reason == "non-finite"


@pytest.mark.parametrize("kind", faults.CORRUPTIONS)
def test_each_injected_corruption_of_a_bf16_reply_is_rejected_with_its_reason(reply, kind):
    content, sent, _, _ = reply
    with pytest.raises(ReplyRejected) as err:
        parse(faults.corrupt(content, kind), sent)
    assert err.value.reason == faults.EXPECTED_REASON[kind]


def test_feedback_metrics_untouched_by_the_wire(reply):
    content, sent, _, _ = reply
    assert isinstance(content["metrics"], MetricRecord)
    assert parse(content, sent).update.num_examples == 20
