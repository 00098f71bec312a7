"""Client capacity: what a client can hold and train, and how long its round takes.

Four pieces, each usable on its own (no Flower imports here: the client and the strategy
wrap the plain dicts of this module into Flower records):

* :class:`CapacityProfile` -- what a client reports in reply to the server's ``query``:
  memory budget, CPU, a matmul micro-benchmark (GFLOP/s), link speeds, plus the speed
  and memory its last training round actually showed. :func:`measure_profile` measures
  one with psutil and torch.
* Emulated device classes (:data:`DEVICE_CLASSES`, :func:`parse_device_mix`,
  :func:`device_class_for`, :func:`emulate`): in simulation every client runs on the
  same machine, so a run-config ``device-mix`` gives each client a deterministic,
  seed-dependent class whose budget caps the measured one.
* :class:`MemoryModel` -- training memory of a client holding ``n`` experts (weights,
  gradients, SGD momentum, activations); :func:`experts_that_fit` inverts it.
* The capacity model (:func:`capacity_from_profiles`, :func:`round_time_s`), vectorized
  over clients: the largest ``n`` that fits in memory and, with a round deadline, whose
  download + local training + upload time meets it. :func:`virtual_round_time_s` is the
  round's simulated wall-clock time (the slowest participant).

All sizes are bytes, link speeds Mbit/s (10**6 bit/s), compute GFLOP/s (10**9 FLOP/s).
docs/CAPACITY.md explains the formulas and how the memory model was checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch

from .model import ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only (avoids an import cycle with config)
    from .config import RunConfig

logger = logging.getLogger(__name__)

MIB = 1 << 20
#: Link speed assumed when nothing was measured (Mbit/s), see :func:`measure_profile`.
DEFAULT_MBPS = 100.0
#: Upper bound of the timed window of the compute micro-benchmark (seconds).
MAX_BENCHMARK_S = 0.45
#: Shares of the dense-matmul GFLOP/s that training reaches on a CPU: ``(stem + gate,
#: experts)``. The small convolutions reach about a fifth of it; the experts run as batched
#: matrix-vector products on a private per-sample copy of their weights (``index_select``
#: forward, ``index_add`` backward), which is memory-bound and reaches about 1%. Calibrated
#: on the development machine (docs/CAPACITY.md); only used until a client has reported a
#: measured ``samples-per-s``.
COMPUTE_EFFICIENCY: tuple[float, float] = (0.2, 0.01)
#: The spec and batch size the emulated device budgets are calibrated for (the app's
#: defaults on Fashion-MNIST).
REFERENCE_SPEC = ModelSpec(in_channels=1, image_size=28, num_classes=10)
REFERENCE_BATCH_SIZE = 32
MEASURED = "measured"

Number = int | float
IntLike = int | np.ndarray


# --------------------------------------------------------------------------- profile
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
        """Measured training throughput slowed down by the emulated class (None if unknown)."""
        if self.samples_per_s is None or self.samples_per_s <= 0:
            return None
        return self.samples_per_s / compute_slowdown(self.device_class)

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


# --------------------------------------------------------------------------- measurement
def _cgroup_available_bytes() -> int | None:
    """Memory left under this process's cgroup limit (v2, then v1), or None if unlimited."""
    candidates = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_path, usage_path in candidates:
        try:
            with open(limit_path, encoding="ascii") as fh:
                limit = fh.read().strip()
            with open(usage_path, encoding="ascii") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(psutil.cpu_count(logical=True) or os.cpu_count() or 1, 1)


def _cpu_freq_mhz() -> float:
    try:
        freq = psutil.cpu_freq()
    except (OSError, RuntimeError, NotImplementedError):  # pragma: no cover - platform
        return 0.0
    if freq is None:
        return 0.0
    return float(freq.current or freq.max or 0.0)


def matmul_gflops(device: str = "cpu", seconds: float = 0.3) -> float:
    """Dense float32 matmul speed in GFLOP/s, timed for about ``seconds``.

    A small untimed product first (thread pools, BLAS and CUDA context start), then
    ``n x n`` products (``n = 256`` on CPU, 2048 on CUDA; halved while one product takes
    more than an eighth of the window) until the window is over. Uses the current torch
    thread count and leaves the global RNG alone.

    Parameters
    ----------
    device : str
        Torch device to benchmark (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
    seconds : float
        Timed window, clipped to ``(0, MAX_BENCHMARK_S]``.

    Returns
    -------
    float
        GFLOP/s (``2 n**3`` FLOP per product), > 0.

    """
    if not seconds > 0:
        raise ValueError(f"benchmark_s must be > 0, got {seconds!r}")
    seconds = min(seconds, MAX_BENCHMARK_S)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = 2048 if dev.type == "cuda" else 256
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        warm = torch.rand(64, 64, generator=gen, device=dev)
        warm @ warm
        sync()
        while True:
            a = torch.rand(n, n, generator=gen, device=dev)
            b = torch.rand(n, n, generator=gen, device=dev)
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if time.perf_counter() - t0 <= seconds / 8 or n <= 32:
                break
            n //= 2
        iters = 0
        start = time.perf_counter()
        while True:
            a @ b
            sync()
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * n**3 * iters / elapsed / 1e9


