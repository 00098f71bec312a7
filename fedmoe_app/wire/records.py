"""Flower records of named arrays: packing, unpacking, the bf16 wire and exact wire-byte accounting.

Run-config ``wire-dtype`` picks how float32 tensors travel: ``fp32`` as they are, or ``bf16``,
half the bytes. numpy has no bfloat16, so a bf16 tensor travels as the upper 16 bits of its
float32 values (a ``uint16`` numpy array, rounded to nearest, ties to even, as torch's
``.to(torch.bfloat16)`` rounds) and is marked by the Flower ``Array``'s own ``dtype`` field,
``"bfloat16"`` (what :func:`to_record` writes; the payload itself is a ``uint16`` ``.npy``).
:func:`from_record` decodes every marked tensor back to float32, so nothing past it sees the
encoding. Tensors of other dtypes travel as they are under either setting.

The server's global tensors may themselves be bfloat16 (``ml_dtypes.bfloat16``, a numpy dtype:
a bf16 checkpoint is kept in its own dtype). Such a tensor travels under ``bf16`` as its bits,
unchanged (no rounding), and under ``fp32`` upcast to float32 (exact); either way the receiver
decodes float32, as for a float32 tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
from flwr.app import Array, ArrayRecord

from ..tensors import Arrays

BF16 = "bfloat16"  # the Array.dtype of a bf16-encoded tensor
WIRE_DTYPES = ("fp32", "bf16")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)  # numpy's dtype of a bfloat16 global tensor


def is_bf16(value: np.ndarray) -> bool:
    """Return whether ``value`` is a bfloat16 array (``ml_dtypes.bfloat16``)."""
    return value.dtype == BFLOAT16


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """Return the bfloat16 bits (``uint16``) of float32 ``x``, rounded to nearest, ties to even.

    NaN stays NaN (quiet); values that round past the largest bfloat16 become infinite.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """Return the float32 values of bfloat16 ``bits`` (``uint16``); exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _array(value: np.ndarray, wire_dtype: str) -> Array:
    value = np.ascontiguousarray(value)
    if is_bf16(value):  # a bf16 global tensor: its bits (bf16 wire) or float32, exact (fp32 wire)
        if wire_dtype == "fp32":
            return Array(value.astype(np.float32))
        bits = value.view(np.uint16)
    elif wire_dtype == "bf16" and value.dtype == np.float32:
        bits = bf16_encode(value)
    else:
        return Array(value)
    encoded = Array(bits)
    return Array(dtype=BF16, shape=tuple(value.shape), stype=encoded.stype, data=encoded.data)


def to_record(arrays: Mapping[str, np.ndarray], wire_dtype: str = "fp32") -> ArrayRecord:
    """Pack arrays into a fresh ArrayRecord (one per message; never shared).

    ``wire_dtype = "bf16"`` encodes float32 arrays as bf16 and packs bfloat16 ones as their bits
    (module docstring); ``"fp32"`` packs every array as it is, bfloat16 ones upcast to float32 (the
    default: local state, checkpoints and Flower's own records).

    Raises
    ------
    ValueError
        If ``wire_dtype`` is neither ``fp32`` nor ``bf16``.

    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
    return ArrayRecord(array_dict={k: _array(v, wire_dtype) for k, v in arrays.items()})


def model_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack a model into an ArrayRecord with no cast: bfloat16 tensors as their bits, the rest as they are."""
    return ArrayRecord(array_dict={k: _array(v, "bf16" if is_bf16(v) else "fp32") for k, v in arrays.items()})


def decode_array(array: Array) -> np.ndarray:
    """Return one record entry as numpy, a bf16-marked one decoded to float32.

    Raises
    ------
    ValueError
        If a bf16-marked entry's payload is not ``uint16`` of the shape its ``Array`` names.

    """
    value = array.numpy()
    if array.dtype != BF16:
        return value
    if value.dtype != np.uint16 or tuple(value.shape) != tuple(array.shape):
        raise ValueError(
            f"a {BF16} array must carry uint16 of shape {tuple(array.shape)}, "
            f"got {value.dtype} of shape {tuple(value.shape)}"
        )
    return bf16_decode(value)


def from_record(record: ArrayRecord) -> Arrays:
    """Unpack an ArrayRecord into numpy arrays (bf16-marked ones decoded to float32)."""
    return {k: decode_array(v) for k, v in record.items()}


def wire_dtypes(record: ArrayRecord) -> dict[str, str]:
    """Return each entry's dtype as it travels: ``"bfloat16"`` for bf16-encoded ones, else numpy's."""
    return {k: v.dtype for k, v in record.items()}


def record_wire_dtype(record: ArrayRecord) -> str:
    """Return the ``wire-dtype`` a record was packed with: ``bf16`` if any entry is bf16-encoded."""
    return "bf16" if any(v.dtype == BF16 for v in record.values()) else "fp32"


def wire_dtype_of(value: np.ndarray, wire_dtype: str) -> str:
    """Return the dtype ``value`` travels as under ``wire_dtype`` (what :func:`wire_dtypes` reads)."""
    if is_bf16(value):
        return BF16 if wire_dtype == "bf16" else "float32"
    return BF16 if wire_dtype == "bf16" and value.dtype == np.float32 else str(value.dtype)


def reply_record(
    trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], wire_dtype: str
) -> ArrayRecord:
    """Return a train reply's arrays: the trained tensors (``fp32``), or their bf16 changes.

    Under ``bf16`` each float32 tensor travels as ``trained - received`` (the change from what
    the client was sent, decoded), so that bf16's 8 significant bits bound the error of the
    *update*, not of the weights, and an update smaller than a weight's bf16 spacing is not
    lost; the server adds the change to its copy (:func:`apply_changes`).
    """
    if wire_dtype != "bf16":
        return to_record(trained, wire_dtype)
    changes = {
        k: (v - received[k]).astype(np.float32) if v.dtype == np.float32 else v for k, v in trained.items()
    }
    return to_record(changes, wire_dtype)


def apply_changes(
    decoded: Mapping[str, np.ndarray], dtypes: Mapping[str, str], base: Mapping[str, np.ndarray]
) -> Arrays:
    """Return a bf16 reply's trained tensors: ``base + change`` for every bf16-encoded entry.

    ``decoded`` is :func:`from_record` of the reply, ``dtypes`` its :func:`wire_dtypes`, ``base``
    the server's tensors that were sent (entries not bf16-encoded are returned as they are). The sum
    is computed in float32 and stored in the base tensor's dtype (a bfloat16 base: rounded to
    nearest, ties to even). A sum may overflow to infinity; the caller checks
    (:func:`~.protocol.parse_train_reply` does).
    """
    with np.errstate(over="ignore"):
        return {k: _add(base[k], v) if dtypes[k] == BF16 else v for k, v in decoded.items()}


def _add(base: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Return ``base + change``, computed in float32, in ``base``'s dtype."""
    if base.dtype == np.float32:
        return np.add(base, change, dtype=np.float32)
    return (base.astype(np.float32) + change).astype(base.dtype)


def wire_nbytes(record: ArrayRecord) -> int:
    """Bytes of a record's serialized tensors, as carried in a message."""
    return int(sum(len(a.data) for a in record.values()))
