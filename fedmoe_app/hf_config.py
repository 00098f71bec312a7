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
* A **model folder** (``hf-model``, the ``save_pretrained`` layout: ``config.json``, the
  tokenizer's files, ``model.safetensors`` or shards) supplies the config, the weights and the
  tokenizer; :func:`check_hf_model` checks it as a config.json, and that its tokenizer's
  vocabulary (read from ``tokenizer.json``) fits the model's embedding.
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


#: files of a tokenizer that ``AutoTokenizer`` reads from a folder (any one of these sets)
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def read_config_file(value: str, key: str = "hf-config") -> dict[str, Any]:
    """Read a config.json named by run-config ``key`` (a file, or a folder holding ``config.json``).

    Raises
    ------
    ValueError
        If the file is missing or not a JSON object, naming the key.

    """
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        allowed = (
            f"a config.json path or a preset ({', '.join(HF_PRESETS)})"
            if key == "hf-config"
            else "a model folder (save_pretrained layout) holding config.json"
        )
        raise ValueError(
            f"run-config key {key!r} = {value!r} is invalid: no such file {path}; allowed: {allowed}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"run-config key {key!r} = {value!r} is invalid: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"run-config key {key!r} = {value!r} is invalid: not a JSON object")
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


def hf_shape(config: dict[str, Any], value: str, key: str = "hf-config") -> tuple[int, int]:
    """``(experts per MoE layer, top-k)`` of ``config``; raises naming ``key`` if not a supported MoE."""
    model_type = config.get("model_type")
    if model_type not in HF_MOE_TYPES:
        raise ValueError(
            f"run-config key {key!r} = {value!r} is invalid: model_type {model_type!r} is not a "
            f"supported MoE causal LM; allowed: {', '.join(HF_MOE_TYPES)}"
        )
    experts, top_k = int(config.get(HF_MOE_TYPES[model_type], 0)), int(config.get("num_experts_per_tok", 0))
    if experts < 1 or moe_layers(config) < 1:
        raise ValueError(f"run-config key {key!r} = {value!r} is invalid: it has no MoE layer")
    if not 1 <= top_k <= experts:
        raise ValueError(
            f"run-config key {key!r} = {value!r} is invalid: num_experts_per_tok = {top_k}; "
            f"allowed: 1..{experts} (the experts per layer)"
        )
    return experts, top_k


def _check_shape(
    config: dict[str, Any], value: str, key: str, num_experts: int, top_k: int, context_length: int
) -> None:
    """Experts, top-k and positions of a config file against the run config (errors name the key)."""
    experts, k = hf_shape(config, value, key)
    for name, want, got in (("num-experts", experts, num_experts), ("top-k", k, top_k)):
        if want != got:
            raise ValueError(
                f"run-config key '{name}' = {got} is invalid for {key} {value!r}; allowed: {want}"
            )
    positions = int(config.get("max_position_embeddings", context_length))
    if positions < context_length:
        raise ValueError(
            f"run-config key 'context-length' = {context_length} is invalid for {key} {value!r}; "
            f"allowed: <= {positions}"
        )


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
        _check_shape(config, value, "hf-config", num_experts, top_k, context_length)
        vocab = int(config.get("vocab_size", 0))
        if vocab < BYTE_VOCAB:
            raise ValueError(
                f"run-config key 'hf-config' = {value!r} is invalid: vocab_size = {vocab}; allowed: >= 256 "
                "(byte-level text)"
            )
    if weights:
        path = Path(weights).expanduser()
        ok = path.is_file() or (path.is_dir() and any(path.glob("*.safetensors")))
        if not ok:
            raise ValueError(
                f"run-config key 'hf-weights' = {weights!r} is invalid; allowed: a .safetensors file or a "
                "folder holding .safetensors files"
            )


def tokenizer_vocab_size(folder: Path) -> int | None:
    """Token ids a folder's ``tokenizer.json`` can produce (its vocabulary and added tokens), from JSON.

    ``None`` when the folder has no ``tokenizer.json`` (its vocabulary is checked when the tokenizer
    is loaded, :func:`fedmoe_app.data.tokens.load_tokenizer`).

    Raises
    ------
    ValueError
        If ``tokenizer.json`` is not a tokenizer's JSON (naming ``hf-model``).

    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"run-config key 'hf-model' = {str(folder)!r} is invalid: {path.name} is not a tokenizer "
            f"({exc!r})"
        ) from None
    return max(ids, default=-1) + 1


def check_hf_model(
    value: str,
    hf_config: str,
    hf_weights: str,
    num_experts: int,
    top_k: int,
    context_length: int,
    default_hf_config: str,
) -> None:
    """Validate the model folder ``hf-model`` = ``value`` (no torch, no transformers).

    The folder supplies the config, the weights and the tokenizer, so ``hf-weights`` must be empty
    and ``hf-config`` left at its default (or name the same folder).

    Raises
    ------
    ValueError
        Naming the key: ``hf-config`` or ``hf-weights`` set beside it; a folder without
        ``config.json``, without tokenizer files or without safetensors weights; a config that is
        not a supported MoE or does not match ``num-experts``, ``top-k``, ``context-length``; a
        tokenizer vocabulary larger than the model's ``vocab_size``.

    """
    folder = Path(value).expanduser()
    if hf_weights:
        raise ValueError(
            f"run-config key 'hf-weights' = {hf_weights!r} is invalid with hf-model {value!r}; allowed: '' "
            "(the model folder holds the weights)"
        )
    if hf_config not in (default_hf_config, value):
        raise ValueError(
            f"run-config key 'hf-config' = {hf_config!r} is invalid with hf-model {value!r}; allowed: its "
            f"default {default_hf_config!r} (the model folder holds the config)"
        )
    if not folder.is_dir():
        raise ValueError(
            f"run-config key 'hf-model' = {value!r} is invalid: not a folder; allowed: a model folder in "
            "the save_pretrained layout (config.json, tokenizer files, model.safetensors)"
        )
    config = read_config_file(value, "hf-model")
    _check_shape(config, value, "hf-model", num_experts, top_k, context_length)
    if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
        wanted = " or ".join("+".join(files) for files in TOKENIZER_FILES)
        raise ValueError(
            f"run-config key 'hf-model' = {value!r} is invalid: no tokenizer files in the folder; allowed: "
            f"a folder holding {wanted} (as save_pretrained of a tokenizer writes them)"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"run-config key 'hf-model' = {value!r} is invalid: no *.safetensors weights in the folder; "
            "allowed: a folder written by save_pretrained (model.safetensors or its shards)"
        )
    vocab, tokens = int(config.get("vocab_size", 0)), tokenizer_vocab_size(folder)
    if tokens is not None and tokens > vocab:
        raise ValueError(
            f"run-config key 'hf-model' = {value!r} is invalid: its tokenizer has {tokens} token ids but the "
            f"model's vocab_size is {vocab}; allowed: a tokenizer of at most vocab_size tokens"
        )
