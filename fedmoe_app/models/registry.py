"""The models a run can choose (run-config key ``model``), built and costed through one door.

* ``cnn-moe``: :class:`~fedmoe_app.models.cnn.MoEClassifier` on images
  (:class:`~fedmoe_app.models.cnn.ModelSpec`);
* ``transformer-moe``: :class:`~fedmoe_app.models.transformer.TransformerMoE` on bytes
  (:class:`~fedmoe_app.models.transformer.TransformerSpec`);
* ``hf``: a Hugging Face ``transformers`` MoE causal LM (:class:`~fedmoe_app.models.hf_spec.HFSpec`),
  whose module :mod:`~fedmoe_app.models.hf` (and ``transformers``) is imported only when used.

:func:`model_spec` reads the shape from the run config and the dataset; :func:`build_model`
and :func:`model_costs` dispatch on the spec's type, so the federation, the training loop and
capacity planning never name an architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..capacity import ModelCosts
from ..config import RunConfig
from .cnn import ModelSpec, build_cnn
from .costs import cnn_costs
from .hf_spec import HFSpec
from .interface import MoEModel
from .transformer import TransformerSpec, build_transformer, transformer_costs

AnySpec = ModelSpec | TransformerSpec | HFSpec


def model_spec(cfg: RunConfig, info: Any) -> AnySpec:
    """Shape of the run's model (``cfg.model``) for a dataset described by ``info``."""
    if cfg.model == "transformer-moe":
        return TransformerSpec.from_config(cfg, info)
    if cfg.model == "hf":
        return HFSpec.from_config(cfg, info)
    return ModelSpec.from_config(cfg, info)


def build_model(spec: AnySpec, expert_ids: Sequence[int] | None = None, seed: int = 0) -> MoEModel:
    """Build the model of ``spec`` holding ``expert_ids`` (all if ``None``), initialised from ``seed``."""
    if isinstance(spec, TransformerSpec):
        return build_transformer(spec, expert_ids, seed)
    if isinstance(spec, HFSpec):
        from .hf import build_hf

        return build_hf(spec, expert_ids, seed)
    return build_cnn(spec, expert_ids, seed)


def model_costs(spec: AnySpec) -> ModelCosts:
    """Parameters, activations and FLOPs of ``spec`` as capacity planning sees them."""
    if isinstance(spec, TransformerSpec):
        return transformer_costs(spec)
    if isinstance(spec, HFSpec):
        from .hf import hf_costs

        return hf_costs(spec)
    return cnn_costs(spec)
