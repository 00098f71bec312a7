"""Flower records of named arrays: packing, unpacking and exact wire-byte accounting."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from ..tensors import Arrays


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack arrays into a fresh ArrayRecord (one per message; never shared)."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """Unpack an ArrayRecord into numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def wire_nbytes(record: ArrayRecord) -> int:
    """Bytes of a record's serialized tensors, as carried in a message."""
    return int(sum(len(a.data) for a in record.values()))
