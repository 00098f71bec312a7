"""A small MoE image classifier of your own, federated by fedmoe: ``model = "mlp_moe:build"``.

This folder must be importable on the server and on every client (``PYTHONPATH``, see README.md).

``flatten → linear stem → top-k gate → MLP experts``, one MoE layer. What makes it a fedmoe model
(docs/MODELS.md, "Your own model"): it subclasses ``MoEModel``, registers the experts it holds with
``self._hold``, keeps them stacked by slot in a module named ``experts``, masks the gate logits of
experts it does not hold, and returns an ``MoEOutput`` with the routing feedback.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmoe_app.models import MoEModel, MoEOutput


class MLPExperts(nn.Module):
    """``n`` two-layer MLP experts, weights stacked by slot (``w1`` is ``[n, d, h]``)."""

    def __init__(self, n: int, d: int, h: int, c: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, d, h) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(n, h))
        self.w2 = nn.Parameter(torch.randn(n, h, c) / math.sqrt(h))
        self.b2 = nn.Parameter(torch.zeros(n, c))

    def forward(self, x: Tensor, slots: Tensor) -> Tensor:
        """Row ``i`` of ``x [rows, d]`` through expert ``slots[i]``: ``[rows, c]``."""
        hid = F.relu(torch.einsum("rd,rdh->rh", x, self.w1[slots]) + self.b1[slots])
        return torch.einsum("rh,rhc->rc", hid, self.w2[slots]) + self.b2[slots]


class MLPMoE(MoEModel):
    """Flattened image → shared features → the top-k held experts' logits, mixed by the gate."""

    def __init__(self, num_experts: int, expert_ids, data_info, width: int = 32, hidden: int = 48) -> None:
        super().__init__()
        held = self._hold(num_experts, expert_ids)[0]  # one MoE layer: the global ids this model holds
        pixels = data_info.in_channels * data_info.image_size**2
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.ReLU())
        self.gate = nn.Linear(width, num_experts)  # one logit per global expert
        self.experts = MLPExperts(len(held), width, hidden, data_info.num_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> MoEOutput:
        """Route every image to its top-k held experts and mix their logits."""
        feats = self.stem(x)
        gate = self.gate(feats)
        masked = gate.masked_fill(~self.held, float("-inf"))  # experts not held never get a token
        top_val, top_idx = masked.topk(self.top_k, dim=1)
        chosen = top_idx.reshape(-1)
        out = self.experts(feats.repeat_interleave(self.top_k, dim=0), self.slot_of[chosen])
        logits = (F.softmax(top_val, dim=1).reshape(-1, 1) * out).view(len(x), self.top_k, -1).sum(dim=1)
        share = torch.bincount(chosen, minlength=self.held.numel()) / chosen.numel()
        aux = len(self.expert_ids) * (share * F.softmax(masked, dim=1).mean(dim=0)).sum()  # Switch balance
        unmasked = gate.detach().topk(min(self.spec.top_k, self.held.numel()), dim=1).indices.reshape(-1)
        return self.token_routed_output(logits, aux, y, [chosen], [unmasked], self.top_k)


def build(num_experts: int, expert_ids, data_info) -> MLPMoE:
    """Build the model; fedmoe calls it with the keyword arguments named here (``top_k``: from ``spec``)."""
    return MLPMoE(num_experts, expert_ids, data_info)
