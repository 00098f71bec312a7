"""A SuperNode's own data: the folder named by its node config ``data-path``.

A deployed site trains and evaluates on its own files instead of a shard of a global
dataset. The folder holds one of the formats the app reads:

* **saved dataset**: a ``datasets.Dataset`` or ``DatasetDict`` written with
  ``save_to_disk`` (what ``python -m fedmoe_app.tools.partition`` writes; flwr-datasets
  partitions saved the same way), with an image column (an ``Image`` feature, or
  ``image``/``img``) and a ``label`` column; every split of a ``DatasetDict`` is used;
* **Fashion-MNIST IDX files** (``train-images-idx3-ubyte[.gz]`` with its labels file,
  and/or the ``t10k-`` pair), as the app reads the global dataset;
* **CIFAR-10 python batches** (``data_batch_<i>`` and/or ``test_batch``);
* **a folder of images per class** (ImageFolder style): ``<class>/<file>.png`` where
  ``<class>`` is a class index (``0``, ``1``, ...) or a class name of the run's dataset
  (``sneaker``, ``Ankle boot``, ``ankle_boot``: case, spaces and punctuation ignored).

Images must have the shape the run's model takes (``dataset``: Fashion-MNIST 1x28x28,
CIFAR-10 3x32x32, synthetic 1x12x12; colour is converted) and labels must be classes of
that dataset. All examples of the folder are pooled and split by a seeded permutation:
``local-test-fraction`` of them for local evaluation, the rest (capped at
``max-samples-per-client``) for training. Every error names the folder or file.

For the text datasets the folder holds text, read as the global dataset reads ``data-dir``
(:mod:`.text`): ``text``, a folder of UTF-8 files (each top-level file and each sub-folder a
group); ``fortunes``, Debian's fortunes layout. Its windows (bytes, or the tokens of
``hf-model``'s tokenizer) are split the same way, the local test windows capped as a client's
partition's are.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TEXT_DATASETS, Columns
from . import DatasetInfo, DatasetUnavailable, read_idx, to_split

log = logging.getLogger(__name__)
NO_COLUMNS = Columns()

#: What the run's model takes, per run-config ``dataset`` (channels, image size, classes).
DATASET_INFO = {
    "fashion-mnist": DatasetInfo(1, 28, 10),
    "cifar10": DatasetInfo(3, 32, 10),
    "synthetic": DatasetInfo(1, 12, 10),
}
#: Class names, index order as in torchvision and the Hugging Face datasets.
CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_IDX_PAIRS = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)


#: Node-config keys naming a node's own data folder: ``data-path``, or ``dataset-path`` (its alias,
#: the name Flower's examples use).
DATA_PATH_KEYS = ("data-path", "dataset-path")


class NodeDataError(ValueError):
    """A node's ``data-path`` folder is missing, unreadable or does not fit the run."""


def class_key(name: str) -> str:
    """Normalised class name: lower case, letters and digits only (``'T-shirt/top'`` -> ``'tshirttop'``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def class_folder_name(dataset: str, label: int) -> str:
    """Folder name of class ``label`` in an image folder (``ankle_boot``; the index without names)."""
    names = CLASS_NAMES.get(dataset)
    return re.sub(r"[^a-z0-9]+", "_", names[label].lower()).strip("_") if names else str(label)


def dataset_info(dataset: str) -> DatasetInfo:
    """Return the model's input shape and class count for run-config ``dataset``."""
    if dataset not in DATASET_INFO:
        raise ValueError(f"unknown dataset {dataset!r}")
    return DATASET_INFO[dataset]


# --------------------------------------------------------------------------- formats
def _label_of_folder(folder: Path, dataset: str, num_classes: int) -> int:
    name = folder.name
    if name.isdigit():
        label = int(name)
    else:
        keys = {class_key(n): i for i, n in enumerate(CLASS_NAMES.get(dataset, ()))}
        if class_key(name) not in keys:
            raise NodeDataError(
                f"class folder {str(folder)!r} is not a class of dataset {dataset!r} "
                f"(allowed: 0..{num_classes - 1}"
                + (f" or one of {list(CLASS_NAMES[dataset])}" if dataset in CLASS_NAMES else "")
                + ")"
            )
        label = keys[class_key(name)]
    if label >= num_classes:
        raise NodeDataError(
            f"class folder {str(folder)!r}: label {label} does not match the run's model "
            f"(dataset {dataset!r} has classes 0..{num_classes - 1})"
        )
    return label


