"""Your own images (run-config ``dataset = "images"``): shape and classes read from the data.

Sources, each read into uint8 ``[N, C, H, W]`` images and int64 labels per split:

* **a folder of images per class**: ``root/<class name>/*.png|jpg|jpeg|bmp``, or with split
  folders ``root/train/<class name>/...`` and ``root/test/<class name>/...`` (the layout of the
  ``imagefolder`` loader of Hugging Face ``datasets``);
* **a dataset saved with** ``save_to_disk`` (``Dataset`` or ``DatasetDict``): an image column
  (run-config ``image-column``, else the ``Image`` feature, else ``image``/``img``) and a label
  column (``label-column``, else the ``ClassLabel`` feature, else ``label``/``labels``);
* Fashion-MNIST IDX files and CIFAR-10 python batches (:mod:`.local`);
* a ``datasets.Dataset`` (what flwr-datasets' ``FederatedDataset`` returns, :mod:`.source`).

Classes are run-config ``classes`` (comma-separated names in label order) when set, else read
from the data: the ``ClassLabel`` names, the sorted class folder names (numerically when all are
digits, the folder ``3`` being label 3), or the sorted label values. The number of channels is
``image-shape``'s when set, else 1 when every image is greyscale, else 3 (RGB). Images must be
square and of one size (cnn-moe's input); at least two classes are needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Columns
from . import DatasetInfo
from .local import (
    CLASS_NAMES,
    IMAGE_SUFFIXES,
    NodeDataError,
    _decode_images,
    _image_array,
    _read_cifar_folder,
    _read_idx_folder,
    class_key,
    detect_format,
)

log = logging.getLogger(__name__)

#: Split folders of an image folder, and the splits the server evaluates on (first found).
SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val")
TEST_SPLITS = ("test", "validation", "valid", "val")
NO_COLUMNS = Columns()
_GREY = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class ImageData:
    """Images and labels per split (uint8 ``[N, C, H, W]``, int64 ``[N]``), the class names, the format."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    fmt: str

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Every split's images and labels together."""
        parts = list(self.splits.values())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def info(self, key: str, value: str) -> DatasetInfo:
        """Return the model's input ``(C, H = W, classes)``; errors name ``key`` (square, 2+ classes)."""
        images = next(iter(self.splits.values()))[0]
        c, h, w = (int(v) for v in images.shape[1:])
        if h != w:
            raise NodeDataError(
                f"{key} = {value!r} holds images of shape {(c, h, w)} (C, H, W); allowed: square images "
                "(H = W, cnn-moe's input): resize them"
            )
        if len(self.classes) < 2:
            raise NodeDataError(
                f"{key} = {value!r} holds {len(self.classes)} class {list(self.classes)}; allowed: two or "
                "more classes (one folder per class), or name them all in run-config 'classes'"
            )
        return DatasetInfo(c, h, len(self.classes))


# --------------------------------------------------------------------------- labels
def _class_index(names: tuple[str, ...]) -> dict[str, int]:
    return {class_key(n): i for i, n in enumerate(names)} | {n: i for i, n in enumerate(names)}


def folder_classes(names: list[str], classes: tuple[str, ...] | None, where: str) -> tuple[str, ...]:
    """Class names of class folders ``names``: ``classes`` when given, else sorted (numerically if digits)."""
    if classes is not None:
        index = _class_index(classes)
        bad = [n for n in names if n not in index and class_key(n) not in index]
        if bad:
            raise NodeDataError(
                f"{where}: class folder(s) {bad} are not in run-config 'classes' = {','.join(classes)!r}"
            )
        return classes
    if names and all(n.isdigit() for n in names):
        return tuple(str(i) for i in range(max(int(n) for n in names) + 1))
    return tuple(sorted(set(names)))


def _label_of(name: str, classes: tuple[str, ...]) -> int:
    index = _class_index(classes)
    return index[name] if name in index else index[class_key(name)]


# --------------------------------------------------------------------------- image folders
def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_roots(path: Path) -> dict[str, Path]:
    """``{split: folder}``: split folders when ``path`` has ``train/`` of class folders, else ``path``."""
    subs = {p.name: p for p in _class_folders(path)}
    if "train" in subs and _class_folders(subs["train"]):
        return {name: subs[name] for name in SPLIT_FOLDERS if name in subs}
    return {"train": path}


