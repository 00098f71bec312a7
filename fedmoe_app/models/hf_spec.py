"""Shape of an ``hf`` model (a Hugging Face ``transformers`` MoE causal LM), without transformers.

:class:`HFSpec` holds the resolved config dict (a preset at the run config's size, a
config.json as it is, or the config.json of the model folder ``hf-model``) and the optional
local weights (``hf-weights``, or the model folder); :mod:`.hf` builds the model from it,
importing ``transformers`` only then (an optional extra: ``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..capacity import Adapters, ModelCosts
from ..config import LoraSection, RunConfig
from ..hf_config import hf_shape, moe_layers, read_config_file, resolve_hf_config


@dataclass(frozen=True)
class HFSpec:
    """A transformers MoE config (as sorted JSON), its weights file or folder, and its shape."""

    config_json: str
    weights: str
    num_experts: int
    top_k: int
    context_length: int
    num_moe_layers: int
    vocab_size: int
    lora: LoraSection | None = None  # peft = "lora": adapters only (models/hf_lora.py)
    weights_key: str = "hf-weights"  # the run-config key that named ``weights`` (for errors)

    @classmethod
    def from_config(cls, cfg: RunConfig, info: Any) -> HFSpec:
        """Resolve ``hf-model`` (a model folder) or ``hf-config`` (a preset, or a file) for ``info``'s text.

        Raises
        ------
        ValueError
            Naming ``hf-model`` when its tokenizer (``info.vocab_size`` token ids) does not fit the
            model's embedding.

        """
        if cfg.hf_model:
            spec = cls.from_folder(cfg.hf_model, cfg.context_length, int(info.vocab_size), cfg.lora)
        else:
            config = resolve_hf_config(cfg.hf_config, **cfg.hf_sizes())
            config["vocab_size"] = max(int(info.vocab_size), int(config.get("vocab_size", 0)))
            experts, top_k = hf_shape(config, cfg.hf_config)
            spec = cls(
                config_json=json.dumps(config, sort_keys=True),
                weights=cfg.hf_weights,
                num_experts=experts,
                top_k=top_k,
                context_length=cfg.context_length,
                num_moe_layers=moe_layers(config),
                vocab_size=int(config["vocab_size"]),
                lora=cfg.lora,
            )
        if spec.lora is not None:  # targets that match no module stop the run before any round
            from .hf_lora import check_targets

            check_targets(spec)
        return spec

    @classmethod
    def from_folder(
        cls, folder: str, context_length: int, tokens: int, lora: LoraSection | None = None
    ) -> HFSpec:
        """Return the spec of a model folder (``hf-model``): its config.json as it is, its weights.

        ``tokens`` is the size of the folder's tokenizer; it must fit the model's ``vocab_size``.
        """
        config = read_config_file(folder, "hf-model")
        experts, top_k = hf_shape(config, folder, "hf-model")
        vocab = int(config.get("vocab_size", 0))
        if tokens > vocab:
            raise ValueError(
                f"run-config key 'hf-model' = {folder!r} is invalid: its tokenizer has {tokens} token ids "
                f"but the model's vocab_size is {vocab}; allowed: a tokenizer of at most vocab_size tokens"
            )
        return cls(
            config_json=json.dumps(config, sort_keys=True),
            weights=folder,
            num_experts=experts,
            top_k=top_k,
            context_length=context_length,
            num_moe_layers=moe_layers(config),
            vocab_size=vocab,
            lora=lora,
            weights_key="hf-model",
        )

    @property
    def config(self) -> dict[str, Any]:
        """The transformers config dict."""
        return json.loads(self.config_json)

    @property
    def routes_per_example(self) -> int:
        """Routing decisions per sequence and chosen expert: every token in every MoE layer."""
        return self.context_length * self.num_moe_layers

    def build(self, expert_ids: Any = None, seed: int = 0) -> Any:
        """Build the transformers model holding ``expert_ids`` (all if None); imports transformers."""
        from .hf import build_hf

        return build_hf(self, expert_ids, seed)

    def costs(self) -> ModelCosts:
        """Parameters, activations and FLOPs of the whole model (:func:`.hf_costs.hf_costs`).

        The same with or without LoRA: the base model's weights and activations; what LoRA trains
        and sends is :meth:`adapters`.
        """
        from .hf_costs import hf_costs

        return hf_costs(dataclasses.replace(self, lora=None))

    def adapters(self) -> Adapters | None:
        """Return the LoRA adapters capacity planning prices under ``peft = "lora"`` (None without LoRA).

        Counted on the meta device (:func:`.hf_costs.lora_param_counts`): ``lora-rank`` on every
        ``lora-target-modules`` linear (shared) and on each expert's stacked tensors.
        """
        if self.lora is None:
            return None
        from .hf_costs import lora_param_counts

        shared, expert = lora_param_counts(self.config, self.lora.rank, self.lora.target_modules)
        return Adapters(self.lora.rank, shared, expert)
