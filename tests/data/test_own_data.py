"""Your own data: image folders and saved datasets read for their shape and classes, a
FederatedDataset, text from a saved dataset, ``dataset-path``, runs without central evaluation."""

import json
import shutil
import time

import numpy as np
import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from PIL import Image

from fedmoe_app.client.handlers import handle_evaluate, handle_query, handle_train, local_data, run_config
from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.data import source
from fedmoe_app.data.images import read_images
from fedmoe_app.data.local import NodeDataError, node_data, node_data_path
from fedmoe_app.data.text import load_text
from fedmoe_app.run.server import run_server
from fedmoe_app.tools.experiments.metrics import FinishedRun
from fedmoe_app.tools.experiments.summary import format_table, summarize, summary_markdown

HANDLERS = {"query": handle_query, "train": handle_train, "evaluate": handle_evaluate}
#: A small cnn-moe: two rounds of two real clients take a few seconds.
SMALL = {
    "num-experts": 4,
    "top-k": 2,
    "experts-per-client": 2,
    "capacity": "fixed",
    "stem-channels": 4,
    "feature-dim": 16,
    "expert-hidden": 32,
    "num-server-rounds": 2,
    "fraction-train": 1.0,
    "min-train-nodes": 1,
    "fraction-evaluate": 1.0,
    "min-evaluate-nodes": 1,
    "partitioner": "iid",
    "batch-size": 8,
    "optimizer": "adamw",
    "lr": 0.01,
    "device": "cpu",
}
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230)]
CLASSES = ("apple", "leaf", "sea", "sun", "sky")


def clear_readers():
    for f in (read_images, source._image_splits, source._hf_image_meta, source.federated_dataset):
        f.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_readers():
    clear_readers()
    yield


class ClientGrid:
    """Nodes 1..n: real clients answering through the app's handlers, each with its node config."""

    def __init__(self, run_config, node_configs):
        self.contexts = {
            i: Context(0, i, nc, RecordDict(), run_config) for i, nc in enumerate(node_configs, 1)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            content = HANDLERS[kind](m, self.contexts[node])
            replies.append(
                Message(content=content, metadata=Metadata(1, "m", node, 0, "", "1", 0.0, 60.0, kind))
            )
        return replies


def partitions(n):
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def colour_images(n, size=32, seed=0):
    """``n`` images per class of :data:`COLOURS` (its colour plus noise), uint8 ``[n, H, W, 3]`` each."""
    rng = np.random.default_rng(seed)
    return {
        c: np.clip(np.array(COLOURS[k]) + rng.normal(0, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)
        for k, c in enumerate(CLASSES)
    }


def write_image_folder(root, per_class=20, size=32, classes=CLASSES):
    for c, images in colour_images(per_class, size).items():
        if c not in classes:
            continue
        (root / c).mkdir(parents=True)
        for i, x in enumerate(images):
            Image.fromarray(x, "RGB").save(root / c / f"{i}.png")
    return root


def run_rows(out):
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------- image folders
def test_a_five_class_rgb_image_folder_federates_end_to_end(tmp_path, serverapp_identity):
    t0 = time.perf_counter()
    folder = write_image_folder(tmp_path / "pictures", per_class=20)
    config = {
        **SMALL,
        "dataset": "images",
        "data-dir": str(folder),
        "output-dir": str(tmp_path / "out"),
        "run-name": "own",
    }
    out = run_server(ClientGrid(config, partitions(2)), config)
    spec = json.loads((out / "model_spec.json").read_text())
    assert json.dumps(spec).count('"in_channels": 3') == 1 and '"num_classes": 5' in json.dumps(spec)
    assert '"image_size": 32' in json.dumps(spec)
    rows = run_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["failures"] == 0 and r["valid_replies"] == 2 for r in rows[1:])
    # the server evaluates on the held-out tenth (10 of 100 images); the clients learn the colours
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[-1]["client_accuracy"] >= 0.5  # chance: 0.2
    print(f"5-class image folder, 2 rounds in process: {time.perf_counter() - t0:.1f} s")


def test_shape_and_classes_come_from_the_data(tmp_path):
    grey = tmp_path / "grey"
    for k, c in enumerate(("3", "7")):  # digit folders: labels 3 and 7 of classes 0..7
        (grey / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16), 40 * k + i, np.uint8), "L").save(grey / c / f"{i}.png")
    cfg = RunConfig.from_run_config({"dataset": "images", "data-dir": str(grey)})
    train, _, test, info = source._image_splits(cfg)
    assert (info.in_channels, info.image_size, info.num_classes) == (1, 16, 8)
    assert len(train) + len(test) == 8 and len(test) == 1
    assert set(train.labels.tolist()) | set(test.labels.tolist()) == {3, 7}
    # train/ and test/ split folders: the server's test set is test/
    split = tmp_path / "split"
    write_image_folder(split / "train", per_class=3, size=8)
    write_image_folder(split / "test", per_class=2, size=8, classes=CLASSES[:3])
    cfg = RunConfig.from_run_config({"dataset": "images", "data-dir": str(split)})
    train, _, test, info = source._image_splits(cfg)
    assert (len(train), len(test), info.num_classes, info.in_channels) == (15, 6, 5, 3)
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]  # apple, leaf, sea in sorted class order
    # run-config classes fix the order (and the count: a node may lack classes)
    cfg = RunConfig.from_run_config(
        {"dataset": "images", "data-dir": str(split), "classes": "sky,sun,sea,leaf,apple,pear"}
    )
    train, _, test, info = source._image_splits(cfg)
    assert info.num_classes == 6 and sorted(set(test.labels.tolist())) == [2, 3, 4]


