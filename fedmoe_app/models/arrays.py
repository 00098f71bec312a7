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


def _slots(model: MoEModel) -> list[tuple[str, str, list[int]]]:
    """``(state name, global suffix, global id of each slot)`` of every stacked tensor."""
    layer_of = model.expert_tensor_layers()
    return [(n, s, model.layer_ids[layer_of[n]]) for n, s in model.expert_tensor_names().items()]


def model_to_arrays(model: MoEModel) -> Arrays:
    """Flatten a model's weights into global names (shared + the experts it holds per layer)."""
    stacked = _slots(model)
    names = {n for n, _, _ in stacked}
    state = model.state_dict()
    out: Arrays = {}
    for name, tensor in state.items():
        if name not in names:
            out[name] = tensor.detach().cpu().numpy().copy()
    width = max(len(ids) for _, _, ids in stacked) if stacked else 0
    for slot in range(width):  # tied layers: expert by expert, as always
        for name, suffix, ids in stacked:
            if slot < len(ids):
                out[expert_key(ids[slot], suffix)] = state[name][slot].detach().cpu().numpy().copy()
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
    stacked = {n: (s, ids) for n, s, ids in _slots(model)}
    new_state = {}
    for name, tensor in model.state_dict().items():
        if name in stacked:
            suffix, ids = stacked[name]
            value = np.stack([arrays[expert_key(e, suffix)] for e in ids])
        else:
            value = arrays[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)}, got {tuple(value.shape)}")
        new_state[name] = torch.as_tensor(np.asarray(value, dtype=np.float32))
    model.load_state_dict(new_state)


def expected_keys(model: MoEModel) -> list[str]:
    """Global names of every tensor ``model`` holds."""
    stacked = _slots(model)
    names = {n for n, _, _ in stacked}
    shared = [n for n in model.state_dict() if n not in names]
    return shared + [expert_key(e, s) for _, s, ids in stacked for e in ids]
