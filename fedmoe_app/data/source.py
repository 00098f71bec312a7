"""The run's data, whatever its source: a client's partition, the server's test set, the model's input.

* built-in datasets (``fashion-mnist``, ``cifar10``, ``synthetic``; ``fortunes``): :mod:`.` and :mod:`.text`;
* ``dataset = "images"`` with ``data-dir``: your images (:mod:`.images`), partitioned by ``partitioner``;
  the server evaluates on the folder's ``test`` (or ``validation``) split, else on a seeded
  :data:`HELDOUT_SHARE` of the examples, which the clients' partitions then leave out;
  ``public-fraction`` holds a share of the training examples out of every partition
  (:func:`public_split`), drawn before that seeded test share so that it is the same examples
  for every seed (in a folder without a test split, the server's test share is then drawn
  from the rest);
* ``dataset = "text"`` with ``data-dir``: a folder of UTF-8 files or a saved dataset (:mod:`.text`);
* ``hf-dataset``: a dataset flwr-datasets' ``FederatedDataset`` loads (a hub name, or a local
  folder ``datasets.load_dataset`` reads: parquet, csv, json, ``imagefolder`` layouts), its
  ``train`` split partitioned by the ``partitioner`` over the label column (images) and its
  ``test`` (or ``validation``) split the server's.

With ``central-eval = false`` the server reads no test set: :func:`model_info` gives the model's
input from ``image-shape`` and ``classes`` when both are set, else from the data.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ..config import TEXT_DATASETS, ConfigError, RunConfig, class_names, image_shape
from . import DatasetInfo, Split, partition_rows, public_data, public_indices, to_split
from .images import TEST_SPLITS, ImageData, dataset_arrays, dataset_channels, dataset_classes, image_columns
from .images import read_images as _read_images
from .local import NodeDataError, dataset_info
from .text import VOCAB_SIZE, TextInfo, dataset_documents, partition_text, text_tokenizer, text_windows
from .text import client_split as _builtin_client_split
from .text import server_split as _builtin_server_split
from .tokens import load_tokenizer, vocab_size

#: Share of a single-split image folder held out for the server's evaluation.
HELDOUT_SHARE = 0.1
_DATA_DIR = "run-config key 'data-dir'"
_HF = "run-config key 'hf-dataset'"


# --------------------------------------------------------------------------- your images
def _channels(cfg: RunConfig) -> int | None:
    shape = image_shape(cfg.image_shape)
    return shape[0] if shape else None


def run_images(cfg: RunConfig) -> ImageData:
    """Return the images of ``data-dir`` (``dataset = "images"``), classes and channels as the config says."""
    return _read_images(cfg.data_dir, _DATA_DIR, cfg.columns, class_names(cfg.classes), _channels(cfg))


def check_shape(cfg: RunConfig, info: DatasetInfo, key: str, value: str) -> DatasetInfo:
    """Return ``info``; an error naming ``key`` if it differs from ``image-shape`` / ``classes``."""
    shape = image_shape(cfg.image_shape)
    if shape and (info.in_channels, info.image_size, info.image_size) != shape:
        raise NodeDataError(
            f"{key} = {value!r} holds images of shape "
            f"{(info.in_channels, info.image_size, info.image_size)}; "
            f"run-config 'image-shape' = {cfg.image_shape!r} wants {shape}"
        )
    return info


@lru_cache(maxsize=4)
def _image_splits(cfg: RunConfig) -> tuple[Split, np.ndarray, Split, DatasetInfo]:
    """``(train, public rows of train, server test, info)`` of ``data-dir``'s images.

    The server's test set is the folder's test split, else a seeded held-out share of the
    examples the public share leaves (``public-fraction``: drawn first, whatever the run's
    seed); ``train`` is every other example, the public ones included.
    """
    data = run_images(cfg)
    info = check_shape(cfg, data.info(_DATA_DIR, cfg.data_dir), _DATA_DIR, cfg.data_dir)
    test_name = next((s for s in TEST_SPLITS if s in data.splits), None)
    if test_name is not None:
        train = [v for k, v in data.splits.items() if k != test_name]
        x = np.concatenate([t[0] for t in train]) if train else data.splits[test_name][0][:0]
        y = np.concatenate([t[1] for t in train]) if train else data.splits[test_name][1][:0]
        test = data.splits[test_name]
        public = public_indices(len(y), cfg.public_fraction)
    else:
        x, y = data.pooled()
        public = public_indices(len(y), cfg.public_fraction)
        rest = np.setdiff1d(np.arange(len(y)), public) if len(public) else np.arange(len(y))
        order = rest[np.random.default_rng([cfg.seed, 31]).permutation(len(rest))]
        n_test = max(1, int(round(len(y) * HELDOUT_SHARE)))
        test = (x[order[:n_test]], y[order[:n_test]])
        keep = np.sort(np.concatenate([order[n_test:], public]))
        x, y, public = x[keep], y[keep], np.searchsorted(keep, public)
    if len(y) == len(public):
        raise NodeDataError(f"{_DATA_DIR} = {cfg.data_dir!r} holds no training examples")
    return to_split(x, y, "images"), public, to_split(*test, "images"), info


def _partition(
    cfg: RunConfig, train: Split, public: np.ndarray, partition_id: int, num_partitions: int
) -> tuple[Split, Split]:
    """Client ``partition_id``'s ``(train, local test)`` of ``train`` less its ``public`` rows."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    parts = partition_rows(train.labels.numpy(), num_partitions, cfg.split, public)
    return _local_cut(cfg, train, parts[partition_id], partition_id)


