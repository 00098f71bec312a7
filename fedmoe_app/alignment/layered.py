"""Alignment per MoE layer (untied layers): fitness, usage and the assignment of every layer.

With tied layers (:class:`~.state.AlignmentState`) expert ``e`` of every MoE layer is one unit:
one fitness ``F[c, e]``, one usage ``U[e]``, one assignment row per client. With untied layers
each MoE layer ``l`` is its own alignment problem: :class:`LayeredAlignment` keeps one
:class:`~.state.AlignmentState` per layer, fed with that layer's feedback (tokens, loss signal
and unmasked gate choices of layer ``l`` alone), and plans each layer with the same capacity
(experts per layer a client can hold) and policy. The result is a bool ``[C, L, E]`` plan: a
client may hold expert 3 in the first layer and expert 5 in the second. Each layer's update and
plan are vectorized over clients and experts; only the layers are looped over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .policies import Policy
from .state import AlignmentState

_VERSION = 1


class LayeredAlignment:
    """One :class:`AlignmentState` per MoE layer, planned and updated together.

    Parameters
    ----------
    num_experts : int
        Experts per MoE layer ``E``.
    num_layers : int
        MoE layers ``L`` (>= 1).
    **knobs
        The knobs of :class:`AlignmentState` (``RunConfig.alignment_kwargs()``), shared by all
        layers.

    """

    def __init__(self, num_experts: int, num_layers: int, **knobs: Any) -> None:
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_experts = int(num_experts)
        self.num_layers = int(num_layers)
        self.layers = [AlignmentState(num_experts, **knobs) for _ in range(self.num_layers)]

    @property
    def client_ids(self) -> list[str]:
        """Clients known (the same in every layer)."""
        return self.layers[0].client_ids

    @property
    def fitness(self) -> np.ndarray:
        """float64 ``[L, C, E]``: each layer's fitness."""
        return np.stack([s.fitness for s in self.layers])

    @property
    def usage(self) -> np.ndarray:
        """float64 ``[L, E]``: each layer's usage."""
        return np.stack([s.usage for s in self.layers])

    def desirability(self, client_ids: Sequence[str]) -> np.ndarray:
        """float64 ``[C, L, E]``: each layer's desirability."""
        return np.stack([s.desirability(client_ids) for s in self.layers], axis=1)

    def plan(
        self,
        client_ids: Sequence[str],
        capacity: np.ndarray | Sequence[int],
        policy: str | Policy,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Plan every layer: bool ``[C, L, E]``, ``min(capacity[c], E)`` experts per layer and client.

        Layers are planned in order with the same ``rng`` (each layer's own generator when omitted).
        """
        return np.stack([s.plan(client_ids, capacity, policy, rng) for s in self.layers], axis=1)

    def update(
        self,
        client_ids: Sequence[str],
        held: np.ndarray,
        tokens: np.ndarray,
        expert_loss: np.ndarray,
        gate_hist: np.ndarray,
    ) -> None:
        """Fold one round's per-layer feedback (arrays ``[R, L, E]``) into each layer's state.

        Raises
        ------
        ValueError
            If an array is not ``[len(client_ids), L, E]`` (or a layer's values are invalid,
            as :meth:`AlignmentState.update` checks).

        """
        shape = (len(client_ids), self.num_layers, self.num_experts)
        arrays = [np.asarray(a) for a in (held, tokens, expert_loss, gate_hist)]
        for name, arr in zip(("held", "tokens", "expert_loss", "gate_hist"), arrays):
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        for layer, state in enumerate(self.layers):
            state.update(client_ids, *(a[:, layer] for a in arrays))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable snapshot: every layer's :meth:`AlignmentState.state_dict`."""
        return {"version": _VERSION, "layers": [s.state_dict() for s in self.layers]}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> LayeredAlignment:
        """Rebuild a state saved by :meth:`state_dict` (exact round trip)."""
        if int(d.get("version", _VERSION)) != _VERSION:
            raise ValueError(f"unsupported layered alignment state version {d.get('version')}")
        layers = [AlignmentState.from_state_dict(x) for x in d["layers"]]
        out = cls.__new__(cls)
        out.num_experts, out.num_layers, out.layers = layers[0].num_experts, len(layers), layers
        return out


def alignment_from_state_dict(d: dict[str, Any]) -> AlignmentState | LayeredAlignment:
    """Rebuild a tied (:class:`AlignmentState`) or untied (:class:`LayeredAlignment`) state."""
    return LayeredAlignment.from_state_dict(d) if "layers" in d else AlignmentState.from_state_dict(d)
