"""``hf``: a Hugging Face ``transformers`` MoE causal LM as an :class:`MoEModel`.

Imported only when a run chooses ``model = "hf"`` (``transformers`` is the optional extra
``hf``). :class:`HFMoE` builds ``AutoModelForCausalLM.from_config`` (random init, or local
weights read by :mod:`.hf_weights`) and adapts every MoE block (a module with a router
``gate`` and stacked ``experts``, the layout of Mixtral, Qwen2/Qwen3-MoE and OLMoE in
transformers 5):

* the experts' stacked tensors (``gate_up_proj [E, 2h, d]``, ``down_proj [E, d, h]``) of each
  MoE layer are cut to the rows of the experts held in that layer (the same in every layer:
  tied; or a set per layer: untied), so slot ``s`` holds the layer's ``s``-th held expert; their
  state names (``model.layers.<l>.mlp.experts.gate_up_proj``) carry the ``experts`` component
  the interface needs;
* the router is replaced by :class:`MaskedRouter`, which keeps its weight (one row per global
  expert, same state name) and masks the logits of absent experts before the top-k choice,
  then hands the experts module slot indices; it records the feedback of the pass;
* under ``peft = "lora"`` (:mod:`.hf_lora`) the base is frozen and only adapters train and
  travel (:meth:`HFMoE.federated_state`).

What capacity planning needs of the model is counted from its config, without building it
(:mod:`.hf_costs`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hf_lora import apply_lora, expert_adapter_parameters, load_lora_state, lora_state, seeded_init
from .hf_spec import HFSpec
from .hf_weights import load_weights
from .interface import HeldExperts, MoEModel, MoEOutput


class MaskedRouter(nn.Module):
    """Top-k router over the held experts; returns ``(logits, weights, slots)`` like transformers'.

    ``ctx`` (set by :class:`HFMoE` before each pass) is ``(held [E] bool, slot_of [E], k, hist_k)``;
    each call appends ``(chosen global ids [N k], unmasked top-k [N hist_k], aux loss)`` to
    ``records``.
    """

    def __init__(self, weight: nn.Parameter, normalize: bool) -> None:
        super().__init__()
        self.weight = weight
        self.normalize = normalize
        self.ctx: tuple[Tensor, Tensor, int, int] | None = None
        self.records: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route rows of ``hidden [..., d]``; slot indices ``[N, k]`` for the cut experts module."""
        held, slot_of, k, hist_k = self.ctx
        logits = F.linear(hidden.reshape(-1, self.weight.shape[1]), self.weight)  # [N, E]
        masked = logits.masked_fill(~held, float("-inf"))
        probs = F.softmax(masked.float(), dim=-1)
        top_val, top_idx = probs.topk(k, dim=-1)
        if self.normalize:
            top_val = top_val / top_val.sum(dim=-1, keepdim=True)
        flat = top_idx.reshape(-1)
        frac = torch.bincount(flat, minlength=held.numel()).to(probs.dtype) / flat.numel()
        aux = int(held.sum()) * (frac * probs.mean(dim=0)).sum()  # Switch balance loss over held
        self.records.append((flat, logits.detach().topk(hist_k, dim=-1).indices.reshape(-1), aux))
        return logits, top_val.to(logits.dtype), slot_of[top_idx]


def moe_blocks(net: nn.Module) -> list[nn.Module]:
    """Return the MoE blocks of a transformers model (a router ``gate`` and stacked ``experts``)."""
    return [
        m
        for m in net.modules()
        if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")
    ]


