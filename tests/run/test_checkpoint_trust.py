"""A tampered, damaged or out-of-range checkpoint stops a resume at start, naming the file."""

import json
import zipfile

import numpy as np
import pytest
from conftest import IN_PROCESS_RUN
from fake_federation import FakeGrid

from fedmoe_app.run.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from fedmoe_app.run.folder import RunFolderError
from fedmoe_app.run.server import run_server

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SPEC = {"dataset": "synthetic", "model": "cnn-moe", "num-experts": 4, "top-k": 2, "expert-hidden": 16}


_FINISHED = {}  # the one finished run every test copies


@pytest.fixture
def finished(tmp_path_factory, serverapp_identity):
    """A real 2-round run's folder (synthetic data, in-process federation) and its config."""
    if not _FINISHED:
        root = tmp_path_factory.mktemp("run")
        config = {**SPEC, **IN_PROCESS_RUN, "partitioner": "dirichlet"}
        config |= {"output-dir": str(root / "outputs"), "run-name": "r"}
        _FINISHED["run"] = run_server(FakeGrid(2, num_experts=4, top_k=2, scale=0.1), config), config
    return _FINISHED["run"]


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run's folder, and a function resuming it for a third round."""
    out, config = finished
    copy = tmp_path / "outputs" / "r"
    copy.mkdir(parents=True)
    for f in out.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    again = config | {"output-dir": str(tmp_path / "outputs"), "resume": True, "num-server-rounds": 3}

    def resume(**changes):
        return run_server(FakeGrid(2, num_experts=4, top_k=2, scale=0.1), again | changes)

    return checkpoint_path(copy), resume


def rewrite(path, change_arrays=None, change_state=None):
    """Rewrite the checkpoint through save_checkpoint (a valid digest): tampering the tool cannot see."""
    arrays, state = load_checkpoint(path)
    if change_arrays:
        change_arrays(arrays)
    if change_state:
        change_state(state)
    save_checkpoint(path, arrays, state)


def first_key(path):
    arrays, _ = load_checkpoint(path)
    return sorted(arrays)[0]


def test_an_untouched_checkpoint_resumes(run):
    ckpt, resume = run
    out = resume()
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [0, 1, 2, 3]


def test_a_changed_byte_fails_the_digest(run):
    ckpt, resume = run
    with zipfile.ZipFile(ckpt) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.startswith("model/"))
    data = bytearray(entries[name])
    data[-4:] = np.float32(np.nan).tobytes()  # the last value of a tensor becomes NaN
    entries[name] = bytes(data)
    with zipfile.ZipFile(ckpt, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    with pytest.raises(CheckpointError, match=f"{ckpt}: its contents do not match the digest"):
        resume()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, k: a.__setitem__(k, np.full_like(a[k], np.nan)), "holds non-finite values"),
        (lambda a, k: a.__setitem__(k, np.full_like(a[k], np.inf)), "holds non-finite values"),
        (lambda a, k: a.__setitem__(k, a[k].astype(np.float64)), "is float64; allowed"),
    ],
    ids=["nan", "inf", "float64"],
)
def test_a_tensor_not_finite_float32_is_refused_naming_the_file_and_tensor(run, change, message):
    ckpt, resume = run
    key = first_key(ckpt)
    rewrite(ckpt, change_arrays=lambda a: change(a, key))
    with pytest.raises(CheckpointError, match=f"{ckpt}: tensor '{key}' {message}"):
        resume()


def test_a_finite_tensor_of_another_shape_is_refused(run):
    ckpt, resume = run
    key = first_key(ckpt)
    rewrite(ckpt, change_arrays=lambda a: a.__setitem__(key, np.zeros(3, np.float32)))
    with pytest.raises(RunFolderError, match=f"checkpoint {ckpt}: .*does not match this model's tensors"):
        resume()


@pytest.mark.parametrize("value", [99, 0, -1, 2.5, "2", True, None])
def test_a_round_outside_the_run_is_refused(run, value):
    ckpt, resume = run
    rewrite(ckpt, change_state=lambda s: s.__setitem__("round", value))
    with pytest.raises(RunFolderError, match=f"checkpoint {ckpt}: key 'round' = .*num-server-rounds = 3"):
        resume()


@pytest.mark.parametrize(
    ("where", "value"), [("fitness", float("nan")), ("usage", float("inf")), ("usage", -1.0)]
)
def test_alignment_state_out_of_range_is_refused(run, where, value):
    ckpt, resume = run

    def spoil(state):
        alignment = state["strategy"]["alignment"]
        for layer in alignment.get("layers", [alignment]):
            row = layer[where][0] if where == "fitness" else layer[where]
            row[0] = value

    rewrite(ckpt, change_state=spoil)
    with pytest.raises(RunFolderError, match=f"checkpoint {ckpt}: key 'strategy.alignment' is invalid"):
        resume()


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.0])
def test_a_truncated_checkpoint_names_its_file(run, keep):
    ckpt, resume = run
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"{ckpt}: not a readable checkpoint"):
        resume()
