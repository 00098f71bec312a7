"""What the rest of the app needs of an MoE model, whatever its architecture.

Every model the app federates is a :class:`MoEModel`:

* **which tensors are experts' tensors**: experts are stored *stacked by slot* (a tensor of
  shape ``[n_held, ...]`` whose name has an ``experts`` component, e.g. ``experts.w1`` or
  ``blocks.1.moe.experts.w1``); :meth:`MoEModel.expert_tensor_names` maps each to its global
  suffix, and :mod:`fedmoe_app.models.arrays` names slot ``s`` of it
  ``experts.<expert_ids[s]>.<suffix>`` (:mod:`fedmoe_app.tensors`). Expert ``e`` of every MoE
  layer therefore travels together as "expert ``e``" (tied layers).
* **a sub-model holding given experts**: the constructor takes the global ids to hold;
  :meth:`MoEModel._hold` registers ``expert_ids``, ``slot_of`` and ``held``, and every MoE
  layer masks the router logits of absent experts before its top-k choice.
* **feedback of a training pass**: ``forward(x, y)`` returns a :class:`MoEOutput` whose
  length-``E`` vectors are summed over the model's MoE layers.
* **the task's loss and accuracy** (:meth:`MoEModel.task_loss`, :meth:`MoEModel.correct`),
  over the last axis of the logits (classes or vocabulary), and the input memory format.

Capacity planning reads a model's costs through ``fedmoe_app.models.model_costs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoEOutput(NamedTuple):
    """What a forward pass returns: logits plus the feedback the server needs.

    ``tokens``, ``expert_loss_sum`` and ``gate_hist`` are detached, length-E vectors
    indexed by *global* expert id, summed over the model's MoE layers.
    """

    logits: Tensor  # [B, num_classes] or [B, T, vocab]
    aux_loss: Tensor  # scalar, Switch-Transformer load-balancing loss (mean over MoE layers)
    route_loss: Tensor  # scalar, the unmasked gate's cross-entropy against the held experts' fit
    tokens: Tensor  # [E] (token, expert) pairs routed to each expert
    expert_loss_sum: Tensor  # [E] summed loss signal of the tokens routed to each expert
    gate_hist: Tensor  # [E] top-k choices of the unmasked gate (all experts)


def expert_suffix(state_name: str) -> str:
    """Global suffix of a stacked expert tensor: its state name without the ``experts`` part."""
    return ".".join(p for p in state_name.split(".") if p != "experts")


class MoEModel(nn.Module):
    """Base of every federated MoE model (see the module docstring for the contract).

    Subclasses set ``self.spec`` (a frozen dataclass with ``num_experts``, ``top_k`` and
    ``routes_per_example``), call :meth:`_hold` before building their layers, store expert
    weights stacked by slot in modules named ``experts`` and implement ``forward(x, y=None)``
    returning a :class:`MoEOutput`.
    """

    spec: object
    expert_ids: Tensor
    slot_of: Tensor
    held: Tensor

    def _hold(self, num_experts: int, expert_ids: Sequence[int] | None) -> list[int]:
        """Register the held experts' buffers; return their sorted global ids.

        Raises
        ------
        ValueError
            If ``expert_ids`` is empty or outside ``0..num_experts - 1``.

        """
        ids = sorted(set(range(num_experts) if expert_ids is None else (int(e) for e in expert_ids)))
        if not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"expert_ids must be a non-empty subset of 0..{num_experts - 1}, got {ids}")
        slot_of = torch.full((num_experts,), -1, dtype=torch.long)
        slot_of[ids] = torch.arange(len(ids))
        self.register_buffer("expert_ids", torch.tensor(ids), persistent=False)
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.register_buffer("held", slot_of >= 0, persistent=False)
        return ids

    @property
    def top_k(self) -> int:
        """Experts each token is routed to: ``min(spec.top_k, experts held)``."""
        return min(self.spec.top_k, len(self.expert_ids))

    def expert_tensor_names(self) -> dict[str, str]:
        """State-dict name → global suffix of every tensor stacked by expert slot."""
        return {n: expert_suffix(n) for n in self.state_dict() if "experts" in n.split(".")}

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters stacked by expert slot (what a read-only holder does not train)."""
        names = self.expert_tensor_names()
        return [p for n, p in self.named_parameters() if n in names]

    def set_experts_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze the experts' parameters."""
        for p in self.expert_parameters():
            p.requires_grad_(trainable)

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """Memory format of a batch of inputs on ``device`` (contiguous unless overridden)."""
        return torch.contiguous_format

    def task_loss(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy over the last axis of ``logits`` (classes, or the next token)."""
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), reduction=reduction
        )

    def correct(self, logits: Tensor, y: Tensor) -> Tensor:
        """Count the targets predicted right (argmax over the last axis)."""
        return (logits.argmax(-1) == y).sum()
