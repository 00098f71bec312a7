"""Rounds through the real server functions (fake grid) with wire-dtype bf16: half the bytes, same model."""

import numpy as np
import pytest
from conftest import make_spec
from fake_federation import FakeGrid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import RunConfig
from fedmoe_app.models import build_model, model_to_arrays
from fedmoe_app.server.rounds import round_lr
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.wire.records import BF16, wire_dtypes

SPEC = make_spec(num_experts=4, top_k=2)  # 4 experts of 33k weights: the .npy headers are < 1 %
START = model_to_arrays(build_model(SPEC, seed=0))


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


class Run:
    """A run of ``rounds`` rounds of 4 fake clients; its rows, final model and the messages sent."""

    def __init__(self, wire, rounds=3, **keys):
        base = {"capacity": "fixed", "experts-per-client": 2, "num-experts": 4, "fraction-train": 1.0}
        evaluate = {"fraction-evaluate": 1.0, "min-evaluate-nodes": 1}
        self.cfg = RunConfig.from_run_config(
            {**base, **evaluate, "num-server-rounds": rounds, "wire-dtype": wire, **keys}
        )
        self.grid = FakeGrid(4, num_experts=4, top_k=2, scale=0.05, seed=3)
        self.messages, self.rows, self.model = [], [], {}
        send = self.grid.send_and_receive

        def spy(messages, timeout):
            self.messages.extend(messages)
            return send(messages, timeout)

        self.grid.send_and_receive = spy
        strategy = FedMoE.from_run_config(self.cfg, SPEC, START)
        strategy.start(self.grid, num_rounds=rounds, on_round=self._on_round)

    def _on_round(self, row, arrays):
        self.rows.append(row)
        self.model = dict(arrays)

    def of_type(self, kind):
        return [m for m in self.messages if m.metadata.message_type == kind]


def test_bf16_halves_the_bytes_and_gives_the_fp32_model_to_bf16_precision_of_the_update():
    fp32, bf16 = Run("fp32"), Run("bf16")
    for r32, r16 in zip(fp32.rows, bf16.rows, strict=True):
        assert r16["valid_replies"] == r32["valid_replies"] == 4 and not r16["rejected"]
        for key in ("bytes_down", "bytes_up", "dense_bytes_down"):
            assert r16[key] == pytest.approx(r32[key] / 2, rel=0.03), key
    # the server adds the replies' bf16 changes to its float32 model: the model moves as in fp32,
    # up to bf16's 8 significant bits of the *update* (bf16 weights would be off by 2^-9 x weight)
    for k, v in fp32.model.items():
        update = v - START[k]
        assert bf16.model[k].dtype == np.float32
        assert np.abs(bf16.model[k] - v).max() <= 2**-8 * np.abs(update).max() + 1e-9, k
    assert any(np.abs(bf16.model[k] - v).max() > 0 for k, v in fp32.model.items())  # it did round
    sent = [m.content["arrays"] for m in bf16.of_type("train") + bf16.of_type("evaluate")]
    assert bf16.of_type("evaluate") and all(set(wire_dtypes(r).values()) == {BF16} for r in sent)
    _, received = bf16.grid.sent[0]  # decoded by the client: float32 holding bf16 values
    assert all(v.dtype == np.float32 and not (v.view(np.uint32) & 0xFFFF).any() for v in received.values())


def test_the_round_lr_is_what_the_train_messages_carry():
    keys = {"lr-schedule": "cosine", "warmup-rounds": 1, "lr": 0.2, "lr-min": 0.02}
    run = Run("fp32", rounds=3, **keys)
    sent = [m.content["config"]["lr"] for m in run.of_type("train")]
    expected = [round_lr(run.cfg.round, n) for n in (1, 2, 3) for _ in range(4)]
    assert sent == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.2) and expected[-1] == pytest.approx(0.02)
    assert expected[4] == pytest.approx(0.11)  # half-way through the cosine
