"""Typed run config: one dataclass mirroring ``[tool.flwr.app.config]``, validated at start.

This is the one home of every default of a run: components below it (alignment, capacity)
take explicit arguments without defaults of their own, and components above it build
themselves from a :class:`RunConfig` (``ModelSpec.from_config``,
``AlignmentState(E, **cfg.alignment_kwargs())``). ``pyproject.toml`` repeats the defaults
because Flower reads them there; a test keeps the two equal.

Every field ``foo_bar`` is the run-config key ``foo-bar``. :meth:`RunConfig.from_run_config`
rejects unknown keys, wrong types, non-finite numbers and out-of-range values with an error
that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..alignment import FITNESS_INITS, POLICIES
from ..capacity import parse_device_mix
from ..hf_config import HF_PRESETS, check_hf_config, check_hf_model
from ..maths.aggregation import AGGREGATIONS
from . import sections


def cache_root() -> Path:
    """Folder of the app's on-disk caches: ``$FEDMOE_CACHE_DIR`` or ``~/.cache/fedmoe``.

    It holds derived data only (dataset partitions, measured model costs): deleting it costs
    the time to recompute them.
    """
    return Path(os.environ.get("FEDMOE_CACHE_DIR") or Path.home() / ".cache" / "fedmoe")


IMAGE_DATASETS = ("fashion-mnist", "cifar10", "synthetic", "images")
TEXT_DATASETS = ("fortunes", "text")
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
PARTITIONERS = ("dirichlet", "pathological", "iid", "natural")
MODELS = ("cnn-moe", "transformer-moe", "hf")
TEXT_MODELS = ("transformer-moe", "hf")
#: A user's model: ``package.module:factory`` (dotted names), see ``fedmoe_app.models.user_model``.
MODEL_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
CAPACITY_MODES = ("profiled", "fixed")
UNDER_CAPACITY = ("shared-only", "skip")
GATE_MODES = ("global", "local")
GATE_AGGREGATIONS = ("auto", "rows", "all")
GATE_BALANCE_STEPS = ("sign", "proportional")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
TRACKERS = ("none", "tensorboard", "mlflow")
OPTIMIZERS = ("sgd", "adamw")
#: State tensors each optimizer keeps per trained parameter (SGD momentum; Adam's two moments).
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}
LR_SCHEDULES = ("constant", "cosine")
WIRE_DTYPES = ("fp32", "bf16")
DP_MODES = ("off", "central", "local")
PEFT_MODES = ("none", "lora")


class ConfigError(ValueError):
    """A run-config value is missing, unknown, of the wrong type or out of range."""


def _choice(*allowed: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), "one of " + ", ".join(repr(a) for a in allowed)


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    def check(v: float) -> bool:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or v <= hi

    left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    right = "" if hi is None else f"<= {hi}"
    return check, " and ".join(s for s in (left, right) if s) or "any number"


def _opt(default: Any, check: tuple[Callable[[Any], bool], str] | None = None, doc: str = ""):
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class RunConfig:
    """All knobs of a fedmoe run (defaults match ``pyproject.toml``)."""

    # Federated rounds
    num_server_rounds: int = _opt(5, _range(1), "rounds of training")
    fraction_train: float = _opt(0.5, _range(0.0, 1.0, lo_open=True), "share of nodes per round")
    min_train_nodes: int = _opt(2, _range(1), "minimum nodes per training round")
    fraction_evaluate: float = _opt(0.5, _range(0.0, 1.0), "share of nodes for client eval")
    min_evaluate_nodes: int = _opt(2, _range(0), "minimum nodes for client eval")
    local_epochs: int = _opt(1, _range(1), "local epochs per round")
    batch_size: int = _opt(32, _range(1), "local batch size")
    lr: float = _opt(0.02, _range(0.0, lo_open=True), "learning rate (the peak under a schedule)")
    momentum: float = _opt(0.9, _range(0.0, 1.0), "SGD momentum")
    optimizer: str = _opt(
        "sgd", _choice(*OPTIMIZERS), "client optimizer: SGD with momentum, or AdamW (fresh every round)"
    )
    weight_decay: float = _opt(0.0, _range(0.0), "weight decay (decoupled under adamw)")
    adam_beta1: float = _opt(0.9, (lambda v: 0.0 <= v < 1.0, ">= 0 and < 1"), "adamw: beta1")
    adam_beta2: float = _opt(0.999, (lambda v: 0.0 <= v < 1.0, ">= 0 and < 1"), "adamw: beta2")
    lr_schedule: str = _opt(
        "constant",
        _choice(*LR_SCHEDULES),
        "the server's lr per round: constant, or cosine decay to lr-min at the last round",
    )
    warmup_rounds: int = _opt(0, _range(0), "rounds of linear lr warm-up (round r of W: lr x r / W)")
    lr_min: float = _opt(0.0, _range(0.0), "cosine: lr of the last round (<= lr)")
    grad_accum_steps: int = _opt(1, _range(1), "micro-batches of batch-size accumulated per optimizer step")
    max_grad_norm: float = _opt(0.0, _range(0.0), "clip the trainable parameters' gradient norm; 0: off")
    grad_checkpointing: bool = _opt(
        False, None, "hf: recompute activations in backward (transformers' gradient checkpointing)"
    )
    wire_dtype: str = _opt(
        "fp32",
        _choice(*WIRE_DTYPES),
        "float tensors on the wire: fp32, or bf16 (half the bytes; the server keeps fp32)",
    )
    aux_loss_weight: float = _opt(0.01, _range(0.0), "Switch load-balancing loss weight")
    route_loss_weight: float = _opt(
        0.0,
        _range(0.0),
        "weight of -log P(held experts) under the full gate; > 0: every client trains the gate",
    )
    gate_aggregation: str = _opt(
        "auto",
        _choice(*GATE_AGGREGATIONS),
        "gate rows over their experts' holders, or over all replies; auto: all with a route loss",
    )
    gate_balance_rate: float = _opt(
        0.1,
        _range(0.0),
        "server step on the gate's bias per round towards equal top-k load of the unmasked gate; "
        "applied to a model whose router is a gate with a bias (gate.bias: cnn-moe, or your own), "
        "not to transformer-moe or hf; 0: off; not applied under dp",
    )
    gate_balance_step: str = _opt(
        "sign",
        _choice(*GATE_BALANCE_STEPS),
        "gate-balance-rate's step: rate x the sign of the load gap (Loss-Free Balancing), or rate x "
        "the gap relative to the mean load, clipped to +-1 (proportional: smaller near balance)",
    )
    seed: int = _opt(0, _range(0), "seed of data split, init, sampling and planning")
    # Data
    dataset: str = _opt(
        "fashion-mnist",
        _choice(*DATASETS),
        "images (synthetic: small, for tests; images: yours, shape and classes read from the data) "
        "or text (fortunes; text: yours, in data-dir)",
    )
    data_dir: str = _opt("", None, "dataset folder; empty: FEDMOE_DATA_DIR or system paths")
    partitioner: str = _opt(
        "dirichlet",
        _choice(*PARTITIONERS),
        "how data is split across clients (natural: text by language/file)",
    )
    dirichlet_alpha: float = _opt(0.1, _range(0.0, lo_open=True), "label skew (smaller: more non-IID)")
    shards_per_client: int = _opt(2, _range(1), "classes per client (pathological)")
    local_test_fraction: float = _opt(0.2, _range(0.0, 0.9), "share of a partition for local test")
    public_fraction: float = _opt(
        0.0,
        _range(0.0, 0.9),
        "share of the training set held out of every client's partition for central pretraining "
        "(fedmoe-pretrain); the same examples whatever the seed; images only",
    )
    max_samples_per_client: int = _opt(0, _range(0), "cap on local train samples; 0: all")
    central_eval_samples: int = _opt(0, _range(0), "cap on server test samples; 0: all")
    central_eval: bool = _opt(
        True, None, "the server evaluates the global model on its test set; false: it holds no data"
    )
    hf_dataset: str = _opt(
        "",
        None,
        "a dataset flwr-datasets' FederatedDataset loads (hub name or local folder); partitioner splits it",
    )
    image_column: str = _opt("", None, "image column of a saved or hf-dataset; empty: detected")
    label_column: str = _opt("", None, "label column of a saved or hf-dataset; empty: detected")
    text_column: str = _opt("", None, "text column of a saved or hf-dataset; empty: detected")
    classes: str = _opt(
        "", None, "dataset images: comma-separated class names in label order; empty: read from the data"
    )
    image_shape: str = _opt("", None, 'dataset images: "C,H,W" the model takes; empty: read from the data')
    # Model
    model: str = _opt(
        "cnn-moe",
        (
            lambda v: v in MODELS or is_model_factory(v),
            "one of " + ", ".join(repr(m) for m in MODELS) + ", or 'package.module:factory'",
        ),
        "cnn-moe for images; transformer-moe or hf (Hugging Face MoE) for text; "
        "package.module:factory: your own MoE (docs/MODELS.md)",
    )
    num_experts: int = _opt(8, _range(1, 1024), "experts E in the model")
    top_k: int = _opt(2, _range(1), "experts each sample is routed to")
    stem_channels: int = _opt(16, _range(1), "channels of the shared conv stem")
    feature_dim: int = _opt(64, _range(1), "feature size fed to gate and experts")
    expert_hidden: int = _opt(256, _range(1), "hidden width of each expert MLP")
    num_layers: int = _opt(2, _range(1, 64), "transformer-moe: blocks, each with an MoE feed-forward")
    d_model: int = _opt(64, _range(2), "transformer-moe: model width")
    num_heads: int = _opt(4, _range(1), "transformer-moe: attention heads (d-model / heads even)")
    context_length: int = _opt(64, _range(2, 8192), "transformer-moe: bytes per training sequence")
    hf_config: str = _opt(
        "tiny-mixtral",
        None,
        "hf: a transformers MoE config.json, or a preset ("
        + ", ".join(HF_PRESETS)
        + ") sized by the keys above",
    )
    hf_weights: str = _opt(
        "", None, "hf: local safetensors file or folder with the model's weights; empty: random init"
    )
    hf_model: str = _opt(
        "",
        None,
        "hf: a model folder (save_pretrained: config.json, tokenizer, safetensors) giving config, weights "
        "and tokenizer (then hf-config, hf-weights unset); empty: hf-config over bytes",
    )
    init_weights: str = _opt(
        "",
        None,
        "safetensors file of the global model's arrays (fedmoe-pretrain writes one), or a run's export "
        "folder, the server starts from; empty: seeded random init (hf: hf-model / hf-weights instead)",
    )
    gate_mode: str = _opt("global", _choice(*GATE_MODES), "aggregated gate, or each client keeps its own")
    peft: str = _opt(
        "none", _choice(*PEFT_MODES), "hf: train and send every weight (none), or LoRA adapters only (lora)"
    )
    lora_rank: int = _opt(8, _range(1), "peft=lora: rank r of every adapter")
    lora_alpha: float = _opt(16.0, _range(0.0, lo_open=True), "peft=lora: scaling alpha (update x alpha / r)")
    lora_dropout: float = _opt(
        0.0, (lambda v: 0.0 <= v < 1.0, ">= 0 and < 1"), "peft=lora: dropout on the attention adapters' input"
    )
    lora_target_modules: str = _opt(
        "q_proj,k_proj,v_proj,o_proj",
        None,
        "peft=lora: comma-separated module-name suffixes given adapters (the experts always are)",
    )
    # Alignment
    policy: str = _opt("load_balanced", _choice(*POLICIES), "client-expert assignment policy")
    experts_per_client: int = _opt(4, _range(1), "experts per client (fixed) / at most (profiled)")
    tie_layers: bool = _opt(
        True, None, "expert e of every MoE layer travels together; false: fitness, usage, plan per layer"
    )
    fitness_ema: float = _opt(0.5, _range(0.0, 1.0, lo_open=True), "EMA weight of new fitness feedback")
    fitness_decay: float = _opt(0.9, _range(0.0, 1.0), "fitness kept per round without interaction")
    usage_decay: float = _opt(0.8, _range(0.0, 1.0), "usage kept per round")
    w_fitness: float = _opt(1.0, _range(0.0), "weight of fitness in desirability")
    w_usage: float = _opt(0.5, _range(0.0), "weight of the usage penalty in desirability")
    fitness_loss_weight: float = _opt(0.5, _range(0.0, 1.0), "share of exp(-expert loss) in fitness feedback")
    fitness_init: str = _opt(
        "zero",
        _choice(*FITNESS_INITS),
        "a pair without evidence its client did not train: rises from 0 by the indirect rule (zero), "
        "or starts at the client's unmasked-gate share (routing: seeds fitness from a pretrained router)",
    )
    load_slack: float = _opt(0.0, _range(0.0), "per-expert load bounds: mean x (1 +- slack)")
    approx_min_clients: int = _opt(
        0, _range(0), "load_balanced rounds of this many clients or more: fast approximate plan; 0: exact"
    )
    # Capacity
    capacity: str = _opt("profiled", _choice(*CAPACITY_MODES), "experts per client: measured or fixed")
    device_mix: str = _opt("", None, 'e.g. "phone=0.5,laptop=0.3,edge=0.2"; empty: none')
    round_deadline_s: float = _opt(0.0, _range(0.0), "deadline for a client's round; 0: none")
    under_capacity: str = _opt("shared-only", _choice(*UNDER_CAPACITY), "client that cannot hold one expert")
    min_trained_experts: int = _opt(
        1, _range(1), "clients holding fewer experts train the shared part only (experts read-only)"
    )
    # Reliability
    round_timeout_s: float = _opt(600.0, _range(0.0, lo_open=True), "seconds to wait for replies")
    min_replies: int = _opt(1, _range(1), "valid replies needed to update the model")
    query_retry_rounds: int = _opt(
        1, _range(1), "rounds before a node that did not answer a query is asked again (doubling per miss)"
    )
    discovery: str = _opt(
        "all",
        _choice("all", "sampled"),
        "query every new node before sampling (all) or only the sampled new ones (sampled: many clients)",
    )
    max_failed_rounds: int = _opt(
        5, _range(0), "stop the run, failed, after this many rounds in a row keep the model; 0: never"
    )
    update_bound: float = _opt(
        3.0,
        _range(0.0),
        "scale a group's update above this x the clients' median relative size back onto it "
        "(leave it out beyond 2x that); 0: off; not applied under dp",
    )
    weight_cap: float = _opt(
        3.0,
        _range(0.0),
        "cap a client's example count at this x the round's median; 0: off; not applied under dp",
    )
    token_cap: float = _opt(
        0.0,
        _range(0.0),
        "cap a client's token weight on an expert at this x its fair share (its layer's tokens / "
        "experts held there); 0: off; not applied under dp",
    )
    aggregation: str = _opt("mean", _choice(*AGGREGATIONS), "per-group combination of the trainers' updates")
    trim_fraction: float = _opt(0.1, _range(0.0, 0.49), "share cut at each end under trimmed-mean")
    # Privacy (docs/PRIVACY.md)
    dp: str = _opt(
        "off", _choice(*DP_MODES), "differential privacy: server adds the noise (central) or each client"
    )
    dp_clip_norm: float = _opt(
        1.0, _range(0.0, lo_open=True), "DP: bound on a client's update norm (shared + its experts)"
    )
    dp_noise_multiplier: float = _opt(1.0, _range(0.0), "DP: Gaussian noise std as a multiple of clip norm")
    dp_delta: float = _opt(1e-5, (lambda v: 0.0 < v < 1.0, "> 0 and < 1"), "DP: delta of reported epsilon")
    dp_min_trainers: int = _opt(
        2, _range(1), "DP: an expert is planned only to rounds with at least this many trainers"
    )
    fault_drop_prob: float = _opt(0.0, _range(0.0, 1.0), "simulation: client raises")
    fault_slow_prob: float = _opt(0.0, _range(0.0, 1.0), "simulation: client stalls past timeout")
    fault_corrupt_prob: float = _opt(0.0, _range(0.0, 1.0), "simulation: client sends garbage")
    resume: bool = _opt(False, None, "continue the named run from its checkpoint")
    # Outputs and hardware
    run_name: str = _opt("", None, "output folder name; empty: timestamp")
    output_dir: str = _opt("outputs", None, "root of run outputs")
    device: str = _opt("auto", _choice(*DEVICES), "client training device")
    precision: str = _opt(
        "fp32", _choice(*PRECISIONS), "train and evaluate in fp32, or under bf16 autocast (weights stay fp32)"
    )
    # Experiment tracking (docs/TRACKING.md)
    tracking: str = _opt(
        "none", _choice(*TRACKERS), "also log every round's metrics to TensorBoard or MLflow (offline files)"
    )
    tracking_dir: str = _opt("", None, "where the tracker writes; empty: <run folder>/tracking")

    @classmethod
    def keys(cls) -> list[str]:
        """Run-config keys in declaration order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower run config and build a :class:`RunConfig`.

        Missing keys take their defaults; unknown keys are an error.

        Raises
        ------
        ConfigError
            Naming the key, the bad value and what is allowed.

        """
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; allowed keys: {', '.join(fields)}")
        values = {}
        for key, f in fields.items():
            if key not in run_config:
                continue
            value = _coerce(key, run_config[key], type(f.default))
            check = f.metadata.get("check")
            if check is not None and not check[0](value):
                raise ConfigError(f"run-config key '{key}' = {value!r} is invalid; allowed: {check[1]}")
            values[f.name] = value
        cfg = cls(**values)
        cfg._check_relations()
        return cfg

    @property
    def gate_from_all(self) -> bool:
        """Whether the gate is averaged over all replies (``gate-aggregation``, resolved)."""
        if self.gate_aggregation == "auto":
            return self.route_loss_weight > 0
        return self.gate_aggregation == "all"

    @property
    def round(self) -> sections.RoundSection:
        """How the server runs rounds (:class:`~.sections.RoundSection`)."""
        return sections.RoundSection(
            num_server_rounds=self.num_server_rounds,
            fraction_train=self.fraction_train,
            min_train_nodes=self.min_train_nodes,
            fraction_evaluate=self.fraction_evaluate,
            min_evaluate_nodes=self.min_evaluate_nodes,
            round_timeout_s=self.round_timeout_s,
            min_replies=self.min_replies,
            query_retry_rounds=self.query_retry_rounds,
            discovery=self.discovery,
            max_failed_rounds=self.max_failed_rounds,
            lr=self.lr,
            local_epochs=self.local_epochs,
            seed=self.seed,
            lr_schedule=self.lr_schedule,
            warmup_rounds=self.warmup_rounds,
            lr_min=self.lr_min,
            wire_dtype=self.wire_dtype,
        )

    @property
    def training(self) -> sections.TrainingSection:
        """A client's local training (:class:`~.sections.TrainingSection`)."""
        return sections.TrainingSection(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            aux_weight=self.aux_loss_weight,
            route_weight=self.route_loss_weight,
            precision=self.precision,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            betas=(self.adam_beta1, self.adam_beta2),
            grad_accum_steps=self.grad_accum_steps,
            max_grad_norm=self.max_grad_norm,
        )

    @property
    def alignment(self) -> sections.AlignmentSection:
        """The alignment state's knobs (:class:`~.sections.AlignmentSection`)."""
        return sections.AlignmentSection(
            fitness_ema=self.fitness_ema,
            fitness_decay=self.fitness_decay,
            usage_decay=self.usage_decay,
            w_fitness=self.w_fitness,
            w_usage=self.w_usage,
            load_slack=self.load_slack,
            approx_min_clients=self.approx_min_clients,
            loss_weight=self.fitness_loss_weight,
            fitness_init=self.fitness_init,
            seed=self.seed,
        )

    @property
    def planning(self) -> sections.PlanningSection:
        """What the round planner reads (:class:`~.sections.PlanningSection`)."""
        return sections.PlanningSection(
            policy=self.policy,
            tie_layers=self.tie_layers,
            capacity=self.capacity,
            experts_per_client=self.experts_per_client,
            round_deadline_s=self.round_deadline_s,
            under_capacity=self.under_capacity,
            min_trained_experts=self.min_trained_experts,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            min_trainers=self.dp_min_trainers if self.dp != "off" else 0,
            wire_dtype=self.wire_dtype,
            optimizer_states=OPTIMIZER_STATES[self.optimizer],
        )

    @property
    def aggregation_rules(self) -> sections.AggregationSection:
        """How valid replies become the new model (:class:`~.sections.AggregationSection`).

        ``gate_balance_rate`` is the rate the server applies: 0 under DP (the router-bias step
        would read the clients' raw routing histograms, which the privacy accounting does not
        cover) and for transformer-moe and hf (their routers have no bias to step).
        """
        balance = self.dp == "off" and self.model not in TEXT_MODELS
        return sections.AggregationSection(
            update_bound=self.update_bound,
            weight_cap=self.weight_cap,
            token_cap=self.token_cap,
            method=self.aggregation,
            trim_fraction=self.trim_fraction,
            gate_from_all=self.gate_from_all,
            single_holders=self.route_loss_weight > 0,
            per_layer=not self.tie_layers,
            gate_balance_rate=self.gate_balance_rate if balance else 0.0,
            gate_balance_step=self.gate_balance_step,
        )

    @property
    def privacy(self) -> sections.PrivacySection:
        """Differential privacy (:class:`~.sections.PrivacySection`)."""
        return sections.PrivacySection(
            mode=self.dp,
            clip_norm=self.dp_clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            min_trainers=self.dp_min_trainers,
        )

    @property
    def split(self) -> sections.SplitSection:
        """How a client's share of the dataset is cut (:class:`~.sections.SplitSection`)."""
        return sections.SplitSection(
            partitioner=self.partitioner,
            alpha=self.dirichlet_alpha,
            shards=self.shards_per_client,
            test_fraction=self.local_test_fraction,
            max_samples=self.max_samples_per_client,
            data_dir=self.data_dir,
            seed=self.seed,
            public_fraction=self.public_fraction,
        )

    @property
    def faults(self) -> sections.FaultSection:
        """Injected faults in simulation (:class:`~.sections.FaultSection`)."""
        return sections.FaultSection(
            drop=self.fault_drop_prob,
            slow=self.fault_slow_prob,
            corrupt=self.fault_corrupt_prob,
            seed=self.seed,
        )

    @property
    def output(self) -> sections.OutputSection:
        """Where the run writes (:class:`~.sections.OutputSection`)."""
        return sections.OutputSection(run_name=self.run_name, output_dir=self.output_dir, resume=self.resume)

    @property
    def tracking_section(self) -> sections.TrackingSection:
        """Experiment tracking (:class:`~.sections.TrackingSection`)."""
        return sections.TrackingSection(tracker=self.tracking, tracking_dir=self.tracking_dir)

    @property
    def lora(self) -> sections.LoraSection | None:
        """LoRA fine-tuning (:class:`~.sections.LoraSection`), ``None`` unless ``peft = "lora"``."""
        if self.peft != "lora":
            return None
        return sections.LoraSection(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=lora_targets(self.lora_target_modules),
            base_seed=self.seed,
        )

    def alignment_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~fedmoe_app.alignment.AlignmentState` (all but ``E``)."""
        return dataclasses.asdict(self.alignment)

    def train_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``fedmoe_app.training.train`` set by the run config."""
        return dataclasses.asdict(self.training)

    def hf_sizes(self) -> dict[str, int]:
        """Sizes of an ``hf`` preset (keyword arguments of ``fedmoe_app.hf_config.resolve_hf_config``)."""
        return {
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "expert_hidden": self.expert_hidden,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "context_length": self.context_length,
        }

    def node_data_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``fedmoe_app.data.local.node_data``: how a node's own folder is split."""
        return {
            "test_fraction": self.local_test_fraction,
            "max_samples": self.max_samples_per_client,
            "seed": self.seed,
            "context_length": self.context_length,
            "tokenizer": self.hf_model if self.model == "hf" else "",
            "columns": self.columns,
            "classes": class_names(self.classes),
            "image_shape": image_shape(self.image_shape),
        }

    @property
    def columns(self) -> sections.Columns:
        """Column names of a saved or Hugging Face dataset (empty: detected), :class:`~.sections.Columns`."""
        return sections.Columns(image=self.image_column, label=self.label_column, text=self.text_column)

    def _check_model(self) -> None:
        text = self.dataset in TEXT_DATASETS
        if (self.model in TEXT_MODELS) != text and not is_model_factory(self.model):
            wanted = " or ".join(repr(m) for m in TEXT_MODELS) if text else "'cnn-moe'"
            raise ConfigError(
                f"run-config key 'model' = {self.model!r} is invalid for dataset {self.dataset!r}; "
                f"allowed: {wanted}"
            )
        if self.partitioner == "natural" and not text:
            raise ConfigError(
                f"run-config key 'partitioner' = 'natural' is invalid for dataset {self.dataset!r}; "
                f"allowed: a text dataset ({', '.join(TEXT_DATASETS)})"
            )
        if self.dataset == "text" and not (self.data_dir or self.hf_dataset) and self.central_eval:
            raise ConfigError(
                "run-config key 'data-dir' = '' is invalid for dataset 'text'; allowed: a folder of "
                "UTF-8 text files or a saved dataset (or hf-dataset; or central-eval = false when every "
                "SuperNode names its own data-path)"
            )
        if self.hf_model and self.model != "hf":
            raise ConfigError(
                f"run-config key 'hf-model' = {self.hf_model!r} is invalid for model {self.model!r}; "
                "allowed: '' (a model folder is read by model 'hf' only)"
            )
        if self.init_weights and self.model == "hf":
            raise ConfigError(
                f"run-config key 'init-weights' = {self.init_weights!r} is invalid for model 'hf'; "
                "allowed: '' (an hf model starts from hf-model or hf-weights)"
            )
        if self.peft != "none" and self.model != "hf":
            raise ConfigError(
                f"run-config key 'peft' = {self.peft!r} is invalid for model {self.model!r}; "
                "allowed: 'none' (LoRA is for model 'hf')"
            )
        if self.peft == "lora":
            try:
                lora_targets(self.lora_target_modules)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.model not in TEXT_MODELS:
            return
        if self.model == "hf":
            try:
                if self.hf_model:
                    default = RunConfig.__dataclass_fields__["hf_config"].default
                    check_hf_model(
                        self.hf_model,
                        self.hf_config,
                        self.hf_weights,
                        self.num_experts,
                        self.top_k,
                        self.context_length,
                        default,
                    )
                else:
                    check_hf_config(
                        self.hf_config, self.hf_weights, self.num_experts, self.top_k, self.context_length
                    )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ConfigError(
                f"run-config key 'd-model' = {self.d_model} is invalid with num-heads = {self.num_heads}; "
                "allowed: a multiple of num-heads with an even head size (RoPE)"
            )
        if self.route_loss_weight > 0:
            raise ConfigError(
                f"run-config key 'route-loss-weight' = {self.route_loss_weight} is invalid for model "
                f"{self.model!r}; allowed: 0"
            )

    def _check_public(self) -> None:
        """``public-fraction > 0`` needs a training set the run partitions: built-in images or data-dir's."""
        if not self.public_fraction:
            return
        if self.dataset in TEXT_DATASETS:
            where = f"dataset {self.dataset!r}"
        elif self.hf_dataset:
            where = "hf-dataset"
        elif self.dataset == "images" and not self.data_dir:
            where = "dataset 'images' without data-dir"
        else:
            return
        raise ConfigError(
            f"run-config key 'public-fraction' = {self.public_fraction} is invalid for {where}; allowed: 0 "
            "(a public share is cut from fashion-mnist, cifar10, synthetic or an image folder in data-dir)"
        )

    def _check_data(self) -> None:
        self._check_public()
        if self.hf_dataset and self.dataset not in ("images", "text"):
            raise ConfigError(
                f"run-config key 'hf-dataset' = {self.hf_dataset!r} is invalid for dataset {self.dataset!r}; "
                "allowed: '' (a FederatedDataset is read for dataset 'images' or 'text')"
            )
        if self.hf_dataset and self.data_dir:
            raise ConfigError(
                f"run-config key 'hf-dataset' = {self.hf_dataset!r} is invalid with data-dir = "
                f"{self.data_dir!r}; allowed: one of the two"
            )
        if self.hf_dataset and self.partitioner == "natural":
            raise ConfigError(
                "run-config key 'partitioner' = 'natural' is invalid with hf-dataset; allowed: "
                "dirichlet, pathological, iid"
            )
        if self.dataset == "images":
            image_shape(self.image_shape)
            class_names(self.classes)
            if not (self.data_dir or self.hf_dataset) and not (self.image_shape and self.classes):
                raise ConfigError(
                    "run-config key 'data-dir' = '' is invalid for dataset 'images'; allowed: a folder "
                    "of images (or hf-dataset), or, for a server that holds no data (central-eval = "
                    "false), both image-shape and classes"
                )
            if self.central_eval and not (self.data_dir or self.hf_dataset):
                raise ConfigError(
                    "run-config key 'central-eval' = true is invalid for dataset 'images' without "
                    "data-dir or hf-dataset; allowed: false (the server holds no test set)"
                )
        elif self.image_shape or self.classes:
            key, value = ("image-shape", self.image_shape) if self.image_shape else ("classes", self.classes)
            raise ConfigError(
                f"run-config key '{key}' = {value!r} is invalid for dataset {self.dataset!r}; "
                "allowed: '' (it sets dataset 'images')"
            )

    def _check_training(self) -> None:
        if self.grad_checkpointing and self.model != "hf":
            raise ConfigError(
                f"run-config key 'grad-checkpointing' = true is invalid for model {self.model!r}; "
                "allowed: false (gradient checkpointing is transformers', model 'hf' only)"
            )
        if self.lr_min > self.lr:
            raise ConfigError(
                f"run-config key 'lr-min' = {self.lr_min} is invalid; allowed: 0..lr ({self.lr})"
            )
        if self.warmup_rounds and self.warmup_rounds >= self.num_server_rounds:
            raise ConfigError(
                f"run-config key 'warmup-rounds' = {self.warmup_rounds} is invalid; allowed: 0 or "
                f"fewer than num-server-rounds ({self.num_server_rounds})"
            )

    def _check_relations(self) -> None:
        self._check_model()
        self._check_data()
        self._check_training()
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"run-config key 'top-k' = {self.top_k} is invalid; allowed: "
                f"1..num-experts ({self.num_experts})"
            )
        if self.experts_per_client > self.num_experts:
            raise ConfigError(
                f"run-config key 'experts-per-client' = {self.experts_per_client} is invalid; "
                f"allowed: 1..num-experts ({self.num_experts})"
            )
        try:
            parse_device_mix(self.device_mix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.dp != "off":
            for key, bad, allowed in (
                (
                    "aggregation",
                    self.aggregation != "mean",
                    "'mean' when dp is on (DP averages clipped deltas)",
                ),
                ("tie-layers", not self.tie_layers, "true when dp is on (privacy accounts per expert)"),
            ):
                if bad:
                    value = getattr(self, key.replace("-", "_"))
                    raise ConfigError(f"run-config key '{key}' = {value!r} is invalid; allowed: {allowed}")
        total = self.fault_drop_prob + self.fault_slow_prob + self.fault_corrupt_prob
        if total > 1.0:
            raise ConfigError(
                f"run-config keys 'fault-drop-prob' + 'fault-slow-prob' + 'fault-corrupt-prob' "
                f"= {total} is invalid; allowed: a sum <= 1"
            )

    @classmethod
    def markdown_table(cls) -> str:
        """Return the README's configuration table: key, default, allowed values, what it does."""
        lines = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is not None:
                allowed = check[1]
            elif isinstance(f.default, bool):
                allowed = "true or false"
            else:
                allowed = "any string"
            default = f.default
            shown = ("true" if default else "false") if isinstance(default, bool) else default
            shown = f'"{shown}"' if isinstance(default, str) else shown
            lines.append(f"| `{f.name.replace('_', '-')}` | `{shown}` | {allowed} | {f.metadata['doc']} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Run-config keys → values (as written to ``config.json``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


def keyword_config(options: Mapping[str, Any], allowed: tuple[str, ...], owner: str) -> RunConfig:
    """Return the validated :class:`RunConfig` of snake_case keyword ``options`` (``top_k=2``, ...).

    What the library classes (``FedMoE``, ``FedMoEClient``) take as keyword arguments: each is a
    run-config key with ``_`` for ``-``, defaults and checks the run config's own.

    Raises
    ------
    TypeError
        For a key not in ``allowed``, naming ``owner`` (the class) and the allowed keys.
    ConfigError
        Naming the run-config key, the bad value and what is allowed.

    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{owner} got unknown keyword argument(s) {unknown}; allowed: {', '.join(allowed)}")
    return RunConfig.from_run_config({k.replace("_", "-"): v for k, v in options.items()})


def is_model_factory(value: str) -> bool:
    """Whether ``model`` names a user's factory (``package.module:factory``) rather than a family."""
    return MODEL_FACTORY.fullmatch(value) is not None


def lora_targets(value: str) -> tuple[str, ...]:
    """Module-name suffixes of ``lora-target-modules`` (comma-separated; empty: the experts only).

    Raises
    ------
    ValueError
        Naming the key, if a name is empty or holds characters other than letters, digits, ``_``, ``.``.

    """
    names = tuple(n.strip() for n in value.split(",")) if value.strip() else ()
    bad = [n for n in names if not n or not all(c.isalnum() or c in "_." for c in n)]
    if bad:
        raise ValueError(
            f"run-config key 'lora-target-modules' = {value!r} is invalid; allowed: comma-separated "
            "module-name suffixes (letters, digits, '_', '.'), e.g. 'q_proj,v_proj'"
        )
    return names


def image_shape(value: str) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of run-config ``image-shape`` (``"3,32,32"``); ``None`` when empty (read from the data).

    Raises
    ------
    ConfigError
        Naming the key unless three integers with ``C`` 1 or 3 and ``H = W >= 4`` (cnn-moe's square input).

    """
    if not value.strip():
        return None
    try:
        c, h, w = (int(v) for v in value.split(","))
    except ValueError:
        c = h = w = 0
    if c not in (1, 3) or h < 4 or h != w:
        raise ConfigError(
            f"run-config key 'image-shape' = {value!r} is invalid; allowed: \"C,H,W\" with C 1 or 3 and "
            "H = W >= 4 (e.g. \"3,32,32\"), or '' (read from the data)"
        )
    return c, h, w


def class_names(value: str) -> tuple[str, ...] | None:
    """Class names of run-config ``classes`` (comma-separated, label order); ``None`` when empty.

    Raises
    ------
    ConfigError
        Naming the key unless at least two distinct, non-empty names.

    """
    if not value.strip():
        return None
    names = tuple(n.strip() for n in value.split(","))
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"run-config key 'classes' = {value!r} is invalid; allowed: two or more distinct comma-separated "
            "class names in label order (e.g. \"cat,dog,fox\"), or '' (read from the data)"
        )
    return names


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Check ``value`` has the field's type (ints are accepted for floats)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ConfigError(f"run-config key '{key}' = {value!r} is invalid; allowed: a finite number")
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"run-config key '{key}' = {value!r} has type {type(value).__name__}; "
            f"allowed: a value of type {kind.__name__}"
        )
    return value
