"""Text datasets, naturally federated: fortunes by language, or a folder of UTF-8 files.

Byte level (vocabulary 256) by default; with a model folder's tokenizer (run-config
``hf-model``, :mod:`.tokens`) the windows hold its token ids instead and documents are joined
with its EOS token. Every window records the UTF-8 bytes of its targets' text, so bits per
byte are exact for either (``nbytes``; ``context-length`` for bytes).

* ``fortunes``: Debian's fortune-cookie collections (``apt-get install fortunes fortunes-de
  fortunes-ru fortunes-zh fortunes-es fortunes-it fortunes-pl fortunes-cs``), read from
  ``data-dir`` or ``/usr/share/games/fortunes``. One group per language: the top-level files
  are English (``en``) except the Chinese ``chinese``, ``song100`` and ``tang300`` (``zh``);
  the sub-folders ``cs de es it pl ru`` hold the other languages. Index files (``.dat``),
  ``.u8`` duplicates, symbolic links (other languages' files linked into the top level, the
  ``cz``/``sk`` aliases) and the ``off`` (offensive) sub-folders are left out.
* ``text``: a user's folder (``data-dir``): every top-level file is a group, every sub-folder
  (all files below it) is a group.

A file that is not valid UTF-8 is skipped with a warning; ANSI colour codes are removed.
Texts are split into documents (fortunes separated by ``%`` lines, else paragraphs), and a
seeded tenth of each group's documents (at most :data:`HELDOUT_BYTES`) is held out: the
server evaluates it for every group. The rest is cut into windows of ``context-length + 1``
bytes or tokens (stride ``context-length``), the examples a client trains on.

Partitions: ``natural`` gives client ``c`` group ``c mod G`` (a group's windows shared among
its clients) or, with fewer clients than groups, every group ``g`` with ``g mod C = c``; the
other partitioners run the flwr-datasets ones on the windows' group labels (``dirichlet``:
a Dirichlet mix of languages per client). A client's local test windows are capped at
``HELDOUT_BYTES / context-length``, like each group's held-out text on the server.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TEXT_DATASETS, Columns, RunConfig, SplitSection
from . import (
    DatasetInfo,
    DatasetUnavailable,
    Rows,
    Split,
    client_data,
    partition_indices,
    server_test_data,
    token_cache,
)
from .tokens import TOKEN_DTYPE, encode_documents, load_tokenizer, vocab_size

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_LANGUAGES = ("cs", "de", "es", "it", "pl", "ru")
CHINESE_FORTUNES = ("chinese", "song100", "tang300")
VOCAB_SIZE = 256
HELDOUT_SHARE = 0.1
HELDOUT_BYTES = 64 * 1024
_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
_FORTUNE_SEP = re.compile(rb"\n%\n")
NO_COLUMNS = Columns()


@dataclass(frozen=True)
class TextSplit(Rows):
    """Windows ``tokens [N, T + 1]``, each one's group id ``groups [N]`` and target bytes ``nbytes [N]``.

    ``tokens`` are bytes (uint8) or a tokenizer's ids (int32); ``nbytes`` (int64) are the UTF-8
    bytes of the text of each window's ``T`` targets (``T`` for bytes, the default).
    """

    tokens: torch.Tensor
    groups: torch.Tensor
    nbytes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.nbytes is None:  # byte level: one byte per target
            n, width = self.tokens.shape[0], max(self.tokens.shape[-1] - 1, 0)
            object.__setattr__(self, "nbytes", torch.full((n,), width, dtype=torch.int64))

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return every window but its last token, and the next token of each position."""
        return self.tokens[:, :-1], self.tokens[:, 1:]

    @property
    def labels(self) -> torch.Tensor:
        """The group id of every window (what a window is labelled with, as an image split's labels)."""
        return self.groups


@dataclass(frozen=True)
class TextInfo:
    """What the model and the metrics need to know of a text dataset."""

    vocab_size: int
    context_length: int
    groups: tuple[str, ...]  # group (language / file) names, indexed by group id
    tokenizer: str = ""  # model folder whose tokenizer made the tokens; empty: bytes


def _is_text_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix not in (".dat", ".u8")