def _image_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    found = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(found) < len(files):
        log.warning("%s: %d files that are not images were left out", folder, len(files) - len(found))
    if not found:
        raise NodeDataError(f"class folder {str(folder)!r} holds no image ({'/'.join(IMAGE_SUFFIXES)})")
    return found


def _channels_of(files: list[Path]) -> int:
    """1 if every image is greyscale, else 3."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as img:
                if img.mode not in _GREY:
                    return 3
        except OSError as exc:
            raise NodeDataError(f"cannot read image {str(f)!r}: {exc}") from None
    return 1


def _stack(images: list[np.ndarray], where: str) -> np.ndarray:
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise NodeDataError(f"{where}: images of different shapes {shapes[:4]} (C, H, W); allowed: one shape")
    return np.stack(images)


def read_image_folder(
    path: Path, classes: tuple[str, ...] | None, channels: int | None, where: str
) -> ImageData:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    roots = _split_roots(path)
    folders = {split: _class_folders(root) for split, root in roots.items()}
    names = sorted({f.name for fs in folders.values() for f in fs})
    classes = folder_classes(names, classes, where)
    files = {
        split: [(f, _label_of(d.name, classes)) for d in fs for f in _image_files(d)]
        for split, fs in folders.items()
    }
    inside = path.resolve()
    for f, _ in (item for items in files.values() for item in items):
        if not f.resolve().is_relative_to(inside):  # a link (or a linked folder) pointing elsewhere
            raise NodeDataError(
                f"{where}: {str(f)!r} links outside the folder (to {str(f.resolve())!r}); "
                "copy the image into the folder or remove the link"
            )
    if channels is None:
        channels = _channels_of([f for fs in files.values() for f, _ in fs])
    splits = {}
    for split, items in files.items():
        if not items:
            continue
        images = []
        for f, _ in items:
            try:
                with Image.open(f) as img:
                    images.append(_image_array(img, channels, repr(str(f))))
            except (OSError, UnidentifiedImageError) as exc:
                raise NodeDataError(f"cannot read image {str(f)!r}: {exc}") from None
        splits[split] = (_stack(images, where), np.asarray([y for _, y in items], dtype=np.int64))
    return ImageData(splits, classes, "image-folder")


# --------------------------------------------------------------------------- Hugging Face datasets
def image_columns(ds: Any, columns: Columns, where: str) -> tuple[str, str]:
    """``(image column, label column)`` of a ``datasets.Dataset``: named by ``columns``, else detected.

    Raises
    ------
    NodeDataError
        Naming ``where``, the columns found and the run-config keys that name them.

    """
    import datasets

    feats = ds.features
    image = columns.image or next(
        (c for c, f in feats.items() if isinstance(f, datasets.Image)),
        next((c for c in ("image", "img") if c in feats), ""),
    )
    label = columns.label or next(
        (c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)),
        next((c for c in ("label", "labels") if c in feats), ""),
    )
    if image not in feats or label not in feats:
        missing = [
            f"{kind} column {name!r}" if name else f"{kind} column"
            for kind, name in (("image", image), ("label", label))
            if name not in feats
        ]
        raise NodeDataError(
            f"{where} has no usable {' and no '.join(missing)}: its columns are {list(feats)}; "
            "allowed: an Image feature (or 'image'/'img') and a ClassLabel feature (or 'label'/'labels'), "
            "or name them in run-config 'image-column' and 'label-column'"
        )
    return image, label


def dataset_classes(parts: list[Any], label: str, classes: tuple[str, ...] | None) -> tuple[str, ...]:
    """Class names of the ``label`` column of datasets ``parts``: ``classes``, else read from them.

    The ``ClassLabel`` names; for integer labels ``"0".."max"``; for other values their sorted union.
    """
    import datasets

    if classes is not None:
        return classes
    feature = parts[0].features[label]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    values = [v for ds in parts for v in ds.unique(label)]
    if values and all(isinstance(v, (int, np.integer)) for v in values):
        return tuple(str(i) for i in range(int(max(values)) + 1))
    return tuple(sorted({str(v) for v in values}))


def dataset_channels(ds: Any, image: str) -> int:
    """1 if the first image of ``ds`` is greyscale, else 3."""
    import datasets

    if not len(ds):
        return 1
    first = (
        ds.cast_column(image, datasets.Image())[0][image]
        if isinstance(ds.features[image], datasets.Image)
        else None
    )
    if first is not None:
        return 1 if first.mode in _GREY else 3
    arr = np.asarray(ds[0][image])
    return 1 if arr.ndim == 2 or (arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1])) else 3


def dataset_arrays(
    ds: Any, image: str, label: str, classes: tuple[str, ...], channels: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[N, C, H, W]`` images and int64 labels of a ``datasets.Dataset``."""
    import datasets
    from PIL import Image

    if isinstance(ds.features[image], datasets.Image):  # decode ourselves: 3x faster than per row
        images = _decode_images(
            ds.cast_column(image, datasets.Image(decode=False))[image],
            Path(where),
            DatasetInfo(channels, 0, 0),
        )
    else:
        images = [
            _image_array(Image.fromarray(np.asarray(v, dtype=np.uint8)), channels, where) for v in ds[image]
        ]
    values = ds[label]
    if values and not isinstance(values[0], (int, np.integer)):
        index = _class_index(classes)
        bad = sorted({str(v) for v in values} - set(index))
        if bad:
            raise NodeDataError(f"{where}: labels {bad[:5]} are not in the classes {list(classes)}")
        labels = np.asarray([index[str(v)] for v in values], dtype=np.int64)
    else:
        labels = np.asarray(values, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise NodeDataError(
            f"{where}: labels {int(labels.min())}..{int(labels.max())}; allowed: 0..{len(classes) - 1} "
            f"(classes {list(classes)})"
        )
    return (_stack(images, where) if images else np.zeros((0, channels, 1, 1), np.uint8)), labels


def read_saved_images(
    path: Path, columns: Columns, classes: tuple[str, ...] | None, channels: int | None, where: str
) -> ImageData:
    """Read a ``save_to_disk`` folder (every split of a ``DatasetDict``)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the reader names the folder
        raise NodeDataError(f"{where}: cannot read the saved dataset: {exc}") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    first = next(iter(parts.values()))
    image, label = image_columns(first, columns, f"the saved dataset {where}")
    classes = dataset_classes(list(parts.values()), label, classes)
    channels = channels or dataset_channels(first, image)
    splits = {
        name: dataset_arrays(ds, image, label, classes, channels, f"{where} (split {name!r})")
        for name, ds in parts.items()
        if len(ds)
    }
    return ImageData(splits, classes, "saved")


# --------------------------------------------------------------------------- any folder
@lru_cache(maxsize=4)
def read_images(
    path: str,
    key: str,
    columns: Columns = NO_COLUMNS,
    classes: tuple[str, ...] | None = None,
    channels: int | None = None,
) -> ImageData:
    """Read the images of folder ``path`` in any layout of the module docstring (cached per process).

    Parameters
    ----------
    path : str
        The folder.
    key : str
        What names it (``run-config key 'data-dir'``, ``node config 'data-path'``), for errors.
    columns : Columns
        Image and label columns of a saved dataset (empty: detected).
    classes : tuple of str, optional
        Class names in label order; ``None``: read from the data.
    channels : int, optional
        Channels to convert the images to; ``None``: 1 if all are greyscale, else 3.

    Raises
    ------
    NodeDataError
        The folder is missing, unreadable, of no known layout or without images; naming ``key``.

    """
    where = f"{key} = {path!r}"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NodeDataError(f"{where} {'is not a folder' if folder.exists() else 'does not exist'}")
    try:
        fmt = detect_format(folder)
    except PermissionError as exc:
        raise NodeDataError(f"{where} is not readable: {exc}") from None
    except NodeDataError as exc:
        raise NodeDataError(f"{where}: {exc}") from None
    if fmt == "saved":
        data = read_saved_images(folder, columns, classes, channels, where)
    elif fmt == "image-folder":
        data = read_image_folder(folder, classes, channels, where)
    else:
        x, y = _read_idx_folder(folder) if fmt == "idx" else _read_cifar_folder(folder)
        names = classes or CLASS_NAMES["fashion-mnist" if fmt == "idx" else "cifar10"]
        data = ImageData({"train": (x, y)}, tuple(names), fmt)
    if not sum(len(y) for _, y in data.splits.values()):
        raise NodeDataError(f"{where} ({fmt}) holds no examples")
    return data
