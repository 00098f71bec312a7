"""Atomic checkpoints: global model, alignment and strategy state, round, RNG, history.

One file per run, :func:`checkpoint_path` (``<run dir>/checkpoint.npz``): every model tensor
under ``model/<name>`` plus a JSON document (``state``) holding everything else. It is
written to a temporary file and renamed, so a crash leaves either the previous checkpoint or
the new one, never half. No pickle is used: loading a checkpoint cannot execute code. This
module needs numpy (and ``ml_dtypes``) only, so tools can find and read checkpoints without torch
or Flower.

``np.savez`` cannot store ``ml_dtypes.bfloat16``: a bfloat16 tensor is stored as its bits
(``uint16``) and named in the state's ``"bfloat16"`` list, and read back as bfloat16.

A SHA-256 digest of the tensors (names, dtypes, shapes, bytes) and of the state document is
written with them (entry ``sha256``) and checked on load; a file that cannot be read, fails its
digest, or holds a tensor that is not finite float32/bfloat16 raises :class:`CheckpointError`
naming the file (and the tensor).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..files import atomic_write_with
from ..tensors import Arrays

CHECKPOINT_FILE = "checkpoint.npz"
DIGEST_ENTRY = "sha256"  # the checkpoint's entry holding the hex digest of its tensors and state
BF16_KEY = "bfloat16"  # the state's list of the tensors stored as bfloat16 bits
BF16_ENTRY = "__bfloat16__"  # a model file's entry listing its tensors stored as bfloat16 bits


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be trusted: unreadable, tampered with, or not finite."""


#: dtypes a checkpoint's tensors may have (bfloat16 stored as its bits)
_TENSOR_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
#: what reading a damaged ``.npz`` raises
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError)


def _digest(tensors: Iterable[tuple[str, np.ndarray]], state: bytes) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes of each, in order) and ``state``."""
    h = hashlib.sha256()
    for name, value in tensors:
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(memoryview(np.ascontiguousarray(value)).cast("B"))
    h.update(state)
    return h.hexdigest()


def _check_tensors(path: Path, arrays: Arrays) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and a tensor of another dtype or not finite."""
    for name, value in arrays.items():
        if value.dtype not in _TENSOR_DTYPES:
            allowed = [str(d) for d in _TENSOR_DTYPES]
            raise CheckpointError(f"{path}: tensor {name!r} is {value.dtype}; allowed: {allowed}")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")


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
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for key in arrays.pop(BF16_ENTRY, np.array([], dtype=str)).tolist():
            arrays[key] = arrays[key].view(ml_dtypes.bfloat16)
    except _READ_ERRORS as err:
        raise CheckpointError(f"{path}: not a readable model file ({type(err).__name__}: {err})") from None
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
    digest = _digest(((k, payload[k]) for k in sorted(payload) if k != "state"), payload["state"].tobytes())
    payload[DIGEST_ENTRY] = np.frombuffer(digest.encode(), dtype=np.uint8)
    atomic_write_with(Path(path), lambda f: np.savez(f, **payload))


def load_checkpoint(path: Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (bfloat16 tensors as bfloat16).

    Raises
    ------
    CheckpointError
        Naming ``path``: the file is unreadable (truncated, not a checkpoint), its digest does not
        match its contents, or a tensor is not finite float32/bfloat16. A checkpoint written
        before digests were kept has none to check; the rest is checked all the same.

    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {k: npz[k].copy() for k in npz.files if k.startswith("model/")}
            raw_state = npz["state"].tobytes()
            digest = npz[DIGEST_ENTRY].tobytes().decode() if DIGEST_ENTRY in npz.files else None
        state = json.loads(raw_state.decode())
    except _READ_ERRORS as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if digest is not None and digest != _digest(sorted(stored.items()), raw_state):
        raise CheckpointError(f"{path}: its contents do not match the digest written with it (changed?)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its state is not a JSON object")
    arrays = {k.removeprefix("model/"): v for k, v in stored.items()}
    bf16 = state.pop(BF16_KEY, [])
    if not isinstance(bf16, list) or any(k not in arrays or arrays[k].dtype != np.uint16 for k in bf16):
        raise CheckpointError(f"{path}: its bfloat16 list names tensors that are not stored as bfloat16 bits")
    for key in bf16:
        arrays[key] = arrays[key].view(ml_dtypes.bfloat16)
    _check_tensors(path, arrays)
    return arrays, state
