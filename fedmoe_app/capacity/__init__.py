"""Client capacity: what a client can hold and train, and how long its round takes.

Pure numpy (no torch, psutil or Flower; an import-linter contract checks it), except the
client-side probe:

* :mod:`.profile` -- :class:`CapacityProfile`, what a client reports to the server's query;
* :mod:`.memory`  -- :class:`ModelCosts` (a model's counted costs), :class:`Adapters` (LoRA's
  trained and travelling values) and :class:`MemoryModel` (training bytes of a client holding
  ``n`` experts, full training or LoRA);
* :mod:`.devices` -- emulated device classes for simulation (``device-mix``);
* :mod:`.timing`  -- round time and the capacity model, vectorized over clients;
* :mod:`.probe`   -- measuring a real machine with psutil and a torch micro-benchmark
  (imported explicitly, client side: ``fedmoe_app.capacity.probe``).

All sizes are bytes, link speeds Mbit/s (10**6 bit/s), compute GFLOP/s (10**9 FLOP/s).
docs/CAPACITY.md explains the formulas and how the memory model was checked.
"""

from .devices import (
    DEVICE_CLASSES,
    REFERENCE_BATCH_SIZE,
    REFERENCE_COSTS,
    DeviceClass,
    anchor_budget,
    device_class_for,
    is_emulated,
    parse_device_mix,
)
from .memory import MIB, Adapters, MemoryModel, ModelCosts
from .profile import MEASURED, CapacityProfile, emulate, profile_arrays
from .timing import COMPUTE_EFFICIENCY, capacity_from_profiles, ema_update, round_time_s, virtual_round_time_s

__all__ = [
    "COMPUTE_EFFICIENCY",
    "DEVICE_CLASSES",
    "MEASURED",
    "MIB",
    "REFERENCE_BATCH_SIZE",
    "REFERENCE_COSTS",
    "Adapters",
    "CapacityProfile",
    "DeviceClass",
    "MemoryModel",
    "ModelCosts",
    "anchor_budget",
    "capacity_from_profiles",
    "device_class_for",
    "ema_update",
    "emulate",
    "is_emulated",
    "parse_device_mix",
    "profile_arrays",
    "round_time_s",
    "virtual_round_time_s",
]
