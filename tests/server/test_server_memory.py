"""A bf16 checkpoint's server holds it in bf16 (N bytes) and aggregates a round in under 1.5 N.

A tiny-mixtral checkpoint (d-model 256, expert-hidden 1024, 4 layers, 8 experts: 26.4 M
weights, 53 MB in bf16) is written here; the server's initial arrays are read from it
(``run.server.initial_arrays``: bf16, N bytes); one round of 3 fake clients holding 2 experts
each (bf16 wire, replies as bf16 changes) is planned and sent, and ``FedMoE.aggregate_round``
(validation, bf16 changes added to the global tensors, bounds, per-tensor averaging) is traced
with tracemalloc. Counted: every allocation made during ``aggregate_round`` (numpy's included);
not counted: the global model (allocated before) and the reply messages (received before).
The replies' decoded tensors (``R``: the trained tensors in the global's dtype, what the clients
returned) are allocated during it and subtracted: the peak beyond them is the server's own cost,
and N plus it is what the server holds for the model while aggregating. ``in_place=True`` is how
``run_server`` makes the strategy (the averages written into the global tensors); the default
(new tensors for those that change) is measured too. Writing the round's checkpoint is traced
as well: it streams tensor by tensor to the file.
"""

import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from fake_federation import FakeGrid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextInfo
from fedmoe_app.models import build_model, model_spec
from fedmoe_app.run.checkpoint import save_checkpoint
from fedmoe_app.run.server import initial_arrays
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.tensors import raw_nbytes

pytest.importorskip("transformers")

SIZES = {"num-layers": 4, "d-model": 256, "num-heads": 4, "expert-hidden": 1024, "num-experts": 8, "top-k": 2}
KEYS = {"dataset": "fortunes", "model": "hf", "hf-config": "tiny-mixtral", "context-length": 16, **SIZES}
INFO = TextInfo(256, 16, ("en",))
ROUND = {"capacity": "fixed", "experts-per-client": 2, "fraction-train": 1.0, "wire-dtype": "bf16"}


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def round_memory(folder, in_place):
    """Return the figures of one traced aggregation (bytes) and the seconds it took."""
    cfg = RunConfig.from_run_config({**KEYS, **ROUND, "hf-weights": str(folder / "model.safetensors")})
    spec = model_spec(cfg, INFO)
    arrays = initial_arrays(spec, cfg.seed)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in arrays.values())
    before = {k: v.copy() for k, v in arrays.items()}
    strategy = FedMoE.from_run_config(cfg, spec, arrays, in_place=in_place)
    grid = FakeGrid(3, num_experts=8, top_k=2, scale=30.0, seed=0)
    train_round = strategy.plan_train(1, arrays, grid)
    replies = grid.send_and_receive(train_round.messages, 60.0)
    grid.sent.clear(), grid.replied.clear()  # the fake clients' own copies
    r = sum(arrays[k].nbytes for s in train_round.sent.values() for k in s.shapes)  # the replies, bf16
    tracemalloc.start()
    t0 = time.perf_counter()
    new, outcome = strategy.aggregate_round(arrays, replies, train_round)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert outcome.valid_replies == 3 and set(new) == set(arrays)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in new.values())  # the global model stays bf16
    changed = [k for k in new if not np.array_equal(new[k], before[k])]
    assert changed and all(np.array_equal(new[k], before[k]) for k in new if k not in changed)
    assert all((new[k] is arrays[k]) == in_place for k in changed if k != "gate.bias")
    n, c = raw_nbytes(arrays), sum(before[k].nbytes for k in changed)
    del replies, train_round, before
    tracemalloc.start()  # the round's checkpoint: streamed to the file, bf16 as bf16
    save_checkpoint(folder / "checkpoint.npz", new, {"round": 1})
    _, saving = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (folder / "checkpoint.npz").stat().st_size < 1.01 * n
    figures = {"N": n, "R": r, "new": c, "changed": len(changed), "tensors": len(new), "peak": peak}
    return figures | {"checkpoint": saving}, seconds


def test_a_bf16_checkpoint_is_held_in_bf16_and_a_round_aggregates_in_under_one_and_a_half_times_it(tmp_path):
    from safetensors.torch import save_file

    state = build_model(model_spec(RunConfig.from_run_config(KEYS), INFO), seed=1).net.state_dict()
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors")
    )
    del state
    for in_place in (True, False):
        m, seconds = round_memory(tmp_path, in_place)
        n, own = m["N"], m["peak"] - m["R"]
        assert n == 2 * 26_355_968  # 26.4 M weights held in bf16
        print(
            f"in_place={in_place}: N={n / 1e6:.1f} MB bf16; replies R={m['R'] / 1e6:.1f} MB; changed "
            f"{m['changed']}/{m['tensors']} tensors ({m['new'] / 1e6:.1f} MB); traced peak "
            f"{m['peak'] / 1e6:.1f} MB = R + {own / 1e6:.1f} MB ({own / n:.2f} N); "
            f"model + peak beyond the replies: {(n + own) / n:.2f} N; {seconds:.2f} s; "
            f"checkpoint written with {m['checkpoint'] / 1e6:.1f} MB"
        )
        assert m["checkpoint"] < 0.1 * n
        assert own < m["new"] + 0.25 * n  # new tensors (copying) and one tensor's temporaries: no model copy
        if in_place:
            assert n + own < 1.5 * n  # the model once, plus temporaries: under 1.5 N
