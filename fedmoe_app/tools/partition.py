"""Write a dataset's federated partitions to disk, one folder per site, for a deployment.

``python -m fedmoe_app.tools.partition --dataset fashion-mnist --num-partitions 3 --alpha 0.5 --out parts/``

reads the dataset's training split the way the app does (``--data-dir``,
``$FEDMOE_DATA_DIR``, ``/usr/share/datasets/fashion-mnist``; downloaded only when none
holds it), splits it with the flwr-datasets partitioner the simulation uses (the same
partitions for the same ``--seed``, alpha and partitioner) and writes ``OUT/site-<i>``
with ``datasets.Dataset.save_to_disk`` (``--format saved``, columns ``image`` and
``label``) or as one PNG folder per class (``--format png``). Each folder is what a
SuperNode names in its node config: ``--node-config "data-path='OUT/site-0'
client-id='site-0'"``. ``OUT/partitions.json`` records the arguments and every site's
label counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import load_cifar10, load_fashion_mnist, make_synthetic, partition_indices
from ..data.local import CLASS_NAMES, class_folder_name

DATASETS = ("fashion-mnist", "cifar10", "synthetic")
PARTITIONERS = ("dirichlet", "pathological", "iid")
FORMATS = ("saved", "png")


def train_split(dataset: str, data_dir: str | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the training images (uint8 ``[N, H, W, C]``) and labels of ``dataset``."""
    if dataset == "fashion-mnist":
        images, labels = load_fashion_mnist(data_dir)["train"]
    elif dataset == "cifar10":
        images, labels = load_cifar10(data_dir)["train"]
    elif dataset == "synthetic":
        images, labels = make_synthetic(seed)["train"]
    else:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {DATASETS}")
    images = images[:, :, :, None] if images.ndim == 3 else images.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def _save(images: np.ndarray, labels: np.ndarray, dataset: str, folder: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    names = list(CLASS_NAMES.get(dataset, [str(i) for i in range(int(labels.max()) + 1)]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    pixels = images[..., 0] if images.shape[-1] == 1 else images
    ds = datasets.Dataset.from_dict({"image": list(pixels), "label": labels.tolist()}, features=features)
    ds.save_to_disk(str(folder))


def _write_png(images: np.ndarray, labels: np.ndarray, dataset: str, folder: Path) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        cls = folder / class_folder_name(dataset, int(label))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(cls / f"{i:06d}.png")


def write_partitions(
    dataset: str,
    out: Path,
    *,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    shards: int,
    seed: int,
    data_dir: str | None,
    fmt: str,
    prefix: str,
    overwrite: bool,
) -> dict[str, dict[str, int]]:
    """Write ``num_partitions`` site folders under ``out``; return ``{site: {label: count}}``.

    Parameters
    ----------
    dataset : str
        ``fashion-mnist``, ``cifar10`` or ``synthetic`` (its training split is partitioned).
    out : Path
        Folder that receives ``<prefix><i>`` per site and ``partitions.json``.
    num_partitions, partitioner, alpha, shards, seed
        The split, as run-config ``partitioner``, ``dirichlet-alpha``,
        ``shards-per-client`` and ``seed`` define it in simulation.
    data_dir : str | None
        Folder holding the dataset (as run-config ``data-dir``); ``None``: the usual places.
    fmt : str
        ``saved`` (``save_to_disk``) or ``png`` (a folder of images per class).
    prefix : str
        Site folder name prefix.
    overwrite : bool
        Replace site folders that exist; otherwise an existing one is an error.

    Returns
    -------
    dict[str, dict[str, int]]
        Label counts of every site written.

    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {FORMATS}")
    images, labels = train_split(dataset, data_dir, seed)
    parts = partition_indices(
        labels.tobytes(), num_partitions, partitioner, alpha=alpha, shards=shards, seed=seed
    )
    sites = {f"{prefix}{i}": idx for i, idx in enumerate(parts)}
    existing = [name for name in sites if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {existing}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, int]] = {}
    for name, idx in sites.items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        idx = np.sort(idx)
        (_save if fmt == "saved" else _write_png)(images[idx], labels[idx], dataset, folder)
        values, counts = np.unique(labels[idx], return_counts=True)
        summary[name] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    manifest = {
        "dataset": dataset,
        "format": fmt,
        "num-partitions": num_partitions,
        "partitioner": partitioner,
        "dirichlet-alpha": alpha,
        "shards-per-client": shards,
        "seed": seed,
        "sites": summary,
    }
    (out / "partitions.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_app.tools.partition",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--num-partitions", type=int, required=True, help="sites (folders) to write")
    parser.add_argument("--partitioner", choices=PARTITIONERS, default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet alpha (smaller: more skew)")
    parser.add_argument("--shards", type=int, default=2, help="classes per site (pathological)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset (default: usual places)")
    parser.add_argument("--format", choices=FORMATS, default="saved", dest="fmt")
    parser.add_argument("--prefix", default="site-", help="site folder prefix (default: site-)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing site folders")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    if args.num_partitions < 1:
        print("--num-partitions must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        summary = write_partitions(
            args.dataset,
            out,
            num_partitions=args.num_partitions,
            partitioner=args.partitioner,
            alpha=args.alpha,
            shards=args.shards,
            seed=args.seed,
            data_dir=args.data_dir,
            fmt=args.fmt,
            prefix=args.prefix,
            overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, counts in summary.items():
        folder = (out / name).resolve()
        print(f"{name}: {sum(counts.values())} examples, labels {counts}")
        print(f"  --node-config \"data-path='{folder}' client-id='{name}'\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
