"""A hostile client against the default config: real clients answer through the app's handlers.

Six clients train on synthetic data through ``handle_query`` / ``handle_train`` behind an
in-process Grid for three honest rounds (client ``0``, node 1, claims 10^12 examples in its
query from the start). In the fourth, client 0 tampers with what its handler returns: tensors
of 1e30, its honest update scaled x50, or its honest update weighted as its 10^12 examples
(``tests/maths/test_robust.py`` puts a random update behind the claim). With the default run
config (bounded influence on) the round ends within 2 points of the same round without client 0
(the best the server can do without its data). With the bounds off the first two cost more than
that and the claim makes client 0's reply the model (checked, so the test can fail).
"""

import copy
import functools

import numpy as np
import pytest
from fake_federation import ClientGrid

from fedmoe_app.client.handlers import handle_evaluate, handle_query, handle_train
from fedmoe_app.config import RunConfig
from fedmoe_app.data import load_splits, server_test_data
from fedmoe_app.models import build_model, load_arrays, model_spec, model_to_arrays
from fedmoe_app.server.strategy import FedMoE
from fedmoe_app.tensors import is_gate_key
from fedmoe_app.training import evaluate
from fedmoe_app.wire.protocol import ARRAYS, CONFIG, FEEDBACK, METRICS, PROFILE
from fedmoe_app.wire.records import from_record, to_record

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("serverapp_identity")]  # 9 runs of 4 rounds

KEYS = {
    "dataset": "synthetic",
    "dirichlet-alpha": 0.5,
    "num-experts": 4,
    "experts-per-client": 3,
    "capacity": "fixed",
    "stem-channels": 4,
    "feature-dim": 16,
    "expert-hidden": 32,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-evaluate-nodes": 0,
    "device": "cpu",
    "optimizer": "adamw",
    "lr": 0.01,
    "local-epochs": 1,
}
OFF = {"update-bound": 0.0, "weight-cap": 0.0, "token-cap": 0.0}
CLAIM = 10**12


def tamper(kind, sent, content):
    """Return the train reply ``content`` of node 1 as the attack ``kind`` rewrites it."""
    arrays, base = from_record(content[ARRAYS]), from_record(sent.content[ARRAYS])
    if kind == "huge":
        arrays = {k: np.full_like(v, 1e30) for k, v in arrays.items()}
    elif kind == "scaled":
        arrays = {k: (base[k] + 50 * (v - base[k])).astype(v.dtype) for k, v in arrays.items()}
    else:  # "claim": its own update, weighted as 10^12 examples (token counts scaled alike)
        n = content[METRICS]["num-examples"]
        content[METRICS]["num-examples"] = CLAIM
        for key in ("layer-tokens", "layer-loss-sum", "layer-gate-hist"):
            content[FEEDBACK][key] = [x * CLAIM / n for x in content[FEEDBACK][key]]
    content[ARRAYS] = to_record(arrays)
    return content


def hostile_handlers(kind, attack_round=4, replied=None):
    """The app's handlers; node 1's query claims 10^12 examples, its reply in ``attack_round`` is tampered.

    ``replied`` receives the tampered arrays.
    """

    def query(msg, context):
        content = handle_query(msg, context)
        if context.node_id == 1:
            content[PROFILE]["num-examples"] = CLAIM
        return content

    def train(msg, context):
        if context.node_id == 1 and msg.content[CONFIG]["server-round"] == attack_round:
            if kind == "absent":
                raise RuntimeError("client 0 sits the round out")
            if kind is not None:
                content = tamper(kind, msg, handle_train(msg, context))
                if replied is not None:
                    replied.update(from_record(content[ARRAYS]))
                return content
        return handle_train(msg, context)

    return {"query": query, "train": train, "evaluate": handle_evaluate}


class FailingClientGrid(ClientGrid):
    """A ClientGrid whose handlers may raise: such a node gives no reply (a failed client)."""

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            try:
                replies += super().send_and_receive([m], timeout)
            except RuntimeError:
                pass
        return replies


@functools.cache
def three_honest_rounds(bounded):
    """The strategy and global model after three honest rounds, bounds on (default) or off."""
    keys = {**KEYS, **({} if bounded else OFF)}
    cfg = RunConfig.from_run_config(keys)
    spec = model_spec(cfg, load_splits("synthetic", "", 0)[2])
    strategy = FedMoE.from_run_config(cfg, spec, model_to_arrays(build_model(spec, seed=0)))
    model = {}
    grid = FailingClientGrid(keys, 6, handlers=hostile_handlers(None))
    strategy.start(
        grid, num_rounds=3, on_round=lambda row, a: model.update({k: v.copy() for k, v in a.items()})
    )
    return keys, spec, strategy, model


def fourth_round(kind, *, bounded):
    """Round 4 with client 0 acting as ``kind``: global accuracy, outcome, model, client 0's reply."""
    keys, spec, start, arrays = three_honest_rounds(bounded)
    strategy, replied = copy.deepcopy(start), {}
    grid = FailingClientGrid(keys, 6, handlers=hostile_handlers(kind, replied=replied))
    with np.errstate(all="ignore"):
        train_round = strategy.plan_train(4, arrays, grid)
        replies = grid.send_and_receive(train_round.messages, timeout=60.0)
        model, outcome = strategy.aggregate_round(arrays, replies, train_round)
    net = build_model(spec)
    load_arrays(net, model)
    test, _ = server_test_data("synthetic", max_samples=0, data_dir="", seed=0)
    return evaluate(net, test)[1], outcome, model, replied


def test_the_bounds_are_on_by_default():
    cfg = RunConfig()
    assert cfg.update_bound > 0 and cfg.weight_cap > 0


@pytest.mark.parametrize("kind", ["huge", "scaled", "claim"])
def test_one_hostile_client_under_the_default_config(kind):
    without = fourth_round("absent", bounded=True)[0]
    protected, outcome, _, _ = fourth_round(kind, bounded=True)
    unbounded, _, model, replied = fourth_round(kind, bounded=False)
    assert without > 0.4, without  # the honest rounds learned (chance: 0.1)
    if kind == "claim":  # the attack bites: unbounded, what client 0 returned is the new model
        taken = [k for k in replied if not is_gate_key(k)]  # router rows it did not hold are others'
        assert taken and all(np.allclose(model[k], replied[k], rtol=1e-5, atol=1e-7) for k in taken)
    else:  # the attack bites (NaN included)
        assert not unbounded >= without - 0.02, (kind, without, unbounded)
    assert protected >= without - 0.02, (kind, without, unbounded, protected)
    assert outcome.valid_replies == 6
    if kind == "claim":  # the example weight is capped (the claim was its bound from the first query)
        assert outcome.capped_weights == 1, outcome
    else:  # the shared update is far off: the reply is left out
        assert outcome.dropped_updates >= 1, outcome
