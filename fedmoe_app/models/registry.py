"""The models a run can choose (run-config key ``model``), built and costed through one door.

* ``cnn-moe``: :class:`~fedmoe_app.models.cnn.MoEClassifier` on images
  (:class:`~fedmoe_app.models.cnn.ModelSpec`);
* ``transformer-moe``: :class:`~fedmoe_app.models.transformer.TransformerMoE` on bytes
  (:class:`~fedmoe_app.models.transformer.TransformerSpec`);
* ``hf``: a Hugging Face ``transformers`` MoE causal LM (:class:`~fedmoe_app.models.hf_spec.HFSpec`),
  whose module :mod:`~fedmoe_app.models.hf` (and ``transformers``) is imported only when used;
* ``package.module:factory``: a user's :class:`MoEModel`, built by their factory
  (:class:`~fedmoe_app.models.user_model.UserSpec`, whose module docstring states the contract).

:func:`model_spec` reads the shape from the run config and the dataset (the family's spec class
in :data:`MODEL_FAMILIES`, or :class:`~.user_model.UserSpec` for a factory); every spec builds its
model and counts its costs (:class:`Spec`), so the federation, the training loop and capacity
planning never name an architecture.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..capacity import Adapters, ModelCosts
from ..config import RunConfig
from .cnn import ModelSpec
from .hf_spec import HFSpec
from .interface import HeldExperts, MoEModel
from .transformer import TransformerSpec
from .user_model import UserSpec


class Spec(Protocol):
    """What every model family's spec offers: its shape, its model and its costs."""

    num_experts: int
    top_k: int

    @property
    def routes_per_example(self) -> int:
        """Routing decisions per example and chosen expert (the bound on a reply's tokens)."""

    def build(self, expert_ids: HeldExperts | None = None, seed: int = 0) -> MoEModel:
        """Build the model holding ``expert_ids`` (all if None), initialised from ``seed``."""

    def costs(self) -> ModelCosts:
        """Parameters, activations and FLOPs as capacity planning sees them."""


#: Run-config ``model`` -> the spec class of that family (each has ``from_config(cfg, info)``).
MODEL_FAMILIES: dict[str, Any] = {"cnn-moe": ModelSpec, "transformer-moe": TransformerSpec, "hf": HFSpec}
AnySpec = Spec


def model_spec(cfg: RunConfig, info: Any) -> Spec:
    """Shape of the run's model (``cfg.model``) for a dataset described by ``info``.

    A built-in family's spec class, or for ``package.module:factory`` a :class:`UserSpec` (the factory
    imported, its model built holding one expert and checked once per process).

    Raises
    ------
    ConfigError
        Naming the key ``model``, if a factory cannot be imported or its model breaks the contract.

    """
    family = MODEL_FAMILIES.get(cfg.model, UserSpec)
    return family.from_config(cfg, info)


def build_model(spec: Spec, expert_ids: HeldExperts | None = None, seed: int = 0) -> MoEModel:
    """Build the model of ``spec`` holding ``expert_ids`` (all if ``None``), initialised from ``seed``."""
    return spec.build(expert_ids, seed)


def model_costs(spec: Spec) -> ModelCosts:
    """Parameters, activations and FLOPs of ``spec`` as capacity planning sees them."""
    return spec.costs()


def model_adapters(spec: Spec) -> Adapters | None:
    """LoRA adapters of ``spec`` as capacity planning prices them; None when the run trains every weight.

    A spec offers them through an ``adapters()`` method (``hf`` under ``peft = "lora"``:
    :meth:`~.hf_spec.HFSpec.adapters`); the other families train every weight.
    """
    adapters = getattr(spec, "adapters", None)
    return adapters() if callable(adapters) else None