def measure_profile(
    client_id: str,
    *,
    benchmark_s: float = 0.3,
    device: str = "cpu",
    last_exchange_mbps: float | None = None,
    default_mbps: float = DEFAULT_MBPS,
    gflops: float | None = None,
) -> CapacityProfile:
    """Measure this machine's capacity profile with psutil and a torch micro-benchmark.

    * memory: ``psutil.virtual_memory().available``, lowered to what is left under a
      cgroup memory limit when there is one (containers);
    * CPUs: the CPUs this process may run on; clock: ``psutil.cpu_freq()`` (0.0 where
      the platform reports none, as on many VMs);
    * compute: :func:`matmul_gflops` on ``device`` for ``benchmark_s`` seconds;
    * GPU: free memory from ``torch.cuda.mem_get_info`` when ``device`` is CUDA;
    * links: a client cannot measure its bandwidth without traffic (counting
      ``psutil.net_io_counters`` over a short window on an idle box measures nothing),
      so both directions are ``last_exchange_mbps`` when the caller measured a real
      transfer, else ``default_mbps``. Emulated device classes supply their own.

    Parameters
    ----------
    client_id : str
        Stable client id to put in the profile.
    benchmark_s : float
        Timed window of the compute benchmark (clipped to 0.45 s).
    device : str
        Torch device training will use.
    last_exchange_mbps : float, optional
        Throughput of the client's last message exchange, if it measured one.
    default_mbps : float
        Link speed assumed otherwise.
    gflops : float, optional
        Reuse an earlier benchmark result instead of running the benchmark.

    Returns
    -------
    CapacityProfile
        With ``device_class == "measured"``.

    """
    memory = int(psutil.virtual_memory().available)
    cg = _cgroup_available_bytes()
    if cg is not None:
        memory = min(memory, cg)
    gpu_memory = 0
    if torch.device(device).type == "cuda":
        try:
            gpu_memory = int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError) as exc:  # no usable CUDA device
            logger.warning("could not read free GPU memory of %s: %s", device, exc)
    measured_mbps = last_exchange_mbps is not None and last_exchange_mbps > 0
    mbps = float(last_exchange_mbps) if measured_mbps else float(default_mbps)
    return CapacityProfile(
        client_id=str(client_id),
        device_class=MEASURED,
        memory_bytes=memory,
        cpu_count=_cpu_count(),
        cpu_freq_mhz=_cpu_freq_mhz(),
        gflops=float(gflops) if gflops else matmul_gflops(device, benchmark_s),
        down_mbps=mbps,
        up_mbps=mbps,
        gpu_memory_bytes=gpu_memory,
    )


# --------------------------------------------------------------------------- memory model
def shared_params(spec: ModelSpec) -> int:
    """Parameters of the shared part (conv stem, projection and gate) of ``spec``."""
    c, d = spec.stem_channels, spec.feature_dim
    conv = spec.in_channels * c * 9 + c + c * 2 * c * 9 + 2 * c
    return conv + 2 * c * 16 * d + d + d * spec.num_experts + spec.num_experts


def expert_params(spec: ModelSpec) -> int:
    """Parameters of one expert (``w1 [d, h]``, ``b1 [h]``, ``w2 [h, C]``, ``b2 [C]``)."""
    d, h, c = spec.feature_dim, spec.expert_hidden, spec.num_classes
    return d * h + h + h * c + c


