"""fedmoe-launch's progress: rounds learnt from the streamed log and metrics.json, ETA, displays."""

import io
import json
import re
import sys
import textwrap

import pytest

from fedmoe_app.config import TrackingSection
from fedmoe_app.run import tracking
from fedmoe_app.tools import launch as launch_mod
from fedmoe_app.tools.run_progress import RunState, RunWatcher, fmt_bytes, make_display

GREEN = "\x1b[92mINFO \x1b[0m:      "


def log_lines(out_dir, rounds=3, total=3):
    """The ServerApp's log lines of a run (as ``flwr run --stream`` shows them, colours included)."""
    lines = [
        "Successfully installed fedmoe to /tmp/x/apps/fedmoe.\n",
        f"{GREEN}fedmoe: outputs in {out_dir}\n",
        f"{GREEN}[ROUND 0] central accuracy 0.1172 loss 4.9887\n",
    ]
    for r in range(1, rounds + 1):
        lines += [
            f"{GREEN}[ROUND {r}/{total}]\n",
            f"{GREEN}configure_train: 6 nodes, load_balanced plan, 2408.4 kB down (dense 7200.8 kB)\n",
            f"{GREEN}[ROUND {r}] acc 0.{r}200 | down 2408.4 kB (33% of dense) up 1000.0 kB | load CV 0.33 "
            "| failures 0 rejected {}\n",
            f"{GREEN}fedmoe: checkpoint of round {r}: 1244499 bytes, 6 clients seen, saved in 0.0266 s\n",
        ]
    return lines


def test_the_watcher_follows_rounds_from_the_log_and_takes_loss_and_bytes_from_metrics_json(tmp_path):
    watcher = RunWatcher()
    lines = log_lines(tmp_path, rounds=2, total=5)
    finished = [watcher.feed(line) for line in lines]
    assert [r for r in finished if r is not None] == [1, 2]
    s = watcher.state
    assert (s.done, s.total, s.done_here, s.accuracy, s.loss) == (2, 5, 2, 0.22, 4.9887)
    assert s.bytes_total == pytest.approx(2 * 3408.4e3)
    assert s.out_dir == tmp_path
    # once metrics.json has the round, its numbers win (loss, bpb, exact bytes over all rounds)
    rows = [
        {"round": 0, "accuracy": 0.1, "loss": 5.0, "bytes_down": None, "bytes_up": None},
        {"round": 1, "accuracy": 0.12, "loss": 4.5, "bytes_down": 100, "bytes_up": 50},
        {"round": 2, "accuracy": 0.25, "loss": 4.0, "bpb": 2.5, "bytes_down": 100, "bytes_up": 50},
    ]
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    watcher.feed(f"{GREEN}\n")
    assert (s.accuracy, s.loss, s.bpb, s.bytes_total) == (0.25, 4.0, 2.5, 300.0)
    # a half-written file is skipped, the numbers stay
    (tmp_path / "metrics.json").write_text('[{"round": 2, "loss": 1')
    watcher.feed("anything\n")
    assert s.loss == 4.0


def test_eta_is_the_mean_round_time_times_the_rounds_left():
    s = RunState(started=0.0, total=10, first_start=5.0, done=4, done_here=4, last_done_at=45.0)
    assert s.mean_round_s() == 10.0
    assert s.eta_s(now=45.0) == 60.0 and s.eta_s(now=50.0) == 55.0 and s.eta_s(now=200.0) == 0.0
    # a resumed run (rounds 6.. in this launch) counts only its own rounds
    resumed = RunState(started=0.0, total=10, first_start=0.0, done=7, done_here=2, last_done_at=20.0)
    assert resumed.eta_s(now=20.0) == 30.0
    line = s.describe(now=45.0)
    assert line.startswith("round 4/10 | elapsed 45s | ETA 1m00s (10.0 s/round)")
    assert RunState(started=0.0).describe(now=1.0) == "round 0/? | elapsed 1s | ETA ? | 0 B sent"
    assert [fmt_bytes(n) for n in (812, 4100, 2.4e6, 1.3e9)] == ["812 B", "4.1 kB", "2.4 MB", "1.30 GB"]


