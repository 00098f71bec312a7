"""Central evaluation: the global model on the server's test set, after every round."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import RunConfig
from ..data.text import TextSplit
from ..models import AnySpec, build_model, load_arrays
from ..tensors import Arrays
from ..training import TextSums, evaluate, evaluate_text_sums, resolve_device


def text_metrics(sums: TextSums, names: tuple[str, ...]) -> dict[str, float]:
    """Central metrics of a text run, from the evaluation's sums per group.

    ``loss`` (nats per token: per byte at byte level), ``perplexity`` (``exp(loss)``), ``accuracy``
    (next token), ``bpb`` (bits per UTF-8 byte of the targets' text: total nats / ln 2 / bytes;
    ``loss / ln 2`` at byte level), ``bpb_<group>`` per group, and ``bytes_per_token``.
    """
    loss = sums.loss
    out = {
        "accuracy": sums.accuracy,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": sums.bpb,
        "bytes_per_token": float(sums.nbytes.sum() / max(sums.tokens.sum(), 1)),
    }
    out.update({f"bpb_{name}": float(v) for name, v in zip(names, sums.group_bpb())})
    return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Make ``dtype`` torch's default floating dtype inside the block (``None``: leave it)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def central_evaluator(
    cfg: RunConfig, spec: AnySpec, test: Any, info: Any, dtype: str | None = None
) -> Callable[[int, Arrays], dict[str, float]]:
    """Return ``evaluate(round, arrays)``: accuracy and loss (and bits per byte for text) on ``test``.

    ``dtype`` (``"bfloat16"``): the global model's dtype; the evaluation model's weights are
    created in it, so a bf16 checkpoint is evaluated in bf16 rather than copied into float32
    (``None``: torch's default, float32).
    """
    with default_dtype(getattr(torch, dtype) if dtype else None):
        model = build_model(spec)
    device = resolve_device(cfg.device)

    def central_eval(server_round: int, arrays: Arrays) -> dict[str, float]:
        load_arrays(model, arrays)
        if isinstance(test, TextSplit):
            sums = evaluate_text_sums(model, test, batch_size=64, device=device, precision=cfg.precision)
            return text_metrics(sums, info.groups)
        loss, acc = evaluate(model, test, device=device, precision=cfg.precision)
        return {"accuracy": acc, "loss": loss}

    return central_eval
