import dataclasses
import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fedmoe_app import data
from fedmoe_app.config import RunConfig


def split_args(**overrides):
    """``client_data``'s split at the run config's defaults, ``overrides`` changed."""
    return dataclasses.replace(RunConfig().split, **overrides)


def write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    payload = header + (arr.astype(">i4") if arr.dtype == np.int32 else arr).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def make_fmnist_dir(folder, n_train=40, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz
        )
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8), gz)


def test_idx_reader_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    write_idx(tmp_path / "b.gz", arr, gz=True)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.gz"), arr)
    ints = np.array([1, -2, 300], dtype=np.int32)
    write_idx(tmp_path / "c", ints)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "c"), ints)


def test_idx_reader_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="expected"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_from_folder(tmp_path, monkeypatch):
    make_fmnist_dir(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nothing")
    out = data.load_fashion_mnist(tmp_path, download=False)
    assert out["train"][0].shape == (40, 28, 28) and out["test"][1].shape == (20,)
    monkeypatch.setenv("FEDMOE_DATA_DIR", str(tmp_path))
    assert data.load_fashion_mnist(None, download=False)["train"][0].shape == (40, 28, 28)


def test_fashion_mnist_missing_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nothing")
    monkeypatch.delenv("FEDMOE_DATA_DIR", raising=False)
    with pytest.raises(data.DatasetUnavailable, match="dataset-fashion-mnist") as err:
        data.load_fashion_mnist(None, download=False)
    assert "data-dir" in str(err.value)


def test_a_named_data_dir_without_the_data_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    system = tmp_path / "system"
    system.mkdir()
    make_fmnist_dir(system)  # a system copy exists ...
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetUnavailable, match=r"'data-dir' = '.*empty' does not hold Fashion-MNIST"):
        data.load_fashion_mnist(tmp_path / "empty", download=False)  # ... but is not used


def test_truncated_archive_names_the_file(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((100, 28, 28), np.uint8), gz=True)
    (tmp_path / "x.gz").write_bytes((tmp_path / "x.gz").read_bytes()[:-20])
    with pytest.raises(data.DatasetUnavailable, match=r"cannot read .*x\.gz"):
        data.read_idx(tmp_path / "x.gz")


@pytest.mark.parametrize(
    "labels, match", [(np.full(40, 255), "labels must lie in 0..9"), (np.zeros(30), "40 images but 30")]
)
def test_labels_must_match_the_images(tmp_path, labels, match):
    make_fmnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels.astype(np.uint8), gz=True)
    with pytest.raises(data.DatasetUnavailable, match=match):
        data.load_splits("fashion-mnist", str(tmp_path), 0)


def test_cifar10_reader_on_written_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    out = data.load_cifar10(tmp_path, download=False)
    assert out["train"][0].shape == (30, 3, 32, 32)
    assert out["test"][0].shape == (4, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    np.testing.assert_array_equal(out["test"][0][1].reshape(-1), raw[1])


def test_synthetic_is_seeded_and_learnable_shape():
    a, b = data.make_synthetic(0), data.make_synthetic(0)
    np.testing.assert_array_equal(a["train"][0], b["train"][0])
    assert not np.array_equal(a["train"][0], data.make_synthetic(1)["train"][0])
    train, test, info = data.load_splits("synthetic", "", 0)
    assert info.num_classes == 10 and info.in_channels == 1
    assert abs(float(train.images.mean())) < 1.0


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological", "iid"])
def test_partitions_are_deterministic_and_disjoint(partitioner):
    y = np.random.default_rng(0).integers(0, 10, 2000).astype(np.int64)
    p1 = data._compute_partitions(y, 8, partitioner, alpha=0.1, shards=2, seed=3)
    p2 = data._compute_partitions(y, 8, partitioner, alpha=0.1, shards=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    allidx = np.concatenate(p1)
    assert len(np.unique(allidx)) == len(allidx)
    if partitioner != "pathological":
        assert len(allidx) == 2000
    if partitioner == "dirichlet":
        p3 = data._compute_partitions(y, 8, partitioner, alpha=0.1, shards=2, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(p1, p3))


def test_partition_cache_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path))
    y = np.random.default_rng(1).integers(0, 10, 3000).astype(np.int64)
    expected = data._compute_partitions(y, 6, "dirichlet", alpha=0.3, shards=2, seed=2)
    data.partition_indices.cache_clear()
    first = data.partition_indices(y.tobytes(), 6, "dirichlet", alpha=0.3, shards=2, seed=2)
    files = list((tmp_path / "partitions").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "partitions").glob(".*"))  # no temp file left
    # Another set of arguments is another entry, never a stale hit.
    data.partition_indices(y.tobytes(), 6, "dirichlet", alpha=0.3, shards=2, seed=3)
    assert len(list((tmp_path / "partitions").glob("*.npz"))) == 2

    # A fresh process reads the file and never imports `datasets` / flwr-datasets.
    script = (
        "import sys, numpy as np\n"
        "from fedmoe_app import data\n"
        f"y = np.random.default_rng(1).integers(0, 10, 3000).astype(np.int64)\n"
        "p = data.partition_indices(y.tobytes(), 6, 'dirichlet', alpha=0.3, shards=2, seed=2)\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, *p)\n"
        "print('datasets' in sys.modules, 'flwr_datasets' in sys.modules)\n"
    )
    env = {**os.environ, "FEDMOE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    with np.load(tmp_path / "out.npz") as z:
        hit = [z[f"arr_{i}"] for i in range(6)]
    for a, b, c in zip(expected, first, hit):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

    # A corrupt cache file is recomputed (and rewritten), not trusted.
    files[0].write_bytes(b"not an npz")
    data.partition_indices.cache_clear()
    again = data.partition_indices(y.tobytes(), 6, "dirichlet", alpha=0.3, shards=2, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(expected, again))
    with np.load(files[0]) as z:
        assert len(z.files) == 6

    # An unwritable cache folder costs only the speed-up.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(blocker))
    data.partition_indices.cache_clear()
    alone = data.partition_indices(y.tobytes(), 6, "dirichlet", alpha=0.3, shards=2, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(expected, alone))
    data.partition_indices.cache_clear()


def test_client_split_is_disjoint_and_capped():
    tr, te, _ = data.client_data("synthetic", 2, 5, split_args(partitioner="iid", test_fraction=0.25))
    tr2, te2, _ = data.client_data("synthetic", 2, 5, split_args(partitioner="iid", test_fraction=0.25))
    assert len(te) > 0 and abs(len(te) / (len(tr) + len(te)) - 0.25) < 0.02
    assert (tr.labels == tr2.labels).all()
    capped, _, _ = data.client_data("synthetic", 2, 5, split_args(partitioner="iid", max_samples=50))
    assert len(capped) == 50
    with pytest.raises(ValueError):
        data.client_data("synthetic", 5, 5, split_args())
