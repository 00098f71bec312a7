"""Emulated device classes for simulation (run-config ``device-mix``).

In simulation every client runs on one machine, so ``device-mix`` gives each client a
deterministic, seed-dependent class whose budget caps the measured one
(:func:`~fedmoe_app.capacity.profile.emulate`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .memory import MIB, MemoryModel, ModelCosts, Number
from .timing import COMPUTE_EFFICIENCY

MEASURED = "measured"
#: Costs of the model the device budgets are calibrated at: the default CNN MoE on
#: Fashion-MNIST (``fedmoe_app.models.REFERENCE_SPEC``; its activations as measured with
#: torch 2.14 and grouped expert dispatch; a test keeps the two equal).
REFERENCE_COSTS = ModelCosts(
    num_experts=8,
    top_k=2,
    shared_params=38152,
    expert_params=19210,
    fixed_activation_values=40780,
    fixed_activation_bytes=0,
    routed_activation_values=0,
    transient_activation_values=0,
    flops_shared=6296064.0,
    flops_experts=227328.0,
    efficiency=COMPUTE_EFFICIENCY["conv"],
)
REFERENCE_BATCH_SIZE = 32


def anchor_budget(
    budget_bytes: Number,
    costs: ModelCosts | None = None,
    batch_size: int | None = None,
    optimizer_states: int = 1,
) -> int:
    """Move a budget calibrated at the reference run to the same place for ``costs``.

    The budget's position on the reference memory curve (``predict_training_bytes(n)`` at
    :data:`REFERENCE_COSTS`, batch 32; e.g. "halfway between 1 and 2 experts") is found by
    piecewise-linear interpolation over ``n`` and mapped to the same position on the curve
    of ``costs`` at ``batch_size``; beyond either end of the curve it is scaled by the ratio
    of the end points. So an emulated class holds the same number of experts whatever the
    dataset, model size, batch size (default 32) and optimizer (``optimizer_states`` of the
    run's curve: 1 SGD momentum, 2 AdamW; the reference is SGD's) when it trains them fully.
    ``costs=None`` returns the budget unchanged.

    Both curves are full training's: under LoRA (a
    :class:`~fedmoe_app.capacity.memory.MemoryModel` with adapters, cheaper per expert) the same
    budget holds more experts.
    """
    if costs is None:
        return int(budget_bytes)
    batch = REFERENCE_BATCH_SIZE if batch_size is None else batch_size
    top = max(costs.num_experts, REFERENCE_COSTS.num_experts)
    grid = np.arange(top + 1)
    ref = np.asarray(MemoryModel(REFERENCE_COSTS, REFERENCE_BATCH_SIZE).predict_training_bytes(grid))
    run_model = MemoryModel(costs, batch, optimizer_states=optimizer_states)
    run = np.asarray(run_model.predict_training_bytes(grid))
    b = float(budget_bytes)
    if b <= ref[0]:
        return int(b * run[0] / ref[0])
    if b >= ref[-1]:
        return int(b * run[-1] / ref[-1])
    # a flat step (equal bytes for n and n + 1) would make the position ambiguous: take the
    # largest n whose memory is <= b, then the fraction of the way to n + 1
    n = int(np.searchsorted(ref, b, side="right") - 1)
    frac = (b - ref[n]) / (ref[n + 1] - ref[n])
    return int(run[n] + frac * (run[n + 1] - run[n]))


@dataclass(frozen=True)
class DeviceClass:
    """An emulated kind of device.

    Attributes
    ----------
    memory_mb : float
        Training-memory budget for this app in MiB at the reference run (see
        :data:`DEVICE_CLASSES` and :meth:`budget_bytes`).
    gflops : float
        Dense float32 matmul speed in GFLOP/s (> 0). It replaces the host's benchmark and
        measured throughput, so a simulated client's round time depends on its class only,
        never on how loaded the machine running the simulation is.
    down_mbps, up_mbps : float
        Link speeds in Mbit/s.
    description : str
        What the class stands for.

    """

    memory_mb: float
    gflops: float
    down_mbps: float
    up_mbps: float
    description: str = ""

    def budget_bytes(
        self, costs: ModelCosts | None = None, batch_size: int | None = None, optimizer_states: int = 1
    ) -> int:
        """Memory budget in bytes for a model of ``costs`` at ``batch_size`` (:func:`anchor_budget`).

        Without ``costs``: ``memory_mb`` MiB, the budget at the reference run.
        """
        return anchor_budget(self.memory_mb * MIB, costs, batch_size, optimizer_states)


def _budget_mb(n_experts: int) -> float:
    """Budget (MiB) midway between holding ``n`` and ``n + 1`` experts at the reference."""
    mm = MemoryModel(REFERENCE_COSTS, REFERENCE_BATCH_SIZE)
    lo, hi = mm.predict_training_bytes(n_experts), mm.predict_training_bytes(n_experts + 1)
    return round((lo + hi) / 2 / MIB, 2)


#: Emulated device classes. ``memory_mb`` are *training-memory budgets for this app*, not
#: the RAM of a real phone (which would hold every expert of this small model): they are
#: derived from the memory model at :data:`REFERENCE_COSTS` and batch size 32, midway
#: between two expert counts, so that a ``tiny`` device holds no expert, a ``phone`` 1, a
#: ``laptop`` 4 and an ``edge`` server all 8. For another dataset, model size or batch
#: size, :meth:`DeviceClass.budget_bytes` moves the budget to the same place on that run's
#: memory curve, so the classes keep their expert counts under full training (docs/CAPACITY.md;
#: under LoRA the same budgets hold more: :func:`anchor_budget`). ``gflops``
#: are the quiet development machine's 150 GFLOP/s (edge) divided by 2 (laptop), 8 (phone)
#: and 20 (tiny).
DEVICE_CLASSES: dict[str, DeviceClass] = {
    "tiny": DeviceClass(_budget_mb(0), 7.5, 5.0, 1.0, "microcontroller-like: no expert fits"),
    "phone": DeviceClass(_budget_mb(1), 18.75, 20.0, 5.0, "phone: 1 expert, slow uplink"),
    "laptop": DeviceClass(_budget_mb(4), 75.0, 100.0, 20.0, "laptop: 4 experts"),
    "edge": DeviceClass(256.0, 150.0, 1000.0, 1000.0, "edge server: every expert"),
}


def is_emulated(device_class: str) -> bool:
    """Whether ``device_class`` names an emulated class (its figures replace measurements)."""
    return device_class in DEVICE_CLASSES


def _allowed_classes() -> str:
    return ", ".join(DEVICE_CLASSES)


def parse_device_mix(s: str) -> dict[str, float]:
    """Parse a run-config ``device-mix`` such as ``"phone=0.5,laptop=0.3,edge=0.2"``.

    Parameters
    ----------
    s : str
        Comma-separated ``name=weight`` pairs; names are keys of :data:`DEVICE_CLASSES`,
        weights are non-negative numbers with a positive sum. Empty means no emulation.

    Returns
    -------
    dict[str, float]
        Weights normalised to sum to 1, in :data:`DEVICE_CLASSES` order; ``{}`` for ``""``.

    Raises
    ------
    ValueError
        Naming the key ``device-mix``, the bad value and what is allowed.

    """
    if not isinstance(s, str):
        raise ValueError(f"run-config key 'device-mix' = {s!r} is invalid; allowed: a str")
    text = s.strip()
    if not text:
        return {}
    allowed = (
        f"allowed: comma-separated name=weight pairs with names from {_allowed_classes()}, "
        "weights >= 0 and a positive sum"
    )

    def bad(why: str) -> ValueError:
        return ValueError(f"run-config key 'device-mix' = {s!r} is invalid ({why}); {allowed}")

    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise bad(f"{item.strip()!r} is not name=weight")
        if name not in DEVICE_CLASSES:
            raise bad(f"unknown device class {name!r}")
        if name in weights:
            raise bad(f"device class {name!r} given twice")
        try:
            w = float(value)
        except ValueError:
            raise bad(f"weight {value.strip()!r} of {name!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise bad(f"weight {w!r} of {name!r} is negative or not finite")
        weights[name] = w
    total = sum(weights.values())
    if total <= 0:
        raise bad("the weights sum to 0")
    return {name: weights[name] / total for name in DEVICE_CLASSES if name in weights}


def _unit_hash(client_id: str, seed: int) -> float:
    """Uniform number in ``[0, 1)`` from ``(seed, client_id)``, stable across processes."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{client_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def device_class_for(client_id: str, mix: Mapping[str, float], seed: int) -> str:
    """Deterministic device class of ``client_id`` under ``mix`` for ``seed``.

    A BLAKE2b hash of ``(seed, client_id)`` gives a number ``u`` in ``[0, 1)``; the class
    is the one whose slice of the cumulative mix (in :data:`DEVICE_CLASSES` order, so the
    order of the pairs in the run config does not matter) contains ``u``. Over many
    clients the classes follow the mix. ``"measured"`` when ``mix`` is empty.

    Raises
    ------
    ValueError
        If ``mix`` names an unknown class or has no positive weight.

    """
    if not mix:
        return MEASURED
    unknown = sorted(set(mix) - set(DEVICE_CLASSES))
    if unknown:
        raise ValueError(f"unknown device class(es) {unknown}; allowed: {_allowed_classes()}")
    names = [n for n in DEVICE_CLASSES if mix.get(n, 0.0) > 0]
    if not names:
        raise ValueError("device mix has no positive weight")
    weights = np.array([float(mix[n]) for n in names])
    cum = np.cumsum(weights / weights.sum())
    idx = int(np.searchsorted(cum, _unit_hash(str(client_id), seed), side="right"))
    return names[min(idx, len(names) - 1)]
