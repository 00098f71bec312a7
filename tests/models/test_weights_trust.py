"""Untrusted weights files and text folders: each stops at start with an error naming the file.

A model folder (tests/llm_folder.py) is damaged as an attacker or a bad copy would: an index
entry pointing outside the folder, a link out, a header claiming a huge tensor or an absurd
length, a same-size dtype swap, a truncated file. The server's reader (the global model, tensor
by tensor) and a client's (its held experts) both refuse each one, before reading tensor bytes.
"""

import json
import os

import numpy as np
import pytest
from llm_folder import tiny_model_folder

from fedmoe_app.data.text import load_text
from fedmoe_app.models import HFSpec, build_model
from fedmoe_app.models.hf_global import hf_global_arrays

pytest.importorskip("transformers")

HELD = [1, 6]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "m", "mixtral")


def copy_of(folder, tmp_path, name="bad"):
    bad = tmp_path / name
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    return bad


def readers(bad):
    """The server's reader and a client's, each on the folder ``bad``."""
    spec = HFSpec.from_folder(str(bad), 16, 320)
    return {"server": lambda: hf_global_arrays(spec), "client": lambda: build_model(spec, HELD)}


def rewrite_header(path, change):
    """Rewrite a safetensors file's JSON header through ``change(header)`` (the tensor bytes kept)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def first_float_tensor(header):
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")


def test_the_intact_folder_loads_on_both_sides(folder):
    arrays = readers(folder)["server"]()
    assert all(np.isfinite(v).all() for v in arrays.values())
    readers(folder)["client"]()


@pytest.mark.parametrize("side", ["server", "client"])
def test_an_index_entry_outside_the_folder_is_refused(folder, tmp_path, side):
    bad = copy_of(folder, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (bad / "model.safetensors").rename(outside / "x.safetensors")
    header_names = json.loads(
        (outside / "x.safetensors").read_bytes()[
            8 : 8 + int.from_bytes((outside / "x.safetensors").read_bytes()[:8], "little")
        ]
    )
    index = {
        "metadata": {},
        "weight_map": {k: "../outside/x.safetensors" for k in header_names if k != "__metadata__"},
    }
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"'hf-model'.*index.json names '\.\./outside/x\.safetensors', which is outside"
    ):
        readers(bad)[side]()
    index["weight_map"] = dict.fromkeys(index["weight_map"], str(outside / "x.safetensors"))  # absolute
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="which is outside"):
        readers(bad)[side]()


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_link_out_of_the_folder_is_refused(folder, tmp_path, side):
    bad = copy_of(folder, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (bad / "model.safetensors").rename(outside)
    os.symlink(outside, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"'hf-model'.*names 'model\.safetensors', which is outside"):
        readers(bad)[side]()


def huge_claim(header):
    header[first_float_tensor(header)]["shape"] = [8, 48000, 32000]


def huge_range(header):
    name = first_float_tensor(header)
    begin = header[name]["data_offsets"][0]
    header[name] |= {"shape": [8, 48000, 32000], "data_offsets": [begin, begin + 4 * 8 * 48000 * 32000]}


def int_swap(header):
    header[first_float_tensor(header)]["dtype"] = "I32"  # same size: the bytes would load as garbage


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (huge_claim, r"tensor '.*' of shape \[8, 48000, 32000\] \(F32\) cannot span"),
        (huge_range, r"tensor '.*' spans bytes \d+\.\.\d+ of a \d+-byte body"),
        (int_swap, r"tensor '.*' is 'I32'; allowed: floating point"),
    ],
    ids=["shape", "range", "dtype"],
)
def test_a_lying_header_is_refused_before_anything_is_allocated(folder, tmp_path, side, change, message):
    bad = copy_of(folder, tmp_path)
    rewrite_header(bad / "model.safetensors", change)
    with pytest.raises(ValueError, match=f"'hf-model'.*{bad / 'model.safetensors'}: {message}"):
        readers(bad)[side]()


@pytest.mark.parametrize("side", ["server", "client"])
def test_an_absurd_header_length_or_a_truncated_file_names_the_file(folder, tmp_path, side):
    bad = copy_of(folder, tmp_path)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match=f"{path}: header length {2**62} does not fit the file"):
        readers(bad)[side]()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: tensor '.*' spans bytes"):
        readers(bad)[side]()


def test_a_text_folder_link_out_is_refused_naming_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat.\n\n" * 200)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n\n" * 200)
    secret.chmod(0o600)
    assert load_text("text", str(corpus), 16, 0)[2].groups == ("a.txt",)
    load_text.cache_clear()
    os.symlink(secret, corpus / "b.txt")
    with pytest.raises(ValueError, match=f"'data-dir'.*{corpus / 'b.txt'} links outside the folder"):
        load_text("text", str(corpus), 16, 0)
    (corpus / "b.txt").unlink()
    (corpus / "sub").mkdir()
    os.symlink(secret, corpus / "sub" / "c.txt")  # inside a group's sub-folder
    with pytest.raises(ValueError, match=f"{corpus / 'sub' / 'c.txt'} links outside the folder"):
        load_text("text", str(corpus), 16, 0)
    (corpus / "sub" / "c.txt").unlink()
    os.symlink(corpus / "a.txt", corpus / "sub" / "d.txt")  # a link inside the folder is fine
    assert load_text("text", str(corpus), 16, 0)[2].groups == ("a.txt", "sub")
