"""Torch model <-> named arrays: a model's weights under their global names, and back.

A model stores its experts stacked by slot; :func:`model_to_arrays` names every tensor
globally (:mod:`fedmoe_app.tensors`) and :func:`load_arrays` loads such a dict back, so a
message holds the shared part plus exactly the experts it names.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..tensors import EXPERT_PARAMS, Arrays, expert_key
from .cnn import MoEClassifier


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
