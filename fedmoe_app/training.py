"""Local training and evaluation loops, collecting the routing feedback the server uses.

Performance notes (measured in ``docs/PERFORMANCE.md``): on CPU the conv stem runs in
``channels_last`` memory format (about 1.5x faster training and 2x faster evaluation than
NCHW), SGD uses the fused kernel where torch has one, and running sums stay on the
device so a step never waits for a host sync. Model and data are moved to the chosen
device (:func:`resolve_device`) before the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .capacity.probe import usable_cpus
from .data import Rows, Split
from .data.text import TextSplit
from .models import MoEModel, MoEOutput

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of one client's local training, with per-expert feedback (length E)."""

    num_examples: int
    loss: float
    accuracy: float
    tokens: np.ndarray  # (sample, expert) pairs routed to each expert
    expert_loss: np.ndarray  # mean CE of each expert's own logits on its tokens (0 if none)
    gate_hist: np.ndarray  # top-k choices of the unmasked gate
    train_time_s: float
    samples_per_s: float
    peak_memory_bytes: int
    layer_tokens: np.ndarray  # [L, E] tokens per MoE layer
    layer_expert_loss: np.ndarray  # [L, E] mean loss signal per MoE layer (0 if no tokens)
    layer_loss_sum: np.ndarray  # [L, E] loss signal summed over each layer's tokens
    layer_gate_hist: np.ndarray  # [L, E] unmasked top-k choices per MoE layer


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config 'device' = 'cuda' but no CUDA device is available")
    return torch.device(name)


