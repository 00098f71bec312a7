"""Global tensor names of an MoE model and slicing of named-array dicts by expert.

Weights travel as a flat ``dict[str, np.ndarray]`` with *global* names: shared tensors keep
their module names (``stem.0.weight``, ``gate.weight``, ...) and every expert tensor is
named ``experts.<global id>.<name>``: ``experts.3.w1`` for the CNN MoE's one MoE layer,
``experts.3.blocks.1.moe.w1`` for expert 3 of block 1 of a transformer MoE. Expert ``e`` of
every MoE layer travels together as "expert ``e``" (layers are tied), so slicing, wire bytes,
aggregation and the alignment work per expert id for any model. A message holds the shared
part plus exactly the experts it names. Router ("gate") tensors are the shared tensors named
``gate.*`` or ``*.gate.*``; their first axis has one row per global expert
(:func:`is_gate_key`).

MoE layers: a stacked expert tensor is a direct attribute of its layer's ``experts`` module, so
the *layer* of an expert tensor name is the name without its last component
(:func:`layer_prefix`: ``blocks.1.moe`` for ``blocks.1.moe.w1``, ``""`` for the CNN's ``w1``) and
the router of that layer is the gate whose name starts with the same prefix. The model's MoE
layers are these prefixes in natural order (:func:`moe_layers`, ``blocks.2`` before
``blocks.10``). With untied layers a client holds a different set of experts in every layer
(a boolean ``[L, E]`` matrix): :func:`select_layers` cuts a message to it and
:func:`layer_holdings` reads it back from a message. Pure numpy: aggregation, capacity
planning and checkpoints use these names without torch or Flower; ``fedmoe_app.models.arrays``
maps a torch model onto them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(.+)$")

Arrays = dict[str, np.ndarray]


def expert_key(expert: int, name: str) -> str:
    """Global name of one expert tensor."""
    return f"experts.{expert}.{name}"


def parse_expert_key(key: str) -> tuple[int, str] | None:
    """Return ``(expert id, tensor name)`` for an expert key, ``None`` for shared keys."""
    m = _EXPERT_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def is_gate_key(key: str) -> bool:
    """Whether ``key`` names a router tensor (``gate.*`` or ``*.gate.*``, one row per expert)."""
    return parse_expert_key(key) is None and (key.startswith("gate.") or ".gate." in key)


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


def layer_prefix(name: str) -> str:
    """MoE layer of an expert tensor's name (``experts.<e>.`` removed): all but its last component."""
    return name.rpartition(".")[0]


def gate_prefix(key: str) -> str:
    """MoE layer of a router key: the components before ``gate`` (``""`` for ``gate.weight``)."""
    parts = key.split(".")
    return ".".join(parts[: parts.index("gate")])


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in text.split("."))


def moe_layers(names: Iterable[str]) -> list[str]:
    """Return the MoE layers (prefixes) named by the expert keys among ``names``, in natural order."""
    prefixes = {layer_prefix(p[1]) for k in names if (p := parse_expert_key(k)) is not None}
    return sorted(prefixes, key=_natural)


def select_layers(arrays: Mapping[str, np.ndarray], held: np.ndarray, layers: Sequence[str]) -> Arrays:
    """Shared tensors plus expert ``e`` of layer ``l`` wherever ``held[l, e]`` (one client's message).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        Global-named arrays (the global model).
    held : np.ndarray
        bool ``[L, E]``, the experts to keep in every MoE layer.
    layers : Sequence[str]
        The model's MoE layers (:func:`moe_layers`), row order of ``held``.

    """
    row = {p: i for i, p in enumerate(layers)}
    out: Arrays = {}
    for k, v in arrays.items():
        p = parse_expert_key(k)
        if p is None or held[row[layer_prefix(p[1])], p[0]]:
            out[k] = v
    return out


def layer_holdings(names: Iterable[str], layers: Sequence[str], num_experts: int) -> np.ndarray:
    """Bool ``[L, E]``: the (layer, expert) pairs with a tensor among ``names``."""
    row = {p: i for i, p in enumerate(layers)}
    held = np.zeros((len(layers), num_experts), dtype=bool)
    for k in names:
        p = parse_expert_key(k)
        if p is not None and layer_prefix(p[1]) in row and 0 <= p[0] < num_experts:
            held[row[layer_prefix(p[1])], p[0]] = True
    return held


def raw_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw bytes of the tensors' data (no framing)."""
    return int(sum(v.nbytes for v in arrays.values()))


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(shared bytes, bytes of one expert)`` of a global-named array dict.

    The per-expert figure is the mean over the experts present (0 if none).
    """
    shared, per_expert = 0, {}
    for key, value in arrays.items():
        parsed = parse_expert_key(key)
        if parsed is None:
            shared += int(value.nbytes)
        else:
            per_expert[parsed[0]] = per_expert.get(parsed[0], 0) + int(value.nbytes)
    expert = round(sum(per_expert.values()) / len(per_expert)) if per_expert else 0
    return shared, expert


def check_same_tensors(
    arrays: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray | tuple[int, ...]], what: str
) -> None:
    """Raise ValueError naming the first tensors whose names or shapes differ from ``model``'s.

    ``model`` maps names to tensors or to their shapes.
    """
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    want = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in model.items()}
    if shapes == want:
        return
    differ = sorted(set(shapes) ^ set(want)) or sorted(k for k in shapes if shapes[k] != want[k])
    raise ValueError(f"{what} does not match this model's tensors (e.g. {differ[:3]})")
