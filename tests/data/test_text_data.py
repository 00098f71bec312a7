"""Text datasets: the fortunes layout, a user's folder, documents, windows, partitions and bad folders."""

import dataclasses
import re

import numpy as np
import pytest

from fedmoe_app.config import RunConfig, SplitSection
from fedmoe_app.data import DatasetUnavailable
from fedmoe_app.data.text import (
    FORTUNES_DIR,
    documents,
    folder_groups,
    fortune_groups,
    load_text,
    natural_partitions,
    read_text,
    server_split,
    text_client_data,
    windows,
)

SPLIT = SplitSection(
    partitioner="natural",
    alpha=0.5,
    shards=2,
    test_fraction=0.2,
    max_samples=0,
    data_dir="",
    seed=0,
    public_fraction=0.0,
)


def fortunes(n, word):
    return "\n%\n".join(f"{word} number {i}, said the {word} of fortune {i * 7}." for i in range(n)) + "\n%\n"


@pytest.fixture
def fortune_tree(tmp_path):
    root = tmp_path / "fortunes"
    (root / "de").mkdir(parents=True)
    (root / "ru" / "off").mkdir(parents=True)
    (root / "cz").mkdir()
    (root / "humorists").write_text(fortunes(40, "joke"))
    (root / "humorists.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (root / "humorists.u8").write_text(fortunes(40, "joke"))
    (root / "tang300").write_text("\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n" * 30)
    (root / "de" / "witze").write_text(fortunes(40, "Witz"))
    (root / "ru" / "anekdoty").write_text(fortunes(40, "анекдот"))
    (root / "ru" / "off" / "rude").write_text(fortunes(40, "rude"))
    (root / "cz" / "alias").symlink_to(root / "de" / "witze")
    (root / "adams").symlink_to(root / "de" / "witze")  # another language's file linked into the top
    return root


def test_fortune_layout_groups_files_by_language(fortune_tree):
    groups = fortune_groups(fortune_tree)
    assert sorted(groups) == ["de", "en", "ru", "zh"]
    assert [p.name for p in groups["en"]] == ["humorists"]  # no .dat, .u8 or symlink
    assert [p.name for p in groups["ru"]] == ["anekdoty"]  # not the off/ folder
    assert [p.name for p in groups["zh"]] == ["tang300"]
    assert b"\x1b" not in read_text(groups["zh"][0])


def test_user_folder_one_group_per_file_or_sub_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b" / "one.txt").write_text("beta " * 50)
    (tmp_path / "b" / "deep" / "two.md").write_text("gamma " * 50)
    (tmp_path / ".hidden").write_text("never")
    groups = folder_groups(tmp_path)
    assert sorted(groups) == ["a.txt", "b"] and len(groups["b"]) == 2


def test_documents_and_windows():
    assert documents(b"one\n%\ntwo\nlines\n%\n") == [b"one", b"two\nlines"]
    assert documents(b"para one\n\npara two\n") == [b"para one", b"para two"]
    w = windows(bytes(range(10)), 3)
    assert w.shape == (3, 4) and w[1].tolist() == [3, 4, 5, 6] and w.dtype == np.uint8
    assert windows(b"abc", 3).shape == (0, 4)


def test_load_text_holds_out_documents_of_every_group(fortune_tree):
    train, test, info = load_text("fortunes", str(fortune_tree), 16, 0)
    assert info.groups == ("de", "en", "ru", "zh") and info.vocab_size == 256
    assert train.tokens.shape[1] == 17 and train.tokens.dtype.is_floating_point is False
    assert set(train.groups.tolist()) == set(test.groups.tolist()) == {0, 1, 2, 3}

    def text(split, group):  # windows overlap by one byte (stride T, length T + 1)
        rows = split.tokens[split.groups == group].numpy()
        return bytes(np.concatenate([rows[:, :-1].reshape(-1), rows[-1:, -1]])).decode("utf-8", "ignore")

    def numbers(s):
        return set(re.findall(r"joke number (\d+), said the joke of fortune \d+\.", s))

    held, trained = numbers(text(test, 1)), numbers(text(train, 1))
    assert held and trained and not held & trained and len(held | trained) >= 38
    ru = text(train, 2)
    assert "анекдот" in ru and "rude" not in ru


def test_natural_partition_gives_each_client_one_language(fortune_tree):
    _, _, info = load_text("fortunes", str(fortune_tree), 16, 0)
    seen = []
    for pid in range(8):
        split = dataclasses.replace(SPLIT, data_dir=str(fortune_tree))
        train, test, _ = text_client_data("fortunes", pid, 8, split, 16)
        assert set(train.groups.tolist()) == {pid % 4} and len(test) > 0
        seen.append(len(train) + len(test))
    full, _, _ = load_text("fortunes", str(fortune_tree), 16, 0)
    assert sum(seen) == len(full)
    parts = natural_partitions(np.array([0, 0, 1, 1, 2, 2, 2]), 3, 2, seed=0)
    assert [sorted(p.tolist()) for p in parts] == [[0, 1, 4, 5, 6], [2, 3]]


def test_dirichlet_mixes_languages(fortune_tree):
    split = dataclasses.replace(SPLIT, partitioner="dirichlet", alpha=1000.0, data_dir=str(fortune_tree))
    train, _, _ = text_client_data("fortunes", 0, 2, split, 16)
    assert len(set(train.groups.tolist())) == 4


def test_server_split_caps_and_covers_groups(fortune_tree):
    cfg = RunConfig.from_run_config(
        {
            "dataset": "fortunes",
            "model": "transformer-moe",
            "data-dir": str(fortune_tree),
            "context-length": 16,
        }
    )
    test, info = server_split(cfg)
    assert len(info.groups) == 4 and len(test) > 0
    capped = RunConfig.from_run_config({**cfg.to_dict(), "central-eval-samples": 5})
    assert len(server_split(capped)[0]) == 5


def test_a_folder_without_readable_text_names_data_dir(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 40)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DatasetUnavailable, match="'data-dir'"):
        load_text("text", str(tmp_path), 16, 0)
    with pytest.raises(DatasetUnavailable, match="'data-dir'"):
        load_text("text", str(tmp_path / "missing"), 16, 0)
    (tmp_path / "ok.txt").write_text("readable text " * 20)
    _, _, info = load_text("text", str(tmp_path), 16, 1)
    assert info.groups == ("ok.txt",)


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian fortunes packages not installed")
def test_installed_fortunes_have_the_eight_languages():
    groups = fortune_groups(FORTUNES_DIR)
    assert {"en", "de", "ru", "zh", "es", "it", "pl", "cs"} <= set(groups)
