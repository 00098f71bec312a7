"""The CNN MoE's own checks: parameter split, routing loss.

What every model family must do is checked by tests/models/test_contract.py.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_spec

from fedmoe_app.models import REFERENCE_SPEC, build_model, count_parameters

SPEC = REFERENCE_SPEC


def test_experts_hold_most_parameters_by_default():
    for spec in (SPEC, make_spec(in_channels=3, image_size=32)):
        shared, experts = count_parameters(build_model(spec))
        assert experts / (shared + experts) >= 0.75


def test_routing_loss_teaches_the_full_gate_which_held_expert_fits():
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    full = build_model(SPEC, seed=0)
    full.route_loss_on = True
    assert float(full(x, y).route_loss) == 0.0  # every expert held: nothing to teach
    sub = build_model(SPEC, [2, 5], seed=0)
    assert float(sub(x, y).route_loss) == 0.0  # off unless the run weights it
    sub.route_loss_on = True
    out = sub(x, y)
    with torch.no_grad():
        feats = sub.stem(x)
        ce = torch.stack(
            [F.cross_entropy(sub.experts(feats, torch.full((16,), s)), y, reduction="none") for s in (0, 1)],
            1,
        )
        target = torch.softmax(-ce, dim=1)
        log_p = torch.log_softmax(sub.gate(feats), dim=1)[:, [2, 5]]
    assert float(out.route_loss) == pytest.approx(float(-(target * log_p).sum(1).mean()), rel=1e-5)
    # one step on the routing loss alone moves the full gate's mass towards the held experts,
    # with gradient on the rows of experts the client does not hold
    opt = torch.optim.SGD(sub.gate.parameters(), lr=1.0)
    opt.zero_grad()
    out.route_loss.backward()
    assert sub.gate.weight.grad[[0, 1, 3, 4, 6, 7]].abs().sum() > 0
    opt.step()
    assert float(sub(x, y).route_loss) < float(out.route_loss)
