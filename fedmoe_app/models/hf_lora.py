"""LoRA on an ``hf`` model with ``peft``: adapters on chosen modules and on every held expert.

``peft = "lora"`` (:class:`~fedmoe_app.config.sections.LoraSection`) fine-tunes an
:class:`~fedmoe_app.models.hf.HFMoE` through ``peft.inject_adapter_in_model``:

* ``target_modules`` (``lora-target-modules``, attention by default) get ``peft``'s
  ``lora.Linear`` adapters: shared tensors, averaged over every trainer;
* every MoE block's stacked ``experts.gate_up_proj`` / ``experts.down_proj`` get ``peft``'s
  ``ParamWrapper`` adapters (``target_parameters``). Its ``lora_A`` weight is ``[r * E_held, in]``
  (expert-major rows) and its ``lora_B`` weight ``[out, r * E_held]`` (expert-minor columns), so
  each expert's adapter is separable. :func:`lora_state` presents them stacked by slot, as
  ``<block>.experts.<param>_lora_A [E_held, r, in]`` and ``<block>.experts.<param>_lora_B
  [E_held, out, r]``, so :mod:`.arrays` names slot ``s`` ``experts.<global id>.<block>.<param>_lora_A``
  and the server averages each expert's adapter over that expert's trainers, exactly as it does
  full expert weights; :func:`load_lora_state` writes them back.

The base weights, the router included, are frozen (``peft`` marks only adapters trainable)
and never travel: every node builds the same base, from ``hf-weights`` or, for a preset, by
:func:`seeded_init` (each module, and each expert's rows, from its own seed, so a client holding
experts 2 and 5 has rows equal to the full model's rows 2 and 5). :func:`write_adapter` writes
the global adapters as a PEFT adapter folder for ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..config.sections import LoraSection

if TYPE_CHECKING:
    from .hf import HFMoE
    from .hf_spec import HFSpec

#: peft's adapter name (one adapter per model)
ADAPTER = "default"
#: the stacked expert tensors every MoE block of transformers 5 holds
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")


def lora_config(lora: LoraSection) -> Any:
    """Return the ``peft.LoraConfig`` of ``lora`` (dropout 0: see :func:`apply_lora`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=list(lora.target_modules),
        target_parameters=list(EXPERT_PARAMETERS),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(net: nn.Module, lora: LoraSection) -> nn.Module:
    """Inject the adapters into ``net`` in place; only they stay trainable.

    ``lora.dropout`` applies to the inputs of the ``target_modules`` adapters (peft's
    ``ParamWrapper`` cannot drop out inside the experts' batched matmuls).
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    inject_adapter_in_model(lora_config(lora), net, adapter_name=ADAPTER)
    if lora.dropout > 0:
        for module in net.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                module.lora_dropout[ADAPTER] = nn.Dropout(lora.dropout)
    return net


def _wrappers(net: nn.Module) -> list[tuple[str, Any]]:
    """``(federated name stem, ParamWrapper)`` of every adapted expert tensor, in module order."""
    from peft.tuners.lora import ParamWrapper

    out = []
    for name, module in net.named_modules():
        if isinstance(module, ParamWrapper):
            path = name
            while path.endswith(".base_layer"):  # peft nests one wrapper per adapted parameter
                path = path[: -len(".base_layer")]
            out.append((f"{path}.{module.parameter_name}", module))
    return out


def _linear_layers(net: nn.Module) -> list[tuple[str, Any]]:
    """Return ``(module name, lora layer)`` of every adapted module other than the experts' tensors."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    return [
        (n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)
    ]


