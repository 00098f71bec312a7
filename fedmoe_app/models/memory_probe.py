"""Measured activation memory of a training step, for any :class:`MoEModel` (CPU, no allocator stats).

:class:`LiveBytes` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that counts the
bytes of every tensor storage created while it is active and subtracts them when the storage is
freed, so its ``peak`` is the largest amount of memory held at once by tensors created during
the measured steps (activations saved for backward, their gradients, the parameters' gradients
and the optimizer's momentum; not the parameters, which exist before). Every aten op goes
through it, forward and backward, so temporaries between ops are seen; a kernel's private
scratch inside one op is not.

:func:`activation_bytes_per_sample` trains a model holding one and two experts at two batch
sizes and returns the per-sample slope of that peak, split into the part every sample costs and
the part per expert a sample visits: the activations in :class:`~fedmoe_app.capacity.ModelCosts`,
measured instead of restating an architecture.

The probe takes a few seconds in a fresh process (its first dispatch-mode steps), so
:func:`cached_activation_bytes` keeps each model configuration's result on disk
(:func:`~fedmoe_app.config.cache_root`): a machine measures a configuration once, and every
later client, server and test process reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..capacity import COMPUTE_EFFICIENCY, ModelCosts
from ..config import cache_root
from ..files import atomic_write
from .interface import MoEModel

logger = logging.getLogger(__name__)

#: Batch sizes of the probe: the slope between them is the per-sample activation memory.
PROBE_BATCHES = (2, 4)


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created while active; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def training_peak_bytes(model: MoEModel, x: Tensor, y: Tensor, steps: int = 2) -> int:
    """Peak bytes created by ``steps`` SGD-momentum steps of ``model`` on ``(x, y)`` (CPU).

    The step is the client's: task loss plus balance loss, ``zero_grad(set_to_none=True)``,
    backward, SGD with momentum (fused where torch has it); from the second step on the
    momentum buffers are alive through the whole step, as in a client's epoch (with one
    step the peak can fall at the momentum's creation instead of in backward).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    with LiveBytes() as mode:
        for _ in range(steps):
            out = model(x, y)
            loss = model.task_loss(out.logits, y) + 0.01 * out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    return mode.peak


def activation_bytes_per_sample(
    build: Callable[[Sequence[int]], MoEModel],
    batch: Callable[[int], tuple[Tensor, Tensor]],
    num_experts: int,
) -> tuple[int, int]:
    """Measure ``(fixed, routed)`` bytes per sample of a training step's peak.

    Parameters
    ----------
    build : callable
        ``build(expert_ids)`` returns the model holding those experts (same seed every call).
    batch : callable
        ``batch(n)`` returns inputs and targets of ``n`` samples.
    num_experts : int
        Experts per MoE layer (with one expert the routed part is 0).

    Returns
    -------
    tuple of int
        ``fixed``: bytes per sample that do not depend on routing; ``routed``: bytes per sample
        and visited expert. The slope of the peak between :data:`PROBE_BATCHES` with one expert
        held is ``fixed + routed``, with two ``fixed + 2 routed``; batch-independent memory
        (gradients, momentum) cancels in the slope.

    """
    lo, hi = PROBE_BATCHES
    data = {n: batch(n) for n in PROBE_BATCHES}

    def slope(ids: list[int]) -> float:
        peaks = [training_peak_bytes(build(ids), *data[n]) for n in (lo, hi)]
        return (peaks[1] - peaks[0]) / (hi - lo)

    one = slope([0])
    two = slope([0, 1]) if num_experts > 1 else one
    routed = max(0.0, two - one)
    return int(max(0.0, one - routed)), int(routed)


def byte_windows(context_length: int) -> Callable[[int], tuple[Tensor, Tensor]]:
    """``batch(n)`` of :func:`activation_bytes_per_sample` for a byte-level LM: seeded random windows."""

    def batch(n: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(n)
        tokens = torch.randint(0, 256, (n, context_length + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    return batch


def cached_activation_bytes(key: str, measure: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """``measure()`` (:func:`activation_bytes_per_sample`), kept on disk under ``key``.

    Parameters
    ----------
    key : str
        Everything the measurement depends on: the model's configuration (e.g. the
        ``repr`` of its spec); the torch version and :data:`PROBE_BATCHES` are added here.
    measure : callable
        Runs the probe; called when no readable cached value exists.

    Returns
    -------
    tuple of int
        ``(fixed, routed)`` bytes per sample. The file is written atomically (clients start
        in parallel); an unreadable one is measured again, an unwritable folder only costs
        the speed-up.

    """
    full = f"{key}|torch={torch.__version__}|batches={PROBE_BATCHES}"
    path = cache_root() / "memory-probe" / f"{hashlib.sha256(full.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == full:
            return int(saved["fixed"]), int(saved["routed"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fixed, routed = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"key": full, "fixed": int(fixed), "routed": int(routed)}))
    except OSError as err:
        logger.debug("memory probe cache not written (%s)", err)
    return int(fixed), int(routed)


def costs_from_probe(
    spec: Any,
    family: str,
    *,
    params: tuple[int, int],
    probed: tuple[int, int],
    flops: tuple[float, float],
) -> ModelCosts:
    """Return a model's :class:`ModelCosts` from its counted parameters and FLOPs and probed activations.

    ``params`` and ``flops`` are ``(shared, per expert)``; ``probed`` the ``(fixed, routed)``
    bytes per sample :func:`cached_activation_bytes` measured (the memory model counts float32
    values); ``spec`` gives ``num_experts`` and ``top_k``; ``family`` the compute efficiency
    (``capacity.COMPUTE_EFFICIENCY``: ``conv`` or ``transformer``).
    """
    (shared, expert), (fixed, routed), (flops_shared, flops_experts) = params, probed, flops
    return ModelCosts(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        shared_params=shared,
        expert_params=expert,
        fixed_activation_values=fixed // 4,
        fixed_activation_bytes=fixed % 4,
        routed_activation_values=-(-routed // 4),
        transient_activation_values=0,
        flops_shared=flops_shared,
        flops_experts=flops_experts,
        efficiency=COMPUTE_EFFICIENCY[family],
    )