def fortune_groups(root: Path) -> dict[str, list[Path]]:
    """Language → fortune files under ``root`` (see the module docstring for what is left out)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not _is_text_name(path):
            continue
        if path.is_file():
            groups.setdefault("zh" if path.name in CHINESE_FORTUNES else "en", []).append(path)
        elif path.is_dir() and path.name in FORTUNE_LANGUAGES:
            files = [
                f for f in sorted(path.iterdir()) if f.is_file() and not f.is_symlink() and _is_text_name(f)
            ]
            if files:
                groups[path.name] = files
    return groups


def folder_groups(root: Path) -> dict[str, list[Path]]:
    """Group → files of a user's folder: each top-level file, and each sub-folder's files.

    Links are followed only where they stay inside ``root``: a file or folder that resolves
    outside it raises ``ValueError`` naming it (text read from elsewhere would be trained on and
    name a metric).
    """
    inside = root.resolve()
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        _check_inside(path, inside)
        if path.is_file():
            groups[path.name] = [path]
        elif path.is_dir():
            found = [f for f in sorted(path.rglob("*")) if not f.name.startswith(".")]
            for f in found:
                _check_inside(f, inside)
            files = [f for f in found if f.is_file()]
            if files:
                groups[path.name] = files
    return groups


def _check_inside(path: Path, root: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if it (a link, or inside one) resolves outside ``root``."""
    if not path.resolve().is_relative_to(root):
        raise ValueError(
            f"text folder {root}: {path} links outside the folder (to {path.resolve()}); "
            "copy the file into the folder or remove the link"
        )


