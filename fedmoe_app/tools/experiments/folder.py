"""The experiment folder: where each run's outputs and log are, and its summary files.

Layout::

    <out>/experiment.json        the grid (base run config, settings, policies, seeds)
    <out>/progress.json          live status of every run, ETA (rewritten every few seconds)
    <out>/experiment.log         the progress lines printed on stdout
    <out>/runs/<run-name>/       each run's outputs (metrics.json, plots, checkpoint, ...)
    <out>/logs/<run-name>.log    each run's `flwr run` log
    <out>/targets.json           the targets given with --target (kept for later summaries)
    <out>/summary.{md,csv}, to_target.csv, accuracy.png, accuracy_vs_bytes.png, expert_load.png

:func:`write_summary` rewrites the summary files from the runs found complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...files import atomic_write
from .grid import ExperimentGrid, RunSpec
from .metrics import FinishedRun, is_complete, read_metrics
from .plots import plot_accuracy, plot_accuracy_vs_bytes, plot_expert_load, plot_groups
from .summary import SummaryRow, round_windows, rows_to_csv, summarize, summary_markdown, window_table
from .text_summary import group_names, is_text, text_table, with_client_bpb
from .to_target import Targets, parse_targets, resolve_targets, target_csv, target_table, to_target

#: Keys whose change does not make an earlier run of the same name a different experiment
#: (more rounds extend a run by resuming it).
IGNORED_WHEN_COMPARING = ("num-server-rounds", "resume", "run-name", "output-dir", "round-timeout-s")


def run_dir(exp_dir: Path, run: RunSpec) -> Path:
    """Return the output folder of ``run`` (``output-dir`` ``runs`` under the experiment folder)."""
    return Path(exp_dir) / str(run.run_config["output-dir"]) / run.name


def log_path(exp_dir: Path, run: RunSpec) -> Path:
    """Return the ``flwr run`` log of ``run``."""
    return Path(exp_dir) / "logs" / f"{run.name}.log"


def collect_results(exp_dir: Path, grid: ExperimentGrid) -> tuple[list[FinishedRun], int]:
    """Find the finished runs of ``grid`` under ``exp_dir``.

    Parameters
    ----------
    exp_dir : Path
        Experiment folder.
    grid : ExperimentGrid
        The grid.

    Returns
    -------
    results : list of FinishedRun
        Runs whose ``metrics.json`` holds every round, rows past the grid's rounds dropped.
    total : int
        Runs of the grid.

    """
    runs = grid.runs()
    out = []
    for run in runs:
        rows = read_metrics(run_dir(exp_dir, run))
        if rows is not None and is_complete(rows, run.num_rounds):
            rows = [r for r in rows if int(r["round"]) <= run.num_rounds]
            out.append(FinishedRun(run.setting, run.policy, run.seed, rows))
    return out, len(runs)


def read_targets(exp_dir: Path, grid: ExperimentGrid) -> Targets:
    """Return the targets kept in ``<exp_dir>/targets.json`` (none if it is absent).

    Raises
    ------
    ValueError
        If the file holds a target :func:`~.to_target.parse_targets` refuses.

    """
    path = Path(exp_dir) / "targets.json"
    if not path.exists():
        return {}
    specs = json.loads(path.read_text())
    return parse_targets(specs, [s.name for s in grid.settings])


def write_summary(
    exp_dir: Path,
    grid: ExperimentGrid,
    *,
    title: str | None = None,
    targets: Sequence[str] | None = None,
) -> list[SummaryRow]:
    """Rewrite ``summary.md``, ``summary.csv``, ``to_target.csv`` and the plots from the finished runs.

    Parameters
    ----------
    exp_dir : Path
        Experiment folder.
    grid : ExperimentGrid
        The grid (row, panel and legend order).
    title : str, optional
        Heading of ``summary.md`` (default: ``fedmoe policy comparison: <folder name>``).
    targets : sequence of str, optional
        ``[SETTING:]VIEW=VALUE`` targets (:func:`~.to_target.parse_targets`), kept in
        ``targets.json`` for later summaries; None: those kept, else 95 % of dense's final
        accuracy.

    Raises
    ------
    ValueError
        On a target that :func:`~.to_target.parse_targets` refuses (nothing is written).

    Returns
    -------
    list of SummaryRow
        The summary rows.

    """
    exp_dir = Path(exp_dir)
    names = [s.name for s in grid.settings]
    if targets is None:
        given = read_targets(exp_dir, grid)
    else:
        given = parse_targets(targets, names)
        atomic_write(exp_dir / "targets.json", json.dumps(list(targets), indent=1) + "\n")
    results, total = collect_results(exp_dir, grid)
    order = {"settings": names, "policies": list(grid.policies)}
    resolved = resolve_targets(results, given)
    rows = summarize(results, **order, targets={s: t for (s, v), t in resolved.items() if v == "global"})
    hits = to_target(results, given, **order)
    plots: list[str] = []
    if results:
        kw: dict[str, Any] = {"settings": grid.settings, "policies": grid.policies}
        plots.append(str(plot_accuracy(results, exp_dir / "accuracy.png", **kw)))
        personal = {"key": "client_accuracy", "ylabel": "clients' local test accuracy, own experts (%)"}
        plots.append(str(plot_accuracy(results, exp_dir / "personalized_accuracy.png", **kw, **personal)))
        by_bytes = plot_accuracy_vs_bytes(results, exp_dir / "accuracy_vs_bytes.png", **kw, targets=resolved)
        plots.append(str(by_bytes))
        plots.append(str(plot_expert_load(results, exp_dir / "expert_load.png", **kw)))
        if is_text(results):
            plots += text_plots(exp_dir, with_client_bpb(results), kw)
    title = title or f"fedmoe policy comparison: {exp_dir.name}"
    atomic_write(
        exp_dir / "summary.md",
        summary_markdown(
            rows,
            title=title,
            complete=len(results),
            total=total,
            plots=plots,
            windows=window_table(results, round_windows(int(grid.base["num-server-rounds"])), **order)
            if results
            else "",
            text=text_table(results, **order) if is_text(results) else "",
            to_target=target_table(hits) if results else "",
        ),
    )
    atomic_write(exp_dir / "summary.csv", rows_to_csv(rows))
    atomic_write(exp_dir / "to_target.csv", target_csv(hits))
    return rows


def text_plots(exp_dir: Path, results: list[FinishedRun], kw: dict[str, Any]) -> list[str]:
    """Draw a text grid's bits-per-byte plots (global, personalized, one per group); return their paths."""
    bits = {"scale": 1.0}
    paths = [
        plot_accuracy(results, exp_dir / "bpb.png", **kw, **bits, key="bpb", ylabel="held-out bits per byte"),
        plot_accuracy(
            results,
            exp_dir / "personalized_bpb.png",
            **kw,
            **bits,
            key="client_bpb",
            ylabel="clients' local bits per byte, own experts",
        ),
    ]
    groups = group_names(results)
    paths.append(plot_groups(results, exp_dir / "bpb_per_group.png", groups, policies=kw["policies"]))
    return [str(p) for p in paths]


def config_mismatch(run_directory: Path, run_config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Compare a run folder's ``config.json`` with ``run_config``.

    Parameters
    ----------
    run_directory : Path
        A run's output folder.
    run_config : Mapping
        The config the grid would run it with.

    Returns
    -------
    dict
        ``{key: (saved, new)}`` for every key both have with different values, except
        :data:`IGNORED_WHEN_COMPARING`; empty if there is no readable ``config.json``.

    """
    try:
        saved = json.loads((Path(run_directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {
        k: (saved.get(k), v)
        for k, v in run_config.items()
        if k not in IGNORED_WHEN_COMPARING and k in saved and saved[k] != v
    }
