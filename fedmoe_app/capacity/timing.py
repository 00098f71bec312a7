"""Round time and the capacity model, vectorized over clients.

:func:`capacity_from_profiles` gives the largest ``n`` experts that fit in a client's memory
and, with a round deadline, whose download + local training + upload time
(:func:`round_time_s`) meets it. :func:`virtual_round_time_s` is a round's simulated
wall-clock time (its slowest participant).

Transfers are priced by the values that travel: the shared part's and the held experts' weights
under full training, their LoRA adapters only under ``peft = "lora"`` (:class:`Adapters`; the
base model, every held expert's weights included, is built on the device and never travels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .memory import Adapters, MemoryModel, ModelCosts, Number

#: Model family -> shares of the dense-matmul GFLOP/s that training reaches on a CPU,
#: ``(shared part, experts)`` (:attr:`ModelCosts.efficiency`). ``conv``: the CNN's small
#: convolutions reach about a quarter of it, its small experts (grouped matmuls of a few
#: hundred rows) about a tenth; ``transformer``: attention and embeddings about a quarter, the
#: experts' larger matmuls about 40%. Calibrated on the development machine with
#: ``fedmoe-bench compute`` (docs/CAPACITY.md); used until a client reports a measured
#: ``samples-per-s``, and always for emulated device classes.
COMPUTE_EFFICIENCY: dict[str, tuple[float, float]] = {"conv": (0.25, 0.1), "transformer": (0.25, 0.4)}


def _payload_defaults(
    costs: ModelCosts, adapters: Adapters | None, shared_nbytes: int | None, expert_nbytes: int | None
) -> tuple[int, int]:
    """``(shared, per expert)`` bytes each way: the given ones, else float32 values of what travels."""
    if adapters is None:
        shared, expert = costs.shared_params, costs.expert_params
    else:
        shared, expert = adapters.shared, adapters.expert
    return (
        4 * shared if shared_nbytes is None else int(shared_nbytes),
        4 * expert if expert_nbytes is None else int(expert_nbytes),
    )


def round_time_s(
    n_experts: Number | np.ndarray,
    gflops: Number | np.ndarray,
    down_mbps: Number | np.ndarray,
    up_mbps: Number | np.ndarray,
    *,
    costs: ModelCosts,
    samples: Number | np.ndarray,
    shared_nbytes: int | None = None,
    expert_nbytes: int | None = None,
    flops_per_sample_shared: float | None = None,
    flops_per_sample_expert: float | None = None,
    samples_per_s: Number | np.ndarray | None = None,
    efficiency: tuple[float, float] | None = None,
    adapters: Adapters | None = None,
) -> np.ndarray:
    """Seconds a client needs for one round holding ``n_experts`` (vectorized, broadcasts).

    ``t = bytes * 8 / (down * 1e6) + compute + bytes * 8 / (up * 1e6)`` with
    ``bytes = shared_nbytes + n * expert_nbytes`` (the client receives and returns the
    shared part and its experts: their weights, or under LoRA their adapters only, the base
    model being on the device already) and ``compute = samples / samples_per_s`` where a
    measured throughput is known (finite, > 0), else
    ``samples * (f_shared / eff_shared + f_expert * min(n, top_k) / top_k / eff_expert) /
    (gflops * 1e9)``.

    Parameters
    ----------
    n_experts, gflops, down_mbps, up_mbps : array_like
        Experts held and the client's effective speeds (broadcast together).
    costs : ModelCosts
        The model's counted costs (defaults for bytes and FLOPs).
    samples : array_like
        Training samples per round (local epochs x local examples).
    shared_nbytes, expert_nbytes : int, optional
        Wire bytes of the shared part and of one expert (default: float32 values of what
        travels: the parameters, or with ``adapters`` the adapters).
    flops_per_sample_shared, flops_per_sample_expert : float, optional
        Default: ``costs.flops_shared`` and ``costs.flops_experts``.
    samples_per_s : array_like, optional
        Measured (effective) throughput; NaN or <= 0 means unknown.
    efficiency : tuple of float, optional
        ``(eff_shared, eff_expert)``: shares of the benchmark GFLOP/s that training of the
        shared part and of the experts reaches; default ``costs.efficiency``.
    adapters : Adapters, optional
        LoRA: the adapters travel instead of the weights (the default wire bytes). Compute is
        still full training's FLOPs (an upper bound: the frozen weights need no gradient).

    Returns
    -------
    np.ndarray
        float64 seconds, the broadcast shape of the inputs.

    """
    s_bytes, e_bytes = _payload_defaults(costs, adapters, shared_nbytes, expert_nbytes)
    f_shared, f_expert = costs.flops_shared, costs.flops_experts
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
    efficiency = costs.efficiency if efficiency is None else efficiency
    eff_shared, eff_expert = (float(e) for e in efficiency)
    if not (eff_shared > 0 and eff_expert > 0):
        raise ValueError(f"efficiency must be two numbers > 0, got {efficiency!r}")
    bits = (s_bytes + n * e_bytes) * 8.0
    transfer = bits / (down * 1e6) + bits / (up * 1e6)
    k = max(costs.top_k, 1)
    flops = f_shared / eff_shared + f_expert * np.minimum(n, k) / k / eff_expert
    compute = smp * flops / (gf * 1e9)
    if samples_per_s is not None:
        sps = np.asarray(samples_per_s, dtype=np.float64)
        known = np.isfinite(sps) & (sps > 0)
        measured = smp / np.where(known, sps, 1.0)
        compute = np.where(known, measured, compute)
    return np.asarray(transfer + compute, dtype=np.float64)


def _check_options(min_experts: int, num_experts: int, deadline_s: float | None) -> None:
    """Raise ValueError unless ``0 <= min_experts <= num_experts`` and ``deadline_s`` is None or >= 0."""
    if not 0 <= min_experts <= num_experts:
        raise ValueError(f"min_experts must be in 0..{num_experts}, got {min_experts}")
    if deadline_s is not None and (not math.isfinite(deadline_s) or deadline_s < 0):
        raise ValueError(f"deadline_s must be None or >= 0, got {deadline_s!r}")


def _per_client(
    memory_bytes: np.ndarray,
    gflops: np.ndarray,
    down_mbps: np.ndarray,
    up_mbps: np.ndarray,
    samples: np.ndarray | Number,
    samples_per_s: np.ndarray | None,
) -> list[np.ndarray]:
    """Broadcast the per-client inputs of :func:`capacity_from_profiles` to float64 ``[C]`` arrays.

    Returns them in argument order; ``samples_per_s=None`` becomes NaN (unknown). Raises
    ValueError unless they are 1-D and ``memory_bytes`` is ``>= 0`` (and not NaN).
    """
    arrays = np.broadcast_arrays(
        np.asarray(memory_bytes, dtype=np.float64),
        np.asarray(gflops, dtype=np.float64),
        np.asarray(down_mbps, dtype=np.float64),
        np.asarray(up_mbps, dtype=np.float64),
        np.asarray(samples, dtype=np.float64),
        np.asarray(np.nan if samples_per_s is None else samples_per_s, dtype=np.float64),
    )
    columns = [np.atleast_1d(a) for a in arrays]
    mem = columns[0]
    if mem.ndim != 1:
        raise ValueError(f"per-client inputs must be 1-D, got shape {mem.shape}")
    if (mem < 0).any() or np.isnan(mem).any():
        raise ValueError("memory_bytes must be >= 0")
    return columns


def _within_deadline(
    cap: np.ndarray,
    deadline_s: float,
    gflops: np.ndarray,
    down_mbps: np.ndarray,
    up_mbps: np.ndarray,
    samples: np.ndarray,
    samples_per_s: np.ndarray,
    *,
    costs: ModelCosts,
    **timing: Any,
) -> np.ndarray:
    """Lower ``cap`` to the most experts ``n`` per client whose round times for ``0..n`` meet ``deadline_s``.

    :func:`round_time_s` is evaluated on the grid ``n = 0..E`` for every client (``[C, E + 1]``)
    with the per-client ``[C]`` arrays and the options ``timing``; a client for which not even
    ``n = 0`` meets the deadline gets -1.
    """
    grid = np.arange(costs.num_experts + 1, dtype=np.float64)[None, :]
    t = round_time_s(
        grid,
        gflops[:, None],
        down_mbps[:, None],
        up_mbps[:, None],
        costs=costs,
        samples=samples[:, None],
        samples_per_s=samples_per_s[:, None],
        **timing,
    )
    ok = np.cumprod(t <= deadline_s * (1 + 1e-12), axis=1)  # prefix of n that meet it
    return np.minimum(cap, ok.sum(axis=1) - 1)


def capacity_from_profiles(
    memory_bytes: np.ndarray,
    gflops: np.ndarray,
    down_mbps: np.ndarray,
    up_mbps: np.ndarray,
    *,
    costs: ModelCosts,
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
    efficiency: tuple[float, float] | None = None,
) -> np.ndarray:
    """Experts each client can hold this round, vectorized over clients.

    ``cap[c] = min(mem_cap[c], deadline_cap[c])`` where ``mem_cap`` is the most experts
    whose predicted training memory fits ``memory_bytes[c]`` and, with a deadline,
    ``deadline_cap`` the most experts ``n`` with ``round_time_s(n) <= deadline_s``
    (:func:`round_time_s`; with top-k routing compute per sample hardly depends on
    ``n``, so the deadline mostly bounds the bytes moved). Both are evaluated on the grid
    ``n = 0..E`` for all clients at once (``[C, E + 1]``).

    The memory model decides how training is priced: with its
    :attr:`~.memory.MemoryModel.adapters` (LoRA) memory is the frozen base plus the trained
    adapters and the transfers default to the adapters' bytes
    (:meth:`~.memory.MemoryModel.wire_values`; the base model is assumed on the device), else
    full training and the weights.

    When not even ``min_experts`` fit (or not even the shared part), the result is 0 and
    the caller decides: the run config's ``under-capacity`` either trains such a client
    on the shared part only or skips it.

    Parameters
    ----------
    memory_bytes, gflops, down_mbps, up_mbps : np.ndarray
        Per-client ``[C]`` arrays (scalars broadcast). ``memory_bytes`` may be ``inf``.
    costs : ModelCosts
        The model's counted costs.
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
        Default ``MemoryModel(costs, batch_size)`` (full training); its ``adapters`` also price
        the transfers (:func:`round_time_s`).
    efficiency : tuple of float, optional
        See :func:`round_time_s`.

    Returns
    -------
    np.ndarray
        int64 ``[C]`` in ``{0} | [min_experts, E]``.

    """
    _check_options(min_experts, costs.num_experts, deadline_s)
    mm = memory_model or MemoryModel(costs, batch_size)
    mem, *speeds = _per_client(memory_bytes, gflops, down_mbps, up_mbps, samples, samples_per_s)
    cap = np.searchsorted(mm.table(), mem, side="right") - 1  # -1: not even the shared part
    if deadline_s:
        cap = _within_deadline(
            cap,
            deadline_s,
            *speeds,
            costs=costs,
            shared_nbytes=shared_nbytes,
            expert_nbytes=expert_nbytes,
            flops_per_sample_shared=flops_per_sample_shared,
            flops_per_sample_expert=flops_per_sample_expert,
            efficiency=efficiency,
            adapters=mm.adapters,
        )
    cap = np.where(cap < min_experts, 0, cap)
    return np.clip(cap, 0, costs.num_experts).astype(np.int64)


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
