"""Measure a real machine's capacity profile (client side): psutil and a torch benchmark."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch

from .devices import DEVICE_CLASSES, MEASURED, _allowed_classes, device_class_for, parse_device_mix
from .memory import ModelCosts
from .profile import CapacityProfile, emulate

logger = logging.getLogger(__name__)

#: Link speed assumed when nothing was measured (Mbit/s), see :func:`measure_profile`.
DEFAULT_MBPS = 100.0


#: Upper bound of the timed window of the compute micro-benchmark (seconds).
MAX_BENCHMARK_S = 0.45


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


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - platform
        cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


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
      transfer (the down-link of the last train messages, :mod:`.link`), else
      ``default_mbps`` (the first round). Emulated device classes supply their own.

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
        cpu_count=usable_cpus(),
        cpu_freq_mhz=_cpu_freq_mhz(),
        gflops=float(gflops) if gflops else matmul_gflops(device, benchmark_s),
        down_mbps=mbps,
        up_mbps=mbps,
        gpu_memory_bytes=gpu_memory,
    )


_GFLOPS_CACHE: dict[str, float] = {}


def client_profile(
    client_id: str,
    *,
    device_mix: str,
    seed: int,
    batch_size: int,
    costs: ModelCosts | None,
    node_config: Mapping[str, Any] | None = None,
    device: str = "cpu",
    benchmark_s: float = 0.3,
    link_mbps: float | None = None,
    optimizer_states: int = 1,
) -> CapacityProfile:
    """Measure the profile a client reports, then emulate a device class if the run asks.

    The device class is node config ``device-class`` when set (deployment), else
    :func:`~fedmoe_app.capacity.devices.device_class_for` under the run's ``device_mix`` and
    ``seed`` (simulation), else ``"measured"``. The compute benchmark runs once per process
    and device (simulated clients share one machine) and is reused afterwards.

    An emulated budget is anchored (:func:`~fedmoe_app.capacity.devices.anchor_budget`) to
    the run's model ``costs`` at ``batch_size`` and its optimizer's ``optimizer_states`` per
    parameter; with ``costs=None`` the class's budget at the
    reference run (``memory_mb``) applies. ``link_mbps`` is the node's measured link speed
    (:mod:`~fedmoe_app.capacity.link`), used by the ``"measured"`` class only: an emulated
    class keeps its own link speeds.

    Raises
    ------
    ValueError
        For a bad ``device_mix`` or an unknown node-config ``device-class``.

    """
    device_class = node_device_class(client_id, device_mix=device_mix, seed=seed, node_config=node_config)
    if device not in _GFLOPS_CACHE:
        _GFLOPS_CACHE[device] = matmul_gflops(device, benchmark_s)
    measured = measure_profile(
        client_id, device=device, gflops=_GFLOPS_CACHE[device], last_exchange_mbps=link_mbps
    )
    return emulate(
        measured, device_class, costs=costs, batch_size=batch_size, optimizer_states=optimizer_states
    )


def node_device_class(
    client_id: str, *, device_mix: str, seed: int, node_config: Mapping[str, Any] | None = None
) -> str:
    """Return the device class a client plays: node config ``device-class``, else the run's mix.

    Raises
    ------
    ValueError
        For a bad ``device_mix`` or an unknown node-config ``device-class``.

    """
    mix = parse_device_mix(device_mix)
    forced = (node_config or {}).get("device-class")
    if not forced:
        return device_class_for(client_id, mix, seed)
    device_class = str(forced)
    if device_class != MEASURED and device_class not in DEVICE_CLASSES:
        raise ValueError(
            f"node-config key 'device-class' = {device_class!r} is invalid; allowed: "
            f"{_allowed_classes()}, {MEASURED}"
        )
    return device_class
