r"""Text as a model folder's tokens: its tokenizer, token ids, and the UTF-8 bytes each token covers.

A model folder (run-config ``hf-model``) brings its own tokenizer, loaded with
``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)``. Documents are
encoded one by one (no special tokens added) and joined with the tokenizer's EOS token (its
``"\\n\\n"`` tokens when it has none, as bytes are joined).

Bits per byte need the UTF-8 bytes of the text a window's targets stand for. Each token is
given the bytes from the end of the text the tokens before it cover to the end of its own
character span (``offset_mapping``); a token inside a multi-byte character (byte-level BPE
splits some) covers the whole character's bytes if it is the first to reach its end, else 0,
and the last token of a document ends at the document's end. So the bytes of consecutive
tokens add up to exactly the bytes of the document, and the EOS separator covers 0 bytes.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: dtype of token ids (any vocabulary under 2**31); bytes stay ``uint8``
TOKEN_DTYPE = np.int32


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Any:
    """Load the fast tokenizer of model folder ``folder`` (``hf-model``), from local files only.

    Raises
    ------
    ValueError
        Naming ``hf-model``: no tokenizer can be read from the folder, or it is not a fast
        (``tokenizers``-backed) tokenizer, which the byte accounting needs (offsets).

    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"run-config key 'hf-model' = {folder!r} is invalid: its tokenizer cannot be loaded ({exc})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"run-config key 'hf-model' = {folder!r} is invalid: {type(tok).__name__} is not a fast "
            "tokenizer; allowed: a folder with tokenizer.json"
        )
    return tok


def vocab_size(tokenizer: Any) -> int:
    """Token ids the tokenizer can produce (its vocabulary and added tokens)."""
    return len(tokenizer)


def _token_bytes(text: str, data: bytes, offsets: np.ndarray) -> np.ndarray:
    """UTF-8 bytes each token of ``text`` covers (module docstring); they sum to ``len(data)``."""
    if len(offsets) == 0:
        return np.zeros(0, np.int64)
    arr = np.frombuffer(data, dtype=np.uint8)
    char_start = np.flatnonzero((arr & 0xC0) != 0x80)  # byte offset of every character
    byte_at_char = np.append(char_start, len(arr))  # [len(text) + 1]
    ends = np.maximum.accumulate(np.minimum(offsets[:, 1], len(text)))
    end_bytes = byte_at_char[ends]
    end_bytes[-1] = len(arr)
    return np.diff(end_bytes, prepend=0)


def encode_documents(tokenizer: Any, docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids, bytes per token)`` of ``docs`` (UTF-8) joined by the tokenizer's EOS token.

    ``ids`` has :data:`TOKEN_DTYPE`; ``bytes per token`` (int64) sums to the documents' bytes (and
    those of the separators when the tokenizer has no EOS).
    """
    if not docs:
        return np.zeros(0, TOKEN_DTYPE), np.zeros(0, np.int64)
    texts = [d.decode("utf-8") for d in docs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if tokenizer.eos_token_id is not None:
        sep_ids, sep_bytes = [int(tokenizer.eos_token_id)], [0]
    else:
        sep = tokenizer(["\n\n"], add_special_tokens=False, return_offsets_mapping=True)
        sep_ids = list(sep["input_ids"][0])
        sep_bytes = list(_token_bytes("\n\n", b"\n\n", np.asarray(sep["offset_mapping"][0]).reshape(-1, 2)))
    ids_parts, byte_parts = [], []
    for i, (text, data) in enumerate(zip(texts, docs)):
        if i:
            ids_parts.append(np.asarray(sep_ids, np.int64))
            byte_parts.append(np.asarray(sep_bytes, np.int64))
        ids_parts.append(np.asarray(enc["input_ids"][i], np.int64))
        offsets = np.asarray(enc["offset_mapping"][i], np.int64).reshape(-1, 2)
        byte_parts.append(_token_bytes(text, data, offsets))
    return np.concatenate(ids_parts).astype(TOKEN_DTYPE), np.concatenate(byte_parts)
