"""Per-round metrics history (``metrics.json`` / ``metrics.csv``) and matplotlib plots."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write

log = logging.getLogger(__name__)

# Keys every round object carries (README, "Outputs"); extras follow.
METRIC_KEYS = (
    "round",
    "accuracy",
    "loss",
    "bytes_down",
    "bytes_up",
    "dense_bytes_down",
    "expert_load",
    "load_cv",
    "virtual_round_time_s",
    "assignment",
    "failures",
)
#: At most this share of a run's wall time goes to refreshing the plots between rounds.
PLOT_SHARE = 0.1


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunRecorder:
    """Accumulates one metrics object per round and keeps the files on disk current.

    Parameters
    ----------
    out_dir : Path
        ``outputs/<run-name>``; created if missing.
    config : Mapping[str, Any]
        Run config written to ``config.json``.
    history : Sequence[Mapping[str, Any]]
        Rounds already recorded (when resuming).

    """

    def __init__(
        self, out_dir: Path, config: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = [dict(r) for r in history]
        self.last_plot_s: float | None = None  # seconds the last plot refresh took
        self._next_plot = 0.0  # time.monotonic() from which the next refresh may run
        atomic_write(self.out_dir / "config.json", json.dumps(_jsonable(config), indent=2))

    def add(self, row: Mapping[str, Any]) -> None:
        """Record one round (replacing an earlier object of the same round)."""
        row = {k: row.get(k) for k in METRIC_KEYS} | {k: v for k, v in row.items() if k not in METRIC_KEYS}
        self.rounds = [r for r in self.rounds if r.get("round") != row["round"]] + [_jsonable(row)]
        self.rounds.sort(key=lambda r: r["round"])
        atomic_write(self.out_dir / "metrics.json", json.dumps(self.rounds, indent=1))
        atomic_write(self.out_dir / "metrics.csv", rounds_to_csv(self.rounds))

    def plot(self) -> list[Path]:
        """Write the PNG plots; returns their paths."""
        return write_plots(self.rounds, self.out_dir)

    def refresh_plots(self, *, force: bool = False) -> list[Path]:
        """Rewrite the plots during the run, throttled to :data:`PLOT_SHARE` of the wall time.

        After a refresh that took ``t`` seconds the next one waits until
        ``t x (1 / PLOT_SHARE - 1)`` seconds have passed (a round that comes sooner keeps the
        plots of an earlier round), so plotting never takes more than that share of a run however
        short its rounds. A failure is logged, not raised: plots are a view, the metrics files the
        record. Returns the paths written (none when throttled or failed).
        """
        now = time.monotonic()
        if not force and now < self._next_plot:
            return []
        try:
            paths = self.plot()
        except Exception:
            log.warning("fedmoe: refreshing the plots failed; the run goes on", exc_info=True)
            return []
        done = time.monotonic()
        self.last_plot_s = done - now
        self._next_plot = done + self.last_plot_s * (1 / PLOT_SHARE - 1)
        return paths


def rounds_to_csv(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Flatten rounds into CSV: lists as ``;``-joined values, dicts as JSON."""
    columns: list[str] = list(METRIC_KEYS)
    for r in rounds:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rounds:
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, list):
                v = ";".join("" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
            elif isinstance(v, dict):
                v = json.dumps(v, separators=(",", ":"))
            cells.append("" if v is None else v)
        writer.writerow(cells)
    return buf.getvalue()


def write_plots(rounds: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Accuracy/loss per round, expert-load heat-maps (total and per MoE layer) and last assignment.

    The accuracy and loss panels show the central evaluation and the clients' where the rounds
    have them (a run with ``central-eval = false`` has the clients' only).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        central = [_nan(r.get(key)) for r in rounds]
        if not all(np.isnan(central)):  # none without central evaluation (central-eval = false)
            ax.plot(x, central, marker="o", label="central (test set)")
        client = [_nan(r.get(f"client_{key}")) for r in rounds]
        if not all(np.isnan(client)):
            ax.plot(x, client, marker="s", label="clients (local test, own experts)")
        worst = [_nan(r.get(f"client_{key}_worst10")) for r in rounds]
        if not all(np.isnan(worst)):
            ax.plot(x, worst, marker="v", ls=":", label="worst 10% of clients")
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy_loss.png")
    save_figure(fig, paths[-1])
    plt.close(fig)

    loads = [r.get("expert_load") for r in rounds if r.get("expert_load")]
    if loads:
        mat = np.array(loads, dtype=float)
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * mat.shape[1] + 2), _height(len(loads), 2)))
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("round")
        label_rows(ax, [r["round"] for r in rounds if r.get("expert_load")])
        ax.set_title("Expert load (tokens trained per round)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out_dir / "expert_load.png")
        save_figure(fig, paths[-1])
        plt.close(fig)

    layer_plot = plot_layer_load(rounds, out_dir, plt)
    if layer_plot is not None:
        paths.append(layer_plot)

    last = next((r["assignment"] for r in reversed(rounds) if r.get("assignment")), None)
    if last:
        ids = sorted(last, key=lambda c: (len(c), c))
        num_e = max((len(r["expert_load"]) for r in rounds if r.get("expert_load")), default=0)
        num_e = max(num_e, 1 + max((e for v in last.values() for e in v), default=0))
        mat = np.zeros((len(ids), num_e))
        for i, cid in enumerate(ids):
            mat[i, last[cid]] = 1
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * num_e + 2), _height(len(ids), 1.5)))
        ax.imshow(mat, aspect="auto", cmap="Greys", vmin=0, vmax=1)
        ax.set_xlabel("expert")
        ax.set_ylabel("client-id")
        label_rows(ax, ids)
        ax.set_title(f"Assignment, round {next(r['round'] for r in reversed(rounds) if r.get('assignment'))}")
        fig.tight_layout()
        paths.append(out_dir / "assignment.png")
        save_figure(fig, paths[-1])
        plt.close(fig)
    return paths


