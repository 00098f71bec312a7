"""A dry run of capacity planning: what each device class of a federation holds, downloads and needs.

Pure numpy, like the rest of :mod:`fedmoe_app.capacity`: :func:`plan_federation` takes a model's
:class:`~fedmoe_app.capacity.memory.ModelCosts` and the federation's run-config values and applies
the planner's rules to every device class of ``device-mix``, as a round would:

* a class's memory budget is :meth:`~fedmoe_app.capacity.devices.DeviceClass.budget_bytes` for
  the model at the batch size (its place on the model's full-training memory curve: a device's
  memory does not depend on how the run trains);
* its experts are :func:`~fedmoe_app.capacity.timing.capacity_from_profiles` under that budget
  with the run's memory model, capped by ``experts-per-client`` (``Planner.capacity`` under
  ``capacity = "profiled"``); with no ``device-mix`` every client holds ``experts-per-client``
  (``capacity = "fixed"``);
* a client that cannot hold one expert still receives one, read-only, and trains the shared
  part (``under-capacity = "shared-only"``);
* it downloads the shared tensors and the experts it receives, exactly, in the wire dtype: their
  weights, or with LoRA their adapters only (the base model is assumed on every device);
* its peak training memory is the same memory model's prediction, the one that chose its experts
  (:class:`~fedmoe_app.capacity.memory.MemoryModel`: float32 weights, gradients and SGD momentum,
  and the activations of a batch; with LoRA the base weights frozen, weights only, each held
  expert's merged weights kept for backward, and the adapters trained).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .devices import DEVICE_CLASSES, device_class_for
from .memory import Adapters, MemoryModel, ModelCosts
from .timing import capacity_from_profiles

#: Bytes per value of each wire dtype.
WIRE_BYTES = {"fp32": 4, "bf16": 2}
#: The entry of a federation without device classes (every client holds experts-per-client).
FIXED = "fixed"


def classes_of_clients(clients: int, mix: Mapping[str, float], seed: int) -> dict[str, int]:
    """Clients per device class when client ids are ``"0"`` .. ``clients - 1`` (partition ids)."""
    if not mix:
        return {FIXED: clients}
    counts = Counter(device_class_for(str(c), mix, seed) for c in range(clients))
    return {name: counts[name] for name in DEVICE_CLASSES if name in mix}


def plan_federation(
    costs: ModelCosts,
    *,
    batch_size: int,
    experts_per_client: int,
    clients: int,
    mix: Mapping[str, float],
    seed: int = 0,
    wire_dtype: str = "fp32",
    adapters: Adapters | None = None,
    optimizer_states: int = 1,
) -> dict[str, dict[str, Any]]:
    """Plan every device class of the federation (see the module docstring).

    Parameters
    ----------
    costs : ModelCosts
        The model's costs (``shared_params`` / ``expert_params`` as they travel).
    batch_size, experts_per_client, clients, seed : int
        The run config's ``batch-size``, ``experts-per-client``, number of clients and ``seed``.
    mix : mapping
        ``parse_device_mix(device-mix)``; empty: no device classes.
    wire_dtype : str
        ``fp32`` or ``bf16`` (:data:`WIRE_BYTES`).
    adapters : Adapters, optional
        LoRA: the adapters travel and train, the base model is assumed on the device; the
        experts held are planned, and the peak predicted, with LoRA's memory model.
    optimizer_states : int
        State tensors the run's optimizer keeps per trained parameter (1: SGD momentum, 2: AdamW).

    Returns
    -------
    dict
        Per class: ``clients``, ``memory_budget_bytes`` (None without a class), ``experts_per_client``
        (trained; 0: shared part only), ``experts_received``, ``download_bytes``,
        ``peak_memory_bytes``, ``download_s`` at the class's link (None without a class).

    """
    if wire_dtype not in WIRE_BYTES:
        raise ValueError(f"wire dtype {wire_dtype!r} is invalid; allowed: {', '.join(WIRE_BYTES)}")
    memory = MemoryModel(costs, batch_size, optimizer_states=optimizer_states, adapters=adapters)
    shared_values, expert_values = memory.wire_values()
    wire = WIRE_BYTES[wire_dtype]
    fixed_k = min(int(experts_per_client), costs.num_experts)
    out: dict[str, dict[str, Any]] = {}
    for name, count in classes_of_clients(clients, mix, seed).items():
        dc = DEVICE_CLASSES.get(name)
        if dc is None:
            budget, held = None, fixed_k
        else:
            budget = dc.budget_bytes(costs, batch_size, optimizer_states)
            cap = capacity_from_profiles(
                [budget],
                [dc.gflops],
                [dc.down_mbps],
                [dc.up_mbps],
                costs=costs,
                batch_size=batch_size,
                samples=0,
                memory_model=memory,
            )
            held = min(int(cap[0]), fixed_k)
        received = max(held, 1)
        peak = int(memory.predict_training_bytes(received))
        download = wire * (shared_values + received * expert_values)
        out[name] = {
            "clients": count,
            "memory_budget_bytes": budget,
            "experts_per_client": held,
            "experts_received": received,
            "download_bytes": int(download),
            "peak_memory_bytes": int(peak),
            "download_s": None if dc is None else download * 8 / (dc.down_mbps * 1e6),
        }
    return out
