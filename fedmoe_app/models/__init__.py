"""The MoE model, its shape and costs, and the bridge between torch weights and named arrays.

* :mod:`.cnn`      -- :class:`ModelSpec` and :class:`MoEClassifier` (conv stem, top-k gate,
  MLP experts), :func:`build_model`;
* :mod:`.experts`  -- stacked MLP experts and their grouped-matmul / gather dispatch;
* :mod:`.costs`    -- :func:`model_costs`: parameters, activations and FLOPs for capacity;
* :mod:`.arrays`   -- :func:`model_to_arrays` / :func:`load_arrays` under global tensor names.
"""

from .arrays import expected_keys, load_arrays, model_to_arrays
from .cnn import REFERENCE_SPEC, ModelSpec, MoEClassifier, MoEOutput, build_model, count_parameters
from .costs import model_costs

__all__ = [
    "REFERENCE_SPEC",
    "ModelSpec",
    "MoEClassifier",
    "MoEOutput",
    "build_model",
    "count_parameters",
    "expected_keys",
    "load_arrays",
    "model_costs",
    "model_to_arrays",
]