def fake_flwr(tmp_path, lines, *, pause=0.05, exit_code=0):
    """A stand-in for ``flwr run``: prints ``lines`` (bytes, as they come) with a pause between them."""
    script = tmp_path / "fake_flwr.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            for line in {lines!r}:
                sys.stdout.write(line)
                sys.stdout.flush()
                time.sleep({pause})
            sys.exit({exit_code})
            """
        )
    )
    return [sys.executable, str(script)]


def run_fake(tmp_path, monkeypatch, lines, progress, *, timeout=60, status="finished:completed", **kw):
    monkeypatch.setattr(launch_mod, "last_run_status", lambda env, app_dir: status)
    out = io.StringIO()
    env = {"FEDMOE_OUTPUT_ROOT": str(tmp_path)}
    code = launch_mod._run_to_end(fake_flwr(tmp_path, lines, **kw), env, tmp_path, out, timeout, progress)
    return code, out.getvalue()


def test_plain_progress_passes_the_log_through_unchanged_with_a_line_per_round(tmp_path, monkeypatch):
    lines = log_lines(tmp_path / "run", rounds=3, total=3) + ["no newline at the end"]
    code, text = run_fake(tmp_path, monkeypatch, lines, "plain")
    assert code == 0
    progress = [line for line in text.splitlines(keepends=True) if line.startswith("fedmoe: progress")]
    assert "".join(line for line in text.splitlines(keepends=True) if line not in progress) == "".join(lines)
    assert [re.match(r"fedmoe: progress round (\d)/3 \| elapsed", p)[1] for p in progress] == ["1", "2", "3"]
    assert "ETA 0s" in progress[-1] and "acc 0.3200 loss 4.9887" in progress[-1]
    assert text.index(progress[0]) > text.index("[ROUND 1] acc")  # after its round's line
    # off: the log only; a failed run still fails (the SuperLink's status), a stuck one times out
    code, text = run_fake(tmp_path, monkeypatch, lines, "off", status="finished:failed")
    assert code == 1 and text == "".join(lines) + "fedmoe: run ended with status 'finished:failed'\n"
    code, text = run_fake(tmp_path, monkeypatch, lines, "plain", timeout=0.5, pause=0.2)
    assert code == 124 and text and "".join(lines).startswith(text.split("fedmoe: progress")[0])


def test_rich_progress_shows_a_bar_under_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    lines = log_lines(tmp_path / "run", rounds=2, total=4)
    code, text = run_fake(tmp_path, monkeypatch, lines, "rich")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert code == 0
    for line in lines:  # every log line is shown (colours re-rendered by rich)
        assert re.sub(r"\x1b\[[0-9;]*m", "", line).strip() in plain
    assert re.search(r"round 2/4 \| elapsed \d+s \| ETA \d+s \(\d\.\d s/round\) \| acc 0\.2200", plain)


def test_auto_is_plain_off_a_terminal_and_a_bad_mode_is_refused():
    assert type(make_display("auto", io.StringIO())).__name__ == "PlainDisplay"
    with pytest.raises(ValueError, match="'fancy' is invalid; allowed: one of auto, rich, plain, off"):
        make_display("fancy", io.StringIO())


def test_the_launcher_refuses_a_tracker_whose_package_is_missing_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None)
    problem = launch_mod.run_config_problem(launch_mod.Path(__file__).parents[2], "tracking='tensorboard'")
    assert problem == tracking.tracking_problem(TrackingSection("tensorboard", ""))
    assert "'tracking' = 'tensorboard'" in problem and "pip install 'fedmoe[track]'" in problem
    assert (
        launch_mod.launch(
            launch_mod.Path(__file__).parents[2], run_config="tracking='mlflow'", stream_to=io.StringIO()
        )
        == 2
    )


def test_a_failing_display_never_blocks_the_run(tmp_path, monkeypatch):
    shown = []

    class Broken:
        def line(self, text):
            if "[ROUND 1/" in text:
                raise OSError("terminal gone")
            shown.append(text)

        def close(self):
            pass

    monkeypatch.setattr(launch_mod, "make_display", lambda mode, out, root: Broken())
    lines = log_lines(tmp_path / "run", rounds=1) + ["x" * 1000 + "\n"] * 200  # more than a pipe holds
    code, _ = run_fake(tmp_path, monkeypatch, lines, "plain", timeout=60, pause=0)
    assert code == 0 and len(shown) == len(lines) - 1
