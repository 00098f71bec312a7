import numpy as np

from fedmoe_app.maths.aggregation import ClientUpdate, aggregate


def _global():
    return {
        "stem.w": np.array([0.0, 0.0], np.float32),
        "gate.weight": np.zeros((3, 2), np.float32),
        "gate.bias": np.zeros(3, np.float32),
        "experts.0.w1": np.array([1.0], np.float32),
        "experts.1.w1": np.array([2.0], np.float32),
        "experts.2.w1": np.array([3.0], np.float32),
    }


def test_per_expert_weighted_average_hand_computed():
    g = _global()
    a = ClientUpdate(  # holds experts 0 and 1; 10 examples
        arrays={
            "stem.w": np.array([1.0, 2.0], np.float32),
            "gate.weight": np.array([[1, 1], [2, 2], [9, 9]], np.float32),
            "gate.bias": np.array([1, 2, 9], np.float32),
            "experts.0.w1": np.array([10.0], np.float32),
            "experts.1.w1": np.array([20.0], np.float32),
        },
        num_examples=10,
        tokens=np.array([6.0, 14.0, 0.0]),
    )
    b = ClientUpdate(  # holds expert 1 only; 30 examples
        arrays={
            "stem.w": np.array([5.0, 6.0], np.float32),
            "gate.weight": np.array([[7, 7], [4, 4], [9, 9]], np.float32),
            "gate.bias": np.array([7, 4, 9], np.float32),
            "experts.1.w1": np.array([40.0], np.float32),
        },
        num_examples=30,
        tokens=np.array([0.0, 6.0, 0.0]),
    )
    out = aggregate(g, [a, b], gate_from_all=False)
    # shared: example-weighted (10, 30)
    np.testing.assert_allclose(out["stem.w"], [(10 * 1 + 30 * 5) / 40, (10 * 2 + 30 * 6) / 40])
    # expert 0: only a trained it -> its value
    np.testing.assert_allclose(out["experts.0.w1"], [10.0])
    # expert 1: token-weighted 14 and 6
    np.testing.assert_allclose(out["experts.1.w1"], [(14 * 20 + 6 * 40) / 20])
    # expert 2 trained by nobody: unchanged
    np.testing.assert_array_equal(out["experts.2.w1"], g["experts.2.w1"])
    # gate rows follow their expert's token weights over clients holding >= 2 experts:
    # b held one expert (its gate got no gradient), so row 1 is a's; untrained row 2 is unchanged
    np.testing.assert_allclose(out["gate.weight"][0], [1, 1])
    np.testing.assert_allclose(out["gate.weight"][1], [2, 2])
    np.testing.assert_array_equal(out["gate.weight"][2], [0, 0])
    np.testing.assert_allclose(out["gate.bias"], [1, 2, 0])
    assert all(out[k].dtype == g[k].dtype for k in g)
    # the input is not modified
    np.testing.assert_array_equal(g["experts.1.w1"], [2.0])
    # with a routing loss every client trained the whole gate: example-weighted over both
    routed = aggregate(g, [a, b], gate_from_all=True)
    np.testing.assert_allclose(routed["gate.bias"], [(10 * 1 + 30 * 7) / 40, (10 * 2 + 30 * 4) / 40, 9])
    # or row by row with single holders counted (the loss gave b's row 1 a gradient):
    # row 1 token-weighted 14 (a) and 6 (b); rows b does not hold stay a's
    rows = aggregate(g, [a, b], gate_from_all=False, single_holders=True)
    np.testing.assert_allclose(rows["gate.bias"], [1, (14 * 2 + 6 * 4) / 20, 0])
    np.testing.assert_allclose(routed["gate.weight"][:, 0], routed["gate.bias"])
    np.testing.assert_allclose(routed["experts.1.w1"], out["experts.1.w1"])  # experts unchanged


def test_no_updates_keeps_model():
    g = _global()
    out = aggregate(g, [], gate_from_all=False)
    for k in g:
        np.testing.assert_array_equal(out[k], g[k])