@dataclass(frozen=True)
class MemoryModel:
    """Training memory of a client holding ``n`` experts of ``spec`` at ``batch_size``.

    ``predict_training_bytes(n) = P(S + n X) + A(min(top_k, n))`` with ``S``/``X`` the
    shared/per-expert parameter counts, ``P = (2 + optimizer_states) * bytes_per_value``
    (weights, gradients, SGD momentum) and ``A(k)`` the activation peak for a batch:

    * the conv stem's saved activations (input, ReLU outputs, max-pool outputs and their
      int64 indices, pooled features) ``B * (...)``, and
    * the larger of (a) the routed part: ``Experts.forward`` gathers a private copy of
      the chosen experts' weights for every (sample, expert) pair (``index_select``),
      and backward materializes an equally large gradient of those copies, so
      ``B k (2 X + d + 2 h + 2 C)`` values; (b) the conv stem's backward transient
      (two gradients of the first conv output, ``2 B c S**2``).

    The gathered copies scale with ``B * top_k``, not with ``n``: they are part of the
    fixed cost (``shared_bytes``), and only parameters, gradients and momentum scale with
    the experts held (``expert_bytes``). With fewer experts than ``top_k`` a sample is
    routed to ``n`` experts only, so ``A`` uses ``min(top_k, n)``.

    Parameters
    ----------
    spec : ModelSpec
        Model shape.
    batch_size : int
        Local batch size.
    bytes_per_value : int
        Bytes of a parameter/activation value (4: float32).
    optimizer_states : int
        Optimizer state tensors per parameter (1: SGD momentum; 2: Adam).

    """

    spec: ModelSpec
    batch_size: int
    bytes_per_value: int = 4
    optimizer_states: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def state_bytes_per_param(self) -> int:
        """Bytes per parameter for weight + gradient + optimizer state."""
        return (2 + self.optimizer_states) * self.bytes_per_value

    def activation_bytes(self, k: int | np.ndarray) -> int | np.ndarray:
        """Activation peak of one training step with samples routed to ``k`` experts."""
        s = self.spec
        c, d, h, n_cls = s.stem_channels, s.feature_dim, s.expert_hidden, s.num_classes
        s1, s2 = s.image_size, s.image_size // 2
        s3 = s2 // 2
        stem_values = (
            s.in_channels * s1 * s1  # input (saved by conv1)
            + c * s1 * s1  # relu1 output (saved by relu1 and pool1)
            + c * s2 * s2  # pool1 output (saved by conv2)
            + 2 * c * s2 * s2  # relu2 output
            + 2 * c * s3 * s3  # pool2 output
            + 2 * c * 16  # adaptive-pool output (saved by the projection)
            + d  # features
            + 4 * s.num_experts  # gate logits, masked logits, probabilities
        )
        stem_index_bytes = 8 * (c * s2 * s2 + 2 * c * s3 * s3)  # max-pool int64 indices
        routed = np.asarray(k) * (2 * expert_params(s) + d + 2 * h + 2 * n_cls)
        transient = np.maximum(routed, 2 * c * s1 * s1)
        per_sample = self.bytes_per_value * (stem_values + transient) + stem_index_bytes
        out = self.batch_size * per_sample
        return int(out) if np.ndim(out) == 0 else out.astype(np.int64)

    def shared_bytes(self) -> int:
        """Bytes that do not grow with the experts held (``n >= top_k``)."""
        params = self.state_bytes_per_param * shared_params(self.spec)
        return int(params + self.activation_bytes(self.spec.top_k))

    def expert_bytes(self) -> int:
        """Bytes each held expert adds: its weights, gradients and optimizer state."""
        return self.state_bytes_per_param * expert_params(self.spec)

    def predict_training_bytes(self, n_experts: int | np.ndarray) -> int | np.ndarray:
        """Predicted peak training memory with ``n_experts`` held (0 = shared part only)."""
        n = np.asarray(n_experts, dtype=np.int64)
        if (n < 0).any():
            raise ValueError(f"n_experts must be >= 0, got {n_experts!r}")
        n_params = shared_params(self.spec) + n * expert_params(self.spec)
        params = self.state_bytes_per_param * n_params
        out = params + self.activation_bytes(np.minimum(n, self.spec.top_k))
        return int(out) if out.ndim == 0 else out.astype(np.int64)

    def table(self) -> np.ndarray:
        """``predict_training_bytes(n)`` for ``n = 0..E`` (non-decreasing int64 ``[E + 1]``)."""
        return np.asarray(self.predict_training_bytes(np.arange(self.spec.num_experts + 1)))

    def experts_that_fit(self, memory_bytes: Number | np.ndarray) -> int | np.ndarray:
        """Most experts whose training fits in ``memory_bytes`` (clipped to ``0..E``).

        0 also when not even the shared part fits.
        """
        mem = np.asarray(memory_bytes, dtype=np.float64)
        if np.isnan(mem).any():
            raise ValueError("memory_bytes must not be NaN")
        fit = np.searchsorted(self.table(), mem, side="right") - 1
        fit = np.clip(fit, 0, self.spec.num_experts)
        return int(fit) if fit.ndim == 0 else fit.astype(np.int64)


def shared_bytes(spec: ModelSpec, batch_size: int) -> int:
    """Training bytes that do not scale with the experts held; see :class:`MemoryModel`."""
    return MemoryModel(spec, batch_size).shared_bytes()


def expert_bytes(spec: ModelSpec, batch_size: int) -> int:
    """Training bytes each held expert adds; see :class:`MemoryModel`."""
    return MemoryModel(spec, batch_size).expert_bytes()


