"""A compact decoder-only transformer MoE in the style of Mixtral, over bytes (vocabulary 256).

``embed → L × [x + attn(rmsnorm(x)); x + moe(rmsnorm(x))] → rmsnorm → head``:

* attention: causal multi-head self-attention with rotary position embeddings (RoPE), no
  biases, :func:`torch.nn.functional.scaled_dot_product_attention`;
* every block's feed-forward is an MoE: a linear router (``gate``, one logit per *global*
  expert) picks the top-k held experts of each token, their SwiGLU outputs
  (``w2(silu(x w1) * (x w3))``) are mixed with the softmax of the k chosen logits (Mixtral).

A sub-model holds a subset of the experts in every block (the same ids in every block: tied
layers; or a set per block: untied); each block's router logits of the experts that block does
not hold are masked before its top-k choice, so an absent expert never gets a token and its
router row never gets a gradient. Weights of the
experts of a block are stacked by slot (``blocks.<l>.moe.experts.w1`` is ``[n_held, d, h]``)
and dispatched with one grouped matmul per projection
(:func:`torch.nn.functional.grouped_mm`), or a loop over the held experts where the
device has no grouped matmul.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capacity import ModelCosts
from ..config import RunConfig
from .experts import _grouped_matmul, grouped_supported
from .interface import HeldExperts, MoEModel, MoEOutput
from .memory_probe import (
    activation_bytes_per_sample,
    byte_windows,
    cached_activation_bytes,
    costs_from_probe,
)

INIT_STD = 0.02


@dataclass(frozen=True)
class TransformerSpec:
    """Shape of a transformer MoE; no field has a default (:meth:`from_config` fills them)."""

    vocab_size: int
    context_length: int
    num_layers: int
    d_model: int
    num_heads: int
    num_experts: int
    top_k: int
    expert_hidden: int

    @classmethod
    def from_config(cls, cfg: RunConfig, info: Any) -> TransformerSpec:
        """Sizes from ``cfg``; the vocabulary from the dataset (``info.vocab_size``)."""
        return cls(
            vocab_size=int(info.vocab_size),
            context_length=cfg.context_length,
            num_layers=cfg.num_layers,
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            expert_hidden=cfg.expert_hidden,
        )

    @property
    def routes_per_example(self) -> int:
        """Routing decisions per sequence and chosen expert: every token in every block."""
        return self.context_length * self.num_layers

    def build(self, expert_ids: HeldExperts | None = None, seed: int = 0) -> TransformerMoE:
        """Build the model holding ``expert_ids`` (all if None), initialised from ``seed``."""
        return build_transformer(self, expert_ids, seed)

    def costs(self) -> ModelCosts:
        """Parameters, activations and FLOPs as capacity planning sees them."""
        return transformer_costs(self)


class SwiGLUExperts(nn.Module):
    """``n`` SwiGLU experts stacked by slot: ``w1, w3 [n, d, h]``, ``w2 [n, h, d]``."""

    def __init__(self, n: int, d: int, h: int, out_std: float) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, d, h).normal_(0.0, INIT_STD))
        self.w3 = nn.Parameter(torch.empty(n, d, h).normal_(0.0, INIT_STD))
        self.w2 = nn.Parameter(torch.empty(n, h, d).normal_(0.0, out_std))

    def forward(self, x: Tensor, slots: Tensor) -> Tensor:
        """Apply expert ``slots[i]`` to row ``x[i]`` (rows sorted by slot, then unsorted)."""
        order = torch.argsort(slots, stable=True)
        xs = x.index_select(0, order)
        counts = torch.bincount(slots, minlength=self.w1.shape[0])
        if grouped_supported(x.device, x.dtype):
            offs = torch.cumsum(counts, 0).to(torch.int32)
            hid = F.silu(_grouped_matmul(xs, self.w1, offs)) * _grouped_matmul(xs, self.w3, offs)
            out = _grouped_matmul(hid, self.w2, offs)
        else:  # one matmul per held expert (a host sync for the split sizes)
            parts = xs.split(counts.tolist())
            out = torch.cat(
                [(F.silu(p @ self.w1[s]) * (p @ self.w3[s])) @ self.w2[s] for s, p in enumerate(parts)]
            )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return out.index_select(0, inverse)


class MoEFeedForward(nn.Module):
    """Router + SwiGLU experts; top-k over the held experts, softmax over the chosen logits."""

    def __init__(self, spec: TransformerSpec, n_held: int) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.d_model, spec.num_experts, bias=False)
        out_std = INIT_STD / math.sqrt(2 * spec.num_layers)
        self.experts = SwiGLUExperts(n_held, spec.d_model, spec.expert_hidden, out_std)

    def forward(self, x: Tensor, held: Tensor, slot_of: Tensor, k: int, hist_k: int):
        """Route rows ``x [N, d]``; return ``(out, aux loss, chosen ids [N k], unmasked top-k)``."""
        logits = self.gate(x)  # [N, E], all global experts
        masked = logits.masked_fill(~held, float("-inf"))
        top_val, top_idx = masked.topk(k, dim=-1)
        weights = F.softmax(top_val, dim=-1)
        flat = top_idx.reshape(-1)
        out = self.experts(x.repeat_interleave(k, dim=0), slot_of[flat])
        out = (weights.reshape(-1, 1) * out).view(-1, k, x.shape[-1]).sum(dim=1)
        probs = F.softmax(masked, dim=-1)  # Switch balance loss over the held experts
        frac = torch.bincount(flat, minlength=held.numel()).to(probs.dtype) / flat.numel()
        aux = self.experts.w1.shape[0] * (frac * probs.mean(dim=0)).sum()
        return out, aux, flat, logits.detach().topk(hist_k, dim=-1).indices.reshape(-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x [B, H, T, hd]`` (pairs of even/odd features)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, no biases."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.heads = spec.num_heads
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=False)
        self.proj = nn.Linear(spec.d_model, spec.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``[B, T, d] → [B, T, d]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then the MoE feed-forward."""

    def __init__(self, spec: TransformerSpec, n_held: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(spec.d_model)
        self.attn = CausalSelfAttention(spec)
        self.moe_norm = nn.RMSNorm(spec.d_model)
        self.moe = MoEFeedForward(spec, n_held)


class TransformerMoE(MoEModel):
    """Decoder-only byte-level transformer with an MoE feed-forward in every block.

    Parameters
    ----------
    spec : TransformerSpec
        Shape of the model.
    expert_ids : HeldExperts | None
        Global ids of the experts this instance holds in every block (tied), or one list per
        block (untied); ``None`` holds all.

    """

    def __init__(self, spec: TransformerSpec, expert_ids: HeldExperts | None = None) -> None:
        super().__init__()
        self.spec = spec
        per_layer = self._hold(spec.num_experts, expert_ids, spec.num_layers)
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.blocks = nn.ModuleList(Block(spec, len(ids)) for ids in per_layer)
        self.norm = nn.RMSNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "gate" not in name:
                std = INIT_STD / math.sqrt(2 * spec.num_layers) if name.endswith("proj.weight") else INIT_STD
                nn.init.normal_(p, 0.0, std)
        half = spec.d_model // spec.num_heads // 2
        freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
        angle = torch.outer(torch.arange(spec.context_length, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x: Tensor, y: Tensor | None = None) -> MoEOutput:
        """Next-byte logits ``[B, T, V]`` of bytes ``x [B, T]``, with feedback per block and summed.

        The per-expert loss signal is the (detached) cross-entropy of each token the expert
        served in a block (summed over the blocks for the totals).
        """
        b, t = x.shape
        if t > self.spec.context_length:
            raise ValueError(f"sequence length {t} exceeds context-length {self.spec.context_length}")
        k, hist_k = self.top_k, min(self.spec.top_k, self.spec.num_experts)
        cos, sin = self.cos[:t], self.sin[:t]
        h = self.embed(x.long())
        aux, chosen, hist = [], [], []
        for layer, block in enumerate(self.blocks):
            h = h + block.attn(block.attn_norm(h), cos, sin)
            held, slot_of = self.layer_held[layer], self.layer_slot_of[layer]
            m, a, flat, top = block.moe(block.moe_norm(h).view(b * t, -1), held, slot_of, k, hist_k)
            h = h + m.view(b, t, -1)
            aux.append(a)
            chosen.append(flat)
            hist.append(top)
        logits = self.head(self.norm(h))
        return self.token_routed_output(logits, torch.stack(aux).mean(), y, chosen, hist, k)


def build_transformer(
    spec: TransformerSpec, expert_ids: HeldExperts | None = None, seed: int = 0
) -> TransformerMoE:
    """Build a transformer MoE with deterministic initial weights for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerMoE(spec, expert_ids)


@functools.lru_cache(maxsize=8)
def transformer_costs(spec: TransformerSpec) -> ModelCosts:
    """Count parameters, activations and FLOPs of ``spec`` for capacity planning (per sequence).

    Parameters follow the layers above; FLOPs take 2 per multiply-add and forward + backward as
    3x forward. Activations are measured
    (:func:`~fedmoe_app.models.memory_probe.activation_bytes_per_sample`): the per-sequence slope
    of the peak memory of a training step holding one and two experts, so the memory model
    sees saved activations, their gradients and the backward's temporaries as they are.
    """
    d, h, e, t, n_layers, v = (
        spec.d_model,
        spec.expert_hidden,
        spec.num_experts,
        spec.context_length,
        spec.num_layers,
        spec.vocab_size,
    )
    per_block_shared = 4 * d * d + d * e + 2 * d
    shared = v * d + n_layers * per_block_shared + d + d * v
    expert = n_layers * 3 * d * h
    attn_fwd = 2 * 4 * d * d + 2 * 2 * t * d  # projections + scores and mixing (per token, T/2 avg x 2)
    fwd_shared = t * (n_layers * (attn_fwd + 2 * d * e) + 2 * d * v)
    fwd_experts = t * n_layers * spec.top_k * 2 * 3 * d * h
    fixed, routed = cached_activation_bytes(
        f"transformer-moe {spec!r}",
        lambda: activation_bytes_per_sample(
            lambda ids: build_transformer(spec, ids, seed=0), byte_windows(t), e
        ),
    )
    flops = (3.0 * fwd_shared, 3.0 * fwd_experts)
    return costs_from_probe(spec, "transformer", params=(shared, expert), probed=(fixed, routed), flops=flops)