def lora_state(net: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Return the adapters of ``net`` by federated name: shared ones as they are, experts' stacked by slot.

    Shared adapters keep their state names (``...q_proj.lora_A.default.weight``); each expert
    tensor's pair is ``<stem>_lora_A [E_held, r, in]`` and ``<stem>_lora_B [E_held, out, r]``
    (detached views of peft's weights; ``<stem>`` is ``<block>.experts.<param>``).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _linear_layers(net):
        out[f"{prefix}{name}.lora_A.{ADAPTER}.weight"] = layer.lora_A[ADAPTER].weight.detach()
        out[f"{prefix}{name}.lora_B.{ADAPTER}.weight"] = layer.lora_B[ADAPTER].weight.detach()
    for stem, wrapper in _wrappers(net):
        a, b, e = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight, wrapper.num_experts
        out[f"{prefix}{stem}_lora_A"] = a.detach().view(e, -1, a.shape[1])
        out[f"{prefix}{stem}_lora_B"] = b.detach().view(b.shape[0], -1, e).permute(2, 0, 1)
    return out


@torch.no_grad()
def load_lora_state(net: nn.Module, state: Mapping[str, Tensor], prefix: str = "") -> None:
    """Write :func:`lora_state`-named tensors back into ``net``'s adapters.

    Raises
    ------
    KeyError
        If ``state`` does not name exactly the adapters of ``net``.
    ValueError
        If a tensor has the wrong shape.

    """
    want = lora_state(net, prefix)
    missing, extra = set(want) - set(state), set(state) - set(want)
    if missing or extra:
        raise KeyError(f"adapters do not match the model: missing={sorted(missing)}, extra={sorted(extra)}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(want[name].shape):
            raise ValueError(f"{name}: expected shape {tuple(want[name].shape)}, got {tuple(value.shape)}")
    for name, layer in _linear_layers(net):
        layer.lora_A[ADAPTER].weight.copy_(state[f"{prefix}{name}.lora_A.{ADAPTER}.weight"])
        layer.lora_B[ADAPTER].weight.copy_(state[f"{prefix}{name}.lora_B.{ADAPTER}.weight"])
    for stem, wrapper in _wrappers(net):
        a, b = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight
        a.copy_(state[f"{prefix}{stem}_lora_A"].reshape(a.shape))
        b.copy_(state[f"{prefix}{stem}_lora_B"].permute(1, 2, 0).reshape(b.shape))


def expert_adapter_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Return the experts' adapter weights (what a read-only holder does not train)."""
    return [p for _, w in _wrappers(net) for p in (w.lora_A[ADAPTER].weight, w.lora_B[ADAPTER].weight)]


def _seed(seed: int, name: str) -> int:
    """Return a seed for ``name`` under the run's ``seed``, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def seeded_init(net: nn.Module, seed: int, expert_rows: Mapping[nn.Module, Sequence[int]]) -> None:
    """Initialise ``net`` with its own ``_init_weights``, each module from its own seed.

    The experts modules in ``expert_rows`` (module → global id of each slot) are initialised one
    expert at a time, expert ``e`` from the seed of ``(module name, e)``. So the base weights do
    not depend on the experts a node holds: every node builds the same base for ``seed``.
    """
    for name, module in net.named_modules():
        ids = expert_rows.get(module)
        if ids is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(seed, name))
                net._init_weights(module)
            continue
        stacked = dict(module.named_parameters(recurse=False))
        for slot, expert in enumerate(ids):
            single = {n: nn.Parameter(p.new_empty((1, *p.shape[1:]))) for n, p in stacked.items()}
            for n, p in single.items():
                setattr(module, n, p)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(seed, f"{name}#{expert}"))
                net._init_weights(module)
            for n, p in single.items():
                stacked[n][slot].copy_(p[0])
        for n, p in stacked.items():
            setattr(module, n, p)


@functools.lru_cache(maxsize=8)
def check_targets(spec: HFSpec) -> None:
    """Check that every ``lora-target-modules`` name matches a linear module of the model.

    Builds the model on the meta device (no weights allocated); once per spec in a process.

    Raises
    ------
    ConfigError
        Naming ``lora-target-modules``, the names that match no ``nn.Linear`` and the ones that do.

    """
    from .hf_costs import meta_model

    net = meta_model(spec.config)
    linear = {n for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    targets = spec.lora.target_modules
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if unmatched:
        suffixes = sorted({n.rpartition(".")[2] for n in linear})
        raise ConfigError(
            f"run-config key 'lora-target-modules' = {','.join(spec.lora.target_modules)!r} is invalid: "
            f"{unmatched} match no linear module of the model; allowed: suffixes of its linear "
            f"modules ({', '.join(suffixes)})"
        )


def base_state_dict(model: HFMoE) -> dict[str, Tensor]:
    """Return the base weights of ``model.net`` under transformers' own names (no adapters, no wrappers)."""
    return {n.replace(".base_layer", ""): t for n, t in model.net.state_dict().items() if ".lora_" not in n}


def write_adapter(folder: str | Path, model: HFMoE) -> Path:
    """Write ``model``'s adapters as a PEFT adapter folder over all experts in global order.

    ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained``
    writes them; ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``
    loads them onto the base model (``lora_dropout`` is written as 0: ``peft`` refuses dropout
    with ``target_parameters``, and inference uses none).

    Raises
    ------
    ValueError
        If ``model`` has no adapters or does not hold every expert in every MoE layer.

    """
    from safetensors.torch import save_file

    lora = model.spec.lora
    if lora is None:
        raise ValueError("write_adapter needs a model built with peft = 'lora'")
    every = list(range(model.spec.num_experts))
    if any(ids != every for ids in model.layer_ids):
        raise ValueError(f"write_adapter needs a model holding every expert, it holds {model.layer_ids}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = lora_config(lora)
    config.save_pretrained(str(out))
    state = {
        "base_model.model." + n.replace(f".{ADAPTER}.", "."): t.detach().cpu().contiguous()
        for n, t in model.net.state_dict().items()
        if ".lora_" in n
    }
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def write_adapter_from_arrays(folder: str | Path, spec: HFSpec, arrays: Mapping[str, Any]) -> Path:
    """Write the global adapters ``arrays`` (the server's model under ``peft = "lora"``) as a PEFT folder."""
    from .arrays import load_arrays
    from .hf import build_hf

    model = build_hf(spec)
    load_arrays(model, arrays)
    return write_adapter(folder, model)