def _image_array(img, channels: int, where: str) -> np.ndarray:
    """``[C, H, W]`` uint8 of a PIL image, converted to the run's colour mode."""
    try:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except OSError as exc:  # truncated file: PIL reads lazily
        raise NodeDataError(f"cannot read image {where}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_image_folder(path: Path, dataset: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images, labels, skipped = [], [], 0
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = _label_of_folder(folder, dataset, info.num_classes)
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        found = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        skipped += len(files) - len(found)
        if not found:
            raise NodeDataError(f"class folder {str(folder)!r} holds no image ({'/'.join(IMAGE_SUFFIXES)})")
        for f in found:
            try:
                with Image.open(f) as img:
                    images.append(_image_array(img, info.in_channels, repr(str(f))))
            except (OSError, UnidentifiedImageError) as exc:
                raise NodeDataError(f"cannot read image {str(f)!r}: {exc}") from None
            labels.append(label)
    if skipped:
        log.warning("data-path %s: %d files that are not images were left out", path, skipped)
    return _stack(images, path), np.asarray(labels, dtype=np.int64)


def _stack(images: list[np.ndarray], path: Path) -> np.ndarray:
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise NodeDataError(f"data-path {str(path)!r}: images of different shapes {shapes[:4]}")
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


def _read_saved_dataset(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the reader names the folder
        raise NodeDataError(f"cannot read the saved dataset in {str(path)!r}: {exc}") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    images, labels = [], []
    for ds in parts:
        image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        image_cols += [c for c in ("image", "img") if c in ds.column_names and c not in image_cols]
        if not image_cols or "label" not in ds.column_names:
            raise NodeDataError(
                f"saved dataset in {str(path)!r} needs an image column (an Image feature, 'image' or "
                f"'img') and a 'label' column; it has {ds.column_names}"
            )
        col = image_cols[0]
        if isinstance(ds.features[col], datasets.Image):  # decode ourselves: 3x faster than per row
            images += _decode_images(ds.cast_column(col, datasets.Image(decode=False))[col], path, info)
        else:
            for img in ds[col]:
                arr = np.asarray(img, dtype=np.uint8)
                images.append(arr[None] if arr.ndim == 2 else arr)
        labels.extend(int(v) for v in ds["label"])
    return _stack(images, path), np.asarray(labels, dtype=np.int64)


def _decode_images(cells: list[dict], path: Path, info: DatasetInfo) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for i, cell in enumerate(cells):
        where = f"row {i} of {str(path)!r}"
        try:
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
            with Image.open(source) as img:
                out.append(_image_array(img, info.in_channels, where))
        except (OSError, UnidentifiedImageError, KeyError, TypeError) as exc:
            raise NodeDataError(f"cannot read image {where}: {exc!r}") from None
    return out


def _read_idx_folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for img_stem, lab_stem in _IDX_PAIRS:
        img = next((path / n for n in (img_stem, img_stem + ".gz") if (path / n).is_file()), None)
        if img is None:
            continue
        lab = next((path / n for n in (lab_stem, lab_stem + ".gz") if (path / n).is_file()), None)
        if lab is None:
            raise NodeDataError(f"{str(img)!r} has no labels file {lab_stem}[.gz] next to it")
        try:
            x, y = read_idx(img), read_idx(lab)
        except (DatasetUnavailable, ValueError) as exc:
            raise NodeDataError(str(exc)) from None
        if len(x) != len(y):
            raise NodeDataError(f"{str(img)!r} holds {len(x)} images but {str(lab)!r} {len(y)} labels")
        images.append(x[:, None] if x.ndim == 3 else x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar_folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(path.glob("data_batch_*")) + sorted(path.glob("test_batch"))
    images, labels = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
            raise NodeDataError(f"cannot read CIFAR-10 batch {str(f)!r}: {exc!r}") from None
    return np.concatenate(images), np.concatenate(labels)


def detect_format(path: Path) -> str:
    """Which format folder ``path`` holds: ``saved``, ``idx``, ``cifar`` or ``image-folder``."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "saved"
    if any((path / (stem + sfx)).is_file() for stem, _ in _IDX_PAIRS for sfx in ("", ".gz")):
        return "idx"
    if any(path.glob("data_batch_*")) or (path / "test_batch").is_file():
        return "cifar"
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return "image-folder"
    raise NodeDataError(
        f"{str(path)!r} holds none of the formats the app reads: a dataset saved with "
        "save_to_disk (dataset_dict.json or state.json), Fashion-MNIST IDX files "
        "(train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz]), CIFAR-10 batches "
        "(data_batch_<i>, test_batch) or one folder of images per class"
    )


@lru_cache(maxsize=2)
def read_node_folder(
    data_path: str, dataset: str, key: str = "data-path"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read every example of a node's folder: ``(uint8 [N, C, H, W], int64 labels [N], format)``.

    Parameters
    ----------
    data_path : str
        The node's folder (node config ``data-path``).
    dataset : str
        Run-config ``dataset``: the image shape and classes the run's model takes.
    key : str
        The node-config key that named the folder (``data-path`` or ``dataset-path``), for errors.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, str]
        Images, labels and the format found (see :func:`detect_format`).

    Raises
    ------
    NodeDataError
        The folder is missing or empty, a file is unreadable, the format is unknown, or
        images or labels do not fit the run's model; the message names the path.

    """
    info = dataset_info(dataset)
    path = Path(data_path).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise NodeDataError(f"node config '{key}' = {data_path!r} {what}")
    try:
        fmt = detect_format(path)
    except PermissionError as exc:
        raise NodeDataError(f"node config '{key}' = {data_path!r} is not readable: {exc}") from None
    except NodeDataError as exc:
        raise NodeDataError(f"node config '{key}' = {data_path!r}: {exc}") from None
    readers = {
        "saved": lambda: _read_saved_dataset(path, info),
        "idx": lambda: _read_idx_folder(path),
        "cifar": lambda: _read_cifar_folder(path),
        "image-folder": lambda: _read_image_folder(path, dataset, info),
    }
    try:
        images, labels = readers[fmt]()
    except PermissionError as exc:
        raise NodeDataError(f"node config '{key}' = {data_path!r}: {exc}") from None
    want = (info.in_channels, info.image_size, info.image_size)
    if len(labels) == 0:
        raise NodeDataError(f"node config '{key}' = {data_path!r} ({fmt}) holds no examples")
    if tuple(images.shape[1:]) != want:
        raise NodeDataError(
            f"node config '{key}' = {data_path!r} ({fmt}) holds images of shape "
            f"{tuple(images.shape[1:])} (C, H, W); the run's model (dataset {dataset!r}) takes {want}"
        )
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise NodeDataError(
            f"node config '{key}' = {data_path!r} ({fmt}) has labels "
            f"{int(labels.min())}..{int(labels.max())}; the run's model (dataset {dataset!r}) has "
            f"classes 0..{info.num_classes - 1}"
        )
    return images, labels, fmt


def node_text(
    data_path: str,
    dataset: str,
    *,
    test_fraction: float,
    max_samples: int,
    seed: int,
    context_length: int,
    tokenizer: str,
    columns: Columns = NO_COLUMNS,
    key: str = "data-path",
) -> tuple[Any, Any, Any]:
    """Return a node's ``(train, local test, info)`` text windows from its own folder (seeded split).

    Raises
    ------
    NodeDataError
        The folder is missing or holds no UTF-8 text of at least ``context_length + 1`` tokens.

    """
    from .text import HELDOUT_BYTES, load_text

    path = Path(data_path).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise NodeDataError(f"node config '{key}' = {data_path!r} {what}")
    try:
        windows, _, info = load_text(
            dataset, str(path), context_length, seed, tokenizer, columns, f"node config '{key}'"
        )
    except DatasetUnavailable as exc:
        raise NodeDataError(
            f"node config '{key}' = {data_path!r} holds no readable UTF-8 text of at least "
            f"context-length + 1 = {context_length + 1} tokens ({exc})"
        ) from None
    idx = np.random.default_rng(seed).permutation(len(windows))
    n_test = int(round(len(idx) * test_fraction))
    train_idx, test_idx = idx[n_test:], idx[: min(n_test, HELDOUT_BYTES // context_length)]
    if max_samples:
        train_idx = train_idx[:max_samples]
    if len(train_idx) == 0:
        raise NodeDataError(
            f"node config '{key}' = {data_path!r} holds {len(windows)} text windows: none left for training "
            f"after local-test-fraction {test_fraction}"
        )
    return windows.subset(np.sort(train_idx)), windows.subset(np.sort(test_idx)), info


def node_data(
    data_path: str,
    dataset: str,
    *,
    test_fraction: float,
    max_samples: int,
    seed: int,
    context_length: int = 64,
    tokenizer: str = "",
    columns: Columns = NO_COLUMNS,
    classes: tuple[str, ...] | None = None,
    image_shape: tuple[int, int, int] | None = None,
    key: str = "data-path",
) -> tuple[Any, Any, Any]:
    """Return a node's ``(train, local test, info)`` from its own folder (seeded split).

    Parameters
    ----------
    data_path : str
        The node's folder (node config ``data-path``; formats in the module docstring).
    dataset : str
        Run-config ``dataset`` (shape, normalisation and classes of the run's model).
    test_fraction : float
        Share of the folder's examples kept for local evaluation.
    max_samples : int
        Cap on the training examples; 0: all.
    seed : int
        Seed of the split.
    context_length : int
        Text: tokens per window (the run's ``context-length``).
    tokenizer : str
        Text: the model folder whose tokenizer cuts the text (``hf-model``); empty: bytes.
    columns : Columns
        Columns of a saved dataset (run-config ``image-column``, ``label-column``, ``text-column``).
    classes : tuple of str, optional
        ``dataset = "images"``: class names in label order (run-config ``classes``); ``None``: read
        from the folder (every node must then hold every class).
    image_shape : tuple of int, optional
        ``dataset = "images"``: the ``(C, H, W)`` the model takes (``image-shape``); ``None``: read.
    key : str
        The node-config key that named the folder (``data-path`` or ``dataset-path``), for errors.

    Returns
    -------
    tuple
        Training split, local test split and the model's dataset info (images: ``Split`` and
        ``DatasetInfo``; text: ``TextSplit`` and ``TextInfo``).

    """
    if dataset in TEXT_DATASETS:
        return node_text(
            data_path,
            dataset,
            test_fraction=test_fraction,
            max_samples=max_samples,
            seed=seed,
            context_length=context_length,
            tokenizer=tokenizer,
            columns=columns,
            key=key,
        )
    if dataset == "images":
        from .images import read_images

        data = read_images(
            str(data_path), f"node config '{key}'", columns, classes, image_shape and image_shape[0]
        )
        info = data.info(f"node config '{key}'", str(data_path))
        if image_shape and (info.in_channels, info.image_size, info.image_size) != image_shape:
            raise NodeDataError(
                f"node config '{key}' = {str(data_path)!r} holds images of shape "
                f"{(info.in_channels, info.image_size, info.image_size)}; run-config 'image-shape' wants "
                f"{image_shape}"
            )
        images, labels = data.pooled()
    else:
        images, labels, _ = read_node_folder(str(data_path), dataset, key)
        info = dataset_info(dataset)
    idx = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(idx) * test_fraction))
    train_idx, test_idx = idx[n_test:], idx[:n_test]
    if max_samples:
        train_idx = train_idx[:max_samples]
    if len(train_idx) == 0:
        raise NodeDataError(
            f"node config '{key}' = {data_path!r} holds {len(labels)} examples: none left for training "
            f"after local-test-fraction {test_fraction}"
        )
    split = to_split(images, labels, dataset)
    return split.subset(train_idx), split.subset(test_idx), info


def node_data_path(node_config: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(key, folder)`` of a node's own data: node config ``data-path`` or its alias ``dataset-path``.

    ``None`` when neither is set (the node takes a partition of the run's dataset).

    Raises
    ------
    NodeDataError
        If both are set to different folders.

    """
    given = {k: str(node_config[k]) for k in DATA_PATH_KEYS if str(node_config.get(k, ""))}
    if len(set(given.values())) > 1:
        raise NodeDataError(
            f"node config 'data-path' = {given['data-path']!r} and 'dataset-path' = "
            f"{given['dataset-path']!r} differ; allowed: one of them (dataset-path is data-path's alias)"
        )
    return next(iter(given.items()), None)
