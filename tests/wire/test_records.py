import numpy as np
import pytest

from fedmoe_app.models import REFERENCE_SPEC, build_model, load_arrays, model_to_arrays
from fedmoe_app.tensors import expert_key, experts_in, parse_expert_key, raw_nbytes, select, shared_keys
from fedmoe_app.wire.records import from_record, to_record, wire_nbytes

SPEC = REFERENCE_SPEC


def test_key_names():
    assert expert_key(3, "w1") == "experts.3.w1"
    assert parse_expert_key("experts.12.b2") == (12, "b2")
    assert parse_expert_key("gate.weight") is None
    assert parse_expert_key("experts.x.w1") is None


def test_slice_round_trip_through_array_record():
    full = model_to_arrays(build_model(SPEC, seed=0))
    assert experts_in(full) == list(range(8))
    sub = select(full, [1, 6])
    assert experts_in(sub) == [1, 6]
    assert set(shared_keys(sub)) == set(shared_keys(full))
    back = from_record(to_record(sub))
    assert back.keys() == sub.keys()
    for k in sub:
        np.testing.assert_array_equal(back[k], sub[k])
    # load into a sub-model and read back: identical
    model = build_model(SPEC, [1, 6], seed=99)
    load_arrays(model, back)
    again = model_to_arrays(model)
    for k in sub:
        np.testing.assert_array_equal(again[k], sub[k])


def test_load_rejects_wrong_keys_and_shapes():
    full = model_to_arrays(build_model(SPEC))
    model = build_model(SPEC, [0, 1])
    with pytest.raises(KeyError):
        load_arrays(model, select(full, [0]))
    with pytest.raises(KeyError):
        load_arrays(model, select(full, [0, 1, 2]))
    bad = select(full, [0, 1])
    bad["experts.0.w1"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError):
        load_arrays(model, bad)


def test_download_is_sparse_and_byte_exact():
    """E=8, k=2: a client's download is <= 1.05x raw bytes of shared + 2 experts, <= 0.45x dense."""
    full = model_to_arrays(build_model(SPEC))
    sub = select(full, [0, 7])
    wire = wire_nbytes(to_record(sub))
    assert raw_nbytes(sub) <= wire <= 1.05 * raw_nbytes(sub)
    assert wire <= 0.45 * wire_nbytes(to_record(full))