def test_node_images_via_dataset_path(tmp_path):
    site = write_image_folder(tmp_path / "site", per_class=5, size=16)
    run = {"dataset": "images", "image-shape": "3,16,16", "classes": ",".join(CLASSES), "central-eval": False}
    ctx = Context(0, 1, {"dataset-path": str(site), "client-id": "a"}, RecordDict(), run)
    train, test, info = local_data(run_config(ctx), ctx)
    assert (len(train), len(test), info.num_classes, tuple(train.images.shape[1:])) == (20, 5, 5, (3, 16, 16))
    assert node_data_path({"data-path": "/x", "dataset-path": "/x"}) == ("data-path", "/x")
    with pytest.raises(NodeDataError, match="'data-path' = '/x' and 'dataset-path' = '/y' differ"):
        node_data_path({"data-path": "/x", "dataset-path": "/y"})
    missing = Context(0, 1, {"dataset-path": str(tmp_path / "nope"), "client-id": "a"}, RecordDict(), run)
    with pytest.raises(NodeDataError, match=r"node config 'dataset-path' = '.*nope' does not exist"):
        handle_query(None, missing)
    wrong = {**run, "image-shape": "3,32,32"}
    ctx = Context(0, 1, {"data-path": str(site), "client-id": "a"}, RecordDict(), wrong)
    with pytest.raises(
        NodeDataError, match=r"shape \(3, 16, 16\); run-config 'image-shape' wants \(3, 32, 32\)"
    ):
        local_data(run_config(ctx), ctx)


def test_an_image_linked_from_outside_the_folder_is_refused_naming_it(tmp_path):
    import os

    site = write_image_folder(tmp_path / "site", per_class=3, size=8)
    cfg = RunConfig.from_run_config({"dataset": "images", "data-dir": str(site)})
    assert len(source._image_splits(cfg)[0]) > 0
    secret = tmp_path / "private.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    os.symlink(secret, site / CLASSES[0] / "linked.png")
    clear_readers()  # the readers cache what they read
    with pytest.raises(NodeDataError, match=r"linked\.png' links outside the folder"):
        source._image_splits(cfg)
    (site / CLASSES[0] / "linked.png").unlink()
    write_image_folder(tmp_path / "elsewhere", per_class=2, size=8, classes=("sky",))
    os.symlink(tmp_path / "elsewhere" / "sky", site / "owl")  # a whole class folder linked in
    clear_readers()
    with pytest.raises(NodeDataError, match="links outside the folder"):
        source._image_splits(cfg)


