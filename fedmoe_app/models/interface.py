"""What the rest of the app needs of an MoE model, whatever its architecture.

Every model the app federates is a :class:`MoEModel`:

* **which tensors are experts' tensors**: experts are stored *stacked by slot* (a tensor of
  shape ``[n_held, ...]`` whose name has an ``experts`` component, e.g. ``experts.w1`` or
  ``blocks.1.moe.experts.w1``); :meth:`MoEModel.expert_tensor_names` maps each to its global
  suffix, and :mod:`fedmoe_app.models.arrays` names slot ``s`` of it
  ``experts.<id>.<suffix>`` (:mod:`fedmoe_app.tensors`), ``id`` the global expert held in
  slot ``s`` of that tensor's MoE layer. A stacked tensor is a direct attribute of its layer's
  ``experts`` module, so its layer is its suffix without the last component
  (:func:`fedmoe_app.tensors.layer_prefix`); the MoE layers in natural order of these prefixes
  are the rows of every per-layer array.
* **a sub-model holding given experts**: the constructor takes the global ids to hold, one
  list for every MoE layer (tied layers: expert ``e`` of every layer travels together) or one
  list per MoE layer (untied); :meth:`MoEModel._hold` registers them (``layer_held``,
  ``layer_slot_of`` per layer; ``expert_ids``, ``held``, ``slot_of`` for their union), and
  every MoE layer masks the router logits of the experts it does not hold before its top-k
  choice.
* **feedback of a training pass**: ``forward(x, y)`` returns a :class:`MoEOutput` with the
  feedback per MoE layer (``[L, E]``, :func:`layer_feedback`) and its sums over the layers.
* **the task's loss and accuracy** (:meth:`MoEModel.task_loss`, :meth:`MoEModel.correct`),
  over the last axis of the logits (classes or vocabulary), and the input memory format.

Capacity planning reads a model's costs through ``fedmoe_app.models.model_costs``.

A model of your own is a subclass of :class:`MoEModel` built by your factory, named by the run
config as ``model = "package.module:factory"``: :mod:`.user_model` states the factory's contract
and what the app derives from the built model (:mod:`.measured_costs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tensors import expert_key, layer_prefix, moe_layers


class MoEOutput(NamedTuple):
    """What a forward pass returns: logits plus the feedback the server needs.

    ``layer_tokens``, ``layer_loss_sum`` and ``layer_gate_hist`` are detached ``[L, E]``
    tensors (row ``l``: MoE layer ``l``, column: *global* expert id); ``tokens``,
    ``expert_loss_sum`` and ``gate_hist`` are their sums over the layers.
    """

    logits: Tensor  # [B, num_classes] or [B, T, vocab]
    aux_loss: Tensor  # scalar, Switch-Transformer load-balancing loss (mean over MoE layers)
    route_loss: Tensor  # scalar, the unmasked gate's cross-entropy against the held experts' fit
    tokens: Tensor  # [E] (token, expert) pairs routed to each expert
    expert_loss_sum: Tensor  # [E] summed loss signal of the tokens routed to each expert
    gate_hist: Tensor  # [E] top-k choices of the unmasked gate (all experts)
    layer_tokens: Tensor  # [L, E] tokens per MoE layer
    layer_loss_sum: Tensor  # [L, E] loss signal per MoE layer
    layer_gate_hist: Tensor  # [L, E] unmasked top-k choices per MoE layer


@torch.no_grad()
def layer_feedback(
    chosen: Sequence[Tensor], hist: Sequence[Tensor], row_loss: Sequence[Tensor] | None, num_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer feedback ``(tokens, loss sums, gate choices)``, each ``[L, E]``, of one pass.

    Parameters
    ----------
    chosen : Sequence[Tensor]
        For every MoE layer, the global ids of its (token, expert) routes (long, flat).
    hist : Sequence[Tensor]
        For every MoE layer, the unmasked router's top-k choices (long, flat).
    row_loss : Sequence[Tensor] | None
        For every MoE layer, the loss signal of each route of ``chosen`` (same length);
        ``None`` without targets (the loss sums are then 0).
    num_experts : int
        ``E``.

    """
    n = len(chosen)
    device = chosen[0].device
    offset = torch.arange(n, device=device) * num_experts
    ids = torch.cat([c + offset[i] for i, c in enumerate(chosen)])
    tokens = torch.bincount(ids, minlength=n * num_experts).float().view(n, num_experts)
    top = torch.cat([h + offset[i] for i, h in enumerate(hist)])
    gate_hist = torch.bincount(top, minlength=n * num_experts).float().view(n, num_experts)
    loss_sum = torch.zeros(n * num_experts, device=device)
    if row_loss is not None:
        loss_sum.index_add_(0, ids, torch.cat(list(row_loss)).float())
    return tokens, loss_sum.view(n, num_experts), gate_hist


def expert_suffix(state_name: str) -> str:
    """Global suffix of a stacked expert tensor: its state name without the ``experts`` part."""
    return ".".join(p for p in state_name.split(".") if p != "experts")


#: The experts a sub-model holds: a boolean ``[L, E]`` holding (one row per MoE layer; tied
#: layers have equal rows) or ``[E]``, or the ids held (one list for every layer, or one per layer).
HeldExperts = np.ndarray | Sequence[int] | Sequence[Sequence[int]]


