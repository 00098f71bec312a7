"""Mixture-of-Experts image classifier: shared conv stem, top-k gate, MLP experts.

The model can hold every expert (the global model) or a subset of them (a client's
sub-model); its experts are :class:`~fedmoe_app.models.experts.Experts`, stacked by slot.
The global expert id of each slot is kept in the ``expert_ids`` buffer. The gate always has
one logit per *global* expert; logits of absent experts are masked before top-k routing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capacity import ModelCosts
from ..config import RunConfig
from .experts import Experts
from .interface import HeldExperts, MoEModel, MoEOutput, layer_feedback


@dataclass(frozen=True)
class ModelSpec:
    """Shape of an MoE classifier; everything needed to rebuild it anywhere.

    No field has a default: :meth:`from_config` takes the run config's values.
    """

    in_channels: int
    image_size: int
    num_classes: int
    num_experts: int
    top_k: int
    stem_channels: int
    feature_dim: int
    expert_hidden: int

    @classmethod
    def from_config(cls, cfg: RunConfig, info: Any) -> ModelSpec:
        """Model shape for a run: sizes from ``cfg``, input and classes from the dataset.

        Parameters
        ----------
        cfg : RunConfig
            The run's validated config (``num-experts``, ``top-k``, sizes).
        info : Any
            The dataset's shape: an object with ``in_channels``, ``image_size`` and
            ``num_classes`` (e.g. :class:`fedmoe_app.data.DatasetInfo`).

        """
        data = ("in_channels", "image_size", "num_classes")  # the rest are run-config fields
        return cls(**{f.name: getattr(info if f.name in data else cfg, f.name) for f in fields(cls)})

    @property
    def routes_per_example(self) -> int:
        """Routing decisions per example and chosen expert: one per image (one MoE layer)."""
        return 1

    def build(self, expert_ids: HeldExperts | None = None, seed: int = 0) -> MoEClassifier:
        """Build the model holding ``expert_ids`` (all if None), initialised from ``seed``."""
        return build_cnn(self, expert_ids, seed)

    def costs(self) -> ModelCosts:
        """Parameters, activations and FLOPs as capacity planning sees them (:mod:`.costs`)."""
        from .costs import cnn_costs  # costs builds models of this module

        return cnn_costs(self)


#: The model the emulated device classes are calibrated at: the default CNN on Fashion-MNIST.
REFERENCE_SPEC = ModelSpec(
    1, 28, 10, num_experts=8, top_k=2, stem_channels=16, feature_dim=64, expert_hidden=256
)


class MoEClassifier(MoEModel):
    """Conv stem → gate (top-k, softmax over the chosen k) → weighted sum of expert logits.

    Parameters
    ----------
    spec : ModelSpec
        Shape of the model.
    expert_ids : HeldExperts | None
        Global ids of the experts this instance holds (sorted), or a list of one such list
        (its one MoE layer); ``None`` holds all.

    """

    #: Compute the routing loss (:meth:`_route_loss`); the training loop sets it when the run
    #: gives the loss a weight (it costs one extra no-grad pass of the held experts).
    route_loss_on: bool = False

    def __init__(self, spec: ModelSpec, expert_ids: HeldExperts | None = None) -> None:
        super().__init__()
        num_e = spec.num_experts
        ids = self._hold(num_e, expert_ids)[0]
        self.spec = spec
        c, d = spec.stem_channels, spec.feature_dim
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * c * 16, d),
            nn.ReLU(),
        )
        self.gate = nn.Linear(d, num_e)
        self.experts = Experts(len(ids), d, spec.expert_hidden, spec.num_classes)

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """``channels_last`` on CPU (measured faster for the conv stem), else NCHW."""
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def _route_loss(self, feats: Tensor, gate_logits: Tensor, y: Tensor | None) -> Tensor:
        """Teach the *unmasked* gate (the global model's router) which held expert fits a sample.

        The target is a distribution over the held experts, ``softmax(-CE_e(x))``: each held
        expert's own cross-entropy on the sample (computed without gradient), so the gate learns
        to send the sample where it is predicted best; the loss is the cross-entropy of the full
        gate's softmax (over all ``E`` experts, so experts not held are pushed down) against it.
        A client holding one expert teaches the gate that its data belongs with that expert.
        0 when switched off (:attr:`route_loss_on`), without labels, or when every expert is
        held (the dense model routes as it trains).
        """
        ids = self.expert_ids
        if not self.route_loss_on or y is None or len(ids) == self.spec.num_experts:
            return gate_logits.new_zeros(())
        n, batch = len(ids), feats.shape[0]
        with torch.no_grad():
            slots = torch.arange(n, device=feats.device).repeat(batch)
            out = self.experts(feats.detach().repeat_interleave(n, dim=0), slots)
            ce = F.cross_entropy(out, y.repeat_interleave(n), reduction="none").view(batch, n)
            target = F.softmax(-ce, dim=1)
        log_p = F.log_softmax(gate_logits, dim=1)[:, ids]
        return -(target * log_p).sum(dim=1).mean()

    def forward(self, x: Tensor, y: Tensor | None = None) -> MoEOutput:
        """Route every sample to its top-k held experts and mix their logits."""
        num_e, k = self.spec.num_experts, self.top_k
        feats = self.stem(x)
        gate_logits = self.gate(feats)  # [B, E], all global experts
        masked = gate_logits.masked_fill(~self.held, float("-inf"))
        top_val, top_idx = masked.topk(k, dim=1)  # global ids [B, k]
        weights = F.softmax(top_val, dim=1)
        flat_idx = top_idx.reshape(-1)
        out = self.experts(feats.repeat_interleave(k, dim=0), self.slot_of[flat_idx])
        logits = (weights.reshape(-1, 1) * out).view(-1, k, out.shape[-1]).sum(dim=1)

        # Switch-style balance loss over the held experts: n * sum_e f_e * P_e.
        probs = F.softmax(masked, dim=1)
        frac = torch.bincount(flat_idx, minlength=num_e).to(probs.dtype) / flat_idx.numel()
        aux = len(self.expert_ids) * (frac * probs.mean(dim=0)).sum()
        route = self._route_loss(feats, gate_logits, y)

        with torch.no_grad():
            hist_idx = gate_logits.topk(min(self.spec.top_k, num_e), dim=1).indices
            ce = None
            if y is not None:
                ce = [F.cross_entropy(out.detach(), y.repeat_interleave(k), reduction="none")]
            fb = layer_feedback([flat_idx], [hist_idx.reshape(-1)], ce, num_e)
        return MoEOutput(logits, aux, route, fb[0][0], fb[1][0], fb[2][0], *fb)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(shared, experts)`` parameter counts (the gate counts as shared)."""
    experts = sum(p.numel() for p in model.experts.parameters())
    return sum(p.numel() for p in model.parameters()) - experts, experts


def build_cnn(spec: ModelSpec, expert_ids: HeldExperts | None = None, seed: int = 0) -> MoEClassifier:
    """Build a model with deterministic initial weights for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoEClassifier(spec, expert_ids)