def predict_training_bytes(spec: ModelSpec, n_experts: IntLike, batch_size: int) -> IntLike:
    """Predicted peak training memory holding ``n_experts``; see :class:`MemoryModel`."""
    return MemoryModel(spec, batch_size).predict_training_bytes(n_experts)


def experts_that_fit(
    memory_bytes: Number | np.ndarray,
    spec: ModelSpec,
    batch_size: int,
) -> IntLike:
    """Most experts (``0..E``) whose training fits in ``memory_bytes``."""
    return MemoryModel(spec, batch_size).experts_that_fit(memory_bytes)


# --------------------------------------------------------------------------- device classes
def anchor_budget(
    budget_bytes: Number,
    spec: ModelSpec | None = None,
    batch_size: int | None = None,
) -> int:
    """Move a budget calibrated at the reference run to the same place for ``spec``.

    The budget's position on the reference memory curve (``predict_training_bytes(n)`` at
    :data:`REFERENCE_SPEC`, batch 32; e.g. "halfway between 1 and 2 experts") is found by
    piecewise-linear interpolation over ``n`` and mapped to the same position on the curve
    of ``spec`` at ``batch_size``; beyond either end of the curve it is scaled by the ratio
    of the end points. So an emulated class holds the same number of experts whatever the
    dataset, model size and batch size (default 32). ``spec=None`` returns the budget
    unchanged.
    """
    if spec is None:
        return int(budget_bytes)
    batch = REFERENCE_BATCH_SIZE if batch_size is None else batch_size
    top = max(spec.num_experts, REFERENCE_SPEC.num_experts)
    grid = np.arange(top + 1)
    ref = np.asarray(MemoryModel(REFERENCE_SPEC, REFERENCE_BATCH_SIZE).predict_training_bytes(grid))
    run = np.asarray(MemoryModel(spec, batch).predict_training_bytes(grid))
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
    compute_slowdown : float
        How many times slower than the machine running the simulation (> 0).
    down_mbps, up_mbps : float
        Link speeds in Mbit/s.
    description : str
        What the class stands for.

    """

    memory_mb: float
    compute_slowdown: float
    down_mbps: float
    up_mbps: float
    description: str = ""

    def budget_bytes(self, spec: ModelSpec | None = None, batch_size: int | None = None) -> int:
        """Memory budget in bytes for a run of ``spec`` at ``batch_size`` (:func:`anchor_budget`).

        Without ``spec``: ``memory_mb`` MiB, the budget at the reference run.
        """
        return anchor_budget(self.memory_mb * MIB, spec, batch_size)


def _budget_mb(n_experts: int) -> float:
    """Budget (MiB) midway between holding ``n`` and ``n + 1`` experts at the reference."""
    mm = MemoryModel(REFERENCE_SPEC, REFERENCE_BATCH_SIZE)
    lo, hi = mm.predict_training_bytes(n_experts), mm.predict_training_bytes(n_experts + 1)
    return round((lo + hi) / 2 / MIB, 2)


#: Emulated device classes. ``memory_mb`` are *training-memory budgets for this app*, not
#: the RAM of a real phone (which would hold every expert of this small model): they are
#: derived from the memory model at :data:`REFERENCE_SPEC` and batch size 32, midway
#: between two expert counts, so that a ``tiny`` device holds no expert, a ``phone`` 1, a
#: ``laptop`` 4 and an ``edge`` server all 8. For another dataset, model size or batch
#: size, :meth:`DeviceClass.budget_bytes` moves the budget to the same place on that run's
#: memory curve, so the classes keep their expert counts (docs/CAPACITY.md).
DEVICE_CLASSES: dict[str, DeviceClass] = {
    "tiny": DeviceClass(_budget_mb(0), 20.0, 5.0, 1.0, "microcontroller-like: no expert fits"),
    "phone": DeviceClass(_budget_mb(1), 8.0, 20.0, 5.0, "phone: 1 expert, slow uplink"),
    "laptop": DeviceClass(_budget_mb(4), 2.0, 100.0, 20.0, "laptop: 4 experts"),
    "edge": DeviceClass(256.0, 1.0, 1000.0, 1000.0, "edge server: every expert"),
}


def compute_slowdown(device_class: str) -> float:
    """Compute slowdown of ``device_class`` (1.0 for ``"measured"`` and unknown names)."""
    dc = DEVICE_CLASSES.get(device_class)
    return dc.compute_slowdown if dc is not None else 1.0


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


def emulate(
    measured: CapacityProfile,
    device_class: str,
    *,
    spec: ModelSpec | None = None,
    batch_size: int | None = None,
) -> CapacityProfile:
    """Effective profile of ``measured`` hardware playing ``device_class``.

    Memory and link speeds are the lesser of the measured and the emulated values (the
    emulated memory is :meth:`DeviceClass.budget_bytes` for ``spec`` and ``batch_size``,
    i.e. ``memory_mb`` when no spec is given);
    compute is ``measured.gflops / compute_slowdown`` (the emulated device is that many
    times slower than this machine). Emulated devices have no GPU, so
    ``gpu_memory_bytes`` is 0 and the emulated memory budget bounds training wherever
    it runs. Training-refreshed fields are copied unchanged (they stay raw
    measurements; see :attr:`CapacityProfile.effective_samples_per_s`).
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
        memory_bytes=min(int(measured.budget_bytes), dc.budget_bytes(spec, batch_size)),
        gflops=measured.gflops / dc.compute_slowdown,
        down_mbps=min(measured.down_mbps, dc.down_mbps),
        up_mbps=min(measured.up_mbps, dc.up_mbps),
        gpu_memory_bytes=0,
    )


