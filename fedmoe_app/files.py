"""Crash-safe file writes: run outputs, checkpoints, the experiment harness and the on-disk caches."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    A crash leaves either the previous file or the new one, never half of it. The temporary
    file is named by the process, so processes writing the same path at once (clients filling
    a cache in parallel) never write into each other's file; on an error it is removed and the
    error raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