def read_text(path: Path) -> bytes | None:
    """UTF-8 bytes of ``path`` without ANSI colour codes; ``None`` (logged) if unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("text: skipping %s (%s)", path, type(exc).__name__)
        return None
    return _ANSI.sub(b"", data)


def documents(data: bytes) -> list[bytes]:
    """Split a text into documents: fortunes at ``%`` lines, other texts at blank lines."""
    data = data.replace(b"\r\n", b"\n")
    parts = _FORTUNE_SEP.split(data) if _FORTUNE_SEP.search(data) else data.split(b"\n\n")
    return [p.strip(b"%\n ") for p in parts if p.strip(b"%\n ")]


def windows(data: bytes | np.ndarray, context_length: int) -> np.ndarray:
    """Windows ``[n, T + 1]`` of ``data`` (bytes: uint8; or an array of token ids) at stride ``T``.

    None if shorter than ``T + 1``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data)
    n = max(0, (len(buf) - 1) // context_length)
    idx = np.arange(n)[:, None] * context_length + np.arange(context_length + 1)[None, :]
    return buf[idx] if n else np.zeros((0, context_length + 1), buf.dtype)


def window_bytes(token_bytes: np.ndarray, context_length: int) -> np.ndarray:
    """UTF-8 bytes of each window's targets (tokens ``1..T`` of window ``w``: ``w T + 1 .. w T + T``)."""
    n = max(0, (len(token_bytes) - 1) // context_length)
    return token_bytes[1 : n * context_length + 1].reshape(n, context_length).sum(axis=1).astype(np.int64)


def heldout_documents(docs: list[bytes], limit: int) -> list[bytes]:
    """Keep the first documents of ``docs`` up to ``limit`` bytes with their separators, the last one cut."""
    out, size = [], 0
    for d in docs:
        if size >= limit:
            break
        part = d[: limit - size]
        out.append(part.decode("utf-8", errors="ignore").encode("utf-8"))  # no broken last character
        size += len(d) + 2
    return [d for d in out if d]


def _token_windows(docs: list[bytes], context_length: int, tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    """Windows and target bytes of ``docs``: bytes joined by blank lines, or tokens joined by EOS."""
    if not tokenizer:
        buf = windows(b"\n\n".join(docs), context_length)
        return buf, np.full(len(buf), context_length, np.int64)
    ids, nbytes = encode_documents(load_tokenizer(tokenizer), docs)
    return windows(ids, context_length), window_bytes(nbytes, context_length)


def _groups_of(name: str, data_dir: str) -> tuple[Path, dict[str, list[Path]]]:
    if name == "fortunes":
        root = Path(data_dir) if data_dir else FORTUNES_DIR
        if not root.is_dir():
            where = f"run-config key 'data-dir' = {data_dir!r}" if data_dir else f"{root}"
            raise DatasetUnavailable(
                f"fortunes not found ({where} is not a folder); install Debian's packages "
                "(apt-get install fortunes fortunes-de fortunes-ru fortunes-zh fortunes-es fortunes-it "
                "fortunes-pl fortunes-cs) or name their folder in 'data-dir'"
            )
        return root, fortune_groups(root)
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetUnavailable(f"run-config key 'data-dir' = {data_dir!r} is not a folder")
    try:
        return root, folder_groups(root)
    except ValueError as err:
        raise ValueError(f"run-config key 'data-dir' = {data_dir!r}: {err}") from None


@lru_cache(maxsize=4)
def load_text(
    name: str,
    data_dir: str,
    context_length: int,
    seed: int,
    tokenizer: str = "",
    columns: Columns = NO_COLUMNS,
    key: str = "run-config key 'data-dir'",
) -> tuple[TextSplit, TextSplit, TextInfo]:
    """``(train windows, held-out windows, info)`` of a text dataset (cached per process).

    ``tokenizer`` is a model folder (``hf-model``) whose tokenizer makes the tokens; empty:
    bytes. The cache is per ``(name, data_dir, context_length, seed, tokenizer)``, in the process
    and, for a tokenizer's windows, on disk (:mod:`.token_cache`).

    Raises
    ------
    DatasetUnavailable
        Naming ``data-dir`` (or the fortunes folder) when no group has a readable UTF-8 text
        of at least ``context_length + 1`` bytes (or tokens).

    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}")
    if name == "text" and is_saved_dataset(Path(data_dir)):
        docs = saved_documents(Path(data_dir), columns, f"{key} = {data_dir!r}")
        return text_windows(docs, f"{key} = {data_dir!r}", context_length, seed, tokenizer)
    root, found = _groups_of(name, data_dir)
    if not tokenizer:
        return _windows_of(root, found, data_dir, context_length, seed, tokenizer)
    path = token_cache.cache_path(name, root, found, context_length, seed, tokenizer)
    cached = token_cache.load(path)
    if cached is not None:
        return _from_arrays(cached, context_length, tokenizer)
    train, test, info = _windows_of(root, found, data_dir, context_length, seed, tokenizer)
    token_cache.save(path, _to_arrays(train, test, info))
    return train, test, info


def _to_arrays(train: TextSplit, test: TextSplit, info: TextInfo) -> dict[str, np.ndarray]:
    out = {
        f"{part}_{field}": getattr(split, field).numpy()
        for part, split in (("train", train), ("test", test))
        for field in ("tokens", "groups", "nbytes")
    }
    return out | {"groups": np.asarray(info.groups, dtype=str), "vocab": np.asarray(info.vocab_size)}


def _from_arrays(
    arrays: dict[str, np.ndarray], context_length: int, tokenizer: str
) -> tuple[TextSplit, TextSplit, TextInfo]:
    train, test = (
        TextSplit(*(torch.from_numpy(arrays[f"{part}_{f}"]) for f in ("tokens", "groups", "nbytes")))
        for part in ("train", "test")
    )
    info = TextInfo(int(arrays["vocab"]), context_length, tuple(str(g) for g in arrays["groups"]), tokenizer)
    return train, test, info


def _windows_of(
    root: Path, found: dict[str, list[Path]], data_dir: str, context_length: int, seed: int, tokenizer: str
) -> tuple[TextSplit, TextSplit, TextInfo]:
    """Cut every group's documents into train and held-out windows (:func:`load_text`)."""
    docs = {
        group: [d for f in files if (text := read_text(f)) is not None for d in documents(text)]
        for group, files in found.items()
    }
    key = f"run-config key 'data-dir' = {data_dir!r}" if data_dir else f"fortunes folder {str(root)!r}"
    return text_windows(docs, key, context_length, seed, tokenizer)


def text_windows(
    docs_by_group: dict[str, list[bytes]], where: str, context_length: int, seed: int, tokenizer: str
) -> tuple[TextSplit, TextSplit, TextInfo]:
    """Cut every group's documents into train and held-out windows (module docstring).

    Raises
    ------
    DatasetUnavailable
        Naming ``where`` when no group has ``context_length + 1`` bytes (or tokens) of text.

    """
    rng = np.random.default_rng([seed, 1789])
    names: list[str] = []
    train_parts, test_parts = [], []
    for group, docs in sorted(docs_by_group.items()):
        order = rng.permutation(len(docs))
        held = sorted(order[: max(1, int(round(len(docs) * HELDOUT_SHARE))) if len(docs) >= 2 else 0])
        held_set = set(held)
        kept = [d for i, d in enumerate(docs) if i not in held_set]
        train = _token_windows(kept, context_length, tokenizer)
        held_docs = [docs[i] for i in held]
        if tokenizer:
            held_docs = heldout_documents(held_docs, HELDOUT_BYTES)
        else:  # byte level: the first HELDOUT_BYTES bytes, as they always were
            held_docs = [b"\n\n".join(held_docs)[:HELDOUT_BYTES]]
        test = _token_windows(held_docs, context_length, tokenizer)
        if len(train[0]) == 0:
            log.warning(
                "text: group %r of %s has under %d bytes of text; left out", group, where, context_length
            )
            continue
        names.append(group)
        train_parts.append(train)
        test_parts.append(test)
    if not names:
        raise DatasetUnavailable(
            f"{where} holds no readable UTF-8 text file of at least context-length + 1 = "
            f"{context_length + 1} bytes"
        )

    def split(parts: list[tuple[np.ndarray, np.ndarray]]) -> TextSplit:
        groups = np.concatenate([np.full(len(p), g, np.int64) for g, (p, _) in enumerate(parts)])
        tokens = np.concatenate([p for p, _ in parts])
        tokens = tokens.astype(TOKEN_DTYPE) if tokenizer else tokens
        nbytes = np.concatenate([b for _, b in parts])
        return TextSplit(torch.from_numpy(tokens), torch.from_numpy(groups), torch.from_numpy(nbytes))

    vocab = vocab_size(load_tokenizer(tokenizer)) if tokenizer else VOCAB_SIZE
    info = TextInfo(vocab, context_length, tuple(names), tokenizer)
    return split(train_parts), split(test_parts), info


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def text_column(ds: Any, columns: Columns, where: str) -> str:
    """Return the text column of a ``datasets.Dataset`` (``text-column``, else detected).

    Detected: ``text``, ``content`` or ``document``, else the only string column.

    Raises
    ------
    DatasetUnavailable
        Naming ``where``, the columns found and the run-config key ``text-column``.

    """
    import datasets

    feats = ds.features
    strings = [
        c for c, f in feats.items() if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")
    ]
    name = columns.text or next((c for c in ("text", "content", "document") if c in strings), "")
    name = name or (strings[0] if len(strings) == 1 else "")
    if name not in strings:
        raise DatasetUnavailable(
            f"{where} has no usable text column{f' {name!r}' if name else ''}: its columns are "
            f"{ {c: str(f) for c, f in feats.items()} }; allowed: a string column 'text' (or 'content', "
            "'document', or the only string column), or name it in run-config 'text-column'"
        )
    return name


def dataset_documents(ds: Any, columns: Columns, where: str) -> dict[str, list[bytes]]:
    """Group -> documents of a ``datasets.Dataset``: its text column, grouped by ``label-column`` if named.

    A ``ClassLabel`` column groups too (its names); without either, every row is in group ``text``.
    """
    import datasets

    col = text_column(ds, columns, where)
    label = columns.label or next(
        (c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), ""
    )
    if label and label not in ds.features:
        raise DatasetUnavailable(
            f"{where} has no column {label!r} (run-config 'label-column'); "
            f"its columns are {list(ds.features)}"
        )
    texts = ds[col]
    feature = ds.features.get(label)
    if not label:
        groups = ["text"] * len(texts)
    elif isinstance(feature, datasets.ClassLabel):
        groups = [feature.names[int(v)] for v in ds[label]]
    else:
        groups = [str(v) for v in ds[label]]
    out: dict[str, list[bytes]] = {}
    for group, text in zip(groups, texts):
        if text:
            out.setdefault(group, []).append(text.encode("utf-8"))
    return out


def saved_documents(path: Path, columns: Columns, where: str) -> dict[str, list[bytes]]:
    """Group -> documents of a ``save_to_disk`` folder (every split of a ``DatasetDict`` pooled)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the reader names the folder
        raise DatasetUnavailable(f"{where}: cannot read the saved dataset: {exc}") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    out: dict[str, list[bytes]] = {}
    for ds in parts:
        for group, docs in dataset_documents(ds, columns, where).items():
            out.setdefault(group, []).extend(docs)
    return out


def text_tokenizer(cfg: RunConfig) -> str:
    """Return the model folder whose tokenizer cuts the run's text (``hf-model``); empty: bytes."""
    return cfg.hf_model if cfg.model == "hf" else ""


def natural_partitions(
    groups: np.ndarray, num_groups: int, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Window indices per client under the ``natural`` partitioner (module docstring)."""
    rng = np.random.default_rng([seed, 2024])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for g in range(num_groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        if num_partitions >= num_groups:
            owners = list(range(g, num_partitions, num_groups))
            for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
                parts[owner].append(chunk)
        else:
            parts[g % num_partitions].append(idx)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def text_client_data(
    name: str,
    partition_id: int,
    num_partitions: int,
    split: SplitSection,
    context_length: int,
    tokenizer: str = "",
    columns: Columns = NO_COLUMNS,
) -> tuple[TextSplit, TextSplit, TextInfo]:
    """One client's ``(train, local test, info)`` windows of a text dataset, cut as ``split`` says."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    train, _, info = load_text(name, split.data_dir, context_length, split.seed, tokenizer, columns)
    return partition_text(train, info, partition_id, num_partitions, split, context_length)


def partition_text(
    train: TextSplit,
    info: TextInfo,
    partition_id: int,
    num_partitions: int,
    split: SplitSection,
    context_length: int,
) -> tuple[TextSplit, TextSplit, TextInfo]:
    """Return client ``partition_id``'s ``(train, local test, info)`` of the windows ``train`` (``split``)."""
    groups = train.groups.numpy()
    if split.partitioner == "natural":
        part = natural_partitions(groups, len(info.groups), num_partitions, split.seed)[partition_id]
    else:
        kw = {"alpha": split.alpha, "shards": split.shards, "seed": split.seed}
        part = partition_indices(groups.tobytes(), num_partitions, split.partitioner, **kw)[partition_id]
    idx = np.random.default_rng([split.seed, partition_id]).permutation(part)
    n_test = int(round(len(idx) * split.test_fraction))
    train_idx = idx[n_test:][: split.max_samples] if split.max_samples else idx[n_test:]
    test_idx = idx[: min(n_test, HELDOUT_BYTES // context_length)]  # as much as the server's per group
    return train.subset(train_idx), train.subset(test_idx), info


def client_split(cfg: RunConfig, partition_id: int, num_partitions: int):
    """Return a client's ``(train, local test, info)`` for the run's dataset, image or text."""
    if cfg.dataset in TEXT_DATASETS:
        return text_client_data(
            cfg.dataset,
            partition_id,
            num_partitions,
            cfg.split,
            cfg.context_length,
            text_tokenizer(cfg),
            cfg.columns,
        )
    return client_data(cfg.dataset, partition_id, num_partitions, cfg.split)


def server_split(cfg: RunConfig) -> tuple[Split | TextSplit, DatasetInfo | TextInfo]:
    """Return the server's evaluation data: the image test set, or every group's held-out text.

    ``central-eval-samples`` caps either (a seeded subsample; 0: all).
    """
    if cfg.dataset not in TEXT_DATASETS:
        return server_test_data(
            cfg.dataset, max_samples=cfg.central_eval_samples, data_dir=cfg.data_dir, seed=cfg.seed
        )
    _, test, info = load_text(
        cfg.dataset, cfg.data_dir, cfg.context_length, cfg.seed, text_tokenizer(cfg), cfg.columns
    )
    cap = cfg.central_eval_samples
    if cap and cap < len(test):
        test = test.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[:cap]))
    return test, info