def _local_cut(cfg: RunConfig, rows: Split, idx: np.ndarray, partition_id: int) -> tuple[Split, Split]:
    split = cfg.split
    idx = np.random.default_rng([split.seed, partition_id]).permutation(idx)
    n_test = int(round(len(idx) * split.test_fraction))
    train_idx = idx[n_test:][: split.max_samples] if split.max_samples else idx[n_test:]
    return rows.subset(train_idx), rows.subset(idx[:n_test])


# --------------------------------------------------------------------------- FederatedDataset
@lru_cache(maxsize=2)
def federated_dataset(cfg: RunConfig, num_partitions: int) -> Any:
    """flwr-datasets' ``FederatedDataset`` of ``hf-dataset``, its ``train`` split cut by ``partitioner``.

    The partitioner runs over ``label-column`` (``label`` when empty) for images; text uses the
    whole ``train`` split (windows are partitioned as for a text folder).
    """
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    by = cfg.label_column or "label"
    if cfg.dataset == "text" or cfg.partitioner == "iid":
        partitioner: Any = IidPartitioner(num_partitions)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, by, cfg.dirichlet_alpha, seed=cfg.seed)
    else:
        partitioner = PathologicalPartitioner(num_partitions, by, cfg.shards_per_client, seed=cfg.seed)
    return FederatedDataset(dataset=cfg.hf_dataset, partitioners={"train": partitioner}, seed=cfg.seed)


def _hf_split(fds: Any, name: str) -> Any:
    try:
        return fds.load_split(name)
    except Exception as exc:  # noqa: BLE001 - the hub, a local folder or a split: the error names the key
        raise NodeDataError(f"{_HF}: cannot load split {name!r}: {exc}") from None


@lru_cache(maxsize=2)
def _hf_image_meta(cfg: RunConfig, num_partitions: int) -> tuple[str, str, tuple[str, ...], int]:
    """``(image column, label column, classes, channels)`` of the ``train`` split (the same everywhere)."""
    train = _hf_split(federated_dataset(cfg, num_partitions), "train")
    image, label = image_columns(train, cfg.columns, f"{_HF} = {cfg.hf_dataset!r}")
    classes = dataset_classes([train], label, class_names(cfg.classes))
    return image, label, classes, _channels(cfg) or dataset_channels(train, image)


def _hf_info(cfg: RunConfig, num_partitions: int, rows: Split) -> DatasetInfo:
    _, _, classes, _ = _hf_image_meta(cfg, num_partitions)
    c, h, w = rows.images.shape[1:]
    data = ImageData({"train": (np.zeros((1, c, h, w), np.uint8), np.zeros(1, np.int64))}, classes, "hf")
    return check_shape(cfg, data.info(_HF, cfg.hf_dataset), _HF, cfg.hf_dataset)


def _hf_images(cfg: RunConfig, ds: Any, num_partitions: int, where: str) -> Split:
    image, label, classes, channels = _hf_image_meta(cfg, num_partitions)
    return to_split(*dataset_arrays(ds, image, label, classes, channels, where), "images")


@lru_cache(maxsize=2)
def _hf_text(cfg: RunConfig) -> tuple[Any, Any, TextInfo]:
    """``(train windows, held-out windows, info)`` of ``hf-dataset``'s ``train`` split (its text column)."""
    where = f"{_HF} = {cfg.hf_dataset!r}"
    docs = dataset_documents(_hf_split(federated_dataset(cfg, 1), "train"), cfg.columns, where)
    return text_windows(docs, where, cfg.context_length, cfg.seed, text_tokenizer(cfg))


