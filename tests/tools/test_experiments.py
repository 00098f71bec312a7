"""The experiment command: grid, summary/aggregation (fast, no Flower) and `compare --quick` (slow)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe_app.config import ConfigError
from fedmoe_app.tools import experiments as ex

ROOT = Path(__file__).resolve().parents[2]


def fake_rounds(accs, *, down=1e6, up=5e5, cv=0.2, vtime=2.0, num_experts=4):
    """metrics.json rows: round 0 (initial) plus one row per accuracy."""
    rows = [{"round": 0, "accuracy": 0.1, "loss": 2.3, "failures": 0}]
    for i, a in enumerate(accs, start=1):
        rows.append(
            {
                "round": i,
                "accuracy": a,
                "loss": 1.0,
                "bytes_down": down,
                "bytes_up": up,
                "dense_bytes_down": 2 * down,
                "expert_load": [float(i + e) for e in range(num_experts)],
                "load_cv": cv,
                "virtual_round_time_s": vtime,
                "assignment": {"0": [0, 1]},
                "failures": 0,
                "client_accuracy": a + 0.1,  # personalized view: clients' own experts
                "client_accuracy_worst10": a - 0.1,
                "wall_time_s": 1.5,
            }
        )
    return rows


def results():
    r = ex.FinishedRun
    return [
        # setting a: dense final 0.80 and 0.60 -> target 0.95 * 0.70 = 0.665
        r("a", "dense", 0, fake_rounds([0.5, 0.7, 0.8])),
        r("a", "dense", 1, fake_rounds([0.3, 0.5, 0.6])),
        # greedy: one seed reaches 0.665 in round 2, the other never
        r("a", "greedy", 0, fake_rounds([0.6, 0.7, 0.65], vtime=None)),
        r("a", "greedy", 1, fake_rounds([0.2, 0.3, 0.4], vtime=None)),
        # setting b has no dense run: no target
        r("b", "greedy", 0, fake_rounds([0.4, 0.5, 0.9])),
    ]


def test_summarize_mean_std_and_rounds_to_target():
    rows = ex.summarize(results(), last_n=2, settings=["a", "b"], policies=["greedy", "dense"])
    assert [(r.setting, r.policy) for r in rows] == [("a", "greedy"), ("a", "dense"), ("b", "greedy")]
    greedy, dense, b = rows
    assert dense.runs == 2 and dense.seeds == [0, 1]
    assert dense.final_acc == pytest.approx(0.7)
    assert dense.final_acc_std == pytest.approx(math.sqrt(0.02))  # sample std of 0.8, 0.6
    assert dense.best_acc == pytest.approx(0.7)
    assert dense.last_n_acc == pytest.approx((0.75 + 0.55) / 2)
    assert dense.target == pytest.approx(0.665)
    # dense seed 0 reaches 0.665 in round 2, seed 1 never (0.6)
    assert dense.rounds_to_target == 2 and dense.reached == 1
    assert greedy.target == pytest.approx(0.665)
    assert greedy.rounds_to_target == 2 and greedy.reached == 1
    assert greedy.final_acc == pytest.approx(0.525)
    assert greedy.best_acc == pytest.approx((0.7 + 0.4) / 2)
    assert greedy.virtual_time_s is None
    assert dense.virtual_time_s == pytest.approx(6.0)
    assert dense.mb_down == pytest.approx(3.0) and dense.mb_up == pytest.approx(1.5)
    assert dense.dense_mb_down == pytest.approx(6.0)
    assert dense.load_cv == pytest.approx(0.2)
    assert dense.wall_time_s == pytest.approx(4.5)
    # one run: no std, no target without a dense baseline
    assert b.runs == 1 and b.final_acc_std is None and b.target is None and b.rounds_to_target is None


def test_rounds_to_target_all_seeds():
    runs = [
        ex.FinishedRun("a", "dense", 0, fake_rounds([0.5, 0.9, 1.0])),
        ex.FinishedRun("a", "x", 0, fake_rounds([0.96, 0.9, 0.97])),
        ex.FinishedRun("a", "x", 1, fake_rounds([0.1, 0.2, 0.95])),
    ]
    rows = {r.policy: r for r in ex.summarize(runs)}
    assert rows["x"].target == pytest.approx(0.95)
    assert rows["x"].rounds_to_target == pytest.approx(2.0) and rows["x"].reached == 2
    assert ex.rounds_to_target(runs[1].rounds, 0.99) is None
    assert ex.last_n_mean(runs[1].rounds, 5) == pytest.approx((0.96 + 0.9 + 0.97) / 3)


def test_format_table_and_csv():
    rows = ex.summarize(results(), last_n=2, settings=["a", "b"], policies=["greedy", "dense"])
    table = ex.format_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| setting | policy | final acc. (%) |") and "last-2 mean (%)" in lines[0]
    assert lines[1].startswith("|---|---|---:|")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]  # a / dense
    assert cells[:3] == ["a", "dense", "70.00 ± 14.14"]
    assert "personalized last-2 (%)" in lines[0] and "worst 10% last-2 (%)" in lines[0]
    # last 2 rounds: dense seeds (0.7, 0.8) and (0.5, 0.6) -> 0.75, 0.55; +0.1 personalized
    assert cells[4:7] == ["65.00 ± 14.14", "75.00 ± 14.14", "55.00"]
    assert cells[7] == "2.0 (1/2)"
    assert cells[8:10] == ["3.0", "1.5"] and cells[-1] == "2"
    greedy = [c.strip() for c in lines[2].strip("|").split("|")]
    assert greedy[11] == "—"  # no virtual time
    b = [c.strip() for c in lines[4].strip("|").split("|")]
    assert b[2] == "90.00" and b[7] == "—"  # one seed: no ±; no dense: no target
    csv_text = ex.rows_to_csv(rows)
    header, first = csv_text.splitlines()[:2]
    assert header.startswith("setting,policy,runs,seeds,final_acc,final_acc_std")
    assert first.startswith("a,greedy,2,0;1,0.525,")
    md = ex.summary_markdown(rows, title="t", complete=5, total=16, plots=["/x/accuracy.png"])
    assert "5 of 16 runs complete" in md and "![accuracy](accuracy.png)" in md and "a: 66.50%" in md


def test_default_and_quick_grids():
    grid = ex.build_grid()
    runs = grid.runs()
    assert len(runs) == 16 and len({r.name for r in runs}) == 16
    assert {r.policy for r in runs} == {"random", "greedy", "load_balanced", "dense"}
    assert sorted({(r.setting, r.seed) for r in runs}) == [
        ("alpha=0.1", 0),
        ("alpha=0.1", 1),
        ("alpha=0.1", 2),
        ("alpha=0.5", 0),
    ]
    # seed-major: the first 8 runs cover every policy in both settings
    assert {(r.setting, r.policy) for r in runs[:8]} == {
        (s, p) for s in ("alpha=0.1", "alpha=0.5") for p in grid.policies
    }
    cfg = runs[0].run_config
    assert grid.num_clients == 20 and cfg["num-server-rounds"] >= 30 and cfg["fraction-train"] == 0.5
    assert cfg["capacity"] == "profiled" and cfg["num-experts"] == 8
    assert cfg["experts-per-client"] == 4  # the laptops' 4 experts are not capped to 2
    for key, value in ex.LOCAL_WORK.items():
        assert cfg[key] == value
    grid.validate()
    quick = ex.build_grid(quick=True)
    assert [r.policy for r in quick.runs()] == ["greedy", "load_balanced"]
    assert quick.num_clients == 4 and quick.runs()[0].run_config["dataset"] == "synthetic"
    assert quick.runs()[0].num_rounds == 3
    custom = ex.build_grid(rounds=40, policies=["dense"], seeds=[3], alphas=[1.0], overrides={"lr": 0.01})
    (run,) = custom.runs()
    assert run.name == "alpha1-dense-s3" and run.run_config["lr"] == 0.01 and run.num_rounds == 40
    assert ex.ExperimentGrid.from_dict(json.loads(json.dumps(grid.to_dict()))).runs() == runs


def test_grid_of_a_natural_partition_has_one_setting():
    text = {"dataset": "fortunes", "model": "transformer-moe", "partitioner": "natural"}
    grid = ex.build_grid(policies=["dense", "random"], seeds=[0, 1], clients=8, overrides=text)
    names = [r.name for r in grid.runs()]
    assert sorted(names) == ["natural-dense-s0", "natural-dense-s1", "natural-random-s0", "natural-random-s1"]
    assert {r.run_config["partitioner"] for r in grid.runs()} == {"natural"}
    grid.validate()
    with pytest.raises(ConfigError, match="--alphas needs partitioner 'dirichlet'"):
        ex.build_grid(alphas=[0.1], overrides=text)


def test_parse_set():
    assert ex.parse_set(["dataset=cifar10", "data-dir=/d/x", "lr=0.01", "batch-size=64"]) == {
        "dataset": "cifar10",
        "data-dir": "/d/x",
        "lr": 0.01,
        "batch-size": 64,
    }
    assert ex.parse_value("true") is True and ex.parse_value(" 2 ") == 2 and ex.parse_value("1e-3") == 0.001
    assert ex.parse_set(["device-mix='phone=1'"]) == {"device-mix": "phone=1"}
    with pytest.raises(ConfigError, match="unknown run-config key"):
        ex.parse_set(["nope=1"])
    with pytest.raises(ConfigError, match="set by the grid"):
        ex.parse_set(["policy=dense"])
    with pytest.raises(ConfigError, match="'lr'"):
        ex.build_grid(overrides={"lr": "fast"}).validate()


def test_progress_eta():
    runs = ex.build_grid(quick=True, seeds=[0, 1]).runs()
    p = ex.Progress(Path("/nonexistent"), runs, jobs=1)
    assert p.eta_s(100.0) is None
    a, b, c, d = p.states
    a.status, a.started_at, a.rounds_done = "running", 0.0, 1
    assert p.eta_s(10.0) == pytest.approx(30.0 - 10.0 + 3 * 30.0)  # 10 s per round, 3 rounds
    # start-up until round 1 (8 s) is counted once, then the rate of later rounds (2 s)
    a.first_round, a.first_round_s, a.rounds_done = 1, 8.0, 2
    assert p.run_estimate(10.0) == pytest.approx(8.0 + 2 * 2.0)
    a.status, a.duration_s = "done", 40.0
    b.status, b.started_at = "running", 100.0
    assert p.eta_s(110.0) == pytest.approx(30.0 + 2 * 40.0)
    # once b has rounds, its own pace replaces the mean: round 1 after 5 s, round 2 after
    # 10 s -> 5 + 2 * 5 = 15 s in all, 5 s left
    b.first_round, b.first_round_s, b.rounds_done = 1, 5.0, 2
    assert p.eta_s(110.0) == pytest.approx(5.0 + 2 * 40.0)
    assert ex.fmt_duration(3725) == "1h02m" and ex.fmt_duration(65) == "1m05s"
    assert ex.fmt_duration(None) == "?"


def write_fake_experiment(exp_dir, grid, accs=(0.3, 0.5, 0.6)):
    for i, run in enumerate(grid.runs()):
        out = ex.run_dir(exp_dir, run)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(fake_rounds([a + 0.01 * i for a in accs])))
        (out / "config.json").write_text(json.dumps(dict(run.run_config)))


def test_summary_files_and_skip_complete_runs_without_launching(tmp_path):
    grid = ex.build_grid(quick=True, policies=["greedy", "dense"], seeds=[0, 1])
    write_fake_experiment(tmp_path, grid)
    t0 = time.monotonic()
    progress = ex.run_grid(grid, tmp_path, app_dir=tmp_path / "no-app")  # nothing may be launched
    assert time.monotonic() - t0 < 60
    assert [s.status for s in progress.states] == ["skipped"] * 4
    doc = json.loads((tmp_path / "progress.json").read_text())
    assert doc["status"] == "finished" and doc["skipped"] == 4 and doc["total"] == 4
    for name in ("summary.md", "summary.csv", "accuracy.png", "expert_load.png", "experiment.json"):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "summary.md").read_text()
    assert "| alpha=0.5 | greedy |" in table and "| alpha=0.5 | dense |" in table
    # a run folder made with another config is refused, not silently reused
    cfg = json.loads((ex.run_dir(tmp_path, grid.runs()[0]) / "config.json").read_text())
    (ex.run_dir(tmp_path, grid.runs()[0]) / "config.json").write_text(json.dumps({**cfg, "batch-size": 64}))
    with pytest.raises(ConfigError, match="another config"):
        ex.run_grid(grid, tmp_path, app_dir=tmp_path / "no-app")


def test_incomplete_runs_are_left_out_of_the_summary(tmp_path):
    grid = ex.build_grid(quick=True)
    write_fake_experiment(tmp_path, grid, accs=(0.3, 0.5))  # 2 of 3 rounds
    first = ex.run_dir(tmp_path, grid.runs()[0])
    (first / "metrics.json").write_text(json.dumps(fake_rounds([0.3, 0.5, 0.7])))
    results, total = ex.collect_results(tmp_path, grid)
    assert total == 2 and [r.policy for r in results] == ["greedy"]
    rows = ex.write_summary(tmp_path, grid)
    assert len(rows) == 1 and "1 of 2 runs complete" in (tmp_path / "summary.md").read_text()


def test_summary_needs_neither_flower_nor_torch():
    code = (
        "import sys, fedmoe_app.tools.experiments as ex; "
        "ex.summarize([]); ex.format_table([]); "
        "bad = [m for m in ('flwr', 'torch', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.slow
def test_compare_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "fedmoe_app.tools.experiments", "compare", "--quick", "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    first = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[2/2]" in proc.stdout and "ETA" in proc.stdout
    for name in (
        "summary.md",
        "summary.csv",
        "to_target.csv",
        "accuracy.png",
        "accuracy_vs_bytes.png",
        "expert_load.png",
        "progress.json",
    ):
        assert (out / name).is_file(), name
    summary, to_target = (
        (out / "summary.md")
        .read_text()
        .split("Mean accuracy per round window")[0]
        .split("Time and bytes to target")
    )
    table = [line for line in summary.splitlines() if line.startswith("| alpha")]
    assert [line.split("|")[2].strip() for line in table] == ["greedy", "load_balanced"]
    views = [line.split("|")[3].strip() for line in to_target.splitlines() if line.startswith("| alpha")]
    assert views == ["global", "global", "personalized", "personalized"]
    csv_rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3
    for policy in ("greedy", "load_balanced"):
        run = out / "runs" / f"alpha0.5-{policy}-s0"
        rows = json.loads((run / "metrics.json").read_text())
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        # Heterogeneous capacity as the grid intends: phones hold 1 expert, laptops 4.
        caps = {c for r in rows[1:] for c in r["capacity"].values()}
        assert caps == {1, 4}, caps
        assert (out / "logs" / f"alpha0.5-{policy}-s0.log").is_file()
    doc = json.loads((out / "progress.json").read_text())
    assert doc["done"] == 2 and doc["failed"] == 0 and doc["status"] == "finished"

    t0 = time.monotonic()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    second = time.monotonic() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 complete, skipped" in again.stdout
    assert second < min(30.0, first / 2)
    assert json.loads((out / "progress.json").read_text())["skipped"] == 2


def test_window_table_both_views():
    from fedmoe_app.tools.experiments.summary import round_windows, window_table

    assert round_windows(60) == [(1, 20), (21, 40), (41, 60)] and round_windows(3) == [(1, 1), (2, 2), (3, 3)]
    table = window_table(results(), [(1, 2), (3, 3)], settings=["a", "b"], policies=["dense", "greedy"])
    lines = table.strip().splitlines()
    assert lines[0] == "| setting | policy | global 1-2 | global 3-3 | personalized 1-2 | personalized 3-3 |"
    dense = [c.strip() for c in lines[2].strip("|").split("|")]
    # dense seeds: rounds 1-2 means 0.6 and 0.4; round 3: 0.8 and 0.6; personalized = + 0.1
    assert dense == ["a", "dense", "50.00 ± 14.14", "70.00 ± 14.14", "60.00 ± 14.14", "80.00 ± 14.14"]
    assert lines[4].startswith("| b | greedy | 45.00 |")  # one seed: no ±


def test_text_grid_summary_reports_bits_per_byte_per_group(tmp_path):
    text = {"dataset": "fortunes", "model": "transformer-moe", "partitioner": "natural"}
    grid = ex.build_grid(rounds=3, policies=["load_balanced", "dense"], seeds=[0, 1], overrides=text)
    for run in grid.runs():
        rows = fake_rounds([0.2, 0.3, 0.4])
        worse = run.policy == "dense"
        for r in rows:  # bits per byte fall over rounds; dense is 1 bit worse; de differs by seed
            r.update({"bpb": 8.0 - r["round"] + worse, "bpb_en": 7.0 - r["round"], "bpb_de": 6.0 + run.seed})
            r["client_loss"] = math.log(2) * (5.0 - r["round"])  # nats: 4, 3, 2 bits
        out = ex.run_dir(tmp_path, run)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(rows))
        (out / "config.json").write_text(json.dumps(dict(run.run_config)))
    ex.write_summary(tmp_path, grid)
    md = (tmp_path / "summary.md").read_text()
    assert (
        "| setting | policy | runs | global bpb | personalized bpb | de | en | MB down/round (dense) |" in md
    )
    # last-5 of rounds 1..3: global 7, 6, 5 -> 6 (+1 for dense); personalized 3; de 6 and 7 by seed
    assert (
        "| natural | load_balanced | 2 | 6.00 ± 0.00 | 3.00 ± 0.00 | 6.50 ± 0.71 | 5.00 ± 0.00 "
        "| 1.00 (2.00) |" in md
    )
    assert (
        "| natural | dense | 2 | 7.00 ± 0.00 | 3.00 ± 0.00 | 6.50 ± 0.71 | 5.00 ± 0.00 | 1.00 (2.00) |" in md
    )
    for png in ("bpb.png", "personalized_bpb.png", "bpb_per_group.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md
