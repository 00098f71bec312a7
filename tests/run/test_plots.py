"""The run folder's plots, refreshed every round: throttled, atomic, never fatal."""

import threading
import time

import numpy as np
import pytest

from fedmoe_app.run import results
from fedmoe_app.run.results import RunRecorder

PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def history(rounds=60, experts=8, layers=2, clients=10):
    rng = np.random.default_rng(0)
    rows = [{"round": 0, "accuracy": 0.1, "loss": 2.3, "failures": 0}]
    for r in range(1, rounds + 1):
        rows.append(
            {
                "round": r,
                "accuracy": float(rng.random()),
                "loss": float(rng.random()),
                "failures": 0,
                "client_accuracy": float(rng.random()),
                "expert_load": rng.random(experts).tolist(),
                "expert_load_per_layer": rng.random((layers, experts)).tolist(),
                "assignment": {str(c): [c % experts, (c + 1) % experts] for c in range(clients)},
            }
        )
    return rows


def test_refreshes_write_every_plot_and_are_throttled_to_a_share_of_the_time(tmp_path, monkeypatch):
    recorder = RunRecorder(tmp_path, {"seed": 0}, history(rounds=8))
    clock = [1000.0]
    monkeypatch.setattr(results.time, "monotonic", lambda: clock[0])
    real_plot, calls = recorder.plot, []

    def plot_taking_2s():
        clock[0] += 2.0
        calls.append(clock[0])
        return real_plot() if len(calls) == 1 else ["a.png", "b.png", "c.png", "d.png"]

    monkeypatch.setattr(recorder, "plot", plot_taking_2s)
    names = ["accuracy_loss.png", "expert_load.png", "expert_load_per_layer.png", "assignment.png"]
    assert [p.name for p in recorder.refresh_plots()] == names
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_START) and data.endswith(PNG_END)
    assert recorder.last_plot_s == 2.0
    clock[0] += 17.9  # 2 s of plots may come every 2 / 0.1 = 20 s: 18 s after the last one ended
    assert recorder.refresh_plots() == []
    assert len(recorder.refresh_plots(force=True)) == 4  # the end of the run
    clock[0] += 18.0
    assert len(recorder.refresh_plots()) == 4


def test_a_viewer_never_reads_half_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, seen, stop = tmp_path / "plot.png", [], threading.Event()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.imshow(np.random.default_rng(0).random((64, 64)))  # noise: a PNG of some size
    results.save_figure(fig, path)

    def view():
        while not stop.is_set():
            seen.append(path.read_bytes())
            time.sleep(0.001)

    viewer = threading.Thread(target=view)
    viewer.start()
    try:
        for _ in range(4):
            results.save_figure(fig, path)
    finally:
        stop.set()
        viewer.join()
        plt.close(fig)
    assert len(seen) > 4
    assert all(data.startswith(PNG_START) and data.endswith(PNG_END) for data in seen)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failing_refresh_is_logged_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    recorder = RunRecorder(tmp_path, {"seed": 0}, history(rounds=2))

    def broken(rounds, out_dir):
        raise ValueError("bad row")

    monkeypatch.setattr(results, "write_plots", broken)
    assert recorder.refresh_plots(force=True) == []
    assert "refreshing the plots failed" in caplog.text and "bad row" in caplog.text


@pytest.mark.parametrize("rows", [3, 200])
def test_heat_maps_label_at_most_sixteen_rows_and_stay_within_eight_inches(tmp_path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, results._height(rows, 2)))
    ax.imshow(np.zeros((rows, 4)), aspect="auto")
    labels = [f"r{i}" for i in range(rows)]
    results.label_rows(ax, labels)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert 1 <= len(shown) <= results.MAX_ROW_LABELS and set(shown) <= set(labels)
    assert (shown == labels) if rows == 3 else "r0" in shown
    assert 3.0 <= results._height(rows, 2) <= results.MAX_HEIGHT
