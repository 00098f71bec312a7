"""What a client reports in reply to the server's ``query``: its capacity profile.

Memory budget, CPU, a matmul micro-benchmark (GFLOP/s), link speeds, plus the speed and
memory its last training round actually showed. :func:`emulate` turns a measured profile
into that of an emulated device class; :func:`profile_arrays` lines profiles up as
per-client arrays for the vectorized capacity model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .devices import DEVICE_CLASSES, MEASURED, _allowed_classes, is_emulated
from .memory import ModelCosts


@dataclass
class CapacityProfile:
    """What a client can offer for training, as reported to the server.

    Attributes
    ----------
    client_id : str
        Stable client id (partition id in simulation, node config in deployment).
    device_class : str
        ``"measured"`` for real hardware, else the emulated class (a key of
        :data:`DEVICE_CLASSES`).
    memory_bytes : int
        Memory available for training (host RAM; the emulated budget when emulated).
    cpu_count : int
        CPUs this process may use.
    cpu_freq_mhz : float
        Current CPU clock (0.0 where the platform does not report one, e.g. many VMs).
    gflops : float
        Dense float32 matmul speed from the micro-benchmark, divided by the emulated
        slowdown when emulated (the *effective* speed).
    down_mbps, up_mbps : float
        Link speeds in Mbit/s (see :func:`measure_profile` for where they come from).
    gpu_memory_bytes : int
        Free GPU memory when training on CUDA, else 0.
    samples_per_s, train_time_s, peak_memory_bytes : float, float, int or None
        Refreshed from training replies: throughput, duration and peak process RSS of
        the client's last local training, as *measured on the real hardware* (an
        emulated class's slowdown is applied when they are used, see
        :attr:`effective_samples_per_s`).
    num_examples : int or None
        Local training examples (one epoch), when known.

    """

    client_id: str
    device_class: str
    memory_bytes: int
    cpu_count: int
    cpu_freq_mhz: float
    gflops: float
    down_mbps: float
    up_mbps: float
    gpu_memory_bytes: int = 0
    samples_per_s: float | None = None
    train_time_s: float | None = None
    peak_memory_bytes: int | None = None
    num_examples: int | None = None

    @property
    def budget_bytes(self) -> int:
        """Memory that bounds training: free GPU memory when on a GPU, else ``memory_bytes``."""
        return self.gpu_memory_bytes if self.gpu_memory_bytes > 0 else self.memory_bytes

    @property
    def effective_samples_per_s(self) -> float | None:
        """Measured training throughput, used for round times (None: unknown or emulated).

        An emulated class's speed is its ``gflops`` alone: what the host measured says
        nothing about the device it plays, and would make the virtual clock follow the
        host's load.
        """
        if self.samples_per_s is None or self.samples_per_s <= 0 or is_emulated(self.device_class):
            return None
        return self.samples_per_s

    def to_dict(self) -> dict[str, int | float | str]:
        """Flat dict of scalars for a Flower ``ConfigRecord`` (``None`` fields are left out).

        Keys are the field names with ``-`` for ``_`` (``memory-bytes``, ``samples-per-s``,
        ...), the style of the app's other records.
        """
        out: dict[str, int | float | str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[_key(f.name)] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CapacityProfile:
        """Validate and build a profile from :meth:`to_dict` output (or a Flower record).

        Keys may use ``-`` or ``_``. Keys that are not fields (e.g. a ``num-examples`` put
        next to the profile by the client) are ignored.

        Raises
        ------
        ValueError
            Naming the field that is missing, has the wrong type or is out of range.

        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _key(f.name)
            raw = d.get(key, d.get(f.name))
            if raw is None:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"capacity profile field '{key}' is missing")
                continue
            kind, lo, lo_open = _FIELD_RULES[f.name]
            values[f.name] = _check_field(key, raw, kind, lo, lo_open)
        return cls(**values)


