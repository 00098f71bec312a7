"""A SuperNode's own data (node config ``data-path``): formats, errors, the partition tool, a deployment."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from test_data import make_fmnist_dir

from fedmoe_app.data import make_synthetic, partition_indices
from fedmoe_app.data.local import NodeDataError, node_data, read_node_folder
from fedmoe_app.tools.partition import write_partitions

SPLIT = {"test_fraction": 0.2, "max_samples": 0, "seed": 0}


@pytest.fixture(autouse=True)
def _fresh_reader():
    read_node_folder.cache_clear()  # tests rewrite folders under the same names
    yield
    read_node_folder.cache_clear()


def write_png_folder(root, per_class, size=12, mode="L", seed=0):
    """``root/<class>/<i>.png``: ``per_class`` maps a class folder name to its image count."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    return root


def n_train(n, fraction=0.2):
    return n - int(round(n * fraction))


def test_image_folder_labels_split_and_seed(tmp_path):
    site = write_png_folder(tmp_path / "site", {"3": 10, "7": 15})
    train, test, info = node_data(str(site), "synthetic", **SPLIT)
    assert (len(train), len(test)) == (n_train(25), 5)
    assert set(train.labels.tolist()) | set(test.labels.tolist()) == {3, 7}
    assert tuple(train.images.shape[1:]) == (1, 12, 12) and info.num_classes == 10
    again, _, _ = node_data(str(site), "synthetic", **SPLIT)
    assert train.labels.tolist() == again.labels.tolist()
    other, _, _ = node_data(str(site), "synthetic", **{**SPLIT, "seed": 1})
    assert not np.array_equal(other.images.numpy(), train.images.numpy())  # another permutation
    capped, _, _ = node_data(str(site), "synthetic", **{**SPLIT, "max_samples": 4})
    assert len(capped) == 4


def test_image_folder_class_names_and_colour(tmp_path):
    site = write_png_folder(tmp_path / "site", {"ankle_boot": 3, "T-shirt top": 2}, size=28, mode="RGB")
    train, test, _ = node_data(str(site), "fashion-mnist", test_fraction=0.0, max_samples=0, seed=0)
    assert sorted(train.labels.tolist()) == [0, 0, 9, 9, 9] and len(test) == 0
    assert tuple(train.images.shape[1:]) == (1, 28, 28)  # RGB converted to the model's one channel


def test_idx_and_cifar_folders(tmp_path):
    (tmp_path / "fm").mkdir()
    make_fmnist_dir(tmp_path / "fm", n_train=30, n_test=10)
    train, test, info = node_data(str(tmp_path / "fm"), "fashion-mnist", **SPLIT)
    assert len(train) + len(test) == 40 and info.image_size == 28  # both IDX pairs pooled
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), b"labels": [1, 2] * 6}
    (cifar / "data_batch_1").write_bytes(pickle.dumps(batch))
    train, test, info = node_data(str(cifar), "cifar10", **SPLIT)
    assert len(train) + len(test) == 12 and tuple(train.images.shape[1:]) == (3, 32, 32)


def test_saved_partitions_are_the_simulation_partitions(tmp_path):
    counts = write_partitions(
        "synthetic",
        tmp_path / "parts",
        num_partitions=2,
        partitioner="dirichlet",
        alpha=0.5,
        shards=2,
        seed=0,
        data_dir=None,
        fmt="saved",
        prefix="site-",
        overwrite=False,
    )
    raw_x, raw_y = make_synthetic(0)["train"]
    parts = partition_indices(raw_y.tobytes(), 2, "dirichlet", alpha=0.5, shards=2, seed=0)
    for i, idx in enumerate(parts):
        x, y, fmt = read_node_folder(str(tmp_path / "parts" / f"site-{i}"), "synthetic")
        assert fmt == "saved" and sum(counts[f"site-{i}"].values()) == len(idx)
        np.testing.assert_array_equal(y, raw_y[np.sort(idx)])
        np.testing.assert_array_equal(x, raw_x[np.sort(idx)])  # PNG is lossless: the same pixels
    with pytest.raises(FileExistsError, match="site-0"):
        write_partitions(
            "synthetic",
            tmp_path / "parts",
            num_partitions=2,
            partitioner="iid",
            alpha=0.5,
            shards=2,
            seed=0,
            data_dir=None,
            fmt="saved",
            prefix="site-",
            overwrite=False,
        )


