"""Local training and evaluation loops, collecting the routing feedback the server uses."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .model import MoEClassifier


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


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config 'device' = 'cuda' but no CUDA device is available")
    return torch.device(name)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(
    model: MoEClassifier,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    aux_weight: float = 0.01,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_samples: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD on in-memory tensors; return loss and feedback.

    ``max_samples`` stops training after that many samples (partial local work within a
    round deadline); ``None`` trains ``epochs`` full epochs.
    """
    device = torch.device(device)
    model.to(device).train()
    num_e = model.spec.num_experts
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.images.to(device), data.labels.to(device)
    tokens = torch.zeros(num_e, device=device)
    loss_sum = torch.zeros(num_e, device=device)
    hist = torch.zeros(num_e, device=device)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    limit = epochs * len(y_all) if max_samples is None else min(max_samples, epochs * len(y_all))
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=gen).to(device)
        for i in range(0, len(order), batch_size):
            if seen >= limit:
                break
            idx = order[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            out = model(x, y)
            loss = F.cross_entropy(out.logits, y)
            opt.zero_grad(set_to_none=True)
            (loss + aux_weight * out.aux_loss).backward()
            opt.step()
            tokens += out.tokens
            loss_sum += out.expert_loss_sum
            hist += out.gate_hist
            total_loss += loss.item() * len(y)
            correct += int((out.logits.argmax(1) == y).sum())
            seen += len(y)
    elapsed = time.perf_counter() - start
    tok = tokens.cpu().numpy().astype(np.float64)
    mean_loss = np.divide(loss_sum.cpu().numpy(), tok, out=np.zeros(num_e), where=tok > 0)
    return TrainResult(
        num_examples=len(y_all),
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        tokens=tok,
        expert_loss=mean_loss,
        gate_hist=hist.cpu().numpy().astype(np.float64),
        train_time_s=elapsed,
        samples_per_s=seen / elapsed if elapsed > 0 else 0.0,
        peak_memory_bytes=peak_rss_bytes(),
    )


@torch.no_grad()
def evaluate(
    model: MoEClassifier, data: Split, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of ``model`` on ``data``."""
    if len(data) == 0:
        return 0.0, 0.0
    device = torch.device(device)
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device)
        y = data.labels[i : i + batch_size].to(device)
        logits = model(x).logits
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return total_loss / len(data), correct / len(data)
