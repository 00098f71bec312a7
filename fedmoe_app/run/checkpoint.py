"""Atomic checkpoints: global model, alignment and strategy state, round, RNG, history.

One file per run, :func:`checkpoint_path` (``<run dir>/checkpoint.npz``): every model tensor
under ``model/<name>`` plus a JSON document (``state``) holding everything else. It is
written to a temporary file and renamed, so a crash leaves either the previous checkpoint or
the new one, never half. No pickle is used: loading a checkpoint cannot execute code. This
module needs numpy only, so tools can find and read checkpoints without torch or Flower.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write
from ..tensors import Arrays

CHECKPOINT_FILE = "checkpoint.npz"


def checkpoint_path(run_dir: Path) -> Path:
    """Return the checkpoint file of the run whose outputs are in ``run_dir``."""
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(path: Path, arrays: Arrays, state: dict[str, Any]) -> None:
    """Atomically write ``arrays`` and JSON-serializable ``state`` to ``path``."""
    buf = io.BytesIO()
    payload = {f"model/{k}": v for k, v in arrays.items()}
    payload["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    np.savez(buf, **payload)
    atomic_write(Path(path), buf.getvalue())


def load_checkpoint(path: Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    with np.load(Path(path), allow_pickle=False) as npz:
        arrays = {k.removeprefix("model/"): npz[k].copy() for k in npz.files if k.startswith("model/")}
        state = json.loads(npz["state"].tobytes().decode())
    return arrays, state
