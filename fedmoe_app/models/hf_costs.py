"""Capacity-planning costs of an ``hf`` model from its config alone: no weights are ever allocated.

A published MoE (Mixtral-8x7B: 47B parameters, 187 GB in float32) cannot be built to be measured,
so everything here runs on tensors without storage:

* **parameters** are counted on the model built on the meta device
  (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``): one expert is its rows of
  the stacked ``experts`` tensors of every MoE layer; everything else is shared (the routers,
  attention, norms, embeddings, and Qwen2-MoE's always-on ``shared_expert`` and its gate);
* **FLOPs and activation memory** are measured on a *twin*: the same config with one or two
  decoder layers (same widths, same experts, same vocabulary), run under
  :class:`~torch._subclasses.fake_tensor.FakeTensorMode` on the CPU device, so every op runs its
  shape function only and the kernels chosen are the CPU's (attention: the CPU flash kernel);
  a training step counts its FLOPs (:class:`~torch.utils.flop_counter.FlopCounterMode`, the
  experts' modules apart) and the bytes of its live tensors
  (:class:`~fedmoe_app.models.memory_probe.LiveBytes`). The per-layer parts (the difference of
  the two twins) are scaled to the model's layers.

Everything is counted in float32, whatever the config's ``torch_dtype``: the memory model counts
float32 weights, gradients, momentum and activations (the app trains in float32, bf16 only under
autocast). The experts run transformers' grouped-matmul path; its kernel has no shape function for float32
on the CPU, so on the twin each grouped matmul is replaced by one matmul of the same rows and
widths (same output, same saved input, same FLOPs). The activation step takes the gradient of
the loss with respect to the decoder's input only: the weights' gradients do not depend on the
batch and would only blur the per-sample slope of the peak.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..capacity import ModelCosts
from ..hf_config import HF_MOE_TYPES, moe_layers
from .hf import moe_blocks
from .hf_spec import HFSpec
from .memory_probe import PROBE_BATCHES, LiveBytes, cached_activation_bytes, costs_from_probe


@dataclass(frozen=True)
class HFParamCounts:
    """Parameters of an ``hf`` model as the app federates it.

    Attributes
    ----------
    shared : int
        Values of the shared state-dict tensors (what every client downloads; a tied
        embedding counts twice, as it travels twice).
    expert : int
        Values of one expert: its rows of the stacked tensors in every MoE layer.
    num_experts : int
        Experts per MoE layer.
    unique_shared : int
        Distinct shared parameters (a tied embedding once): ``total = unique_shared + E * expert``.

    """

    shared: int
    expert: int
    num_experts: int
    unique_shared: int

    @property
    def total(self) -> int:
        """Distinct parameters of the whole model."""
        return self.unique_shared + self.num_experts * self.expert


def _hf_config(config: dict[str, Any]) -> Any:
    """Return the transformers config object of ``config`` (a dict with ``model_type``), no KV cache."""
    from transformers import AutoConfig

    rest = dict(config)
    hf_cfg = AutoConfig.for_model(rest.pop("model_type"), **rest)
    hf_cfg.use_cache = False
    return hf_cfg


def fill_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Return ``config`` with the sizes the planning reads filled in from transformers' defaults.

    A config.json may leave out what its model type defaults (Mixtral's ``num_experts_per_tok``,
    a vocabulary); the values transformers would build with are written in.
    """
    if config.get("model_type") not in HF_MOE_TYPES:
        return dict(config)
    hf_cfg = _hf_config(config)
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_experts_per_tok",
        "max_position_embeddings",
        HF_MOE_TYPES[config["model_type"]],
    )
    return {**{k: getattr(hf_cfg, k) for k in keys if hasattr(hf_cfg, k)}, **config}


def meta_model(config: dict[str, Any]) -> nn.Module:
    """Build the transformers model of ``config`` on the meta device (shapes only, no storage)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            _hf_config(config), attn_implementation="sdpa", dtype=torch.float32
        )


def _stacked(net: nn.Module) -> dict[str, Tensor]:
    """State-dict name -> stacked expert tensor ``[E, ...]`` of every MoE block of ``net``."""
    names = {id(m): n for n, m in net.named_modules()}
    return {
        f"{names[id(block.experts)]}.{name}": p
        for block in moe_blocks(net)
        for name, p in block.experts.named_parameters(recurse=False)
    }


@functools.lru_cache(maxsize=16)
def _param_counts(config_json: str) -> HFParamCounts:
    net = meta_model(json.loads(config_json))
    stacked = _stacked(net)
    if not stacked:
        raise ValueError("the model has no MoE block (a router 'gate' and stacked 'experts')")
    num_experts = {int(t.shape[0]) for t in stacked.values()}
    if len(num_experts) != 1:
        raise ValueError(f"MoE blocks with different numbers of experts: {sorted(num_experts)}")
    state = net.state_dict(keep_vars=True)
    expert = sum(t[0].numel() for t in stacked.values())
    shared = sum(t.numel() for n, t in state.items() if n not in stacked)
    stacked_ids = {id(t) for t in stacked.values()}
    unique = sum(p.numel() for p in net.parameters() if id(p) not in stacked_ids)
    unique += sum(b.numel() for n, b in net.named_buffers() if n in state)
    return HFParamCounts(shared=shared, expert=expert, num_experts=num_experts.pop(), unique_shared=unique)


def param_counts(config: dict[str, Any]) -> HFParamCounts:
    """Count the parameters of ``config``'s model on the meta device (:class:`HFParamCounts`)."""
    return _param_counts(json.dumps(config, sort_keys=True))