def _inputs_targets(data: Rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a split's inputs and targets (:meth:`~fedmoe_app.data.Rows.inputs_targets`) on ``device``."""
    inputs, targets = data.inputs_targets()
    return inputs.to(device), targets.to(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Context of a forward pass at ``precision``: ``fp32`` (nothing), or ``bf16`` autocast.

    ``bf16`` runs ``torch.autocast(device.type, dtype=torch.bfloat16)``: on CUDA and on CPU
    (torch's CPU autocast) matmuls and convolutions compute in bfloat16 while parameters,
    their gradients, the optimizer state and what goes on the wire stay float32; losses and
    softmaxes run in float32 by autocast's own policy. Backward runs outside the context.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


def make_sgd(
    params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """SGD with momentum, using torch's fused kernel where available (same update rule).

    The fused CPU/CUDA kernel does the momentum update in one pass over each tensor
    (about 2x faster steps on CPU than the default per-tensor loop); torch versions or
    devices without it get the default implementation.
    """
    params = list(params)
    try:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    """Return a fresh optimizer over ``params``: ``sgd`` (:func:`make_sgd`) or ``adamw``.

    ``adamw`` is :class:`torch.optim.AdamW` (decoupled ``weight_decay``, ``betas``), fused where
    torch has the kernel. A client builds a new one every round, so AdamW's moments start from
    zero each round (the usual choice in federated fine-tuning: the moments are local state the
    server never sees). ``momentum`` is SGD's only; ``betas`` AdamW's only.

    Raises
    ------
    ValueError
        If ``name`` is neither ``sgd`` nor ``adamw``.

    """
    params = list(params)
    if name == "sgd":
        return make_sgd(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def cpu_share() -> int:
    """Return the CPU cores this process may use.

    ``$OMP_NUM_THREADS`` if set (Ray sets it to ``floor(num_cpus)``, at least 1, for every
    simulated client, i.e. ``client-resources-num-cpus``); otherwise
    :func:`~fedmoe_app.capacity.probe.usable_cpus` (affinity mask and cgroup CPU quota).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cpus()


_THREADS_SET = False


def configure_threads() -> int:
    """Cap torch's intra-op threads at :func:`cpu_share` (once per process); return the count.

    torch already reads ``$OMP_NUM_THREADS``; without it torch takes every physical core
    of the host, which over-subscribes a container with a CPU quota or a client pinned to
    a few cores. The count is only ever lowered, never raised, and a later explicit
    :func:`torch.set_num_threads` by the caller wins.
    """
    global _THREADS_SET
    if not _THREADS_SET:
        _THREADS_SET = True
        share = cpu_share()
        if torch.get_num_threads() > share:
            torch.set_num_threads(share)
            log.debug("torch intra-op threads capped at %d (CPU share)", share)
    return torch.get_num_threads()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class _RunningSums:
    """Sums of one local training run, kept on the device so that a step never waits for the host."""

    tokens: torch.Tensor  # [E]
    loss_sum: torch.Tensor  # [E]
    hist: torch.Tensor  # [E]
    layers: torch.Tensor  # [3, L, E]: tokens, loss, hist per MoE layer
    total_loss: torch.Tensor  # float64 scalar: sum of batch loss x batch size
    correct: torch.Tensor  # int64 scalar

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, device: torch.device) -> _RunningSums:
        """Return all-zero sums for ``num_layers`` MoE layers of ``num_experts`` experts on ``device``."""
        return cls(
            tokens=torch.zeros(num_experts, device=device),
            loss_sum=torch.zeros(num_experts, device=device),
            hist=torch.zeros(num_experts, device=device),
            layers=torch.zeros(3, num_layers, num_experts, device=device),
            total_loss=torch.zeros((), dtype=torch.float64, device=device),
            correct=torch.zeros((), dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def add(self, model: MoEModel, out: MoEOutput, loss: torch.Tensor, y: torch.Tensor) -> None:
        """Add one step's forward output ``out``, its task ``loss`` and targets ``y`` (in place)."""
        self.tokens += out.tokens
        self.loss_sum += out.expert_loss_sum
        self.hist += out.gate_hist
        self.layers += torch.stack((out.layer_tokens, out.layer_loss_sum, out.layer_gate_hist))
        self.total_loss += loss.detach() * len(y)
        self.correct += model.correct(out.logits, y)


def _train_result(
    sums: _RunningSums, *, num_examples: int, mean_total: float, seen: int, targets: int, elapsed: float
) -> TrainResult:
    """Copy the device sums to the host and make the :class:`TrainResult` of a training run."""
    num_e = sums.tokens.shape[0]
    tok = sums.tokens.cpu().numpy().astype(np.float64)
    mean_loss = np.divide(sums.loss_sum.cpu().numpy(), tok, out=np.zeros(num_e), where=tok > 0)
    l_tok, l_loss, l_hist = sums.layers.cpu().numpy().astype(np.float64)
    return TrainResult(
        num_examples=num_examples,
        loss=mean_total,
        accuracy=int(sums.correct) / max(targets, 1),
        tokens=tok,
        expert_loss=mean_loss,
        gate_hist=sums.hist.cpu().numpy().astype(np.float64),
        train_time_s=elapsed,
        samples_per_s=seen / elapsed if elapsed > 0 else 0.0,
        peak_memory_bytes=peak_rss_bytes(),
        layer_tokens=l_tok,
        layer_expert_loss=np.divide(l_loss, l_tok, out=np.zeros_like(l_tok), where=l_tok > 0),
        layer_loss_sum=l_loss,
        layer_gate_hist=l_hist,
    )


def _micro_batches(
    order: torch.Tensor, start: int, *, batch_size: int, accum: int, room: int
) -> list[torch.Tensor]:
    """Return the micro-batches of the optimizer step beginning at ``order[start]``.

    Up to ``accum`` slices of ``batch_size`` indices, stopping before the epoch ends and once
    ``room`` more samples (the sample budget left) have been taken: a micro-batch is taken while
    the budget is not yet spent, so the last may overshoot it, as a whole batch did without
    accumulation.
    """
    parts, taken = [], 0
    for i in range(start, min(start + batch_size * accum, len(order)), batch_size):
        if taken >= room:
            break
        parts.append(order[i : i + batch_size])
        taken += len(parts[-1])
    return parts


def train(
    model: MoEModel,
    data: Split | TextSplit,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    aux_weight: float,
    route_weight: float,
    device: torch.device | str,
    seed: int,
    max_samples: int | None,
    precision: str,
    optimizer: str,
    weight_decay: float,
    betas: tuple[float, float],
    grad_accum_steps: int,
    max_grad_norm: float,
) -> TrainResult:
    """Train ``model`` in place on in-memory tensors; return loss and feedback.

    Every knob is required (the run config holds their defaults: ``RunConfig.train_kwargs``).
    ``max_samples`` stops
    training after that many samples (partial local work within a round deadline); ``None``
    trains ``epochs`` full epochs. ``precision`` is ``fp32`` or ``bf16`` (:func:`autocast`).

    ``optimizer`` (``sgd`` or ``adamw``, :func:`make_optimizer`) is built fresh for this call.
    One optimizer step takes ``grad_accum_steps`` micro-batches of ``batch_size``: each
    micro-batch's loss is weighted by its share of the step's samples, so the gradient of the
    task loss is that of one batch of ``grad_accum_steps × batch_size`` (the balance and routing
    losses, which are not sums over samples, are averaged over the micro-batches the same way).
    ``max_grad_norm > 0`` clips the trainable parameters' gradient norm before every step
    (:func:`torch.nn.utils.clip_grad_norm_`).
    """
    device = torch.device(device)
    configure_threads()
    fmt = model.memory_format(device)
    model.to(device=device, memory_format=fmt).train()
    model.route_loss_on = route_weight > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=betas)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = _inputs_targets(data, device)
    sums = _RunningSums.zeros(model.layer_held.shape[0], model.spec.num_experts, device)
    seen = targets = 0
    start = time.perf_counter()
    limit = epochs * len(y_all) if max_samples is None else min(max_samples, epochs * len(y_all))
    step_size = batch_size * grad_accum_steps
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=gen).to(device)
        for i in range(0, len(order), step_size):
            parts = _micro_batches(order, i, batch_size=batch_size, accum=grad_accum_steps, room=limit - seen)
            if not parts:
                break
            in_step = sum(len(idx) for idx in parts)
            opt.zero_grad(set_to_none=True)
            for idx in parts:
                x = x_all.index_select(0, idx).contiguous(memory_format=fmt)
                y = y_all.index_select(0, idx)
                with autocast(device, precision):
                    out = model(x, y)
                    loss = model.task_loss(out.logits, y)
                total = loss + aux_weight * out.aux_loss + route_weight * out.route_loss
                if len(parts) > 1:
                    total = total * (len(idx) / in_step)
                total.backward()
                sums.add(model, out, loss, y)
                seen += len(y)
                targets += y.numel()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
    mean_total = float(sums.total_loss) / max(seen, 1)  # the one sync of the loop
    elapsed = time.perf_counter() - start
    if fmt != torch.contiguous_format:
        model.to(memory_format=torch.contiguous_format)
    return _train_result(
        sums, num_examples=len(y_all), mean_total=mean_total, seen=seen, targets=targets, elapsed=elapsed
    )


@torch.no_grad()
def evaluate(
    model: MoEModel,
    data: Split | TextSplit,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``data`` (per target: image or byte)."""
    if isinstance(data, TextSplit):
        loss, acc, _ = evaluate_text(model, data, batch_size=batch_size, device=device, precision=precision)
        return loss, acc
    if len(data) == 0:
        return 0.0, 0.0
    device = torch.device(device)
    configure_threads()
    fmt = model.memory_format(device)
    model.to(device=device, memory_format=fmt).eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device=device, memory_format=fmt)
        y = data.labels[i : i + batch_size].to(device)
        with autocast(device, precision):
            logits = model(x).logits.float()
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    if fmt != torch.contiguous_format:
        model.to(memory_format=torch.contiguous_format)
    return float(total_loss) / len(data), int(correct) / len(data)


@dataclass(frozen=True)
class TextSums:
    """Sums of a text evaluation per group ``[G]``: nats, target tokens, their UTF-8 bytes; right guesses."""

    nats: np.ndarray
    tokens: np.ndarray
    nbytes: np.ndarray
    correct: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token (nats)."""
        return float(self.nats.sum() / max(self.tokens.sum(), 1))

    @property
    def accuracy(self) -> float:
        """Share of next tokens predicted right."""
        return self.correct / max(float(self.tokens.sum()), 1.0)

    @property
    def bpb(self) -> float:
        """Bits per byte: total nats / ln 2 / the targets' UTF-8 bytes."""
        return float(self.nats.sum() / math.log(2) / max(self.nbytes.sum(), 1))

    def group_loss(self) -> np.ndarray:
        """Mean cross-entropy per token of every group (NaN without windows)."""
        out = np.full(len(self.nats), np.nan)
        return np.divide(self.nats, self.tokens, out=out, where=self.tokens > 0)

    def group_bpb(self) -> np.ndarray:
        """Bits per byte of every group (NaN without windows)."""
        out = np.full(len(self.nats), np.nan)
        return np.divide(self.nats / math.log(2), self.nbytes, out=out, where=self.nbytes > 0)


@torch.no_grad()
def evaluate_text_sums(
    model: MoEModel,
    data: TextSplit,
    *,
    batch_size: int,
    device: torch.device | str,
    precision: str = "fp32",
) -> TextSums:
    """Nats, tokens and target bytes per group of ``model`` on ``data``, and its right next-token guesses."""
    num_groups = int(data.groups.max()) + 1 if len(data) else 0
    if len(data) == 0:
        return TextSums(np.zeros(0), np.zeros(0), np.zeros(0), 0)
    device = torch.device(device)
    configure_threads()
    model.to(device=device).eval()
    group_loss = torch.zeros(num_groups, dtype=torch.float64, device=device)
    group_count = torch.zeros(num_groups, dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    x_all, y_all = _inputs_targets(data, device)
    groups = data.groups.to(device)
    for i in range(0, len(data), batch_size):
        x, y, g = x_all[i : i + batch_size], y_all[i : i + batch_size], groups[i : i + batch_size]
        with autocast(device, precision):
            logits = model(x).logits.float()
        per_seq = model.task_loss(logits, y, reduction="none").view(len(y), -1).sum(dim=1)
        group_loss.index_add_(0, g, per_seq.double())
        group_count.index_add_(0, g, torch.full_like(per_seq, y.shape[1], dtype=torch.float64))
        correct += model.correct(logits, y)
    nbytes = np.bincount(data.groups.numpy(), weights=data.nbytes.double().numpy(), minlength=num_groups)
    return TextSums(group_loss.cpu().numpy(), group_count.cpu().numpy(), nbytes, int(correct))


def evaluate_text(
    model: MoEModel,
    data: TextSplit,
    *,
    batch_size: int,
    device: torch.device | str,
    precision: str = "fp32",
) -> tuple[float, float, np.ndarray]:
    """``(mean CE per token in nats, next-token accuracy, mean CE per group [G])`` on ``data``.

    Groups without windows get NaN. For bytes, bits per byte are these losses divided by
    ``ln 2``; for a tokenizer's tokens see :func:`evaluate_text_sums` (:attr:`TextSums.bpb`).
    """
    sums = evaluate_text_sums(model, data, batch_size=batch_size, device=device, precision=precision)
    if len(sums.nats) == 0:
        return 0.0, 0.0, np.zeros(0)
    return sums.loss, sums.accuracy, sums.group_loss()
