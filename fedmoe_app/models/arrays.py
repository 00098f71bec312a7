"""Torch model <-> named arrays: a model's federated tensors under their global names, and back.

A model stores its experts stacked by slot (:class:`~fedmoe_app.models.interface.MoEModel`);
:func:`model_to_arrays` names every tensor globally (:mod:`fedmoe_app.tensors`: slot ``s`` of
a stacked tensor becomes ``experts.<expert_ids[s]>.<suffix>``) and :func:`load_arrays` loads
such a dict back, so a message holds the shared part plus exactly the experts it names. The
same two functions serve every model: the CNN MoE's one MoE layer and a transformer's many.
What travels is the model's :meth:`~fedmoe_app.models.interface.MoEModel.federated_state`:
every weight, or a chosen set (an ``hf`` model under LoRA: its adapters only).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import torch

from ..tensors import Arrays, expert_key
from .interface import MoEModel


def to_torch(value: np.ndarray) -> torch.Tensor:
    """Return ``value`` as a CPU tensor of the same dtype, ``ml_dtypes.bfloat16`` as ``torch.bfloat16``.

    The tensor shares memory with ``value`` where it is contiguous (bf16: its bits, viewed).
    """
    value = np.ascontiguousarray(value)
    if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def _slots(model: MoEModel) -> list[tuple[str, str, list[int]]]:
    """``(state name, global suffix, global id of each slot)`` of every stacked tensor."""
    layer_of = model.expert_tensor_layers()
    return [(n, s, model.layer_ids[layer_of[n]]) for n, s in model.expert_tensor_names().items()]


def model_to_arrays(model: MoEModel) -> Arrays:
    """Flatten a model's federated tensors into global names (shared + the experts it holds per layer)."""
    stacked = _slots(model)
    names = {n for n, _, _ in stacked}
    state = model.federated_state()
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


def global_shapes(model: MoEModel) -> dict[str, tuple[int, ...]]:
    """Return the shape of every tensor :func:`model_to_arrays` gives, in its order (a meta model will do)."""
    stacked = _slots(model)
    names = {n for n, _, _ in stacked}
    state = model.federated_state()
    out = {name: tuple(t.shape) for name, t in state.items() if name not in names}
    width = max(len(ids) for _, _, ids in stacked) if stacked else 0
    for slot in range(width):
        for name, suffix, ids in stacked:
            if slot < len(ids):
                out[expert_key(ids[slot], suffix)] = tuple(state[name].shape[1:])
    return out


def load_arrays(model: MoEModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load global-named arrays into ``model``; they must cover exactly what it holds.

    Each tensor is cast to the dtype of the model's own tensor (float32 or bfloat16 arrays alike).

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
    for name, tensor in model.federated_state().items():
        if name in stacked:
            suffix, ids = stacked[name]
            value = np.stack([arrays[expert_key(e, suffix)] for e in ids])
        else:
            value = arrays[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)}, got {tuple(value.shape)}")
        new_state[name] = to_torch(value).to(tensor.dtype)
    model.load_federated_state(new_state)


def expected_keys(model: MoEModel) -> list[str]:
    """Global names of every tensor ``model`` holds."""
    stacked = _slots(model)
    names = {n for n, _, _ in stacked}
    shared = [n for n in model.federated_state() if n not in names]
    return shared + [expert_key(e, s) for _, s, ids in stacked for e in ids]
