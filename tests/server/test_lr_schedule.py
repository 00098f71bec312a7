"""The server's learning rate per round: warm-up, then constant or cosine.

That the train messages carry it: ``tests/server/test_bf16_wire.py``.
"""

import math

import pytest

from fedmoe_app.config import RunConfig
from fedmoe_app.server.rounds import round_lr


def rounds(**keys):
    return RunConfig.from_run_config({"num-server-rounds": 10, "lr": 0.1, **keys}).round


def test_constant_is_the_run_config_lr_every_round():
    r = rounds()
    assert [round_lr(r, n) for n in range(1, 11)] == [0.1] * 10


def test_warm_up_rises_linearly_to_lr():
    r = rounds(**{"warmup-rounds": 4})
    assert [round_lr(r, n) for n in range(1, 7)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_cosine_decays_from_lr_to_lr_min_at_the_last_round():
    r = rounds(**{"lr-schedule": "cosine", "lr-min": 0.01})
    lrs = [round_lr(r, n) for n in range(1, 11)]
    assert lrs[-1] == pytest.approx(0.01)  # the last round: lr-min
    assert lrs[4] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: the mean
    assert lrs[0] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly falling
    assert round_lr(r, 12) == pytest.approx(0.01)  # past the run's rounds (a resumed run): lr-min


def test_cosine_after_warm_up():
    r = rounds(**{"lr-schedule": "cosine", "warmup-rounds": 2})
    lrs = [round_lr(r, n) for n in range(1, 11)]
    assert lrs[:2] == pytest.approx([0.05, 0.1])
    assert lrs[2] == pytest.approx(0.05 * (1 + math.cos(math.pi / 8)))  # 1 of the 8 cosine rounds
    assert lrs[-1] == pytest.approx(0.0)
