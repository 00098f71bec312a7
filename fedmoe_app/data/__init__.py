"""Datasets held as in-memory tensors, and federated partitions via flwr-datasets.

``fashion-mnist`` (default) reads the IDX files from ``data-dir``, ``$FEDMOE_DATA_DIR``,
or Debian's ``dataset-fashion-mnist`` package, and downloads them through torchvision
only as a last resort. ``cifar10`` reads torchvision's python-batch format
(``cifar-10-batches-py``) the same way. ``synthetic`` is small, seeded and learnable,
for tests. Partitions are computed with flwr-datasets partitioners on an in-memory
``datasets.Dataset`` of labels, so every process derives the same split from the seed.

``public-fraction`` holds a share of the training split out of every client's partition
(:func:`public_indices`): the examples a model is pretrained on centrally
(``fedmoe-pretrain``). The share is drawn with the constant :data:`PUBLIC_SEED`, not the
run's seed, so runs of every seed leave out the same examples (and one pretrained model
serves them all); the clients' partitions are cut from the rest.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import io
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Self

import numpy as np
import torch

from ..config import SplitSection, cache_root
from ..files import atomic_write

log = logging.getLogger(__name__)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Seed of the public share (``public-fraction``): a constant, so that it is the same examples
#: whatever the run's seed.
PUBLIC_SEED = 7_919
# Per-channel mean/std used to normalise images to roughly zero mean, unit variance.
_NORM = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DatasetUnavailable(FileNotFoundError):
    """The dataset is neither on disk nor downloadable."""


class Rows:
    """A split of aligned tensors, one row per example (a frozen dataclass): its size, row subsets."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[-1].name))

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the model's inputs and the targets of its loss, one row per example."""
        raise NotImplementedError

    def subset(self, idx: np.ndarray) -> Self:
        """Rows ``idx`` of this split."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[t] for f in dataclasses.fields(self)}
        )


@dataclass(frozen=True)
class Split(Rows):
    """Images ``[N, C, H, W]`` (float32, normalised) and labels ``[N]`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the images and their labels."""
        return self.images, self.labels


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset."""

    in_channels: int
    image_size: int
    num_classes: int


# --------------------------------------------------------------------------- readers
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # truncated or corrupt archive
        raise DatasetUnavailable(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, got {arr.size}")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fmnist_folder(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        for sub in (folder, folder / "FashionMNIST" / "raw"):
            if all(_find_idx(sub, s) for pair in _FMNIST_FILES.values() for s in pair):
                return sub
    return None


def _locate(
    name: str,
    data_dir: str | Path | None,
    find: Callable[[list[Path]], Path | None],
    fetch: Callable[[str], None],
    download: bool,
    system: list[Path],
) -> Path | None:
    """Find a dataset's folder in ``data_dir``, ``$FEDMOE_DATA_DIR``, ``system``; else download it.

    A ``data_dir`` the user named is the only place looked in (downloading into it if
    allowed), and an error names it when it holds no dataset. Otherwise a download goes into
    ``~/.cache/fedmoe`` with ``fetch``; any failure is logged and leaves the caller to explain
    where the files may come from.
    """
    if data_dir:  # a folder the user named: that one, or an error naming it
        folder = find([Path(data_dir)])
        if folder is None and download:
            try:
                fetch(str(data_dir))
            except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
                log.warning("%s download failed: %s", name, exc)
            folder = find([Path(data_dir)])
        if folder is None:
            raise DatasetUnavailable(f"run-config key 'data-dir' = {str(data_dir)!r} does not hold {name}")
        return folder
    candidates = [Path(p) for p in (os.environ.get("FEDMOE_DATA_DIR"),) if p]
    folder = find(candidates + system)
    if folder is None and download:
        root = Path(candidates[0] if candidates else Path.home() / ".cache" / "fedmoe")
        try:
            fetch(str(root))
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            log.warning("%s download failed: %s", name, exc)
        folder = find([root])
    return folder


def load_fashion_mnist(
    data_dir: str | Path | None = None, *, download: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train": (images uint8 [N,28,28], labels), "test": ...}``.

    Looks in ``data_dir``, ``$FEDMOE_DATA_DIR``, then ``/usr/share/datasets/fashion-mnist``;
    if none holds the files and ``download`` is set, downloads them with torchvision into
    ``data_dir`` (or ``~/.cache/fedmoe``).
    """

    def fetch(root: str) -> None:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(root, train=train, download=True)

    folder = _locate("Fashion-MNIST", data_dir, _fmnist_folder, fetch, download, [FASHION_MNIST_SYSTEM_DIR])
    if folder is None:
        raise DatasetUnavailable(
            "Fashion-MNIST not found. Either install Debian's package "
            "(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist) "
            "or put the four IDX files in a folder named by run-config 'data-dir' or "
            "$FEDMOE_DATA_DIR; with internet access they are downloaded automatically."
        )
    out = {}
    for split, (img, lab) in _FMNIST_FILES.items():
        out[split] = (read_idx(_find_idx(folder, img)), read_idx(_find_idx(folder, lab)).astype(np.int64))
    return out


def _cifar_folder(candidates: list[Path]) -> Path | None:
    for folder in candidates:
        for sub in (folder, folder / "cifar-10-batches-py"):
            if (sub / "test_batch").is_file() and (sub / "data_batch_1").is_file():
                return sub
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(
    data_dir: str | Path | None = None, *, download: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train": (uint8 [N,3,32,32], labels), "test": ...}`` from python batches."""

    def fetch(root: str) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(root, train=True, download=True)

    folder = _locate("CIFAR-10", data_dir, _cifar_folder, fetch, download, [])
    if folder is None:
        raise DatasetUnavailable(
            "CIFAR-10 not found. Put torchvision's 'cifar-10-batches-py' folder in the folder "
            "named by run-config 'data-dir' or $FEDMOE_DATA_DIR; with internet access it is "
            "downloaded automatically."
        )
    train = [
        _read_cifar_batch(folder / f"data_batch_{i}")
        for i in range(1, 6)
        if (folder / f"data_batch_{i}").is_file()
    ]
    return {
        "train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        "test": _read_cifar_batch(folder / "test_batch"),
    }


def make_synthetic(
    seed: int = 0, n_train: int = 2400, n_test: int = 600, size: int = 12, classes: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Small learnable images: a random smooth prototype per class plus noise (uint8)."""
    rng = np.random.default_rng(10_000 + seed)
    protos = rng.normal(size=(classes, 1, size // 2, size // 2)).repeat(2, axis=2).repeat(2, axis=3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, n)
        x = protos[labels] + rng.normal(scale=0.8, size=(n, 1, size, size))
        return np.clip(127.5 + 40 * x, 0, 255).astype(np.uint8), labels.astype(np.int64)

    return {"train": draw(n_train), "test": draw(n_test)}


# --------------------------------------------------------------------------- tensors
def to_split(images: np.ndarray, labels: np.ndarray, name: str) -> Split:
    """Normalise uint8 ``images`` (``[N, H, W]`` or ``[N, C, H, W]``) the way dataset ``name`` is."""
    mean, std = _NORM.get(name, ((0.5,), (0.25,)))
    x = torch.from_numpy(np.require(images, requirements=("C", "W"))).float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return Split((x - m) / s, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


@lru_cache(maxsize=4)
def load_splits(name: str, data_dir: str = "", seed: int = 0) -> tuple[Split, Split, DatasetInfo]:
    """Load ``name`` as normalised tensors: ``(train, test, info)`` (cached per process)."""
    if name == "fashion-mnist":
        raw = load_fashion_mnist(data_dir or None)
    elif name == "cifar10":
        raw = load_cifar10(data_dir or None)
    elif name == "synthetic":
        raw = make_synthetic(seed)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    splits = []
    classes = {"fashion-mnist": 10, "cifar10": 10}.get(name)
    for key in ("train", "test"):
        images, labels = raw[key]
        labels = np.asarray(labels)
        if len(images) != len(labels):
            raise DatasetUnavailable(f"{name} {key} split: {len(images)} images but {len(labels)} labels")
        if classes and labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DatasetUnavailable(
                f"{name} {key} split: labels must lie in 0..{classes - 1}, "
                f"found {int(labels.min())}..{int(labels.max())}"
            )
        splits.append(to_split(images, labels, name))
    train, test = splits
    info = DatasetInfo(int(train.images.shape[1]), int(train.images.shape[2]), int(train.labels.max()) + 1)
    return train, test, info


def partition_cache_dir() -> Path:
    """Folder of the on-disk partition cache: ``$FEDMOE_CACHE_DIR`` or ``~/.cache/fedmoe``."""
    return cache_root() / "partitions"


def _flwr_datasets_version() -> str:
    try:
        return importlib.metadata.version("flwr-datasets")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "unknown"


@lru_cache(maxsize=4)
def partition_indices(
    labels: tuple[int, ...] | bytes,
    num_partitions: int,
    partitioner: str,
    *,
    alpha: float,
    shards: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Split sample indices into ``num_partitions`` with a flwr-datasets partitioner.

    ``labels`` is passed as bytes of an int64 array (hashable, for the in-process cache).
    Results are also cached on disk (:func:`partition_cache_dir`), keyed by a hash of the
    labels, the arguments and the flwr-datasets version, so only the first process of a
    run imports ``datasets`` and computes the split; every process gets the same arrays.
    The cache file is written atomically (temp file + rename: clients start in parallel);
    an unreadable one is recomputed and an unwritable folder only costs the speed-up.
    """
    if partitioner not in ("dirichlet", "pathological", "iid"):
        raise ValueError(f"unknown partitioner {partitioner!r}")
    y = np.frombuffer(labels, dtype=np.int64) if isinstance(labels, bytes) else np.asarray(labels, np.int64)
    args = (num_partitions, partitioner, float(alpha), int(shards), int(seed), _flwr_datasets_version())
    key = hashlib.sha256(y.tobytes() + repr(args).encode()).hexdigest()[:32]
    path = partition_cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                parts = tuple(np.asarray(z[f"p{i}"], dtype=np.int64) for i in range(num_partitions))
            if sum(len(p) for p in parts) <= len(y):
                return parts
        except (OSError, KeyError, ValueError) as err:
            log.warning("partition cache %s is unreadable (%s); recomputing", path, err)
    parts = _compute_partitions(y, num_partitions, partitioner, alpha=alpha, shards=shards, seed=seed)
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i}": p for i, p in enumerate(parts)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as err:
        log.debug("partition cache not written (%s)", err)
    return parts


def _compute_partitions(
    y: np.ndarray, num_partitions: int, partitioner: str, *, alpha: float, shards: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Run the flwr-datasets partitioner on an in-memory dataset of ``y``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    ds = Dataset.from_dict({"label": y, "idx": np.arange(len(y))})
    if partitioner == "dirichlet":
        min_size = max(1, min(10, len(y) // (4 * num_partitions)))
        part = DirichletPartitioner(num_partitions, "label", alpha, min_partition_size=min_size, seed=seed)
    elif partitioner == "pathological":
        part = PathologicalPartitioner(num_partitions, "label", shards, seed=seed)
    else:
        part = IidPartitioner(num_partitions)
    part.dataset = ds
    return tuple(np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions))


def public_indices(num_examples: int, fraction: float) -> np.ndarray:
    """Rows of a training split of ``num_examples`` held out as the public share (sorted).

    ``round(num_examples * fraction)`` rows drawn with :data:`PUBLIC_SEED`: the same for every
    run seed; none for ``fraction = 0``.

    Raises
    ------
    ValueError
        If ``fraction`` is outside ``[0, 1)``.

    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"public fraction must lie in [0, 1), got {fraction}")
    count = int(round(num_examples * fraction))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(PUBLIC_SEED).permutation(num_examples)
    return np.sort(order[:count]).astype(np.int64)


def partition_rows(
    labels: np.ndarray, num_partitions: int, split: SplitSection, public: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Rows of a training split (its ``labels``) in every client's partition, the ``public`` rows left out.

    The ``split.partitioner`` cuts the rows ``public`` leaves (all of them when it is empty,
    exactly as without a public share); the indices returned are into ``labels``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    kw = {"alpha": split.alpha, "shards": split.shards, "seed": split.seed}
    if not len(public):
        return partition_indices(labels.tobytes(), num_partitions, split.partitioner, **kw)
    rest = np.setdiff1d(np.arange(len(labels)), public)
    parts = partition_indices(labels[rest].tobytes(), num_partitions, split.partitioner, **kw)
    return tuple(rest[p] for p in parts)


def client_data(
    name: str, partition_id: int, num_partitions: int, split: SplitSection
) -> tuple[Split, Split, DatasetInfo]:
    """One client's ``(train, local test, info)``: its partition (``split``), cut and optionally capped."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    train, _, info = load_splits(name, split.data_dir, split.seed)
    public = public_indices(len(train), split.public_fraction)
    parts = partition_rows(train.labels.numpy(), num_partitions, split, public)
    idx = np.random.default_rng([split.seed, partition_id]).permutation(parts[partition_id])
    n_test = int(round(len(idx) * split.test_fraction))
    train_idx = idx[n_test:]
    if split.max_samples:
        train_idx = train_idx[: split.max_samples]
    return train.subset(train_idx), train.subset(idx[:n_test]), info


def public_data(name: str, split: SplitSection) -> tuple[Split, DatasetInfo]:
    """Return the public share of built-in dataset ``name``'s training split (:func:`public_indices`)."""
    train, _, info = load_splits(name, split.data_dir, split.seed)
    return train.subset(public_indices(len(train), split.public_fraction)), info


def server_test_data(name: str, *, max_samples: int, data_dir: str, seed: int) -> tuple[Split, DatasetInfo]:
    """Return the official test set (optionally a seeded subsample) for central evaluation."""
    _, test, info = load_splits(name, data_dir, seed)
    if max_samples and max_samples < len(test):
        test = test.subset(np.random.default_rng(seed).permutation(len(test))[:max_samples])
    return test, info
