"""A bfloat16 global model (``ml_dtypes.bfloat16``): wire, replies, aggregation, checkpoints, loading."""

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import make_spec

from fedmoe_app.maths.aggregation import ClientUpdate, aggregate
from fedmoe_app.models import build_model, load_arrays, model_to_arrays
from fedmoe_app.run.checkpoint import load_checkpoint, load_model, save_checkpoint, save_model
from fedmoe_app.tensors import payload_nbytes
from fedmoe_app.wire.records import (
    BF16,
    apply_changes,
    from_record,
    reply_record,
    to_record,
    wire_dtype_of,
    wire_dtypes,
    wire_nbytes,
)

BF = ml_dtypes.bfloat16


def _bf16(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32).astype(BF)


def test_bf16_globals_travel_as_their_bits_on_bf16_and_exactly_upcast_on_fp32():
    rng = np.random.default_rng(0)
    arrays = {"w": _bf16(rng, 3, 5), "n": np.arange(4, dtype=np.int64)}
    bf16 = to_record(arrays, "bf16")
    assert wire_dtypes(bf16) == {"w": BF16, "n": "int64"} and wire_dtype_of(arrays["w"], "bf16") == BF16
    back = from_record(bf16)
    assert back["w"].dtype == np.float32
    np.testing.assert_array_equal(back["w"], arrays["w"].astype(np.float32))  # no rounding
    assert back["w"].astype(BF).view(np.uint16).tolist() == arrays["w"].view(np.uint16).tolist()
    fp32 = to_record(arrays, "fp32")
    assert wire_dtypes(fp32)["w"] == "float32" == wire_dtype_of(arrays["w"], "fp32")
    np.testing.assert_array_equal(from_record(fp32)["w"], arrays["w"].astype(np.float32))


def test_a_bf16_change_is_added_in_fp32_and_stored_in_the_globals_dtype():
    rng = np.random.default_rng(1)
    base = {"w": _bf16(rng, 64)}
    received = from_record(to_record(base, "bf16"))
    trained = {"w": received["w"] + np.float32(1e-3) * rng.standard_normal(64).astype(np.float32)}
    record = reply_record(trained, received, "bf16")
    out = apply_changes(from_record(record), wire_dtypes(record), base)
    assert out["w"].dtype == BF
    change = from_record(record)["w"]
    expected = (base["w"].astype(np.float32) + change).astype(BF)  # fp32 sum, rounded once
    np.testing.assert_array_equal(out["w"].view(np.uint16), expected.view(np.uint16))
    assert not np.array_equal(out["w"], base["w"])  # the small change was not lost in the sum


def test_aggregating_a_bf16_model_matches_the_fp32_average_to_bf16_precision_and_shares_untouched():
    rng = np.random.default_rng(2)
    g32 = {
        "stem.w": rng.standard_normal(8).astype(np.float32),
        "gate.weight": rng.standard_normal((3, 4)).astype(np.float32),
        **{f"experts.{e}.w1": rng.standard_normal((4, 6)).astype(np.float32) for e in range(3)},
    }
    g16 = {k: v.astype(BF) for k, v in g32.items()}

    def updates(dtype):
        out = []
        for i, experts in enumerate(([0, 1], [1])):
            r = np.random.default_rng(10 + i)
            arrays = {
                k: (g32[k] + r.standard_normal(g32[k].shape)).astype(dtype) for k in ("stem.w", "gate.weight")
            }
            arrays |= {
                f"experts.{e}.w1": (g32[f"experts.{e}.w1"] + 1.0).astype(dtype) * (i + 1) for e in experts
            }
            tokens = np.array([5.0 * (0 in experts), 3.0 + i, 0.0])
            out.append(
                ClientUpdate(arrays=arrays, num_examples=10 + 20 * i, tokens=tokens, num_held=len(experts))
            )
        return out

    new32 = aggregate(g32, updates(np.float32), gate_from_all=False)
    new16 = aggregate(g16, updates(BF), gate_from_all=False)
    assert all(v.dtype == BF for v in new16.values())
    assert new16["experts.2.w1"] is g16["experts.2.w1"]  # nobody trained expert 2: shared, not copied
    for k, v in new32.items():
        # bf16 inputs (2^-9 relative) and one rounding of the result (2^-9)
        tol = 2**-7 * (np.abs(v).max() + 1)
        np.testing.assert_allclose(new16[k].astype(np.float32), v, atol=tol, err_msg=k)
    assert not np.array_equal(new16["experts.1.w1"], g16["experts.1.w1"])
    for g in (g32, g16):  # in place: the same values, written into the global tensors themselves
        expected = aggregate(g, updates(next(iter(g.values())).dtype), gate_from_all=False)
        tensors, before = dict(g), {k: v.copy() for k, v in g.items()}
        got = aggregate(g, updates(next(iter(g.values())).dtype), gate_from_all=False, in_place=True)
        assert all(got[k] is tensors[k] for k in g) and any(not np.array_equal(g[k], before[k]) for k in g)
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k


def test_a_checkpoint_keeps_bf16_tensors_bf16(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"a": _bf16(rng, 4, 3), "b": rng.standard_normal(5).astype(np.float32)}
    save_checkpoint(tmp_path / "c.npz", arrays, {"round": 2})
    back, state = load_checkpoint(tmp_path / "c.npz")
    assert state == {"round": 2}
    assert back["a"].dtype == BF and back["b"].dtype == np.float32
    np.testing.assert_array_equal(back["a"].view(np.uint16), arrays["a"].view(np.uint16))
    np.testing.assert_array_equal(back["b"], arrays["b"])
    save_model(tmp_path / "final_model.npz", arrays)  # the final model's file: the same
    back = load_model(tmp_path / "final_model.npz")
    assert set(back) == set(arrays) and back["a"].dtype == BF and back["b"].dtype == np.float32
    assert back["a"].tobytes() == arrays["a"].tobytes() and back["b"].tobytes() == arrays["b"].tobytes()
    save_model(tmp_path / "f32.npz", {"b": arrays["b"]})  # a float32 model: plain np.savez
    with np.load(tmp_path / "f32.npz") as npz:
        assert npz.files == ["b"]


def test_load_arrays_casts_bf16_arrays_to_the_models_dtype_and_bytes_count_two_per_weight():
    model = build_model(make_spec(num_experts=4, top_k=2), seed=0)
    arrays = model_to_arrays(model)
    halves = {k: v.astype(BF) for k, v in arrays.items()}
    load_arrays(model, halves)
    back = model_to_arrays(model)
    assert all(v.dtype == np.float32 for v in back.values())
    for k, v in halves.items():
        np.testing.assert_array_equal(back[k], v.astype(np.float32))
    shared, expert = payload_nbytes(halves)
    assert (shared, expert) == tuple(n // 2 for n in payload_nbytes(arrays))
    model.to(torch.bfloat16)
    load_arrays(model, arrays)  # float32 arrays into a bf16 model: cast to bf16
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_record_sizes_follow_the_real_itemsize(wire):
    x = {"w": np.zeros((100, 100), BF)}
    assert wire_nbytes(to_record(x, wire)) == pytest.approx(
        x["w"].size * (2 if wire == "bf16" else 4), rel=0.01
    )