def _hf_test_split(fds: Any) -> tuple[str, Any]:
    """Return the first of :data:`TEST_SPLITS` the dataset has (the server's evaluation)."""
    errors = []
    for name in TEST_SPLITS:
        try:
            return name, fds.load_split(name)
        except ValueError as exc:  # not a split of this dataset
            errors.append(str(exc))
    raise NodeDataError(
        f"{_HF} has none of the splits {list(TEST_SPLITS)} for the server's evaluation ({errors[-1]}); "
        "allowed: a dataset with a test split, or run-config 'central-eval' = false"
    )


# --------------------------------------------------------------------------- the run's API
def client_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[Any, Any, Any]:
    """Return a client's ``(train, local test, info)`` of the run's data (module docstring)."""
    if cfg.hf_dataset and cfg.dataset == "images":
        fds = federated_dataset(cfg, num_partitions)
        where = f"{_HF} = {cfg.hf_dataset!r} (partition {partition_id})"
        rows = _hf_images(cfg, fds.load_partition(partition_id, "train"), num_partitions, where)
        info = _hf_info(cfg, num_partitions, rows)
        return (*_local_cut(cfg, rows, np.arange(len(rows)), partition_id), info)
    if cfg.hf_dataset:  # text
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
        train, _, info = _hf_text(cfg)
        return partition_text(train, info, partition_id, num_partitions, cfg.split, cfg.context_length)
    if cfg.dataset == "images":
        train, public, _, info = _image_splits(cfg)
        return (*_partition(cfg, train, public, partition_id, num_partitions), info)
    return _builtin_client_split(cfg, partition_id, num_partitions)


def public_split(cfg: RunConfig) -> tuple[Split, DatasetInfo]:
    """Return the public share of the run's training set (``public-fraction``) and the model's input.

    The examples every client partition leaves out, the same for every run seed: what
    ``fedmoe-pretrain`` trains on centrally.

    Raises
    ------
    ConfigError
        Naming ``public-fraction`` when it is 0 (there is no public share).

    """
    if not cfg.public_fraction:
        raise ConfigError(
            "run-config key 'public-fraction' = 0.0 leaves no public share; allowed: a share in (0, 0.9] "
            "of the training set (e.g. 0.1)"
        )
    if cfg.dataset == "images":
        train, public, _, info = _image_splits(cfg)
        return train.subset(public), info
    return public_data(cfg.dataset, cfg.split)


def server_split(cfg: RunConfig) -> tuple[Any, Any]:
    """Return the server's evaluation data and the model's input (``central-eval = true``)."""
    if cfg.hf_dataset and cfg.dataset == "images":
        fds = federated_dataset(cfg, 1)
        _hf_split(fds, "train")
        name, ds = _hf_test_split(fds)
        test = _hf_images(cfg, ds, 1, f"{_HF} = {cfg.hf_dataset!r} (split {name!r})")
        return _cap(cfg, test), _hf_info(cfg, 1, test)
    if cfg.hf_dataset:  # text: every group's held-out windows
        _, test, info = _hf_text(cfg)
        return _cap(cfg, test), info
    if cfg.dataset == "images":
        _, _, test, info = _image_splits(cfg)
        return _cap(cfg, test), info
    return _builtin_server_split(cfg)


def _cap(cfg: RunConfig, test: Any) -> Any:
    cap = cfg.central_eval_samples
    if cap and cap < len(test):
        test = test.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[:cap]))
    return test


def model_info(cfg: RunConfig) -> DatasetInfo | TextInfo:
    """Return the model's input without the server's test set (``central-eval = false``).

    Text: the tokenizer's (or the bytes') vocabulary (no group names: no central metrics);
    built-in images: their table; your images: ``image-shape`` and ``classes`` when both are set,
    else read from ``data-dir`` / ``hf-dataset``.
    """
    if cfg.dataset in TEXT_DATASETS:
        tokenizer = text_tokenizer(cfg)
        vocab = vocab_size(load_tokenizer(tokenizer)) if tokenizer else VOCAB_SIZE
        return TextInfo(vocab, cfg.context_length, (), tokenizer)
    if cfg.dataset != "images":
        return dataset_info(cfg.dataset)
    shape, classes = image_shape(cfg.image_shape), class_names(cfg.classes)
    if shape and classes:
        return DatasetInfo(shape[0], shape[1], len(classes))
    if cfg.hf_dataset:
        train = _hf_split(federated_dataset(cfg, 1), "train")
        return _hf_info(cfg, 1, _hf_images(cfg, train.select(range(min(1, len(train)))), 1, _HF))
    return _image_splits(cfg)[3]
