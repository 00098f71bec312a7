"""The MoE models, their shapes and costs, and the bridge between torch weights and named arrays.

* :mod:`.interface`   -- :class:`MoEModel`, what every model offers the app (expert tensors,
  sub-models with masked routers, feedback, task loss) and :class:`MoEOutput`;
* :mod:`.registry`    -- :func:`model_spec`, :func:`build_model`, :func:`model_costs` (and
  :func:`model_adapters` under LoRA) for the run's ``model``;
* :mod:`.cnn`         -- ``cnn-moe``: :class:`ModelSpec` and :class:`MoEClassifier` (conv stem,
  top-k gate, MLP experts);
* :mod:`.transformer` -- ``transformer-moe``: :class:`TransformerSpec` and
  :class:`TransformerMoE` (Mixtral-style decoder, an MoE in every block);
* :mod:`.hf_spec`     -- ``hf``: :class:`HFSpec` (a transformers MoE config); :mod:`.hf` builds
  it (imported lazily: ``transformers`` is an optional extra), :mod:`.hf_weights` reads its
  local safetensors weights, a client's experts only;
* :mod:`.user_model`  -- a user's model (``model = "package.module:factory"``): :class:`UserSpec`,
  the factory's contract and its checks; :mod:`.measured_costs` derives its costs from the model;
* :mod:`.experts`     -- stacked MLP experts and their grouped-matmul / gather dispatch;
* :mod:`.costs`       -- the CNN's parameters, activations and FLOPs for capacity;
* :mod:`.arrays`      -- :func:`model_to_arrays` / :func:`load_arrays` under global tensor names;
* :mod:`.export`      -- the global model as a standard folder, and :func:`load_exported`.
"""

from .arrays import expected_keys, load_arrays, model_to_arrays
from .cnn import REFERENCE_SPEC, ModelSpec, MoEClassifier, count_parameters
from .export import load_exported
from .hf_spec import HFSpec
from .interface import MoEModel, MoEOutput
from .registry import AnySpec, build_model, model_adapters, model_costs, model_spec
from .transformer import TransformerMoE, TransformerSpec
from .user_model import UserSpec

__all__ = [
    "REFERENCE_SPEC",
    "AnySpec",
    "HFSpec",
    "ModelSpec",
    "MoEClassifier",
    "MoEModel",
    "MoEOutput",
    "TransformerMoE",
    "TransformerSpec",
    "UserSpec",
    "build_model",
    "count_parameters",
    "expected_keys",
    "load_arrays",
    "load_exported",
    "model_adapters",
    "model_costs",
    "model_spec",
    "model_to_arrays",
]