_GFLOPS_CACHE: dict[str, float] = {}


def client_profile(
    client_id: str,
    cfg: RunConfig,
    node_config: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    benchmark_s: float = 0.3,
    spec: ModelSpec | None = None,
) -> CapacityProfile:
    """Measure the profile a client reports, then emulate a device class if the run asks.

    The device class is node config ``device-class`` when set (deployment), else
    :func:`device_class_for` under the run config's ``device-mix`` and ``seed``
    (simulation), else ``"measured"``. The compute benchmark runs once per process and
    device (simulated clients share one machine) and is reused afterwards.

    An emulated budget is anchored (:func:`anchor_budget`) to ``spec`` at
    ``cfg.batch_size``; pass the run's real spec (dataset shape included). Without it the
    class's budget at the reference run (``memory_mb``) applies.

    Raises
    ------
    ValueError
        For a bad ``device-mix`` or an unknown node-config ``device-class``.

    """
    mix = parse_device_mix(cfg.device_mix)
    forced = (node_config or {}).get("device-class")
    if forced:
        device_class = str(forced)
        if device_class != MEASURED and device_class not in DEVICE_CLASSES:
            raise ValueError(
                f"node-config key 'device-class' = {device_class!r} is invalid; allowed: "
                f"{_allowed_classes()}, {MEASURED}"
            )
    else:
        device_class = device_class_for(client_id, mix, cfg.seed)
    if device not in _GFLOPS_CACHE:
        _GFLOPS_CACHE[device] = matmul_gflops(device, benchmark_s)
    measured = measure_profile(client_id, device=device, gflops=_GFLOPS_CACHE[device])
    return emulate(measured, device_class, spec=spec, batch_size=cfg.batch_size)


