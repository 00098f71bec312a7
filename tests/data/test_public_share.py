"""public-fraction: a share of the training set no client partition holds, the same for every seed."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from fedmoe_app import data
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data import source

CLIENTS = 4


def write_fmnist(folder, n_train=300, n_test=50):
    """Fashion-MNIST's four IDX files of random images (every image distinct) in ``folder``."""
    rng = np.random.default_rng(5)
    folder.mkdir()
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + _dims(n, 28, 28) + images.tobytes()
        )
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + _dims(n) + labels.tobytes())
    return folder


def _dims(*dims):
    return b"".join(int(d).to_bytes(4, "big") for d in dims)


def write_image_folder(root, per_class=12, classes=("red", "green", "blue")):
    """One folder per class of noisy 8x8 RGB PNGs (every image distinct), no test split."""
    rng = np.random.default_rng(3)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = np.zeros(3)
            colour[k] = 200
            x = np.clip(colour + rng.normal(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(x, "RGB").save(root / name / f"{i}.png")
    return root


def rows(split):
    """Each example of a split as a digest of its image (the examples are all distinct)."""
    return [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in split.images]


def clients(cfg):
    """Every client's rows, train and local test together, one list per client."""
    out = []
    for pid in range(CLIENTS):
        train, test, _ = source.client_split(cfg, pid, CLIENTS)
        out.append(rows(train) + rows(test))
    return out


@pytest.fixture(autouse=True)
def _fresh_readers():
    source._image_splits.cache_clear()
    data.load_splits.cache_clear()
    yield
    source._image_splits.cache_clear()


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_the_public_share_is_in_no_partition_and_the_same_for_every_seed(tmp_path, partitioner):
    folder = write_fmnist(tmp_path / "fmnist")
    base = {"dataset": "fashion-mnist", "data-dir": str(folder), "partitioner": partitioner}
    base |= {"dirichlet-alpha": 0.5, "local-test-fraction": 0.2}
    everything = set(rows(data.load_splits("fashion-mnist", str(folder), 0)[0]))
    publics = []
    for seed in (0, 1):
        cfg = RunConfig.from_run_config({**base, "seed": seed, "public-fraction": 0.2})
        public, info = source.public_split(cfg)
        assert len(public) == 60 and info.num_classes == 10
        publics.append(rows(public))
        parts = clients(cfg)
        for i, part in enumerate(parts):
            assert not set(part) & set(publics[-1]), f"client {i} holds public examples"
            for other in parts[i + 1 :]:
                assert not set(part) & set(other)
        held = set().union(*parts)
        if partitioner == "iid":  # every example is either public or a client's
            assert held | set(publics[-1]) == everything
    assert publics[0] == publics[1]  # the same examples, in the same order, whatever the seed
    # the server's test set is not touched
    with_share = source.server_split(RunConfig.from_run_config({**base, "public-fraction": 0.2}))[0]
    without = source.server_split(RunConfig.from_run_config(base))[0]
    assert rows(with_share) == rows(without)


def test_at_zero_there_is_no_public_share_and_partitions_are_as_before(tmp_path):
    folder = write_fmnist(tmp_path / "fmnist")
    cfg = RunConfig.from_run_config(
        {"dataset": "fashion-mnist", "data-dir": str(folder), "partitioner": "iid"}
    )
    with pytest.raises(ConfigError, match=r"'public-fraction' = 0\.0"):
        source.public_split(cfg)
    everything = set(rows(data.load_splits("fashion-mnist", str(folder), 0)[0]))
    assert set().union(*clients(cfg)) == everything
    labels = data.load_splits("fashion-mnist", str(folder), 0)[0].labels.numpy()
    split = cfg.split
    kw = {"alpha": split.alpha, "shards": split.shards, "seed": split.seed}
    plain = data.partition_indices(labels.tobytes(), CLIENTS, "iid", **kw)
    got = data.partition_rows(labels, CLIENTS, split, data.public_indices(len(labels), 0.0))
    assert all(np.array_equal(a, b) for a, b in zip(plain, got, strict=True))


def test_an_image_folder_without_test_split_keeps_the_public_share_out_of_test_and_partitions(tmp_path):
    folder = write_image_folder(tmp_path / "pictures")
    base = {"dataset": "images", "data-dir": str(folder), "partitioner": "iid", "public-fraction": 0.25}
    publics = []
    for seed in (0, 1):
        cfg = RunConfig.from_run_config({**base, "seed": seed})
        public = rows(source.public_split(cfg)[0])
        test = rows(source.server_split(cfg)[0])
        assert len(public) == 9 and len(test) == 4  # 25 % and 10 % of 36 images
        assert not set(public) & set(test)
        for part in clients(cfg):
            assert not set(part) & set(public) and not set(part) & set(test)
        publics.append(public)
    assert publics[0] == publics[1]


@pytest.mark.parametrize(
    "keys, where",
    [
        ({"dataset": "fortunes", "model": "transformer-moe"}, "dataset 'fortunes'"),
        ({"dataset": "images", "hf-dataset": "some/images"}, "hf-dataset"),
        (
            {"dataset": "images", "image-shape": "1,8,8", "classes": "a,b", "central-eval": False},
            "without data-dir",
        ),
    ],
)
def test_a_public_share_of_data_the_run_does_not_partition_is_refused_at_start(keys, where):
    with pytest.raises(ConfigError, match=rf"'public-fraction' = 0\.1 is invalid for .*{where}.*allowed: 0"):
        RunConfig.from_run_config({**keys, "public-fraction": 0.1})
    with pytest.raises(
        ConfigError, match=r"'public-fraction' = 0\.95 is invalid; allowed: >= 0\.0 and <= 0\.9"
    ):
        RunConfig.from_run_config({"public-fraction": 0.95})