# (type, lower bound, lower bound exclusive) per field
_FIELD_RULES: dict[str, tuple[type, float | None, bool]] = {
    "client_id": (str, None, False),
    "device_class": (str, None, False),
    "memory_bytes": (int, 0, False),
    "cpu_count": (int, 1, False),
    "cpu_freq_mhz": (float, 0.0, False),
    "gflops": (float, 0.0, True),
    "down_mbps": (float, 0.0, True),
    "up_mbps": (float, 0.0, True),
    "gpu_memory_bytes": (int, 0, False),
    "samples_per_s": (float, 0.0, False),
    "train_time_s": (float, 0.0, False),
    "peak_memory_bytes": (int, 0, False),
    "num_examples": (int, 0, False),
}


def _where(key: str, value: Any) -> str:
    return f"capacity profile field '{key}' = {value!r}"


def _key(name: str) -> str:
    return name.replace("_", "-")


def _check_field(key: str, value: Any, kind: type, lo: float | None, lo_open: bool) -> Any:
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{_where(key, value)}: expected a non-empty str")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"capacity profile field '{key}' = {value!r}: expected a {kind.__name__}")
    if kind is int:
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(f"capacity profile field '{key}' = {value!r}: expected an int")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{_where(key, value)}: expected a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"{_where(key, value)} is out of range; allowed: {bound}")
    return value


def emulate(
    measured: CapacityProfile,
    device_class: str,
    *,
    costs: ModelCosts | None = None,
    batch_size: int | None = None,
    optimizer_states: int = 1,
) -> CapacityProfile:
    """Effective profile of ``measured`` hardware playing ``device_class``.

    Memory, compute and link speeds are the class's own: memory is
    :meth:`DeviceClass.budget_bytes` for ``costs``, ``batch_size`` and the optimizer's
    ``optimizer_states`` per parameter (``memory_mb`` when no
    costs are given), compute its ``gflops``, links its speeds. Nothing measured on the host
    enters, so in simulation a client's capacity, sample budget and virtual round time
    depend on its class and the run config only. Emulated devices have no GPU, so
    ``gpu_memory_bytes`` is 0 and the emulated memory budget bounds training wherever it
    runs. Training-refreshed fields are copied unchanged (they stay raw measurements and
    are not used for round times; see :attr:`CapacityProfile.effective_samples_per_s`).
    ``"measured"`` returns an unchanged copy.

    Raises
    ------
    ValueError
        For an unknown class (the message lists the allowed ones).

    """
    if device_class == MEASURED:
        return dataclasses.replace(measured)
    dc = DEVICE_CLASSES.get(device_class)
    if dc is None:
        allowed = f"{_allowed_classes()}, {MEASURED}"
        raise ValueError(f"unknown device class {device_class!r}; allowed: {allowed}")
    return dataclasses.replace(
        measured,
        device_class=device_class,
        memory_bytes=dc.budget_bytes(costs, batch_size, optimizer_states),
        gflops=dc.gflops,
        down_mbps=dc.down_mbps,
        up_mbps=dc.up_mbps,
        gpu_memory_bytes=0,
    )


def profile_arrays(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
) -> dict[str, np.ndarray]:
    """Per-client arrays from profiles (objects or :meth:`CapacityProfile.to_dict` dicts).

    Returns float64 arrays ``memory_bytes`` (:attr:`CapacityProfile.budget_bytes`),
    ``gflops``, ``down_mbps``, ``up_mbps``, ``samples_per_s`` (measured throughput, NaN for
    emulated classes: see :attr:`CapacityProfile.effective_samples_per_s`) and
    ``num_examples``; NaN where a value is unknown.
    """
    fields = ("memory_bytes", "gflops", "down_mbps", "up_mbps", "samples_per_s", "num_examples")
    out = {f: np.full(len(profiles), np.nan) for f in fields}
    for i, p in enumerate(profiles):
        d = p.to_dict() if isinstance(p, CapacityProfile) else p

        def get(name: str, d: Mapping[str, Any] = d) -> float:
            v = d.get(_key(name), d.get(name))
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan

        gpu = get("gpu_memory_bytes")
        out["memory_bytes"][i] = gpu if gpu > 0 else get("memory_bytes")
        for f in ("gflops", "down_mbps", "up_mbps", "num_examples"):
            out[f][i] = get(f)
        sps = get("samples_per_s")
        cls = d.get("device-class", d.get("device_class", MEASURED))
        out["samples_per_s"][i] = sps if sps > 0 and not is_emulated(str(cls)) else np.nan
    return out