# --------------------------------------------------------------------------- capacity model
def flops_per_sample(spec: ModelSpec) -> tuple[float, float]:
    """Training FLOPs per sample: ``(stem + gate, the top_k experts together)``.

    Forward multiply-adds count 2 FLOPs; forward + backward is taken as 3x forward.
    With ``n < top_k`` experts held a sample visits ``n`` experts, so scale the second
    number by ``min(n, top_k) / top_k``.
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


def _payload_defaults(
    spec: ModelSpec, shared_nbytes: int | None, expert_nbytes: int | None
) -> tuple[int, int]:
    return (
        4 * shared_params(spec) if shared_nbytes is None else int(shared_nbytes),
        4 * expert_params(spec) if expert_nbytes is None else int(expert_nbytes),
    )


def round_time_s(
    n_experts: Number | np.ndarray,
    gflops: Number | np.ndarray,
    down_mbps: Number | np.ndarray,
    up_mbps: Number | np.ndarray,
    *,
    spec: ModelSpec,
    samples: Number | np.ndarray,
    shared_nbytes: int | None = None,
    expert_nbytes: int | None = None,
    flops_per_sample_shared: float | None = None,
    flops_per_sample_expert: float | None = None,
    samples_per_s: Number | np.ndarray | None = None,
    efficiency: tuple[float, float] = COMPUTE_EFFICIENCY,
) -> np.ndarray:
    """Seconds a client needs for one round holding ``n_experts`` (vectorized, broadcasts).

    ``t = bytes * 8 / (down * 1e6) + compute + bytes * 8 / (up * 1e6)`` with
    ``bytes = shared_nbytes + n * expert_nbytes`` (the client receives and returns the
    shared part and its experts) and ``compute = samples / samples_per_s`` where a
    measured throughput is known (finite, > 0), else
    ``samples * (f_shared / eff_shared + f_expert * min(n, top_k) / top_k / eff_expert) /
    (gflops * 1e9)``.

    Parameters
    ----------
    n_experts, gflops, down_mbps, up_mbps : array_like
        Experts held and the client's effective speeds (broadcast together).
    spec : ModelSpec
        Model shape (defaults for bytes and FLOPs).
    samples : array_like
        Training samples per round (local epochs x local examples).
    shared_nbytes, expert_nbytes : int, optional
        Wire bytes of the shared part and of one expert (default: float32 parameters).
    flops_per_sample_shared, flops_per_sample_expert : float, optional
        Default: :func:`flops_per_sample`.
    samples_per_s : array_like, optional
        Measured (effective) throughput; NaN or <= 0 means unknown.
    efficiency : tuple of float
        ``(eff_shared, eff_expert)``: shares of the benchmark GFLOP/s that training of the
        stem and of the experts reaches (:data:`COMPUTE_EFFICIENCY`).

    Returns
    -------
    np.ndarray
        float64 seconds, the broadcast shape of the inputs.

    """
    s_bytes, e_bytes = _payload_defaults(spec, shared_nbytes, expert_nbytes)
    f_shared, f_expert = flops_per_sample(spec)
    f_shared = f_shared if flops_per_sample_shared is None else float(flops_per_sample_shared)
    f_expert = f_expert if flops_per_sample_expert is None else float(flops_per_sample_expert)
    n = np.asarray(n_experts, dtype=np.float64)
    gf = np.asarray(gflops, dtype=np.float64)
    down = np.asarray(down_mbps, dtype=np.float64)
    up = np.asarray(up_mbps, dtype=np.float64)
    smp = np.asarray(samples, dtype=np.float64)
    if (gf <= 0).any() or (down <= 0).any() or (up <= 0).any():
        raise ValueError("gflops, down_mbps and up_mbps must be > 0")
    if (n < 0).any() or (smp < 0).any():
        raise ValueError("n_experts and samples must be >= 0")
    eff_shared, eff_expert = (float(e) for e in efficiency)
    if not (eff_shared > 0 and eff_expert > 0):
        raise ValueError(f"efficiency must be two numbers > 0, got {efficiency!r}")
    bits = (s_bytes + n * e_bytes) * 8.0
    transfer = bits / (down * 1e6) + bits / (up * 1e6)
    k = max(spec.top_k, 1)
    flops = f_shared / eff_shared + f_expert * np.minimum(n, k) / k / eff_expert
    compute = smp * flops / (gf * 1e9)
    if samples_per_s is not None:
        sps = np.asarray(samples_per_s, dtype=np.float64)
        known = np.isfinite(sps) & (sps > 0)
        measured = smp / np.where(known, sps, 1.0)
        compute = np.where(known, measured, compute)
    return np.asarray(transfer + compute, dtype=np.float64)


def capacity_from_profiles(
    memory_bytes: np.ndarray,
    gflops: np.ndarray,
    down_mbps: np.ndarray,
    up_mbps: np.ndarray,
    *,
    spec: ModelSpec,
    batch_size: int,
    samples: np.ndarray | Number,
    deadline_s: float | None = None,
    flops_per_sample_shared: float | None = None,
    flops_per_sample_expert: float | None = None,
    expert_nbytes: int | None = None,
    shared_nbytes: int | None = None,
    min_experts: int = 1,
    samples_per_s: np.ndarray | None = None,
    memory_model: MemoryModel | None = None,
    efficiency: tuple[float, float] = COMPUTE_EFFICIENCY,
) -> np.ndarray:
    """Experts each client can hold this round, vectorized over clients.

    ``cap[c] = min(mem_cap[c], deadline_cap[c])`` where ``mem_cap`` is the most experts
    whose predicted training memory fits ``memory_bytes[c]`` and, with a deadline,
    ``deadline_cap`` the most experts ``n`` with ``round_time_s(n) <= deadline_s``
    (:func:`round_time_s`; with top-k routing compute per sample hardly depends on
    ``n``, so the deadline mostly bounds the bytes moved). Both are evaluated on the grid
    ``n = 0..E`` for all clients at once (``[C, E + 1]``).

    When not even ``min_experts`` fit (or not even the shared part), the result is 0 and
    the caller decides: the run config's ``under-capacity`` either trains such a client
    on the shared part only or skips it.

    Parameters
    ----------
    memory_bytes, gflops, down_mbps, up_mbps : np.ndarray
        Per-client ``[C]`` arrays (scalars broadcast). ``memory_bytes`` may be ``inf``.
    spec : ModelSpec
        Model shape.
    batch_size : int
        Local batch size (activation memory).
    samples : np.ndarray or number
        Training samples per client per round (local epochs x partition size).
    deadline_s : float, optional
        Round deadline; ``None`` or 0 means none.
    flops_per_sample_shared, flops_per_sample_expert, expert_nbytes, shared_nbytes
        Passed to :func:`round_time_s`.
    min_experts : int
        Smallest useful capacity (``0..E``); fewer becomes 0.
    samples_per_s : np.ndarray, optional
        Measured effective throughput per client; NaN means unknown (use ``gflops``).
    memory_model : MemoryModel, optional
        Default ``MemoryModel(spec, batch_size)``.
    efficiency : tuple of float
        See :func:`round_time_s`.

    Returns
    -------
    np.ndarray
        int64 ``[C]`` in ``{0} | [min_experts, E]``.

    """
    num_e = spec.num_experts
    if not 0 <= min_experts <= num_e:
        raise ValueError(f"min_experts must be in 0..{num_e}, got {min_experts}")
    if deadline_s is not None and (not math.isfinite(deadline_s) or deadline_s < 0):
        raise ValueError(f"deadline_s must be None or >= 0, got {deadline_s!r}")
    mm = memory_model or MemoryModel(spec, batch_size)
    arrays = np.broadcast_arrays(
        np.asarray(memory_bytes, dtype=np.float64),
        np.asarray(gflops, dtype=np.float64),
        np.asarray(down_mbps, dtype=np.float64),
        np.asarray(up_mbps, dtype=np.float64),
        np.asarray(samples, dtype=np.float64),
        np.asarray(np.nan if samples_per_s is None else samples_per_s, dtype=np.float64),
    )
    mem, gf, down, up, smp, sps = (np.atleast_1d(a) for a in arrays)
    if mem.ndim != 1:
        raise ValueError(f"per-client inputs must be 1-D, got shape {mem.shape}")
    if (mem < 0).any() or np.isnan(mem).any():
        raise ValueError("memory_bytes must be >= 0")
    cap = np.searchsorted(mm.table(), mem, side="right") - 1  # -1: not even the shared part
    if deadline_s:
        grid = np.arange(num_e + 1, dtype=np.float64)[None, :]
        t = round_time_s(
            grid,
            gf[:, None],
            down[:, None],
            up[:, None],
            spec=spec,
            samples=smp[:, None],
            shared_nbytes=shared_nbytes,
            expert_nbytes=expert_nbytes,
            flops_per_sample_shared=flops_per_sample_shared,
            flops_per_sample_expert=flops_per_sample_expert,
            samples_per_s=sps[:, None],
            efficiency=efficiency,
        )
        ok = np.cumprod(t <= deadline_s * (1 + 1e-12), axis=1)  # prefix of n that meet it
        cap = np.minimum(cap, ok.sum(axis=1) - 1)
    cap = np.where(cap < min_experts, 0, cap)
    return np.clip(cap, 0, num_e).astype(np.int64)


def virtual_round_time_s(round_times: np.ndarray | Sequence[float]) -> float:
    """Return the simulated wall-clock time of a round: its slowest participant (0.0 if none)."""
    t = np.asarray(round_times, dtype=np.float64)
    return float(t.max()) if t.size else 0.0


def ema_update(old: float | None, new: float, alpha: float) -> float:
    """Exponential moving average step: ``alpha * new + (1 - alpha) * old``.

    ``old is None`` (no estimate yet) returns ``new``.

    Raises
    ------
    ValueError
        If ``alpha`` is not in ``(0, 1]`` or ``new`` is not finite.

    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    new = float(new)
    if not math.isfinite(new):
        raise ValueError(f"new value must be finite, got {new!r}")
    if old is None:
        return new
    return alpha * new + (1.0 - alpha) * float(old)