def lora_param_counts(config: dict[str, Any], rank: int, target_modules: Sequence[str]) -> tuple[int, int]:
    """``(shared, per expert)`` LoRA adapter values of rank ``rank`` on ``config``'s model.

    Shared: every ``nn.Linear`` whose name is or ends with ``.<target>`` (peft's rule for
    ``target_modules``) gets ``A [r, in]`` and ``B [out, r]``. Experts: every stacked tensor
    ``[E, a, b]`` of an MoE block gets ``r (a + b)`` values per expert and MoE layer (peft's
    ``target_parameters``: ``A [r E, in]``, ``B [out, r E]``). Counted on the meta device.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    net = meta_model(config)
    targets = [t.strip() for t in target_modules if t.strip()]
    shared = sum(
        rank * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    )
    expert = sum(rank * (int(t.shape[1]) + int(t.shape[2])) for t in _stacked(net).values())
    return shared, expert


def twin_config(
    config: dict[str, Any], dense_after: int = 0, moe: int = 1, top_k: int | None = None
) -> dict[str, Any]:
    """``config`` cut to ``moe`` MoE decoder layers followed by ``dense_after`` dense ones (same widths).

    ``top_k`` replaces the experts each token is routed to. Per-layer lists (``layer_types``)
    are cut to the twin's layers; a router's training noise is turned off.
    """
    out = dict(config)
    layers = moe + dense_after
    out["num_hidden_layers"] = layers
    if top_k is not None:
        out["num_experts_per_tok"] = top_k
    if out.get("model_type") in ("qwen2_moe", "qwen3_moe"):
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = list(range(moe, layers))
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = list(out["layer_types"][:1]) * layers
    if "router_jitter_noise" in out:
        out["router_jitter_noise"] = 0.0
    return out


#: Twins run one at a time: the stand-in for grouped matmuls is installed for the whole process.
_TWIN_LOCK = threading.Lock()


def _shape_grouped_mm(real: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``grouped_mm`` that stands in for ``real`` on fake tensors (same rows, widths, FLOPs), else calls it.

    A model running for real in another thread meanwhile keeps transformers' own kernel.
    """

    def grouped_mm(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
        if isinstance(input, FakeTensor):
            return input.to(weight.dtype) @ weight[0]
        return real(input, weight, offs=offs)

    return grouped_mm


@contextmanager
def _fake_twin(config: dict[str, Any]) -> Iterator[nn.Module]:
    """Build ``config``'s model under a fake-tensor mode on the CPU device, grouped matmuls stood in."""
    from unittest import mock

    import transformers.integrations.moe as moe
    from transformers import AutoModelForCausalLM

    with _TWIN_LOCK, FakeTensorMode(allow_non_fake_inputs=True):
        with mock.patch.object(moe, "_grouped_mm", _shape_grouped_mm(moe._grouped_mm)):
            net = AutoModelForCausalLM.from_config(
                _hf_config(config), attn_implementation="sdpa", dtype=torch.float32
            )
            net.set_experts_implementation("grouped_mm")
            net.train()
            yield net


def _tokens(config: dict[str, Any], batch: int, context_length: int) -> Tensor:
    return torch.randint(0, int(config["vocab_size"]), (batch, context_length + 1))


def _step_peak_bytes(config: dict[str, Any], context_length: int) -> float:
    """Per-sequence slope of a training step's live-bytes peak on the fake twin ``config``."""
    peaks = []
    with _fake_twin(config) as net:
        for batch in PROBE_BATCHES:
            tokens = _tokens(config, batch, context_length)
            x, y = tokens[:, :-1], tokens[:, 1:]
            with LiveBytes() as live:
                embeds = net.get_input_embeddings()(x).detach().requires_grad_()
                logits = net(inputs_embeds=embeds, use_cache=False).logits.float()
                flat = logits.reshape(-1, logits.shape[-1])
                F.cross_entropy(
                    flat.detach(), y.reshape(-1), reduction="none"
                )  # the feedback's per-token loss
                loss = F.cross_entropy(flat, y.reshape(-1))
                torch.autograd.grad(loss, [embeds])
                del embeds, logits, flat, loss
            peaks.append(live.peak)
    lo, hi = PROBE_BATCHES
    return (peaks[1] - peaks[0]) / (hi - lo)


def _step_flops(config: dict[str, Any], context_length: int) -> tuple[float, float]:
    """``(shared, experts)`` FLOPs of one sequence's training step (forward + backward) on the fake twin.

    ``experts`` is every experts module run alone on as many (token, expert) rows as the step
    routes (``top_k`` per token), as the old measurement on the built model did; ``shared`` the
    rest of the step.
    """
    with _fake_twin(config) as net:
        tokens = _tokens(config, 1, context_length)
        with FlopCounterMode(display=False) as counter:
            logits = net(input_ids=tokens[:, :-1], use_cache=False).logits.float()
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        experts = 0.0
        k = int(config["num_experts_per_tok"])
        for block in moe_blocks(net):
            experts_module = block.experts
            rows = torch.randn(context_length, int(config["hidden_size"]), requires_grad=True)
            slots = torch.randint(0, int(experts_module.num_experts), (context_length, k))
            weights = torch.full((context_length, k), 1.0 / k, requires_grad=True)
            with FlopCounterMode(display=False) as alone:
                experts_module(rows, slots, weights).sum().backward()
            experts += float(alone.get_total_flops())
    return float(counter.get_total_flops()) - experts, experts


def twin_activation_bytes(config: dict[str, Any], context_length: int) -> tuple[int, int]:
    """Measure ``(fixed, routed)`` activation bytes per sequence on twins, scaled to the layers.

    With ``s(m, k)`` the per-sequence peak slope of a twin of ``m`` MoE layers routing ``k``
    experts per token: ``routed = s(1, 2) - s(1, 1)`` per MoE layer and visited expert,
    ``layer = s(2, 1) - s(1, 1)`` per MoE layer, a dense layer (Qwen-MoE's ``mlp_only_layers``)
    from a twin with one more, dense, layer; the rest (embedding, head, loss) is ``s(1, 1)``
    less one layer. The model's values: ``fixed = rest + L_moe (layer - routed) + L_dense dense``,
    ``routed = L_moe routed``.
    """
    n_layers, n_moe = int(config["num_hidden_layers"]), moe_layers(config)
    two = min(2, int(config["num_experts_per_tok"]))
    s11 = _step_peak_bytes(twin_config(config, top_k=1), context_length)
    s12 = _step_peak_bytes(twin_config(config, top_k=two), context_length) if two > 1 else s11
    s21 = _step_peak_bytes(twin_config(config, moe=2, top_k=1), context_length)
    routed = max(0.0, s12 - s11)
    layer = s21 - s11  # one MoE layer routing one expert per token
    dense = 0.0
    if n_layers > n_moe:
        dense = _step_peak_bytes(twin_config(config, dense_after=1, top_k=1), context_length) - s11
    rest = s11 - layer
    fixed = rest + n_moe * (layer - routed) + (n_layers - n_moe) * dense
    return int(max(0.0, fixed)), int(n_moe * routed)


def twin_flops(config: dict[str, Any], context_length: int) -> tuple[float, float]:
    """Training FLOPs per sequence ``(shared, top-k experts)``, counted on twins and scaled to the layers.

    Matrix products only, as :class:`FlopCounterMode` counts them on the CPU (attention's score
    products run in one fused kernel it does not count).
    """
    n_layers, n_moe = int(config["num_hidden_layers"]), moe_layers(config)
    shared1, experts1 = _step_flops(twin_config(config), context_length)
    shared2, _ = _step_flops(twin_config(config, moe=2), context_length)
    per_layer = shared2 - shared1
    dense = 0.0
    if n_layers > n_moe:
        dense = _step_flops(twin_config(config, dense_after=1), context_length)[0] - shared1
    shared = shared1 + (n_moe - 1) * per_layer + (n_layers - n_moe) * dense
    return shared, n_moe * experts1


@functools.lru_cache(maxsize=8)
def hf_costs(spec: HFSpec) -> ModelCosts:
    """Parameters, FLOPs and activations of ``spec`` per sequence of context-length, from its config.

    Parameters are counted on the meta device (:func:`param_counts`), FLOPs and activations on
    fake-tensor twins (:func:`twin_flops`, :func:`twin_activation_bytes`; the activations are
    kept on disk per configuration by
    :func:`~fedmoe_app.models.memory_probe.cached_activation_bytes`). Nothing the size of the
    model is allocated, so this plans models far larger than the machine's memory.
    """
    config = spec.config
    params = param_counts(config)
    version = importlib.metadata.version("transformers")
    probed = cached_activation_bytes(
        f"hf-twin {dataclasses.replace(spec, weights='')!r} transformers={version}",
        lambda: twin_activation_bytes(config, spec.context_length),
    )
    flops = twin_flops(config, spec.context_length)
    return costs_from_probe(
        spec, "transformer", params=(params.shared, params.expert), probed=probed, flops=flops
    )
