"""On-disk cache of tokenized text windows, so every client process does not tokenize again.

Tokenizing a text dataset with a model folder's tokenizer takes seconds to minutes (the
fortunes: about 6 MB of text per language mix); every client process (a Ray worker, a
SuperNode) would repeat it. The windows are kept in ``<cache>/text-tokens/<key>.npz``
(:func:`fedmoe_app.config.cache_root`), the key a digest of the dataset name and folder, every
text file's path, size and modification time, ``context-length``, the seed, and the content of
the tokenizer's files. Byte-level windows are cheap and not cached on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from ..config import cache_root
from ..files import atomic_write

log = logging.getLogger(__name__)

VERSION = 1
#: files of a model folder that are not the tokenizer's (left out of the key)
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_path(
    name: str, root: Path, files: dict[str, list[Path]], context_length: int, seed: int, tokenizer: str
) -> Path:
    """Return the cache file of these windows (module docstring: what the key covers)."""
    h = hashlib.sha256(json.dumps([VERSION, name, str(root.resolve()), context_length, seed]).encode())
    folder = Path(tokenizer).expanduser()
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.endswith(_NOT_TOKENIZER) and f.name != "pretrain.json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    for group, paths in sorted(files.items()):
        for f in paths:
            st = f.stat()
            h.update(f"{group}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_root() / "text-tokens" / f"{h.hexdigest()[:32]}.npz"


def load(path: Path) -> dict[str, np.ndarray] | None:
    """Return the arrays cached at ``path``; ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        log.warning("text-token cache %s unreadable (%s); tokenizing again", path, err)
        return None


def save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` (atomically; a failure is logged, not raised)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as err:
        log.debug("text-token cache not written (%s)", err)
