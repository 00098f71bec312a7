"""Costs of a user's model (:class:`~.user_model.UserSpec`) for capacity planning, derived from the model.

* **parameters** are counted from the built model: a stacked expert tensor of ``n`` slots counts
  ``numel / n`` per expert, every other federated tensor is shared;
* **FLOPs** are the model's ``flops_per_example`` attribute if it has one, else counted by
  :class:`FlopCount` (torch's FLOP formulas of :mod:`torch.utils.flop_counter`: matmuls,
  convolutions, attention; plus one for grouped matmul) over one
  forward pass of the model holding expert 0 (top-1) and of the model holding experts 0 and 1
  (top-2): their difference is one routed expert's forward FLOPs. With ``top_k`` or
  ``num_experts`` 1 the two passes route alike, and an expert's forward is taken as 2 FLOPs per
  weight per route (``2 x expert parameters x routes_per_example / MoE layers``). Training is
  3x the forward, as for the built-in families;
* **activations** are measured (:func:`~.memory_probe.activation_bytes_per_sample`, kept on disk
  by :func:`~.memory_probe.cached_activation_bytes` under the spec and the factory module's
  source, so an edited model is measured again).

The compute efficiency is the ``transformer`` family's for text, the ``conv`` family's otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from ..capacity import ModelCosts
from .interface import MoEModel
from .memory_probe import activation_bytes_per_sample, cached_activation_bytes, costs_from_probe
from .user_model import UserSpec, example_batch, model_error

#: Examples of a measured forward pass.
FLOP_EXAMPLES = 2


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm``: 2 per multiply-add, every output value a dot of ``a``'s rows."""
    return 2 * math.prod(out_shape) * a_shape[-1]


#: aten op -> FLOPs of one call (its arguments; ``out_val``: its result): torch's formulas, grouped matmul.
FLOP_FORMULAS = {**flop_registry, torch.ops.aten._grouped_mm: shape_wrapper(_grouped_mm_flops)}


class FlopCount(TorchDispatchMode):
    """FLOPs of the aten ops run while active (:data:`FLOP_FORMULAS`; other ops count 0) in ``total``.

    What :class:`torch.utils.flop_counter.FlopCounterMode` counts, without its per-module tracking
    (whose first use imports ``torch._dynamo``: seconds, in every client process).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def counted_params(model: MoEModel) -> tuple[int, int]:
    """Return ``(shared, per expert)`` parameters of ``model``'s federated tensors."""
    state = model.federated_state()
    layers = model.expert_tensor_layers()
    expert = sum(state[n].numel() // len(model.layer_ids[layer]) for n, layer in layers.items())
    shared = sum(t.numel() for n, t in state.items() if n not in layers)
    return shared, expert


def forward_flops(spec: UserSpec, model: MoEModel) -> int:
    """Forward FLOPs of ``model`` over :data:`FLOP_EXAMPLES` examples of :func:`example_batch`."""
    x, y = example_batch(spec, model, FLOP_EXAMPLES)
    with torch.no_grad(), FlopCount() as counter:
        model(x, y)
    return counter.total


def flops_per_example(spec: UserSpec, one: MoEModel, expert_params: int) -> tuple[float, float]:
    """Training FLOPs per example ``(shared, the top_k experts together)`` (module docstring).

    ``one`` is the model holding expert 0. The counts are kept on disk as the activations are
    (:func:`~.memory_probe.cached_activation_bytes`: a dispatch mode's first use costs seconds).
    """
    given = getattr(one, "flops_per_example", None)
    if given is not None:
        return float(given[0]), float(given[1])
    two = spec.top_k > 1 and spec.num_experts > 1
    f_one, f_two = cached_activation_bytes(
        f"user-model flops {spec!r} source={source_digest(spec.factory)}",
        lambda: (forward_flops(spec, one), forward_flops(spec, spec.build([0, 1], seed=0)) if two else 0),
    )
    if two:
        per_expert = (f_two - f_one) / FLOP_EXAMPLES
    else:
        per_expert = 2.0 * expert_params * spec.routes_per_example / spec.num_layers
    shared = f_one / FLOP_EXAMPLES - per_expert
    if per_expert <= 0 or shared < 0:
        raise model_error(
            spec.factory,
            f"its counted forward FLOPs per example (one expert {f_one / FLOP_EXAMPLES:g}, an expert more "
            f"{per_expert:g}) do not split into a shared part and experts",
            "a model whose experts compute with matmuls, or one with a flops_per_example attribute",
        )
    return 3.0 * shared, 3.0 * spec.top_k * per_expert


def source_digest(factory: str) -> str:
    """Return a digest of the source file of ``factory``'s module ('' if none): edits change it."""
    module = sys.modules.get(factory.partition(":")[0])
    try:
        path = inspect.getsourcefile(module) if module is not None else None
        return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16] if path else ""
    except (OSError, TypeError):
        return ""


@functools.lru_cache(maxsize=8)
def measured_costs(spec: UserSpec) -> ModelCosts:
    """Parameters, activations and FLOPs of the user's model ``spec`` (module docstring)."""
    one = spec.build([0], seed=0)
    shared, expert = counted_params(one)
    flops = flops_per_example(spec, one, expert)
    probed = cached_activation_bytes(
        f"user-model {spec!r} source={source_digest(spec.factory)}",
        lambda: activation_bytes_per_sample(
            lambda ids: spec.build(ids, seed=0),
            lambda n: example_batch(spec, one, n),
            spec.num_experts,
        ),
    )
    family = "transformer" if "vocab_size" in dict(spec.data) else "conv"
    return costs_from_probe(spec, family, params=(shared, expert), probed=probed, flops=flops)
