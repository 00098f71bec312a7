"""Performance work: exact expert dispatch, device path, threads, benchmark CLIs.

No timing is asserted here; ``python -m fedmoe_app.tools.bench experts|dispatch|overhead`` measures
(see docs/PERFORMANCE.md).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_spec, train_args

from fedmoe_app import training
from fedmoe_app.data import Split
from fedmoe_app.models import build_model
from fedmoe_app.models.experts import Experts, dispatch_gather, dispatch_grouped, grouped_supported
from fedmoe_app.tools import bench
from fedmoe_app.training import evaluate, train

SPEC = make_spec(image_size=12)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GROUPED = pytest.mark.skipif(
    not grouped_supported(torch.device("cpu"), torch.float32),
    reason="torch.nn.functional.grouped_mm unavailable (torch < 2.8): the model uses gather",
)


def reference_experts(x, slots, w1, b1, w2, b2):
    """Straightforward per-row loop: row i through expert slots[i]."""
    rows = []
    for i in range(len(slots)):
        s = int(slots[i])
        rows.append(F.relu(x[i] @ w1[s] + b1[s]) @ w2[s] + b2[s])
    return torch.stack(rows)


def routing(batch, n, k, skewed, seed):
    gen = torch.Generator().manual_seed(seed)
    return bench.routing_slots(batch, n, k, skewed, gen)


def run_with_grads(fn, x, slots, weights, grad_out):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in weights]
    out = fn(x, slots, *ws)
    out.backward(grad_out)
    return [out.detach(), x.grad] + [w.grad for w in ws]


def random_weights(n, d, h, c, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, d, h, generator=gen) / math.sqrt(d),
        torch.randn(n, h, generator=gen),
        torch.randn(n, h, c, generator=gen) / math.sqrt(h),
        torch.randn(n, c, generator=gen),
    ]


DISPATCHES = [
    pytest.param(dispatch_grouped, id="grouped", marks=GROUPED),
    pytest.param(dispatch_gather, id="gather"),
]


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
@pytest.mark.parametrize(
    ("n", "d", "h", "c", "batch"),
    [(8, 64, 256, 10, 32), (64, 64, 256, 10, 64), (3, 10, 30, 7, 17), (1, 5, 6, 3, 9), (16, 8, 12, 4, 5)],
)
def test_dispatch_matches_per_row_reference(dispatch, skewed, n, d, h, c, batch):
    """Outputs and all gradients equal a per-row loop (unaligned sizes, empty experts included)."""
    k = min(2, n)
    slots = routing(batch, n, k, skewed, seed=n + batch)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(len(slots), d, generator=gen)
    grad_out = torch.randn(len(slots), c, generator=gen)
    weights = random_weights(n, d, h, c, seed=3)
    ref = run_with_grads(reference_experts, x, slots, weights, grad_out)
    got = run_with_grads(dispatch, x, slots, weights, grad_out)
    for name, a, b in zip(["out", "x", "w1", "b1", "w2", "b2"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if skewed and n > 4:  # the skewed case really is skewed, and leaves experts empty
        counts = torch.bincount(slots, minlength=n)
        assert counts.max() >= 3 * counts.float().mean() and (counts == 0).any()


@GROUPED
def test_skewed_to_one_expert_and_all_rows_one_expert():
    n, d, h, c = 8, 16, 32, 10
    weights = random_weights(n, d, h, c, seed=1)
    x = torch.randn(12, d)
    grad_out = torch.randn(12, c)
    for slots in (torch.full((12,), 5), torch.tensor([0] * 11 + [7])):
        ref = run_with_grads(reference_experts, x, slots, weights, grad_out)
        got = run_with_grads(dispatch_grouped, x, slots, weights, grad_out)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@GROUPED
def test_model_forward_backward_same_for_both_dispatches():
    """Whole model: logits, feedback and every parameter gradient agree between the paths."""
    x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))
    results = {}
    for method in ("grouped", "gather"):
        model = build_model(SPEC, [1, 2, 4, 6], seed=5)
        model.experts.dispatch = method
        assert model.experts.method(x) == method
        out = model(x, y)
        (F.cross_entropy(out.logits, y) + 0.01 * out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[method] = (out, grads)
    (a, ga), (b, gb) = results["grouped"], results["gather"]
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for field in ("tokens", "gate_hist", "expert_loss_sum"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(
            ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_auto_dispatch_and_bad_value():
    layer = Experts(4, 8, 16, 10)
    x = torch.randn(3, 8)
    expected = "grouped" if grouped_supported(x.device, x.dtype) else "gather"
    assert layer.method(x) == expected
    assert layer.method(x.double()) == "gather"  # grouped_mm has no float64: falls back
    out = layer.double()(x.double(), torch.tensor([0, 3, 3]))
    assert out.shape == (3, 10) and out.dtype == torch.float64
    layer.dispatch = "bogus"
    with pytest.raises(ValueError, match="dispatch"):
        layer(x.float(), torch.tensor([0, 1, 2]))


def test_dispatch_does_not_change_parameters_or_state_dict():
    model = build_model(SPEC, [0, 3], seed=0)
    assert set(model.state_dict()) == set(build_model(SPEC, [0, 3]).state_dict())
    assert model.experts.w1.shape == (2, SPEC.feature_dim, SPEC.expert_hidden)
    assert "dispatch" not in model.state_dict()


def synthetic_split(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def test_train_same_result_for_both_dispatches_and_frozen_experts():
    data = synthetic_split()
    params = {}
    for method in ("grouped", "gather"):
        model = build_model(SPEC, [0, 5, 7], seed=2)
        model.experts.dispatch = method
        res = train(model, data, **train_args(epochs=2, batch_size=16, lr=0.05, seed=3))
        params[method] = {k: v.clone() for k, v in model.state_dict().items()}
        assert res.tokens.sum() == 2 * len(data) * 2 and math.isfinite(res.loss)
    for key in params["grouped"]:
        torch.testing.assert_close(params["grouped"][key], params["gather"][key], rtol=1e-4, atol=1e-5)
    frozen = build_model(SPEC, [1, 2], seed=2)
    before = frozen.experts.w1.detach().clone()
    frozen.experts.requires_grad_(False)
    train(frozen, data, **train_args(epochs=1, batch_size=16, lr=0.05))
    assert torch.equal(frozen.experts.w1, before)


def test_train_restores_contiguous_layout_and_matches_plain_eval():
    """channels_last is internal to train/evaluate: weights come back NCHW-contiguous."""
    data = synthetic_split()
    model = build_model(SPEC, seed=0)
    train(model, data, **train_args(epochs=1, batch_size=32, lr=0.05))
    assert all(p.is_contiguous() for p in model.parameters())
    loss, acc = evaluate(model, data, batch_size=40)
    with torch.no_grad():
        logits = model.eval()(data.images).logits
    assert loss == pytest.approx(float(F.cross_entropy(logits, data.labels)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == data.labels).float().mean()))


def test_train_accumulates_on_device_like_per_batch_sums():
    """Loss/accuracy are the sample-weighted means over batches (incl. a short last batch)."""
    data = synthetic_split(n=50)
    model = build_model(SPEC, seed=4)
    res = train(model, data, **train_args(epochs=1, batch_size=16, lr=1e-9, momentum=0.0, aux_weight=0.0))
    loss, acc = evaluate(model, data)  # lr ~ 0: the weights did not move
    assert res.loss == pytest.approx(loss, rel=1e-4)
    assert res.accuracy == pytest.approx(acc)


def test_cpu_share_and_configure_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert training.cpu_share() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= training.cpu_share() <= (torch.get_num_threads() + 1024)
    before = torch.get_num_threads()
    monkeypatch.setattr(training, "_THREADS_SET", False)
    monkeypatch.setattr(training, "cpu_share", lambda: 1)
    try:
        assert training.configure_threads() == 1
        assert training.configure_threads() == 1  # once per process
    finally:
        torch.set_num_threads(before)


def test_make_sgd_matches_reference_sgd():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = training.make_sgd([a], lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD([b], lr=0.1, momentum=0.9, foreach=False)
    for step in range(3):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b)


@CUDA
def test_training_on_cuda_matches_cpu():
    """A few steps on the GPU give the same weights and feedback as on the CPU."""
    data = synthetic_split(n=64)
    results = {}
    for device in ("cpu", "cuda"):
        model = build_model(SPEC, [0, 2, 3], seed=1)
        res = train(model, data, **train_args(epochs=1, batch_size=16, lr=0.05, seed=0, device=device))
        assert next(model.parameters()).device.type == device
        loss, acc = evaluate(model, data, device=device)
        results[device] = (res, {k: v.detach().cpu() for k, v in model.state_dict().items()}, loss, acc)
    (rc, pc, lc, ac), (rg, pg, lg, ag) = results["cpu"], results["cuda"]
    assert rg.loss == pytest.approx(rc.loss, rel=1e-3, abs=1e-4)
    assert (rg.tokens == rc.tokens).all()
    for key in pc:
        torch.testing.assert_close(pg[key], pc[key], rtol=1e-3, atol=1e-4)
    assert lg == pytest.approx(lc, rel=1e-3, abs=1e-4) and ag == pytest.approx(ac, abs=1 / 64)


# --------------------------------------------------------------------------- benchmark CLIs
def test_bench_experts_and_dispatch_smoke(capsys):
    code = bench.main(
        [
            "experts",
            "--experts",
            "2,4",
            "--samples",
            "32",
            "--repeats",
            "1",
            "--image-size",
            "12",
            "--dispatch",
            "all",
        ]
    )
    assert code in (0, 1)  # 1 = criterion missed; timing is not asserted in unit tests
    out = capsys.readouterr().out
    assert "E=4 / E=2" in out and "gather" in out
    assert (
        bench.main(["dispatch", "--experts", "4", "--batch-sizes", "8", "--repeats", "1", "--iters", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "balanced" in out and "skewed" in out and "padded" in out


def test_bench_compute_sets_the_capacity_estimate_beside_the_measured_throughput(capsys):
    from fedmoe_app.capacity import REFERENCE_COSTS
    from fedmoe_app.tools.bench.compute import predicted_samples_per_s

    # round_time_s: G / (f_shared / e_shared + f_experts * min(k, top_k) / top_k / e_experts)
    (e_s, e_e), f_s, f_e = (
        REFERENCE_COSTS.efficiency,
        REFERENCE_COSTS.flops_shared,
        REFERENCE_COSTS.flops_experts,
    )
    for k, share in ((1, 0.5), (2, 1.0), (8, 1.0)):
        want = 100e9 / (f_s / e_s + f_e * share / e_e)
        assert predicted_samples_per_s(REFERENCE_COSTS, k, 100.0) == pytest.approx(want)
    args = ["compute", "--models", "cnn-moe", "--experts", "1,2", "--samples", "64", "--repeats", "1"]
    assert bench.main(args) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.count("|") == 3]
    assert [r[0].strip() for r in rows] == ["k", "1", "2"]
    for _, measured, predicted, ratio in rows[1:]:
        assert float(measured) > 0 and float(predicted) > 0
        assert float(ratio) == pytest.approx(float(predicted) / float(measured), abs=0.02)


def test_bench_alternatives_match_reference():
    weights = random_weights(6, 8, 12, 5, seed=0)
    for skewed in (False, True):
        slots = routing(10, 6, 2, skewed, seed=1)
        x = torch.randn(len(slots), 8)
        ref = reference_experts(x, slots, *weights)
        for fn in bench.ALTERNATIVES.values():
            torch.testing.assert_close(fn(x, slots, *weights), ref, rtol=1e-4, atol=1e-5)


def test_plain_loop_runs_an_assignment():
    cfg = bench.overhead_run_config(
        bench.build_parser().parse_args(
            [
                "overhead",
                "--dataset",
                "synthetic",
                "--clients",
                "3",
                "--rounds",
                "2",
                "--max-samples-per-client",
                "40",
            ]
        ),
        "x",
        "/tmp",
    )
    result = bench.plain_loop(
        cfg, 3, [{"0": [1, 2], "2": [0, 7]}, {"1": [3, 4]}], threads=torch.get_num_threads()
    )
    assert len(result["round_s"]) == 2 and len(result["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"])


def overhead_args(*, rounds: int, samples: int, central: int) -> list[str]:
    """``fedmoe-bench overhead`` arguments for a tiny synthetic run of two clients."""
    sizes = ["--clients", "2", "--rounds", str(rounds), "--max-samples-per-client", str(samples)]
    return ["overhead", "--dataset", "synthetic", *sizes, "--central-eval-samples", str(central)]


def test_bench_overhead_with_a_fake_app(monkeypatch, tmp_path, capsys):
    """The overhead report without Flower: a fake launch writes the app's metrics.json."""
    import fedmoe_app.tools.launch as launch_mod

    def fake_launch(app_dir, *, run_config, stream_to, output_root, **kwargs):
        out = tmp_path / "outputs" / run_config["run-name"]
        out.mkdir(parents=True)
        rows = [{"round": 0, "accuracy": 0.1}]
        rows += [
            {"round": r, "accuracy": 0.2, "wall_time_s": 0.5, "assignment": {"1": [0, 3]}} for r in (1, 2)
        ]
        (out / "metrics.json").write_text(json.dumps(rows))
        for line in ("Starting FedMoE", "[ROUND 0] central", "[ROUND 1/2]", "fedmoe: done"):
            stream_to.write(line + "\n")
        stream_to.flush()
        return 0

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    args = overhead_args(rounds=2, samples=32, central=50) + ["--workdir", str(tmp_path)]
    code = bench.main(args)
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "total wall incl. start-up" in out and "steady rounds" in out and "criterion" in out
    assert "launch -> ServerApp started" in out


@pytest.mark.slow
def test_bench_overhead_through_flwr_run(capsys):
    """The real comparison on tiny settings (one `flwr run` + one plain loop, ~40-60 s)."""
    args = overhead_args(rounds=1, samples=64, central=100) + ["--timeout", "300"]
    code = bench.main(args)
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "rounds: train + aggregate + central eval" in out
    line = next(x for x in out.splitlines() if x.startswith("total wall"))
    app_s, plain_s = (float(v) for v in line.split()[-3:-1])
    assert app_s > 0 and plain_s > 0
