"""Name-stable slicing of MoE weights into what is sent, and exact byte accounting.

Weights travel as a flat ``dict[str, np.ndarray]`` with *global* names:
shared tensors keep their module names (``stem.0.weight``, ``gate.weight``, ...) and
every expert tensor is named ``experts.<global id>.<w1|b1|w2|b2>``. A client's model
stores its experts stacked by slot; :func:`model_to_arrays` and :func:`load_arrays`
translate between the two, so a message holds the shared part plus exactly the
experts it names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .model import MoEClassifier

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(w1|b1|w2|b2)$")

Arrays = dict[str, np.ndarray]


def expert_key(expert: int, name: str) -> str:
    """Global name of one expert tensor."""
    return f"experts.{expert}.{name}"


def parse_expert_key(key: str) -> tuple[int, str] | None:
    """Return ``(expert id, tensor name)`` for an expert key, ``None`` for shared keys."""
    m = _EXPERT_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def model_to_arrays(model: MoEClassifier) -> Arrays:
    """Flatten a model's weights into global names (shared + the experts it holds)."""
    out: Arrays = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("experts."):
            out[name] = tensor.detach().cpu().numpy().copy()
    for slot, e in enumerate(model.expert_ids.tolist()):
        for name in EXPERT_PARAMS:
            out[expert_key(e, name)] = getattr(model.experts, name)[slot].detach().cpu().numpy().copy()
    return out


def load_arrays(model: MoEClassifier, arrays: Mapping[str, np.ndarray]) -> None:
    """Load global-named arrays into ``model``; they must cover exactly what it holds.

    Raises
    ------
    KeyError
        If a tensor the model needs is missing or an unexpected key is present.
    ValueError
        If a tensor has the wrong shape.

    """
    expected = set(expected_keys(model))
    missing, extra = expected - set(arrays), set(arrays) - expected
    if missing or extra:
        raise KeyError(f"arrays do not match the model: missing={sorted(missing)}, extra={sorted(extra)}")
    state = model.state_dict()
    new_state = {}
    for name, tensor in state.items():
        if name.startswith("experts."):
            pname = name.split(".", 1)[1]
            parts = [arrays[expert_key(e, pname)] for e in model.expert_ids.tolist()]
            value = np.stack(parts)
        else:
            value = arrays[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)}, got {tuple(value.shape)}")
        new_state[name] = torch.as_tensor(np.asarray(value, dtype=np.float32))
    model.load_state_dict(new_state)


def expected_keys(model: MoEClassifier) -> list[str]:
    """Global names of every tensor ``model`` holds."""
    shared = [n for n in model.state_dict() if not n.startswith("experts.")]
    return shared + [expert_key(e, n) for e in model.expert_ids.tolist() for n in EXPERT_PARAMS]


def shared_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the shared (non-expert) tensors in ``arrays``."""
    return [k for k in arrays if parse_expert_key(k) is None]


def select(arrays: Mapping[str, np.ndarray], expert_ids: Iterable[int]) -> Arrays:
    """Shared tensors plus the tensors of ``expert_ids`` (what one client receives)."""
    ids = set(int(e) for e in expert_ids)
    return {k: v for k, v in arrays.items() if (p := parse_expert_key(k)) is None or p[0] in ids}


def experts_in(arrays: Mapping[str, np.ndarray]) -> list[int]:
    """Sorted global ids of the experts present in ``arrays``."""
    return sorted({p[0] for k in arrays if (p := parse_expert_key(k)) is not None})


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack arrays into a fresh ArrayRecord (one per message; never shared)."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """Unpack an ArrayRecord into numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def raw_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw bytes of the tensors' data (no framing)."""
    return int(sum(v.nbytes for v in arrays.values()))


def wire_nbytes(record: ArrayRecord) -> int:
    """Bytes of a record's serialized tensors, as carried in a message."""
    return int(sum(len(a.data) for a in record.values()))
