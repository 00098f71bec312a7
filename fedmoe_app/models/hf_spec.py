"""Shape of an ``hf`` model (a Hugging Face ``transformers`` MoE causal LM), without transformers.

:class:`HFSpec` holds the resolved config dict (a preset at the run config's size, or a
config.json as it is) and the optional local weights; :mod:`.hf` builds the model from it,
importing ``transformers`` only then (an optional extra: ``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..capacity import ModelCosts
from ..config import LoraSection, RunConfig
from ..hf_config import hf_shape, moe_layers, resolve_hf_config


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

    @classmethod
    def from_config(cls, cfg: RunConfig, info: Any) -> HFSpec:
        """Resolve ``hf-config`` (preset at the run config's size, or a file) for byte-level text."""
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
        """Parameters, activations and FLOPs as capacity planning sees them (:func:`.hf_costs.hf_costs`)."""
        from .hf_costs import hf_costs

        return hf_costs(dataclasses.replace(self, lora=None))  # under LoRA: full training's (an upper bound)