# --------------------------------------------------------------------------- app helpers
def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """``(shared bytes, bytes of one expert)`` of a global-named array dict.

    Expert tensors are named ``experts.<id>.<name>`` (see :mod:`fedmoe_app.records`); the
    per-expert figure is the mean over the experts present (0 if none).
    """
    shared, per_expert = 0, {}
    for key, value in arrays.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "experts" and parts[1].isdigit():
            per_expert[parts[1]] = per_expert.get(parts[1], 0) + int(value.nbytes)
        else:
            shared += int(value.nbytes)
    expert = round(sum(per_expert.values()) / len(per_expert)) if per_expert else 0
    return shared, expert


def profile_arrays(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
) -> dict[str, np.ndarray]:
    """Per-client arrays from profiles (objects or :meth:`CapacityProfile.to_dict` dicts).

    Returns float64 arrays ``memory_bytes`` (:attr:`CapacityProfile.budget_bytes`),
    ``gflops``, ``down_mbps``, ``up_mbps``, ``samples_per_s`` (effective, i.e. slowed by
    the emulated class) and ``num_examples``; NaN where a value is unknown.
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
        out["samples_per_s"][i] = sps / compute_slowdown(str(cls)) if sps > 0 else np.nan
    return out


def capacity_for_profiles(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
    memory: MemoryModel,
    cfg: RunConfig,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Capacities for the strategy: :func:`capacity_from_profiles` on stored profiles.

    Uses ``cfg.round_deadline_s`` (0: none) with one batch of samples (the rest of the
    local work shrinks to fit the deadline, see :func:`deadline_sample_budget`; 0 when
    ``num-examples`` is unknown: only the bytes count), wire sizes from ``global_arrays``
    when given, ``min_experts = 1``.
    A client whose profile lacks memory, compute or link figures (it never answered a
    query) gets the fixed ``cfg.experts_per_client``.
    """
    n = len(profiles)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    a = profile_arrays(profiles)
    known = np.isfinite(a["memory_bytes"]) & (a["gflops"] > 0) & (a["down_mbps"] > 0)
    known &= a["up_mbps"] > 0
    fixed = min(int(cfg.experts_per_client), memory.spec.num_experts)
    out = np.full(n, fixed, dtype=np.int64)
    if not known.any():
        return out
    shared_nb, expert_nb = payload_nbytes(global_arrays) if global_arrays else (None, None)
    # Against a deadline only the transfers and one batch must fit: the strategy shrinks a
    # slow client's local work to its sample budget (deadline_sample_budget).
    samples = np.minimum(cfg.local_epochs * np.nan_to_num(a["num_examples"], nan=0.0), cfg.batch_size)
    out[known] = capacity_from_profiles(
        a["memory_bytes"][known],
        a["gflops"][known],
        a["down_mbps"][known],
        a["up_mbps"][known],
        spec=memory.spec,
        batch_size=memory.batch_size,
        samples=samples[known],
        deadline_s=float(cfg.round_deadline_s) or None,
        shared_nbytes=shared_nb,
        expert_nbytes=expert_nb or None,
        samples_per_s=a["samples_per_s"][known],
        memory_model=memory,
    )
    return out


