"""Central evaluation: the global model on the server's test set, after every round."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import RunConfig
from ..data.text import TextSplit
from ..models import AnySpec, build_model, load_arrays
from ..tensors import Arrays
from ..training import evaluate, evaluate_text, resolve_device


def text_metrics(loss: float, acc: float, per_group: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    """Central metrics of a text run: loss (nats/byte), accuracy, bits per byte overall and per group."""
    out = {"accuracy": acc, "loss": loss, "bpb": loss / math.log(2)}
    out.update({f"bpb_{name}": float(v) / math.log(2) for name, v in zip(names, per_group)})
    return out


def central_evaluator(
    cfg: RunConfig, spec: AnySpec, test: Any, info: Any
) -> Callable[[int, Arrays], dict[str, float]]:
    """Return ``evaluate(round, arrays)``: accuracy and loss (and bits per byte for text) on ``test``."""
    model = build_model(spec)
    device = resolve_device(cfg.device)

    def central_eval(server_round: int, arrays: Arrays) -> dict[str, float]:
        load_arrays(model, arrays)
        if isinstance(test, TextSplit):
            per = evaluate_text(model, test, batch_size=64, device=device, precision=cfg.precision)
            return text_metrics(*per, info.groups)
        loss, acc = evaluate(model, test, device=device, precision=cfg.precision)
        return {"accuracy": acc, "loss": loss}

    return central_eval
