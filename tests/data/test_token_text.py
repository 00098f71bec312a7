"""Text as a model folder's tokens: token windows, the bytes they cover, bits per byte, data-path text."""

import math

import numpy as np
import pytest
import torch
from llm_folder import TEXT, tokenizer_folder

from fedmoe_app.data.local import NodeDataError, node_data
from fedmoe_app.data.text import TextSplit, load_text
from fedmoe_app.data.tokens import encode_documents
from fedmoe_app.run.evaluation import text_metrics
from fedmoe_app.training import evaluate_text, evaluate_text_sums

pytest.importorskip("transformers")

EOS = "<|endoftext|>"


@pytest.fixture
def tok_folder(tmp_path):
    folder = tmp_path / "tok"
    tokenizer_folder(folder)
    return folder


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "mixed.txt").write_bytes(b"\n\n".join(TEXT))
    (root / "sub" / "a.txt").write_bytes(b"\n\n".join(reversed(TEXT)))
    return root


def stream(split: TextSplit, group: int) -> list[int]:
    """A group's token stream: its windows overlap by one token (stride T, width T + 1)."""
    rows = split.tokens[split.groups == group]
    return rows[:, :-1].reshape(-1).tolist() + rows[-1:, -1].tolist()


def test_token_windows_decode_back_to_the_documents(tok_folder, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    train, test, info = load_text("text", str(corpus), 16, 0, str(tok_folder))
    assert info.groups == ("mixed.txt", "sub") and info.vocab_size == len(tok)
    assert train.tokens.dtype == test.tokens.dtype == torch.int32 and train.tokens.shape[1] == 17
    docs = {d.decode() for d in TEXT}
    for g in range(2):
        train_text, held_text = tok.decode(stream(train, g)), tok.decode(stream(test, g))
        train_docs, held_docs = train_text.split(EOS), held_text.split(EOS)
        # whole documents joined by EOS; only the last one is cut where the windows end
        assert set(train_docs[:-1]) <= docs and set(held_docs[:-1]) <= docs
        assert not set(train_docs[:-1]) & set(held_docs)
        assert any(d.startswith(train_docs[-1].rstrip("\ufffd")) for d in docs)  # may end mid-character
        # the windows' target bytes: every byte of the decoded text but the first token's
        first = len(tok.decode(stream(train, g)[:1]).encode())
        want = len(train_text.replace(EOS, "").encode()) - first
        assert int(train.nbytes[train.groups == g].sum()) == want
    # byte level stays as it was: uint8 windows, T bytes of targets each
    b_train, _, b_info = load_text("text", str(corpus), 16, 0)
    assert b_train.tokens.dtype == torch.uint8 and b_info.vocab_size == 256
    assert (b_train.nbytes == 16).all()


def test_every_token_covers_the_bytes_of_its_text(tok_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    docs = ["Straße über 猫は".encode(), b"plain ascii", "ñ🙂".encode()]
    ids, nbytes = encode_documents(tok, docs)
    assert ids.dtype == np.int32 and len(ids) == len(nbytes)
    assert int(nbytes.sum()) == sum(len(d) for d in docs)  # EOS separators cover no byte
    eos = np.flatnonzero(ids == tok.eos_token_id)
    assert len(eos) == 2 and (nbytes[eos] == 0).all()
    # each document's tokens cover exactly its bytes
    bounds = [0, *eos.tolist(), len(ids)]
    for d, (a, b) in zip(docs, zip(bounds[:-1], bounds[1:])):
        assert int(nbytes[a + (a > 0) : b].sum()) == len(d)


class Uniform(torch.nn.Module):
    """A model whose next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y=None):
        return type("Out", (), {"logits": torch.zeros(*x.shape, self.vocab)})()

    def task_loss(self, logits, y, reduction="mean"):
        flat = logits.reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(flat, y.reshape(-1).long(), reduction=reduction)

    def correct(self, logits, y):
        return (logits.argmax(-1) == y).sum()


def test_bits_per_byte_are_total_nats_over_the_target_bytes():
    vocab, t = 1000, 4
    tokens = torch.zeros(3, t + 1, dtype=torch.int32)
    data = TextSplit(tokens, torch.tensor([0, 0, 1]), torch.tensor([10, 6, 7]))
    sums = evaluate_text_sums(Uniform(vocab), data, batch_size=2, device="cpu")
    nats = math.log(vocab)  # per token
    assert sums.loss == pytest.approx(nats) and sums.bpb == pytest.approx(3 * t * nats / math.log(2) / 23)
    m = text_metrics(sums, ("en", "de"))
    assert m["perplexity"] == pytest.approx(vocab) and m["loss"] == pytest.approx(nats)
    assert m["bpb_en"] == pytest.approx(2 * t * math.log2(vocab) / 16)
    assert m["bpb_de"] == pytest.approx(t * math.log2(vocab) / 7)
    assert m["bytes_per_token"] == pytest.approx(23 / 12) and m["accuracy"] == pytest.approx(1.0)
    # byte level: T bytes per window, bits per byte = loss / ln 2 (8 bits for a uniform guess)
    byte_data = TextSplit(torch.zeros(3, t + 1, dtype=torch.uint8), torch.tensor([0, 1, 1]))
    m = text_metrics(evaluate_text_sums(Uniform(256), byte_data, batch_size=2, device="cpu"), ("en", "de"))
    assert m["bpb"] == pytest.approx(8.0) and m["bpb_de"] == pytest.approx(8.0)
    loss, acc, per_group = evaluate_text(Uniform(256), byte_data, batch_size=2, device="cpu")
    assert loss == pytest.approx(math.log(256)) and per_group == pytest.approx([math.log(256)] * 2)


def test_a_node_folder_of_text_files_gives_its_windows(tok_folder, corpus, tmp_path):
    kw = {"test_fraction": 0.25, "max_samples": 0, "seed": 0, "context_length": 16}
    train, test, info = node_data(str(corpus), "text", **kw, tokenizer="")
    assert isinstance(train, TextSplit) and train.tokens.dtype == torch.uint8
    assert info.groups == ("mixed.txt", "sub") and len(test) == pytest.approx(len(train) / 3, abs=1)
    assert set(train.labels.tolist()) == {0, 1}
    capped, _, _ = node_data(str(corpus), "text", **{**kw, "max_samples": 5}, tokenizer=str(tok_folder))
    assert len(capped) == 5 and capped.tokens.dtype == torch.int32
    (tmp_path / "empty").mkdir()
    with pytest.raises(NodeDataError, match="'data-path'.*no readable UTF-8 text"):
        node_data(str(tmp_path / "empty"), "text", **kw, tokenizer="")
    with pytest.raises(NodeDataError, match="'data-path'.*does not exist"):
        node_data(str(tmp_path / "absent"), "text", **kw, tokenizer="")


def test_token_windows_are_cached_on_disk_per_text_and_tokenizer(tok_folder, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "cache"))
    load_text.cache_clear()
    first = load_text("text", str(corpus), 16, 0, str(tok_folder))
    files = list((tmp_path / "cache" / "text-tokens").glob("*.npz"))
    assert len(files) == 1
    load_text.cache_clear()
    again = load_text("text", str(corpus), 16, 0, str(tok_folder))  # read back from the file
    assert again[2] == first[2]
    for a, b in zip(again[:2], first[:2]):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "groups", "nbytes"))
    load_text("text", str(corpus), 32, 0, str(tok_folder))  # another context length: another file
    (corpus / "mixed.txt").write_bytes(b"\n\n".join(TEXT[:40]))  # changed text: another file
    load_text.cache_clear()
    assert len(load_text("text", str(corpus), 16, 0, str(tok_folder))[0]) < len(first[0])
    assert len(list((tmp_path / "cache" / "text-tokens").glob("*.npz"))) == 3
    load_text.cache_clear()