def test_gate_rows_token_weighted_over_multi_expert_holders():
    g = _global()

    def upd(row1, tokens, num_held):
        gate = np.zeros((3, 2), np.float32)
        gate[1] = row1
        return ClientUpdate(
            arrays={"stem.w": np.zeros(2, np.float32), "gate.weight": gate, "gate.bias": gate[:, 0].copy()},
            num_examples=10,
            tokens=np.array(tokens, dtype=float),
            num_held=num_held,
        )

    out = aggregate(
        g, [upd(3, [5, 15, 0], 2), upd(7, [0, 5, 0], 3), upd(100, [0, 40, 0], 1)], gate_from_all=False
    )
    np.testing.assert_allclose(out["gate.weight"][1], [(15 * 3 + 5 * 7) / 20] * 2)
    np.testing.assert_allclose(out["gate.bias"], [0, (15 * 3 + 5 * 7) / 20, 0])
    # Only single-expert holders: the gate got no gradient anywhere, it keeps its value.
    out = aggregate(g, [upd(100, [0, 40, 0], 1)], gate_from_all=False)
    np.testing.assert_array_equal(out["gate.weight"], g["gate.weight"])


def test_read_only_holder_trains_neither_gate_row_nor_expert():
    g = _global()
    frozen = ClientUpdate(  # held expert 2 read-only: returns shared tensors only
        arrays={
            "stem.w": np.array([4.0, 4.0], np.float32),
            "gate.weight": np.array([[0, 0], [0, 0], [5, 5]], np.float32),
            "gate.bias": np.array([0, 0, 5], np.float32),
        },
        num_examples=10,
        tokens=np.array([0.0, 0.0, 10.0]),
    )
    out = aggregate(g, [frozen], gate_from_all=False)
    np.testing.assert_array_equal(out["experts.2.w1"], g["experts.2.w1"])
    np.testing.assert_array_equal(out["gate.weight"], g["gate.weight"])  # one expert: no gate gradient
    np.testing.assert_allclose(out["stem.w"], [4, 4])


def test_gate_balancing_raises_the_bias_of_experts_the_gate_neglects():
    from fedmoe_app.maths.aggregation import balance_gate_bias

    arrays = {"gate.bias": np.zeros(4, np.float32), "gate.weight": np.ones((4, 3), np.float32)}
    hist = np.array([[10.0, 0.0, 5.0, 5.0], [10.0, 0.0, 5.0, 5.0]])  # load 20, 0, 10, 10: mean 10
    out = balance_gate_bias(arrays, hist, 0.25)
    np.testing.assert_array_equal(out["gate.bias"], [-0.25, 0.25, 0.0, 0.0])
    assert out["gate.bias"].dtype == np.float32 and arrays["gate.bias"].sum() == 0  # input kept
    np.testing.assert_array_equal(out["gate.weight"], arrays["gate.weight"])
    assert balance_gate_bias(arrays, np.zeros((2, 4)), 0.25)["gate.bias"].sum() == 0  # no choices
    assert balance_gate_bias(arrays, hist, 0.0)["gate.bias"].sum() == 0  # off
    # proportional: the gap over the mean load, clipped to +-1: (10-20)/10, (10-0)/10, 0, 0
    out = balance_gate_bias(arrays, hist, 0.25, step="proportional")
    np.testing.assert_allclose(out["gate.bias"], [-0.25, 0.25, 0.0, 0.0])
    near = np.array([[12.0, 8.0, 10.0, 10.0]])  # 20 % off balance: a fifth of the step
    out = balance_gate_bias(arrays, near, 0.25, step="proportional")
    np.testing.assert_allclose(out["gate.bias"], [-0.05, 0.05, 0.0, 0.0], rtol=1e-6)
    assert balance_gate_bias(arrays, near, 0.25)["gate.bias"].tolist() == [-0.25, 0.25, 0.0, 0.0]  # sign