# ---------------------------------------------------------------------------- saved datasets
def saved_images(path, *, image="image", label="label", splits=("train", "test"), n=10):
    import datasets

    pics = colour_images(n, size=12)
    rows = [(x, k) for k, c in enumerate(CLASSES) for x in pics[c]]
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict(
        {image: [x for x, _ in rows], label: [k for _, k in rows]}, features=features
    ).shuffle(seed=0)
    if len(splits) == 1:
        ds.save_to_disk(str(path))
    else:
        cut = ds.train_test_split(test_size=0.2, seed=0)
        datasets.DatasetDict({"train": cut["train"], "test": cut["test"]}).save_to_disk(str(path))
    return path


def test_a_saved_image_dataset_with_named_columns(tmp_path):
    path = saved_images(tmp_path / "saved", image="picture", label="kind")
    cfg = RunConfig.from_run_config({"dataset": "images", "data-dir": str(path)})
    train, _, test, info = source._image_splits(cfg)  # detected: the Image and the ClassLabel feature
    assert (len(train), len(test), info.num_classes, info.in_channels, info.image_size) == (40, 10, 5, 3, 12)
    client_train, client_test, client_info = source.client_split(cfg, 1, 2)
    assert client_info == info and len(client_train) + len(client_test) == 20
    # columns without those features: named by the keys, else an error naming them
    import datasets

    plain = datasets.Dataset.from_dict({"px": [np.zeros((8, 8), np.uint8)] * 4, "y": [0, 1, 0, 1]})
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(
        NodeDataError,
        match="no usable image column and no label column.*'px', 'y'.*'image-column' and 'label-column'",
    ):
        read_images(str(tmp_path / "plain"), "run-config key 'data-dir'")
    keys = {
        "dataset": "images",
        "data-dir": str(tmp_path / "plain"),
        "image-column": "px",
        "label-column": "y",
    }
    train, _, test, info = source._image_splits(RunConfig.from_run_config(keys))
    assert (info.in_channels, info.image_size, info.num_classes, len(train) + len(test)) == (1, 8, 2, 4)


def test_errors_name_the_key_the_value_and_what_is_allowed(tmp_path):
    one = write_image_folder(tmp_path / "one", per_class=3, size=8, classes=("sea",))
    cfg = RunConfig.from_run_config({"dataset": "images", "data-dir": str(one)})
    with pytest.raises(
        NodeDataError, match=r"'data-dir' = '.*one' holds 1 class \['sea'\]; allowed: two or more"
    ):
        source.server_split(cfg)
    with pytest.raises(NodeDataError, match=r"node config 'data-path' = '.*one' holds 1 class"):
        node_data(str(one), "images", test_fraction=0.2, max_samples=0, seed=0)
    with pytest.raises(NodeDataError, match=r"'data-dir' = '.*absent' does not exist"):
        source.server_split(
            RunConfig.from_run_config({"dataset": "images", "data-dir": str(tmp_path / "absent")})
        )
    with pytest.raises(ConfigError, match="'image-shape' = '3,32' is invalid; allowed: \"C,H,W\""):
        RunConfig.from_run_config({"dataset": "images", "data-dir": "x", "image-shape": "3,32"})
    with pytest.raises(ConfigError, match="'data-dir' = '' is invalid for dataset 'images'"):
        RunConfig.from_run_config({"dataset": "images"})
    with pytest.raises(ConfigError, match="'central-eval' = true is invalid for dataset 'images'"):
        RunConfig.from_run_config({"dataset": "images", "image-shape": "1,8,8", "classes": "a,b"})
    with pytest.raises(ConfigError, match="'classes' = 'a,a' is invalid"):
        RunConfig.from_run_config({"dataset": "images", "data-dir": "x", "classes": "a,a"})