def parse_held(expert_ids: HeldExperts | None, num_experts: int, num_layers: int) -> list[list[int]]:
    """Sorted global ids held in each of ``num_layers`` MoE layers (see :meth:`MoEModel._hold`)."""
    if isinstance(expert_ids, (Tensor, np.ndarray)) and expert_ids.dtype in (torch.bool, np.bool_):
        mask = np.asarray(expert_ids.cpu() if isinstance(expert_ids, Tensor) else expert_ids, dtype=bool)
        if mask.shape[-1] != num_experts or mask.ndim not in (1, 2):
            raise ValueError(
                f"a holding mask must be bool [E] or [L, E] with E = {num_experts}, got {mask.shape}"
            )
        expert_ids = [np.flatnonzero(row).tolist() for row in np.atleast_2d(mask)]
        expert_ids = expert_ids[0] if mask.ndim == 1 else expert_ids
    if isinstance(expert_ids, (Tensor, np.ndarray)):
        expert_ids = expert_ids.tolist()
    if expert_ids is None:
        sets = [range(num_experts)] * num_layers
    elif len(expert_ids) and not isinstance(expert_ids[0], (int, np.integer)):  # per layer
        sets = list(expert_ids)
        if len(sets) != num_layers:
            raise ValueError(
                f"expert_ids has {len(sets)} per-layer lists, the model has {num_layers} MoE layers"
            )
    else:
        sets = [expert_ids] * num_layers
    out = []
    for s in sets:
        ids = sorted({int(e) for e in s})
        if not ids or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"expert_ids must be a non-empty subset of 0..{num_experts - 1}, got {ids}")
        out.append(ids)
    return out


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
    layer_held: Tensor
    layer_slot_of: Tensor
    layer_ids: list[list[int]]

    def _hold(self, num_experts: int, expert_ids: HeldExperts | None, num_layers: int = 1) -> list[list[int]]:
        """Register the held experts' buffers; return the sorted global ids held per MoE layer.

        ``expert_ids`` is one list for every layer (tied), one list per layer (untied) or
        ``None`` (all).

        Raises
        ------
        ValueError
            If a layer's set is empty or outside ``0..num_experts - 1``, or the number of
            per-layer lists is not ``num_layers``.

        """
        per_layer = parse_held(expert_ids, num_experts, num_layers)
        union = sorted(set().union(*per_layer))
        slot_of = torch.full((num_experts,), -1, dtype=torch.long)
        slot_of[union] = torch.arange(len(union))
        layer_slot_of = torch.full((num_layers, num_experts), -1, dtype=torch.long)
        for layer, ids in enumerate(per_layer):
            layer_slot_of[layer, ids] = torch.arange(len(ids))
        self.register_buffer("expert_ids", torch.tensor(union), persistent=False)
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.register_buffer("held", slot_of >= 0, persistent=False)
        self.register_buffer("layer_slot_of", layer_slot_of, persistent=False)
        self.register_buffer("layer_held", layer_slot_of >= 0, persistent=False)
        self.layer_ids = per_layer
        return per_layer

    def token_routed_output(
        self, logits: Tensor, aux: Tensor, y: Tensor | None, chosen: list[Tensor], hist: list[Tensor], k: int
    ) -> MoEOutput:
        """Return the :class:`MoEOutput` of a token-routed pass; each route of a token carries its loss.

        ``chosen`` and ``hist`` are per MoE layer, as for :func:`layer_feedback`; ``k`` routes per token.
        """
        rows = None
        if y is not None:
            ce = self.task_loss(logits.detach(), y, reduction="none").reshape(-1).repeat_interleave(k)
            rows = [ce] * len(chosen)
        fb = layer_feedback(chosen, hist, rows, self.spec.num_experts)
        return MoEOutput(logits, aux, logits.new_zeros(()), *(f.sum(dim=0) for f in fb), *fb)

    @property
    def top_k(self) -> int:
        """Experts each token is routed to: ``min(spec.top_k, fewest experts held in a layer)``."""
        return min(self.spec.top_k, min(len(ids) for ids in self.layer_ids))

    def expert_tensor_layers(self) -> dict[str, int]:
        """State-dict name → MoE layer (row of the per-layer arrays) of every stacked tensor."""
        names = self.expert_tensor_names()
        prefixes = moe_layers(expert_key(0, s) for s in names.values())
        if len(prefixes) != len(self.layer_ids):
            raise ValueError(
                f"the model's stacked expert tensors name {len(prefixes)} MoE layers {prefixes}, "
                f"it holds experts for {len(self.layer_ids)}"
            )
        row = {p: i for i, p in enumerate(prefixes)}
        return {n: row[layer_prefix(s)] for n, s in names.items()}

    def federated_state(self) -> dict[str, Tensor]:
        """Return the tensors that travel, by name: every weight (``state_dict()``) unless overridden.

        A model may federate a chosen set instead (LoRA adapters, :mod:`.hf_lora`); experts'
        tensors among them are stacked by slot with an ``experts`` component in their name.
        """
        return self.state_dict()

    def load_federated_state(self, state: dict[str, Tensor]) -> None:
        """Load every tensor of :meth:`federated_state` from ``state`` (same names and shapes)."""
        self.load_state_dict(state)

    def expert_tensor_names(self) -> dict[str, str]:
        """Federated name → global suffix of every tensor stacked by expert slot."""
        return {n: expert_suffix(n) for n in self.federated_state() if "experts" in n.split(".")}

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
