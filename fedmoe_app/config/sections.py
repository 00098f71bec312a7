"""The run config in sections: one small dataclass per subsystem, handed to it by the run layer.

:class:`~.run.RunConfig` is the run config as Flower passes it (flat keys, validated, every
default in one place); its properties cut it into these sections, each holding exactly what
one subsystem reads, under the names that subsystem uses. A section has no defaults of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundSection:
    """How the server runs rounds: sampling, waiting and giving up (the strategy and its loop)."""

    num_server_rounds: int
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int
    round_timeout_s: float
    min_replies: int
    query_retry_rounds: int
    discovery: str
    max_failed_rounds: int
    lr: float  # sent to clients with every train message
    local_epochs: int  # sent to clients with every train message
    seed: int
    lr_schedule: str  # constant or cosine: the lr of each round (server.rounds.round_lr)
    warmup_rounds: int
    lr_min: float
    wire_dtype: str  # fp32 or bf16: the float tensors of every message (wire.records)


@dataclass(frozen=True)
class TrainingSection:
    """A client's local training: the keyword arguments of ``fedmoe_app.training.train``."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    aux_weight: float
    route_weight: float
    precision: str
    optimizer: str  # sgd or adamw
    weight_decay: float
    betas: tuple[float, float]  # adamw's (beta1, beta2)
    grad_accum_steps: int
    max_grad_norm: float  # 0: no clipping


@dataclass(frozen=True)
class AlignmentSection:
    """The alignment state's knobs: the keyword arguments of ``AlignmentState`` (all but ``E``)."""

    fitness_ema: float
    fitness_decay: float
    usage_decay: float
    w_fitness: float
    w_usage: float
    load_slack: float
    approx_min_clients: int
    loss_weight: float
    fitness_init: str  # "zero" | "routing": how a pair without evidence a client did not train starts
    seed: int


@dataclass(frozen=True)
class PlanningSection:
    """What the round planner reads: the policy, capacities, the deadline and the local work."""

    policy: str
    tie_layers: bool
    capacity: str
    experts_per_client: int
    round_deadline_s: float
    under_capacity: str
    min_trained_experts: int
    local_epochs: int
    batch_size: int
    min_trainers: int  # every planned expert gets at least this many trainers (dp-min-trainers); 0: any
    wire_dtype: str  # what the transfers carry: "fp32", or "bf16" (half the bytes)
    optimizer_states: int = 1  # state tensors per trained parameter: 1 SGD momentum, 2 AdamW


@dataclass(frozen=True)
class AggregationSection:
    """How valid replies become the new model: bounded influence, the per-group rule, the router."""

    update_bound: float
    weight_cap: float
    token_cap: float
    method: str
    trim_fraction: float
    gate_from_all: bool
    single_holders: bool
    per_layer: bool
    gate_balance_rate: float
    gate_balance_step: str


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy: where the noise is added, its scale and the reported delta."""

    mode: str
    clip_norm: float
    noise_multiplier: float
    delta: float
    min_trainers: int


@dataclass(frozen=True)
class SplitSection:
    """How a client's share of a dataset is cut: the keyword arguments of ``data.client_data``."""

    partitioner: str
    alpha: float
    shards: int
    test_fraction: float
    max_samples: int
    data_dir: str
    seed: int
    public_fraction: float  # share of the training set held out of every partition (data.public_indices)


@dataclass(frozen=True)
class Columns:
    """Column names of a saved or Hugging Face dataset; empty: detected (``data.columns``)."""

    image: str = ""
    label: str = ""
    text: str = ""


@dataclass(frozen=True)
class FaultSection:
    """Injected faults (simulation): the probability of each, per client and round."""

    drop: float
    slow: float
    corrupt: float
    seed: int


@dataclass(frozen=True)
class OutputSection:
    """Where a run writes and whether it resumes there."""

    run_name: str
    output_dir: str
    resume: bool


@dataclass(frozen=True)
class TrackingSection:
    """Experiment tracking of the per-round metrics (``tracking``, ``tracking-dir``)."""

    tracker: str  # "none" | "tensorboard" | "mlflow"
    tracking_dir: str  # empty: <run folder>/tracking


@dataclass(frozen=True)
class LoraSection:
    """Parameter-efficient fine-tuning with peft LoRA (``peft = "lora"``, model ``hf`` only).

    Only the adapters train and travel; the base weights (the router included) stay frozen and
    are built alike on every node: from ``hf-weights``, or for a preset from ``base_seed``.
    """

    rank: int
    alpha: float
    dropout: float  # on the attention adapters' inputs (peft has none for the experts' tensors)
    target_modules: tuple[str, ...]  # module-name suffixes; the experts are always adapted
    base_seed: int  # the run's seed: the base weights of a preset, the same on every node
