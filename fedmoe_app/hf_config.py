"""Hugging Face MoE configs as plain dicts: the named tiny presets, a config.json, and their checks.

Free of torch and ``transformers`` so the run config can validate ``hf-config`` and
``hf-weights`` at start (:func:`check_hf_config`); :mod:`fedmoe_app.models.hf` builds the model
from the dict :func:`resolve_hf_config` returns.

* A **preset** (``tiny-mixtral``, ``tiny-qwen2-moe``, ``tiny-olmoe``) is the family's
  architecture at the run config's size (``num-layers``, ``d-model``, ``num-heads``,
  ``expert-hidden``, ``num-experts``, ``top-k``, ``context-length``) over bytes (vocabulary 256).
* A **config.json** is taken as it is: its experts per layer and top-k must equal the run
  config's ``num-experts`` and ``top-k`` (the alignment plans over those), its vocabulary must
  hold the 256 byte values and its positions the ``context-length``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: preset name -> transformers ``model_type``
HF_PRESETS = {"tiny-mixtral": "mixtral", "tiny-qwen2-moe": "qwen2_moe", "tiny-olmoe": "olmoe"}
#: supported MoE ``model_type`` -> the config key holding the experts per MoE layer
HF_MOE_TYPES = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
}
BYTE_VOCAB = 256


def preset_config(
    name: str,
    num_layers: int,
    d_model: int,
    num_heads: int,
    expert_hidden: int,
    num_experts: int,
    top_k: int,
    context_length: int,
) -> dict[str, Any]:
    """Return the transformers config dict of preset ``name`` at the given size (byte vocabulary)."""
    model_type = HF_PRESETS[name]
    out: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": BYTE_VOCAB,
        "hidden_size": d_model,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": context_length,
        "num_experts_per_tok": top_k,
        HF_MOE_TYPES[model_type]: num_experts,
        "intermediate_size": expert_hidden,
        "tie_word_embeddings": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if model_type == "qwen2_moe":
        out.update(moe_intermediate_size=expert_hidden, shared_expert_intermediate_size=expert_hidden)
        out.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if model_type == "mixtral":
        out["router_jitter_noise"] = 0.0
    return out


def read_config_file(value: str) -> dict[str, Any]:
    """Read a config.json named by ``hf-config`` (a file, or a folder holding ``config.json``).

    Raises
    ------
    ValueError
        If the file is missing or not a JSON object, naming the key.

    """
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        presets = ", ".join(HF_PRESETS)
        raise ValueError(
            f"run-config key 'hf-config' = {value!r} is invalid: no such file; allowed: a config.json "
            f"path or a preset ({presets})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"run-config key 'hf-config' = {value!r} is invalid: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"run-config key 'hf-config' = {value!r} is invalid: not a JSON object")
    return data


def is_preset_name(value: str) -> bool:
    """Whether ``value`` names a preset rather than a path (no separator, no ``.json``)."""
    return "/" not in value and not value.endswith(".json") and not Path(value).expanduser().exists()


def resolve_hf_config(value: str, **sizes: int) -> dict[str, Any]:
    """Return the config dict of ``hf-config`` = ``value``: a preset at ``sizes`` or the file's content."""
    if value in HF_PRESETS:
        return preset_config(value, **sizes)
    if is_preset_name(value):
        raise ValueError(
            f"run-config key 'hf-config' = {value!r} is invalid: unknown preset; allowed: "
            f"{', '.join(HF_PRESETS)} or a config.json path"
        )
    return read_config_file(value)


def moe_layers(config: dict[str, Any]) -> int:
    """Count the decoder layers of ``config`` with an MoE feed-forward (Qwen-MoE may keep some dense)."""
    n = int(config.get("num_hidden_layers", 0))
    if config.get("model_type") not in ("qwen2_moe", "qwen3_moe"):
        return n
    step, dense = int(config.get("decoder_sparse_step", 1)), set(config.get("mlp_only_layers") or [])
    return sum(1 for i in range(n) if i not in dense and (i + 1) % step == 0)


def hf_shape(config: dict[str, Any], value: str) -> tuple[int, int]:
    """``(experts per MoE layer, top-k)`` of ``config``; raises if it is not a supported MoE."""
    model_type = config.get("model_type")
    if model_type not in HF_MOE_TYPES:
        raise ValueError(
            f"run-config key 'hf-config' = {value!r} is invalid: model_type {model_type!r} is not a "
            f"supported MoE causal LM; allowed: {', '.join(HF_MOE_TYPES)}"
        )
    experts, top_k = int(config.get(HF_MOE_TYPES[model_type], 0)), int(config.get("num_experts_per_tok", 0))
    if experts < 1 or moe_layers(config) < 1:
        raise ValueError(f"run-config key 'hf-config' = {value!r} is invalid: it has no MoE layer")
    if not 1 <= top_k <= experts:
        raise ValueError(
            f"run-config key 'hf-config' = {value!r} is invalid: num_experts_per_tok = {top_k}; "
            f"allowed: 1..{experts} (the experts per layer)"
        )
    return experts, top_k


def check_hf_config(value: str, weights: str, num_experts: int, top_k: int, context_length: int) -> None:
    """Validate ``hf-config`` and ``hf-weights`` against the run config (no torch, no transformers).

    Raises
    ------
    ValueError
        Naming the key: an unknown preset, a missing or unreadable file, a config that is not a
        supported MoE, a top-k above its experts per layer, experts or top-k differing from
        ``num-experts`` / ``top-k``, a vocabulary under 256, too few positions, or missing weights.

    """
    if value not in HF_PRESETS:
        config = resolve_hf_config(value)
        experts, k = hf_shape(config, value)
        for key, want, got in (("num-experts", experts, num_experts), ("top-k", k, top_k)):
            if want != got:
                raise ValueError(
                    f"run-config key '{key}' = {got} is invalid for hf-config {value!r}; allowed: {want}"
                )
        vocab = int(config.get("vocab_size", 0))
        if vocab < BYTE_VOCAB:
            raise ValueError(
                f"run-config key 'hf-config' = {value!r} is invalid: vocab_size = {vocab}; allowed: >= 256 "
                "(byte-level text)"
            )
        positions = int(config.get("max_position_embeddings", context_length))
        if positions < context_length:
            raise ValueError(
                f"run-config key 'context-length' = {context_length} is invalid for hf-config {value!r}; "
                f"allowed: <= {positions}"
            )
    if weights:
        path = Path(weights).expanduser()
        ok = path.is_file() or (path.is_dir() and any(path.glob("*.safetensors")))
        if not ok:
            raise ValueError(
                f"run-config key 'hf-weights' = {weights!r} is invalid; allowed: a .safetensors file or a "
                "folder holding .safetensors files"
            )