class HFMoE(MoEModel):
    """A transformers MoE causal LM holding ``expert_ids`` of every MoE layer.

    Parameters
    ----------
    spec : HFSpec
        The config (and optional weights).
    expert_ids : HeldExperts | None
        Global ids held in every MoE layer (tied), or one list per MoE layer (untied);
        ``None`` holds all.

    """

    def __init__(self, spec: HFSpec, expert_ids: HeldExperts | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.spec = spec
        config = spec.config
        hf_cfg = AutoConfig.for_model(config.pop("model_type"), **config)
        hf_cfg.use_cache = False
        # a client's part of the experts is built on the meta device and then materialised, so
        # the experts it does not hold are never allocated (nor read from hf-weights)
        on_meta = expert_ids is not None
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self.net = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        blocks = moe_blocks(self.net)
        per_layer = self._hold(spec.num_experts, expert_ids, len(blocks))
        names = {id(m): n for n, m in self.net.named_modules()}
        rows: dict[str, list[int]] = {}
        for block, ids in zip(blocks, per_layer):
            experts, index = block.experts, torch.tensor(ids, device=block.gate.weight.device)
            for name, p in list(experts.named_parameters(recurse=False)):
                setattr(experts, name, nn.Parameter(p.detach().index_select(0, index).clone()))
                rows[f"{names[id(experts)]}.{name}"] = list(ids)
            experts.num_experts = len(ids)
        if on_meta:
            self.net.to_empty(device="cpu")
        if spec.lora is not None:  # base weights never travel: the same on every node for the seed
            seeded_init(self.net, spec.lora.base_seed, {b.experts: ids for b, ids in zip(blocks, per_layer)})
        elif on_meta:
            self.net.initialize_weights()  # the model's own init, its rotary buffers included
        if on_meta or spec.lora is not None:
            self.net.tie_weights()
        if spec.weights:
            load_weights(self.net, spec.weights, rows, spec.num_experts, spec.weights_key)
        for block in blocks:
            block.gate = MaskedRouter(block.gate.weight, bool(getattr(block.gate, "norm_topk_prob", True)))
        self.routers = [b.gate for b in blocks]
        if spec.lora is not None:
            apply_lora(self.net, spec.lora)  # adapters only train: base and routers frozen

    def federated_state(self) -> dict[str, Tensor]:
        """Every weight, or under ``peft = "lora"`` the adapters only (:func:`.hf_lora.lora_state`)."""
        if self.spec.lora is None:
            return super().federated_state()
        return lora_state(self.net, prefix="net.")

    def load_federated_state(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`federated_state`-named tensors (under LoRA: into the adapters)."""
        if self.spec.lora is None:
            super().load_federated_state(state)
        else:
            load_lora_state(self.net, state, prefix="net.")

    def expert_parameters(self) -> list[nn.Parameter]:
        """Return the experts' weights, or under LoRA their adapters (the base stays frozen)."""
        if self.spec.lora is None:
            return super().expert_parameters()
        return expert_adapter_parameters(self.net)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every decoder layer's activations in backward instead of keeping them.

        transformers' own activation (gradient) checkpointing, non-reentrant; run-config
        ``grad-checkpointing``. The routers' feedback is recorded in the forward pass only.
        """
        self.net.activation_checkpointing_enable({"use_reentrant": False})

    def forward(self, x: Tensor, y: Tensor | None = None) -> MoEOutput:
        """Next-byte logits ``[B, T, V]`` of ``x [B, T]``, with feedback per MoE layer and summed."""
        b, t = x.shape
        if t > self.spec.context_length:
            raise ValueError(f"sequence length {t} exceeds context-length {self.spec.context_length}")
        num_e, k = self.spec.num_experts, self.top_k
        for layer, r in enumerate(self.routers):
            r.ctx = (self.layer_held[layer], self.layer_slot_of[layer], k, min(self.spec.top_k, num_e))
            r.records = []
        logits = self.net(input_ids=x.long(), use_cache=False).logits.float()
        chosen = [rec[0] for r in self.routers for rec in r.records]
        hist = [rec[1] for r in self.routers for rec in r.records]
        aux = torch.stack([rec[2] for r in self.routers for rec in r.records]).mean()
        for r in self.routers:
            r.records = []
        return self.token_routed_output(logits, aux, y, chosen, hist, k)


def build_hf(spec: HFSpec, expert_ids: HeldExperts | None = None, seed: int = 0) -> HFMoE:
    """Build the ``hf`` model with deterministic initial weights for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HFMoE(spec, expert_ids)
