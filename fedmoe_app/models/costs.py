"""What capacity planning needs to know of the CNN MoE: parameters, activations and FLOPs.

:func:`cnn_costs` counts them for a :class:`~fedmoe_app.models.cnn.ModelSpec` and returns
the model-independent :class:`~fedmoe_app.capacity.ModelCosts` that the memory and time
models use (docs/CAPACITY.md checks the memory prediction against measured peaks).
"""

from __future__ import annotations

from ..capacity import ModelCosts
from .cnn import ModelSpec


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


def cnn_costs(spec: ModelSpec) -> ModelCosts:
    """Parameter, activation and FLOP counts of the CNN MoE ``spec``.

    Activations saved for backward, per sample:

    * the conv stem's (input, ReLU outputs, max-pool outputs and their int64 indices, pooled
      features, features, gate logits, masked logits and probabilities);
    * the larger of (a) the routed part, per expert a sample visits: ``Experts.forward`` may
      hold a private copy of the chosen expert's weights (gather dispatch) and backward an
      equally large gradient, so ``2 X + d + 2 h + 2 C`` values; (b) the conv stem's backward
      transient (two gradients of the first conv output, ``2 c S**2``).
    """
    c, d, h, n_cls = spec.stem_channels, spec.feature_dim, spec.expert_hidden, spec.num_classes
    s1, s2 = spec.image_size, spec.image_size // 2
    s3 = s2 // 2
    stem_values = (
        spec.in_channels * s1 * s1  # input (saved by conv1)
        + c * s1 * s1  # relu1 output (saved by relu1 and pool1)
        + c * s2 * s2  # pool1 output (saved by conv2)
        + 2 * c * s2 * s2  # relu2 output
        + 2 * c * s3 * s3  # pool2 output
        + 2 * c * 16  # adaptive-pool output (saved by the projection)
        + d  # features
        + 4 * spec.num_experts  # gate logits, masked logits, probabilities
    )
    f_shared, f_experts = flops_per_sample(spec)
    return ModelCosts(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        shared_params=shared_params(spec),
        expert_params=expert_params(spec),
        fixed_activation_values=stem_values,
        fixed_activation_bytes=8 * (c * s2 * s2 + 2 * c * s3 * s3),  # max-pool int64 indices
        routed_activation_values=2 * expert_params(spec) + d + 2 * h + 2 * n_cls,
        transient_activation_values=2 * c * s1 * s1,
        flops_shared=f_shared,
        flops_experts=f_experts,
    )
