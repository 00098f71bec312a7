"""Time and bytes to a target accuracy: per run, over seeds, in summary.md, and from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_experiments import fake_rounds, write_fake_experiment

from fedmoe_app.tools import experiments as ex
from fedmoe_app.tools.experiments.metrics import reach
from fedmoe_app.tools.experiments.plots import bytes_curves
from fedmoe_app.tools.experiments.to_target import parse_targets, resolve_targets, target_table, to_target

ROOT = Path(__file__).resolve().parents[2]


def test_reach_sums_bytes_and_virtual_time_up_to_the_first_round_at_target():
    rows = fake_rounds([0.5, 0.7, 0.8], down=3e6, vtime=2.5)
    rows[2]["virtual_round_time_s"] = None  # a round without a clock reading is skipped
    hit = reach(rows, 0.7)
    assert (hit.round, hit.bytes_down, hit.virtual_time_s) == (2, 6e6, 2.5)
    # the personalized view reads client_accuracy (accuracy + 0.1 in these rows)
    assert reach(rows, 0.6).round == 2 and reach(rows, 0.6, "client_accuracy").round == 1
    assert reach(rows, 0.81) is None
    assert reach(fake_rounds([0.9], vtime=None), 0.5).virtual_time_s is None


def runs():
    r = ex.FinishedRun
    return [
        # dense sends 4 MB a round, sparse 1 MB
        r("a", "dense", 0, fake_rounds([0.5, 0.7, 0.8], down=4e6)),
        r("a", "dense", 1, fake_rounds([0.6, 0.75, 0.8], down=4e6)),
        r("a", "sparse", 0, fake_rounds([0.4, 0.5, 0.7], down=1e6, vtime=1.0)),
        r("a", "sparse", 1, fake_rounds([0.3, 0.4, 0.5], down=1e6, vtime=1.0)),  # never 0.7
    ]


def test_to_target_rounds_bytes_time_per_view_and_against_the_baseline():
    rows = to_target(runs(), parse_targets(["global=0.7", "a:personalized=0.85"]))
    got = {(r.policy, r.view): r for r in rows}
    assert [(r.view, r.policy) for r in rows] == [
        ("global", "dense"),
        ("global", "sparse"),
        ("personalized", "dense"),
        ("personalized", "sparse"),
    ]
    dense, sparse = got[("dense", "global")], got[("sparse", "global")]
    assert dense.target == 0.7 and (dense.reached, dense.runs) == (2, 2)
    assert dense.rounds == 2.0 and dense.rounds_std == 0.0 and dense.mb_down == 8.0
    assert dense.virtual_s == 4.0 and dense.bytes_vs_baseline == 1.0
    assert (sparse.reached, sparse.rounds, sparse.rounds_std) == (1, 3.0, None)
    assert sparse.mb_down == 3.0 and sparse.virtual_s == 3.0
    assert sparse.bytes_vs_baseline == pytest.approx(3.0 / 8.0)
    # personalized = accuracy + 0.1: dense reaches 0.85 in round 3 (seed 0) and 2 (seed 1)
    p = got[("dense", "personalized")]
    assert p.target == 0.85 and p.rounds == 2.5 and p.mb_down == 10.0
    assert got[("sparse", "personalized")].reached == 0 and got[("sparse", "personalized")].mb_down is None
    table = target_table(rows)
    assert "| a | sparse | global | 70.00 | 3.0 | 3.0 | 0.38 | 3 | 1/2 |" in table
    assert "| a | sparse | personalized | 85.00 | — | — | — | — | 0/2 |" in table


def test_default_targets_are_95_percent_of_the_baselines_final_in_each_view():
    targets = resolve_targets(runs())
    assert targets[("a", "global")] == pytest.approx(0.95 * 0.8)
    assert targets[("a", "personalized")] == pytest.approx(0.95 * 0.9)
    # a setting's own target beats one for every setting; a setting without dense has none
    lone = [ex.FinishedRun("b", "sparse", 0, fake_rounds([0.5]))]
    given = resolve_targets(runs() + lone, parse_targets(["global=0.6", "a:global=0.7"]))
    assert given[("a", "global")] == 0.7 and given[("b", "global")] == 0.6
    assert given[("b", "personalized")] is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("global", "VIEW=VALUE"),
        ("local=0.7", "global, personalized"),
        ("global=75", r"\(0, 1\]"),
        ("global=fast", r"\(0, 1\]"),
        ("alpha=0.3:global=0.7", "setting 'alpha=0.3'; allowed: alpha=0.1, alpha=0.5"),
    ],
)
def test_bad_targets_are_refused_naming_what_is_allowed(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_targets([spec], ["alpha=0.1", "alpha=0.5"])


def test_bytes_curves_start_at_zero_and_accumulate_bytes_down():
    mb, acc = bytes_curves(runs()[:2])
    assert mb.tolist() == [0.0, 4.0, 8.0, 12.0]
    assert acc == pytest.approx([0.1, 0.55, 0.725, 0.8])


def test_summarize_keeps_the_given_targets_for_later_summaries(tmp_path):
    grid = ex.build_grid(quick=True, policies=["greedy", "dense"], seeds=[0, 1])
    write_fake_experiment(tmp_path, grid)  # accuracies 0.3, 0.5, 0.6 (+0.01 per run)
    (tmp_path / "experiment.json").write_text(json.dumps(grid.to_dict()))
    cli = [sys.executable, "-m", "fedmoe_app.tools.experiments", "summarize", str(tmp_path)]
    bad = subprocess.run([*cli, "--target", "alpha=9:global=0.5"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "names setting 'alpha=9'" in bad.stderr
    assert not (tmp_path / "targets.json").exists()
    done = subprocess.run([*cli, "--target", "global=0.5"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "targets.json").read_text()) == ["global=0.5"]
    ex.write_summary(tmp_path, grid)  # no targets given: the kept ones
    md = (tmp_path / "summary.md").read_text()
    assert "| alpha=0.5 | greedy | global | 50.00 | 2.0 ± 0.0 | 2.0 ± 0.0 | 1.00 | 4 ± 0 | 2/2 |" in md
    assert "Targets: alpha=0.5: 50.00%" in md
    assert "![accuracy_vs_bytes](accuracy_vs_bytes.png)" in md
    assert (tmp_path / "accuracy_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    csv_rows = (tmp_path / "to_target.csv").read_text().splitlines()
    assert csv_rows[0].startswith("setting,policy,view,target,runs,reached,rounds,")
    assert len(csv_rows) == 1 + 2 * 2  # header + (greedy, dense) x (global, personalized)


def test_the_summary_reports_late_and_partial_clients_under_a_deadline():
    runs = [
        ex.FinishedRun("a", "fixed", 0, fake_rounds([0.5, 0.6])),
        ex.FinishedRun("a", "prof", 0, fake_rounds([0.5, 0.6])),
    ]
    for i, row in enumerate(runs[0].rounds[1:]):
        row.update({"late_clients": 2 + i, "partial_clients": 0})  # 2 then 3 stragglers
    for row in runs[1].rounds[1:]:
        row.update({"late_clients": 0, "partial_clients": 4})
    rows = ex.summarize(runs)
    assert [(r.late_clients, r.partial_clients) for r in rows] == [(2.5, 0.0), (0.0, 4.0)]
    md = ex.summary_markdown(rows, title="t", complete=2, total=2)
    assert "| a | fixed | 2.50 | 0.00 | 4.0 |" in md and "| a | prof | 0.00 | 4.00 | 4.0 |" in md
    plain = ex.summarize([ex.FinishedRun("a", "x", 0, fake_rounds([0.5]))])
    assert "past the deadline" not in ex.summary_markdown(plain, title="t", complete=1, total=1)
