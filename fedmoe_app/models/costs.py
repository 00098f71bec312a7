"""What capacity planning needs to know of the CNN MoE: parameters, activations and FLOPs.

:func:`cnn_costs` counts the parameters and FLOPs of a
:class:`~fedmoe_app.models.cnn.ModelSpec`, measures its activations, and returns the
model-independent :class:`~fedmoe_app.capacity.ModelCosts` that the memory and time models
use (docs/CAPACITY.md checks the memory prediction against measured peaks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..capacity import ModelCosts
from .cnn import ModelSpec, build_cnn
from .memory_probe import activation_bytes_per_sample, cached_activation_bytes, costs_from_probe


def shared_params(spec: ModelSpec) -> int:
    """Parameters of the shared part (conv stem, projection and gate) of ``spec``."""
    c, d = spec.stem_channels, spec.feature_dim
    conv = spec.in_channels * c * 9 + c + c * 2 * c * 9 + 2 * c
    return conv + 2 * c * 16 * d + d + d * spec.num_experts + spec.num_experts


def expert_params(spec: ModelSpec) -> int:
    """Parameters of one expert (``w1 [d, h]``, ``b1 [h]``, ``w2 [h, C]``, ``b2 [C]``)."""
    d, h, c = spec.feature_dim, spec.expert_hidden, spec.num_classes
    return d * h + h + h * c + c


def flops_per_sample(spec: ModelSpec) -> tuple[float, float]:
    """Training FLOPs per sample: ``(stem + gate, the top_k experts together)``.

    Forward multiply-adds count 2 FLOPs; forward + backward is taken as 3x forward.
    """
    c, d, h = spec.stem_channels, spec.feature_dim, spec.expert_hidden
    s1, s2 = spec.image_size, spec.image_size // 2
    fwd_stem = (
        2 * spec.in_channels * 9 * c * s1 * s1
        + 2 * c * 9 * 2 * c * s2 * s2
        + 2 * 2 * c * 16 * d
        + 2 * d * spec.num_experts
    )
    fwd_experts = spec.top_k * (2 * d * h + 2 * h * spec.num_classes)
    return 3.0 * fwd_stem, 3.0 * fwd_experts


def image_batches(spec: ModelSpec) -> Callable[[int], tuple[Tensor, Tensor]]:
    """``batch(n)`` of :func:`activation_bytes_per_sample` for ``spec``: seeded random images and labels."""

    def batch(n: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
        return x, torch.randint(0, spec.num_classes, (n,), generator=gen)

    return batch


@functools.lru_cache(maxsize=8)
def cnn_costs(spec: ModelSpec) -> ModelCosts:
    """Parameter, activation and FLOP counts of the CNN MoE ``spec``.

    Parameters and FLOPs are counted from the layers above. Activations are measured, as for
    the transformer families (:func:`~fedmoe_app.models.memory_probe.activation_bytes_per_sample`,
    kept on disk by :func:`~fedmoe_app.models.memory_probe.cached_activation_bytes`): the
    per-sample slope of the live bytes of a training step holding one and two experts. So the
    memory model follows the expert dispatch that actually runs: grouped matmul keeps no
    per-sample copy of the experts' weights (routed part about 0), the gather path keeps one
    and its gradient per visited expert.
    """
    f_shared, f_experts = flops_per_sample(spec)
    fixed, routed = cached_activation_bytes(
        f"cnn-moe {spec!r}",
        lambda: activation_bytes_per_sample(
            lambda ids: build_cnn(spec, ids, seed=0), image_batches(spec), spec.num_experts
        ),
    )
    params = (shared_params(spec), expert_params(spec))
    return costs_from_probe(spec, "conv", params=params, probed=(fixed, routed), flops=(f_shared, f_experts))