# ---------------------------------------------------------------------------- text
def saved_text(path, column="text"):
    import datasets

    lines = [f"Sentence {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(60)]
    topic = datasets.ClassLabel(names=["odd", "even"])
    feats = datasets.Features(
        {column: datasets.Value("string"), "topic": topic, "n": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict(
        {column: lines, "topic": [i % 2 for i in range(60)], "n": list(range(60))}, features=feats
    )
    ds.save_to_disk(str(path))
    return path


def test_text_from_a_saved_dataset(tmp_path):
    path = saved_text(tmp_path / "corpus")
    load_text.cache_clear()
    train, held, info = load_text("text", str(path), 16, 0)
    assert info.groups == ("even", "odd") and info.vocab_size == 256  # grouped by the ClassLabel column
    assert len(train) > 100 and len(held) > 0
    train_b, test_b, info_b = node_data(
        str(path), "text", test_fraction=0.2, max_samples=0, seed=0, context_length=16
    )
    assert info_b == info and len(train_b) + len(test_b) == len(train)
    other = saved_text(tmp_path / "other", column="body")
    from fedmoe_app.data.text import DatasetUnavailable

    load_text.cache_clear()
    assert load_text("text", str(other), 16, 0)[2].groups == ("even", "odd")  # the only string column
    import datasets

    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(DatasetUnavailable, match="no usable text column.*'text-column'"):
        load_text("text", str(tmp_path / "numbers"), 16, 0)


# ---------------------------------------------------------------------------- FederatedDataset
def test_a_federated_dataset_from_a_local_folder(tmp_path):
    """flwr-datasets' FederatedDataset reads a local parquet folder (the hub is unreachable here)."""
    import datasets

    path = saved_images(tmp_path / "saved", n=10)
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    loaded = datasets.load_from_disk(str(path))
    for split, ds in loaded.items():
        ds.to_parquet(str(parquet / f"{split}.parquet"))
    cfg = RunConfig.from_run_config(
        {"dataset": "images", "hf-dataset": str(parquet), "partitioner": "dirichlet", "dirichlet-alpha": 1.0}
    )
    parts = [source.client_split(cfg, i, 2) for i in range(2)]
    assert sum(len(tr) + len(te) for tr, te, _ in parts) == 40  # the train split, partitioned
    assert parts[0][2] == parts[1][2] and parts[0][2].num_classes == 5 and parts[0][2].in_channels == 3
    test, info = source.server_split(cfg)
    assert len(test) == 10 and info == parts[0][2]
    assert source.model_info(cfg) == info


# ---------------------------------------------------------------------------- central-eval = false
def test_without_central_evaluation_rounds_record_the_clients_and_summarise(tmp_path, serverapp_identity):
    folder = write_image_folder(tmp_path / "pictures", per_class=12, size=8)
    sites = [tmp_path / "a", tmp_path / "b"]
    for site, keep in zip(sites, (CLASSES[:3], CLASSES[2:])):
        site.mkdir()
        for c in keep:
            shutil.copytree(folder / c, site / c)  # a link out of a site's folder is refused
    config = {
        **SMALL,
        "dataset": "images",
        "central-eval": False,
        "image-shape": "3,8,8",
        "classes": ",".join(CLASSES),
        "output-dir": str(tmp_path / "out"),
        "run-name": "clients-only",
    }
    nodes = [{"data-path": str(s), "client-id": s.name} for s in sites]
    out = run_server(ClientGrid(config, nodes), config)
    rows = run_rows(out)
    assert [r["round"] for r in rows] == [1, 2]  # no round 0: it records the central evaluation only
    assert all(r["accuracy"] is None and r["loss"] is None for r in rows)
    assert all(r["client_accuracy"] is not None and 0 <= r["client_accuracy"] <= 1 for r in rows)
    assert (out / "accuracy_loss.png").is_file()
    runs = [FinishedRun("own", "load_balanced", 0, rows), FinishedRun("own", "dense", 0, rows)]
    summary = summarize(runs)
    assert summary[0].view == "client_accuracy"
    assert summary[0].final_acc == rows[-1]["client_accuracy"] and summary[0].rounds_to_target is not None
    table = format_table(summary)
    assert "load_balanced (clients)" in table
    assert "central-eval = false" in summary_markdown(summary, title="t", complete=2, total=2)


# ---------------------------------------------------------------------------- deployment
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_supernodes_train_on_their_own_text(tmp_path):
    """SuperLink + 2 SuperNodes: text from node config data-path (a folder) and dataset-path (saved)."""
    from conftest import ROOT, write_corpus
    from test_deploy import DEPLOY_FAST, left_over

    from deploy.local import Deployment

    t0 = time.perf_counter()
    site_a = write_corpus(tmp_path / "site-a")
    site_b = saved_text(tmp_path / "site-b")
    run_config = {
        **DEPLOY_FAST,
        "dataset": "text",
        "model": "transformer-moe",
        "central-eval": False,
        "num-layers": 1,
        "d-model": 16,
        "num-heads": 2,
        "expert-hidden": 32,
        "context-length": 16,
        "fraction-evaluate": 1.0,
        "min-evaluate-nodes": 2,
        "min-train-nodes": 2,
        "max-samples-per-client": 48,
        "round-timeout-s": 300.0,
        "run-name": "own-text",
    }
    workdir = tmp_path / "wd"
    with Deployment(ROOT, workdir, output_root=tmp_path, env={"OMP_NUM_THREADS": "1"}) as dep:
        dep.start_superlink()
        nodes = [
            dep.start_supernode(None, None, client_id="site-a", data_path=site_a),
            dep.start_supernode(None, None, client_id="site-b", data_path=site_b, data_key="dataset-path"),
        ]
        assert "dataset-path=" in nodes[1].node_config
        dep.wait_activated()
        with open(tmp_path / "run.log", "w") as log:
            result = dep.run(run_config, timeout=800, stream_to=log)
        assert result.ok, (result, (tmp_path / "run.log").read_text()[-3000:], dep.superlink_log()[-2000:])
        logs = {n.name: n.log_text() for n in nodes}
    # each node read its own folder: the text files, and the saved dataset named by dataset-path
    assert f"client site-a: 48 train / 66 local test examples from {site_a.resolve()}" in logs["node-site-a"]
    assert f"client site-b: 48 train / 118 local test examples from {site_b.resolve()}" in logs["node-site-b"]
    rows = run_rows(tmp_path / "outputs" / "own-text")
    assert [r["round"] for r in rows] == [1, 2]  # no round 0: it records the central evaluation only
    assert all(r["accuracy"] is None and r.get("bpb") is None for r in rows)
    last = rows[-1]
    assert set(last["assignment"]) == {"site-a", "site-b"} and last["failures"] == 0
    assert last["client_bpb"] < rows[0]["client_bpb"] < 8.5 and last["client_accuracy"] > 0
    assert not left_over(workdir)
    print(f"text on two SuperNodes: {time.perf_counter() - t0:.0f} s")


def test_the_run_configs_in_docs_data_md_are_valid():
    """Every ``--run-config "..."`` of docs/DATA.md parses (Flower's parser) and validates."""
    import re

    from conftest import ROOT
    from flwr.common.config import parse_config_args

    text = (ROOT / "docs" / "DATA.md").read_text()
    found = re.findall(r'--run-config "([^"]+)"', text)
    assert len(found) >= 5
    for args in found:
        cfg = RunConfig.from_run_config(parse_config_args([args]))
        assert cfg.dataset in ("images", "text"), args
