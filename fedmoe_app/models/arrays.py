"""Torch model <-> named arrays: a model's weights under their global names, and back.

A model stores its experts stacked by slot (:class:`~fedmoe_app.models.interface.MoEModel`);
:func:`model_to_arrays` names every tensor globally (:mod:`fedmoe_app.tensors`: slot ``s`` of
a stacked tensor becomes ``experts.<expert_ids[s]>.<suffix>``) and :func:`load_arrays` loads
such a dict back, so a message holds the shared part plus exactly the experts it names. The
same two functions serve every model: the CNN MoE's one MoE layer and a transformer's many.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..tensors import Arrays, expert_key
from .interface import MoEModel


def model_to_arrays(model: MoEModel) -> Arrays:
    """Flatten a model's weights into global names (shared + the experts it holds)."""
    stacked = model.expert_tensor_names()
    state = model.state_dict()
    out: Arrays = {}
    for name, tensor in state.items():
        if name not in stacked:
            out[name] = tensor.detach().cpu().numpy().copy()
    for slot, e in enumerate(model.expert_ids.tolist()):
        for name, suffix in stacked.items():
            out[expert_key(e, suffix)] = state[name][slot].detach().cpu().numpy().copy()
    return out


def load_arrays(model: MoEModel, arrays: Mapping[str, np.ndarray]) -> None:
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
    stacked = model.expert_tensor_names()
    new_state = {}
    for name, tensor in model.state_dict().items():
        if name in stacked:
            value = np.stack([arrays[expert_key(e, stacked[name])] for e in model.expert_ids.tolist()])
        else:
            value = arrays[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)}, got {tuple(value.shape)}")
        new_state[name] = torch.as_tensor(np.asarray(value, dtype=np.float32))
    model.load_state_dict(new_state)


def expected_keys(model: MoEModel) -> list[str]:
    """Global names of every tensor ``model`` holds."""
    stacked = model.expert_tensor_names()
    shared = [n for n in model.state_dict() if n not in stacked]
    return shared + [expert_key(e, s) for e in model.expert_ids.tolist() for s in stacked.values()]
