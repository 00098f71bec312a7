"""Atomic checkpoints: global model, alignment and strategy state, round, RNG, history.

One file per run, :func:`checkpoint_path` (``<run dir>/checkpoint.npz``): every model tensor
under ``model/<name>`` plus a JSON document (``state``) holding everything else. It is
written to a temporary file and renamed, so a crash leaves either the previous checkpoint or
the new one, never half. No pickle is used: loading a checkpoint cannot execute code. This
module needs numpy (and ``ml_dtypes``) only, so tools can find and read checkpoints without torch
or Flower.

``np.savez`` cannot store ``ml_dtypes.bfloat16``: a bfloat16 tensor is stored as its bits
(``uint16``) and named in the state's ``"bfloat16"`` list, and read back as bfloat16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..files import atomic_write_with
from ..tensors import Arrays

CHECKPOINT_FILE = "checkpoint.npz"
BF16_KEY = "bfloat16"  # the state's list of the tensors stored as bfloat16 bits
BF16_ENTRY = "__bfloat16__"  # a model file's entry listing its tensors stored as bfloat16 bits


def save_model(path: Path, arrays: Arrays) -> None:
    """Write named arrays to the ``.npz`` file ``path`` (``final_model.npz``), bf16 ones as their bits.

    Tensors other than bfloat16 are stored as they are (a float32 model's file is plain
    ``np.savez``); bfloat16 ones as ``uint16`` bits, named in the entry ``__bfloat16__``
    (:func:`load_model` reads them back as bfloat16).
    """
    bf16 = sorted(k for k, v in arrays.items() if v.dtype == ml_dtypes.bfloat16)
    payload = {k: v.view(np.uint16) if k in bf16 else v for k, v in arrays.items()}
    if bf16:
        payload[BF16_ENTRY] = np.array(bf16)
    np.savez(Path(path), **payload)


def load_model(path: Path) -> Arrays:
    """Read a model file written by :func:`save_model` (or ``np.savez``), bf16 tensors as bfloat16."""
    with np.load(Path(path), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key in arrays.pop(BF16_ENTRY, np.array([], dtype=str)).tolist():
        arrays[key] = arrays[key].view(ml_dtypes.bfloat16)
    return arrays


def checkpoint_path(run_dir: Path) -> Path:
    """Return the checkpoint file of the run whose outputs are in ``run_dir``."""
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(path: Path, arrays: Arrays, state: dict[str, Any]) -> None:
    """Atomically write ``arrays`` and JSON-serializable ``state`` to ``path``.

    The file is streamed tensor by tensor (no copy of the model in memory). ``state`` must not
    use the key ``"bfloat16"`` (it lists the bfloat16 tensors).
    """
    bf16 = sorted(k for k, v in arrays.items() if v.dtype == ml_dtypes.bfloat16)
    payload = {f"model/{k}": v.view(np.uint16) if k in bf16 else v for k, v in arrays.items()}
    document = {**state, BF16_KEY: bf16} if bf16 else state
    payload["state"] = np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)
    atomic_write_with(Path(path), lambda f: np.savez(f, **payload))


def load_checkpoint(path: Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (bfloat16 tensors as bfloat16)."""
    with np.load(Path(path), allow_pickle=False) as npz:
        arrays = {k.removeprefix("model/"): npz[k].copy() for k in npz.files if k.startswith("model/")}
        state = json.loads(npz["state"].tobytes().decode())
    for key in state.pop(BF16_KEY, []):
        arrays[key] = arrays[key].view(ml_dtypes.bfloat16)
    return arrays, state
