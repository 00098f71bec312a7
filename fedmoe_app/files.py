"""Crash-safe file writes: run outputs, checkpoints, the experiment harness and the on-disk caches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    A crash leaves either the previous file or the new one, never half of it. The temporary
    file is named by the process, so processes writing the same path at once (clients filling
    a cache in parallel) never write into each other's file; on an error it is removed and the
    error raised.
    """
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda f: f.write(payload))


def atomic_write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` as :func:`atomic_write` does, by ``write(file)`` (streamed: no bytes held whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
