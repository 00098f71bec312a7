"""Training memory of a client holding ``n`` experts, from a model's counted costs.

:class:`ModelCosts` is what capacity planning needs to know of a model (parameters,
activations and FLOPs per sample); every model computes its own (for the CNN MoE:
``fedmoe_app.models.model_costs``), so this package stays free of torch and of any one
architecture. :class:`Adapters` describes LoRA fine-tuning (``peft = "lora"``): the adapter
values that train and travel instead of the weights. :class:`MemoryModel` turns both into
predicted peak training bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIB = 1 << 20

Number = int | float


@dataclass(frozen=True)
class ModelCosts:
    """Parameters, activations and FLOPs of one MoE model, as capacity planning sees it.

    Attributes
    ----------
    num_experts, top_k : int
        Experts ``E`` and how many each sample is routed to.
    shared_params, expert_params : int
        Parameters of the shared part (``S``) and of one expert (``X``).
    fixed_activation_values : int
        Values saved for backward per sample that do not depend on routing (the stem).
    fixed_activation_bytes : int
        Bytes per sample saved besides those values (e.g. int64 max-pool indices).
    routed_activation_values : int
        Values per sample and visited expert (activations, gathered weights and their
        gradients).
    transient_activation_values : int
        Per-sample backward transient of the shared part; the activation peak takes the
        larger of it and the routed values.
    flops_shared, flops_experts : float
        Training FLOPs per sample of the shared part and of the ``top_k`` experts together.
    efficiency : tuple of float
        ``(shared, experts)``: shares of a client's dense-matmul GFLOP/s that training of each
        part reaches, for the round-time estimate (the family's calibration,
        :data:`fedmoe_app.capacity.timing.COMPUTE_EFFICIENCY`).

    """

    num_experts: int
    top_k: int
    shared_params: int
    expert_params: int
    fixed_activation_values: int
    fixed_activation_bytes: int
    routed_activation_values: int
    transient_activation_values: int
    flops_shared: float
    flops_experts: float
    efficiency: tuple[float, float]


@dataclass(frozen=True)
class Adapters:
    """LoRA adapters of a model: what trains and travels under ``peft = "lora"``.

    Attributes
    ----------
    rank : int
        Rank ``r`` of every adapter (>= 1).
    shared : int
        Adapter values of the shared modules (``aS``: every ``lora-target-modules`` linear).
    expert : int
        Adapter values of one expert over all MoE layers (``aX``).

    """

    rank: int
    shared: int
    expert: int

    def __post_init__(self) -> None:
        if self.rank < 1 or self.shared < 0 or self.expert < 0:
            raise ValueError(f"adapters need rank >= 1 and counts >= 0, got {self!r}")


@dataclass(frozen=True)
class MemoryModel:
    """Training memory of a client holding ``n`` experts of a model at ``batch_size``.

    Full training (``adapters=None``): ``predict_training_bytes(n) = P(S + n X) +
    A(min(top_k, n))`` with ``S``/``X`` the shared/per-expert parameter counts,
    ``P = (2 + optimizer_states) * bytes_per_value`` (weights, gradients, SGD momentum) and
    ``A(k)`` the activation peak of a batch,
    ``B * (bytes_per_value * (fixed + max(k * routed, transient)) + fixed_bytes)``
    (:class:`ModelCosts`). Routed activations scale with ``B * top_k``, not with ``n``:
    only parameters, gradients and momentum scale with the experts held
    (:meth:`expert_bytes`). With fewer experts than ``top_k`` a sample is routed to ``n``
    experts only, so ``A`` uses ``min(top_k, n)``.

    LoRA (``adapters`` given, ``aS``/``aX`` their shared/per-expert values):
    ``predict_training_bytes(n) = b (S + n X) + b n X + P (aS + n aX) + A(min(top_k, n))``
    with ``b = bytes_per_value``. The base weights are frozen (weights only: no gradient, no
    optimizer state) and the adapters train (weights, gradients, optimizer state). The middle
    term is the merged expert weights: peft's ``ParamWrapper`` adapts the stacked expert
    tensors by adding each held expert's low-rank update to its frozen weights in the forward
    pass (``W + s B A``, one full-size tensor per MoE layer and stacked parameter), and
    autograd keeps that tensor for backward, so every held expert costs its weights twice
    (the shared modules' ``lora.Linear`` adapters merge nothing). The activation model is
    full training's.

    Parameters
    ----------
    costs : ModelCosts
        The model's counted costs (its full weights: ``S`` and ``X``).
    batch_size : int
        Local batch size.
    bytes_per_value : int
        Bytes of a parameter/activation value (4: float32).
    optimizer_states : int
        Optimizer state tensors per trained parameter (1: SGD momentum; 2: Adam).
    adapters : Adapters, optional
        LoRA fine-tuning: the base frozen, the adapters trained. None: full training.

    """

    costs: ModelCosts
    batch_size: int
    bytes_per_value: int = 4
    optimizer_states: int = 1
    adapters: Adapters | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def state_bytes_per_param(self) -> int:
        """Bytes per parameter for weight + gradient + optimizer state."""
        return (2 + self.optimizer_states) * self.bytes_per_value

    def activation_bytes(self, k: int | np.ndarray) -> int | np.ndarray:
        """Activation peak of one training step with samples routed to ``k`` experts."""
        c = self.costs
        routed = np.asarray(k) * c.routed_activation_values
        transient = np.maximum(routed, c.transient_activation_values)
        per_sample = self.bytes_per_value * (c.fixed_activation_values + transient) + c.fixed_activation_bytes
        out = self.batch_size * per_sample
        return int(out) if np.ndim(out) == 0 else out.astype(np.int64)

    def shared_bytes(self) -> int:
        """Bytes that do not grow with the experts held (``n >= top_k``).

        Full training: ``P S + A(top_k)``; LoRA: ``b S + P aS + A(top_k)``.
        """
        c, a = self.costs, self.adapters
        if a is None:
            params = self.state_bytes_per_param * c.shared_params
        else:
            params = self.bytes_per_value * c.shared_params + self.state_bytes_per_param * a.shared
        return int(params + self.activation_bytes(c.top_k))

    def expert_bytes(self) -> int:
        """Bytes each held expert adds.

        Full training: its weights, gradients and optimizer state, ``P X``; LoRA: its frozen and
        merged weights and its adapters' weights, gradients and optimizer state, ``2 b X + P aX``.
        """
        c, a = self.costs, self.adapters
        if a is None:
            return self.state_bytes_per_param * c.expert_params
        return 2 * self.bytes_per_value * c.expert_params + self.state_bytes_per_param * a.expert

    def predict_training_bytes(self, n_experts: int | np.ndarray) -> int | np.ndarray:
        """Predicted peak training memory with ``n_experts`` held (0 = shared part only)."""
        n = np.asarray(n_experts, dtype=np.int64)
        if (n < 0).any():
            raise ValueError(f"n_experts must be >= 0, got {n_experts!r}")
        n_params = self.costs.shared_params + n * self.costs.expert_params
        if self.adapters is None:
            params = self.state_bytes_per_param * n_params
        else:
            merged = n * self.costs.expert_params  # W + s B A of every held expert, kept for backward
            trained = self.adapters.shared + n * self.adapters.expert
            params = self.bytes_per_value * (n_params + merged) + self.state_bytes_per_param * trained
        out = params + self.activation_bytes(np.minimum(n, self.costs.top_k))
        return int(out) if out.ndim == 0 else out.astype(np.int64)

    def wire_values(self) -> tuple[int, int]:
        """``(shared, per expert)`` values a client receives, and returns, each round.

        Full training: the weights, ``(S, X)``. LoRA: the adapters only, ``(aS, aX)``; the base
        model (every weight, the held experts' included) is assumed on the device already: each
        node builds it from ``hf-weights``/``hf-model`` or, for a preset, from the run's seed.
        """
        if self.adapters is None:
            return self.costs.shared_params, self.costs.expert_params
        return self.adapters.shared, self.adapters.expert

    def table(self) -> np.ndarray:
        """``predict_training_bytes(n)`` for ``n = 0..E`` (non-decreasing int64 ``[E + 1]``)."""
        return np.asarray(self.predict_training_bytes(np.arange(self.costs.num_experts + 1)))

    def experts_that_fit(self, memory_bytes: Number | np.ndarray) -> int | np.ndarray:
        """Most experts whose training fits in ``memory_bytes`` (clipped to ``0..E``).

        0 also when not even the shared part fits.
        """
        mem = np.asarray(memory_bytes, dtype=np.float64)
        if np.isnan(mem).any():
            raise ValueError("memory_bytes must not be NaN")
        fit = np.searchsorted(self.table(), mem, side="right") - 1
        fit = np.clip(fit, 0, self.costs.num_experts)
        return int(fit) if fit.ndim == 0 else fit.astype(np.int64)