def test_partition_cli_writes_png_folders(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedmoe_app.tools.partition", "--dataset", "synthetic", "--num-partitions=2"]
        + ["--partitioner", "pathological", "--shards", "2", "--format", "png", "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "data-path=" in out.stdout and (tmp_path / "p" / "partitions.json").is_file()
    for site in ("site-0", "site-1"):
        classes = sorted(p.name for p in (tmp_path / "p" / site).iterdir())
        assert len(classes) == 2  # pathological: 2 classes per site
        _, y, fmt = read_node_folder(str(tmp_path / "p" / site), "synthetic")
        assert fmt == "image-folder" and sorted({str(v) for v in y}) == classes


@pytest.mark.parametrize(
    "make, dataset, match",
    [
        (lambda p: p / "nowhere", "synthetic", "does not exist"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "synthetic", "is not a folder"),
        (lambda p: (p / "notes.txt").write_text("x") and p, "synthetic", "none of the formats"),
        (lambda p: write_png_folder(p / "s", {"12": 2}), "fashion-mnist", "does not match the run's model"),
        (lambda p: write_png_folder(p / "s", {"boots": 2}, size=28), "fashion-mnist", "not a class"),
        (lambda p: write_png_folder(p / "s", {"1": 2}, size=28), "synthetic", r"shape \(1, 28, 28\)"),
        (lambda p: write_png_folder(p / "s", {"1": 0}), "synthetic", "holds no image"),
    ],
    ids=["missing", "file", "unknown-format", "label-range", "class-name", "shape", "empty-class"],
)
def test_errors_name_the_path(tmp_path, make, dataset, match):
    path = make(tmp_path)
    with pytest.raises(NodeDataError, match=match) as err:
        node_data(str(path), dataset, **SPLIT)
    assert str(path) in str(err.value)


def test_unreadable_files_are_named(tmp_path):
    site = write_png_folder(tmp_path / "s", {"1": 2})
    (site / "1" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(NodeDataError, match="broken.png"):
        node_data(str(site), "synthetic", **SPLIT)
    (tmp_path / "fm").mkdir()
    make_fmnist_dir(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(NodeDataError, match="train-labels-idx1-ubyte"):
        node_data(str(tmp_path / "fm"), "fashion-mnist", **SPLIT)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{broken")
    with pytest.raises(NodeDataError, match="saved dataset in .*saved"):
        node_data(str(saved), "synthetic", **SPLIT)


def test_client_uses_its_data_path(tmp_path):
    from flwr.app import Context, RecordDict

    from fedmoe_app.client.handlers import handle_query, local_data, run_config

    site = write_png_folder(tmp_path / "site-a", {"2": 20, "5": 10})
    cfg = {"dataset": "synthetic"}
    ctx = Context(0, 1, {"data-path": str(site), "client-id": "site-a"}, RecordDict(), cfg)
    train, test, _ = local_data(run_config(ctx), ctx)
    assert (len(train), len(test)) == (n_train(30), 6)
    reply = handle_query(None, ctx)
    assert reply["profile"]["num-examples"] == n_train(30) and reply["client"]["client-id"] == "site-a"
    nameless = Context(0, 1, {"data-path": str(site)}, RecordDict(), cfg)
    with pytest.raises(ValueError, match="client-id"):
        handle_query(None, nameless)
    with pytest.raises(ValueError, match="data-path"):
        local_data(run_config(ctx), Context(0, 1, {}, RecordDict(), cfg))


def _find(state, key):
    """The first value under ``key`` anywhere in a nested checkpoint state."""
    if isinstance(state, dict):
        if key in state:
            return state[key]
        for value in state.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_supernodes_train_on_their_own_folders(tmp_path):
    """SuperLink + 2 SuperNodes, each with node config data-path: a PNG folder and a saved dataset."""
    import datasets
    from test_deploy import DEPLOY_FAST, left_over

    from deploy.local import Deployment
    from fedmoe_app.run.checkpoint import checkpoint_path, load_checkpoint

    site_a = write_png_folder(tmp_path / "site-a", {"0": 15, "1": 15, "2": 10})  # 40 examples
    rng = np.random.default_rng(1)
    pixels = list(rng.integers(0, 256, (65, 12, 12), dtype=np.uint8))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    site_b = tmp_path / "site-b"
    datasets.Dataset.from_dict({"image": pixels, "label": [5, 6] * 32 + [5]}, features=features).save_to_disk(
        str(site_b)
    )
    run_config = {**DEPLOY_FAST, "min-train-nodes": 2, "run-name": "own-data", "max-samples-per-client": 0}
    workdir = tmp_path / "wd"
    with Deployment(ROOT, workdir, output_root=tmp_path, env={"OMP_NUM_THREADS": "1"}) as dep:
        dep.start_superlink()
        nodes = [dep.start_supernode(None, None, client_id=p.name, data_path=p) for p in (site_a, site_b)]
        assert all("partition-id" not in n.node_config for n in nodes)
        dep.wait_activated()
        with open(tmp_path / "run.log", "w") as log:
            result = dep.run(run_config, timeout=300, stream_to=log)
        assert result.ok, (result, (tmp_path / "run.log").read_text()[-3000:], dep.superlink_log()[-2000:])
        logs = {n.name: n.log_text() for n in nodes}
    # each node announced its own folder, split and label set
    assert (
        f"client site-a: {n_train(40)} train / 8 local test examples from {site_a.resolve()}"
        in logs["node-site-a"]
    )
    assert (
        f"client site-b: {n_train(65)} train / 13 local test examples from {site_b.resolve()}"
        in logs["node-site-b"]
    )
    assert "labels [0, 1, 2]" in logs["node-site-a"] and "labels [5, 6]" in logs["node-site-b"]
    assert "site-b" not in logs["node-site-a"] and "site-a" not in logs["node-site-b"]
    # and the server saw the examples each one reported (not a shard of the global synthetic set)
    _, state = load_checkpoint(checkpoint_path(tmp_path / "outputs" / "own-data"))
    profiles = _find(state, "profiles")
    assert {cid: p["num-examples"] for cid, p in profiles.items()} == {
        "site-a": n_train(40),
        "site-b": n_train(65),
    }
    assert not left_over(workdir)