def _client_times(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    global_arrays: Mapping[str, np.ndarray] | None,
    samples: np.ndarray,
) -> np.ndarray | None:
    """Per-client round seconds, or None when a profile lacks compute or link figures."""
    a = profile_arrays(profiles)
    if not ((a["gflops"] > 0) & (a["down_mbps"] > 0) & (a["up_mbps"] > 0)).all():
        return None
    shared_nb, expert_nb = payload_nbytes(global_arrays) if global_arrays else (None, None)
    return round_time_s(
        np.asarray(n_experts),
        a["gflops"],
        a["down_mbps"],
        a["up_mbps"],
        spec=memory.spec,
        samples=samples,
        shared_nbytes=shared_nb,
        expert_nbytes=expert_nb or None,
        samples_per_s=a["samples_per_s"],
    )


def planned_samples(profiles: Sequence[CapacityProfile | Mapping[str, Any]], cfg: RunConfig) -> np.ndarray:
    """Training samples each client would process in a full round (epochs x its examples)."""
    a = profile_arrays(profiles)
    return cfg.local_epochs * np.nan_to_num(a["num_examples"], nan=0.0)


def deadline_sample_budget(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    cfg: RunConfig,
    global_arrays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Training samples each client can process within ``round-deadline-s``.

    Round time is linear in samples, ``t(s) = t(0) + s * (t(1) - t(0))`` where ``t(0)`` is
    the transfer time, so the budget is ``floor((deadline - t(0)) / (t(1) - t(0)))``,
    clipped to ``[batch-size, epochs x examples]``: a slow client does partial local work
    instead of holding the round up. Without a deadline, or for clients whose profile is
    incomplete, the budget is the full ``epochs x examples``.
    """
    full = planned_samples(profiles, cfg)
    deadline = float(cfg.round_deadline_s)
    if deadline <= 0 or len(profiles) == 0:
        return full
    t0 = _client_times(profiles, n_experts, memory, global_arrays, np.zeros(len(profiles)))
    t1 = _client_times(profiles, n_experts, memory, global_arrays, np.ones(len(profiles)))
    if t0 is None or t1 is None:
        return full
    per_sample = np.maximum(t1 - t0, 1e-12)
    budget = np.floor(np.maximum(deadline - t0, 0.0) / per_sample)
    return np.minimum(full, np.maximum(budget, cfg.batch_size))


def virtual_round_time(
    profiles: Sequence[CapacityProfile | Mapping[str, Any]],
    n_experts: np.ndarray | Sequence[int],
    memory: MemoryModel,
    cfg: RunConfig,
    global_arrays: Mapping[str, np.ndarray] | None = None,
    samples: np.ndarray | None = None,
) -> float | None:
    """Return the simulated duration of a round whose clients hold ``n_experts`` (slowest one).

    ``samples`` are the training samples each client processes (default: a full round,
    :func:`planned_samples`). None when a participant's profile lacks compute or link figures.
    """
    if len(profiles) == 0:
        return 0.0
    samples = planned_samples(profiles, cfg) if samples is None else np.asarray(samples, np.float64)
    times = _client_times(profiles, n_experts, memory, global_arrays, samples)
    return None if times is None else virtual_round_time_s(times)