def plot_layer_load(rounds: Sequence[Mapping[str, Any]], out_dir: Path, plt: Any) -> Path | None:
    """Write ``expert_load_per_layer.png``: one heat map (round x expert) per MoE layer.

    Each panel's colours are that layer's share of its tokens per expert and round, so the
    layers are comparable whatever their token counts; ``None`` when no round has the key.
    """
    rows = [r for r in rounds if r.get("expert_load_per_layer")]
    if not rows:
        return None
    mat = np.array([r["expert_load_per_layer"] for r in rows], dtype=float)  # [R, L, E]
    total = mat.sum(axis=2, keepdims=True)
    share = np.divide(mat, total, out=np.zeros_like(mat), where=total > 0)
    num_layers, num_e = mat.shape[1], mat.shape[2]
    fig, axes = plt.subplots(
        1,
        num_layers,
        figsize=(max(4, num_layers * (0.45 * num_e + 1.5)), _height(len(rows), 2)),
        squeeze=False,
    )
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(
            share[:, layer], aspect="auto", cmap="viridis", vmin=0, vmax=max(float(share.max()), 1e-9)
        )
        ax.set_xlabel("expert")
        ax.set_title(f"MoE layer {layer}")
        label_rows(ax, [r["round"] for r in rows])
    axes[0][0].set_ylabel("round")
    fig.suptitle("Expert load per layer (share of the layer's tokens)")
    fig.colorbar(im, ax=list(axes[0]))
    path = Path(out_dir) / "expert_load_per_layer.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


#: Heat maps grow with their rows up to this height (inches); at most MAX_ROW_LABELS rows are labelled.
MAX_HEIGHT = 8.0
MAX_ROW_LABELS = 16


def _height(rows: int, extra: float) -> float:
    """Return a heat map's height: 0.25 inch a row plus ``extra``, within [3, MAX_HEIGHT]."""
    return min(max(3.0, 0.25 * rows + extra), MAX_HEIGHT)


def label_rows(ax: Any, labels: Sequence[Any]) -> None:
    """Label a heat map's rows (row ``i``: ``labels[i]``) with at most :data:`MAX_ROW_LABELS` ticks.

    One tick per row made long histories slow to draw (about a second per heat map at 60 rounds)
    and unreadable; the ticks are spaced out instead.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    names = [str(label) for label in labels]
    ax.yaxis.set_major_locator(MaxNLocator(nbins=MAX_ROW_LABELS, integer=True, min_n_ticks=1))
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda v, _: names[int(v)] if float(v).is_integer() and 0 <= v < len(names) else "")
    )


def save_figure(fig: Any, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically: a viewer never sees half a file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)
