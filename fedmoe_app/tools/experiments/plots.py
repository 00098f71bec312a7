"""The figures of a grid: accuracy per round and per MB sent, and expert-load heat-maps.

:func:`plot_accuracy` draws one panel per setting with a mean ± std band over seeds per
policy; :func:`plot_accuracy_vs_bytes` draws accuracy against cumulative bytes sent down;
:func:`plot_expert_load` draws round x expert heat-maps, one per (setting,
policy). matplotlib is imported (with the Agg backend) only when a figure is drawn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .grid import Setting
from .metrics import FinishedRun, finite_or_none
from .summary import in_order
from .to_target import VIEWS

#: Policies in the order of their plot colours (tab10), kept so that plots stay comparable.
COLOR_ORDER = ("load_balanced", "greedy", "random", "dense")


def _policy_colors(policies: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    fixed = {p: cmap(i) for i, p in enumerate(COLOR_ORDER)}
    extra = [p for p in policies if p not in fixed]
    fixed.update({p: cmap(len(COLOR_ORDER) + i) for i, p in enumerate(extra)})
    return fixed


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def accuracy_curves(
    results: Sequence[FinishedRun], key: str = "accuracy"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return accuracy per round over ``results``.

    Parameters
    ----------
    results : sequence of FinishedRun
        Runs to average.
    key : str
        Metric to average: ``accuracy`` (global view) or ``client_accuracy`` (personalized).

    Returns
    -------
    rounds, mean, std : np.ndarray
        Every round any run recorded, and the mean and std (ddof 0) over the runs that
        have an accuracy in that round (NaN where none has).

    """
    rounds = sorted({int(r["round"]) for res in results for r in res.rounds})
    mat = np.full((len(results), len(rounds)), np.nan)
    pos = {rnd: i for i, rnd in enumerate(rounds)}
    for i, res in enumerate(results):
        for r in res.rounds:
            a = finite_or_none(r.get(key))
            if a is not None:
                mat[i, pos[int(r["round"])]] = a
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        mean = np.nanmean(mat, axis=0)
        std = np.nanstd(mat, axis=0)
    return np.asarray(rounds), mean, std


def load_matrix(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], np.ndarray]:
    """Return each round's share of the expert load from ``expert_load`` rows.

    Parameters
    ----------
    rows : sequence of Mapping
        ``metrics.json`` rows; those without ``expert_load`` are skipped.

    Returns
    -------
    rounds : list of int
        Rounds that have an expert load.
    shares : np.ndarray
        ``[R, E]``: each row's load divided by its total (zeros where the total is 0).

    """
    pairs = [(int(r["round"]), r["expert_load"]) for r in rows if r.get("expert_load")]
    if not pairs:
        return [], np.zeros((0, 0))
    width = max(len(v) for _, v in pairs)
    mat = np.zeros((len(pairs), width))
    for i, (_, v) in enumerate(pairs):
        mat[i, : len(v)] = [finite_or_none(x) or 0.0 for x in v]
    total = mat.sum(axis=1, keepdims=True)
    return [r for r, _ in pairs], np.divide(mat, total, out=np.zeros_like(mat), where=total > 0)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _figure_layout(
    results: Sequence[FinishedRun], settings: Sequence[Setting] | None, policies: Sequence[str] | None
) -> tuple[Any, list[str], dict[str, str], list[str]]:
    """Return pyplot (Agg backend), the setting names, their titles and the policies to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = in_order([r.setting for r in results], [s.name for s in settings or ()])
    titles = {s.name: s.title for s in settings or ()}
    pols = in_order([r.policy for r in results], policies)
    return plt, names, titles, pols


def _plot_band(
    ax: Any,
    runs: Sequence[FinishedRun],
    key: str,
    *,
    color: Any,
    label: str,
    lw: float,
    alpha: float,
    scale: float = 1.0,
) -> None:
    """Draw ``scale`` x the mean of ``key`` per round over ``runs``, with a ± std band if several."""
    x, mean, std = accuracy_curves(runs, key)
    ax.plot(x, scale * mean, color=color, label=label, lw=lw)
    if len(runs) > 1:
        ax.fill_between(x, scale * (mean - std), scale * (mean + std), color=color, alpha=alpha, lw=0)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (110 dpi) and close it; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_accuracy(
    results: Sequence[FinishedRun],
    path: Path,
    *,
    settings: Sequence[Setting] | None = None,
    policies: Sequence[str] | None = None,
    key: str = "accuracy",
    ylabel: str = "central test accuracy (%)",
    scale: float = 100.0,
) -> Path:
    """Plot accuracy per round, mean ± std band over seeds per policy, one panel per setting.

    ``key`` picks the view: ``accuracy`` (global: central test, full model) or
    ``client_accuracy`` (personalized: clients' own experts on their local test); any other
    per-round metric works too (text runs plot ``bpb`` with ``scale = 1``).

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished runs.
    path : Path
        Image file to write.
    settings : sequence of Setting, optional
        Panel order and titles.
    policies : sequence of str, optional
        Legend order.
    key : str
        Metric of each round to plot (see above).
    ylabel : str
        Label of the y axis.
    scale : float
        Factor applied to the metric (100: fractions drawn as percent).

    Returns
    -------
    Path
        ``path``.

    """
    plt, names, titles, pols = _figure_layout(results, settings, policies)
    colors = _policy_colors(pols)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5.5 * max(len(names), 1), 4), squeeze=False)
    for ax, s in zip(axes[0], names):
        for p in pols:
            runs = [r for r in results if r.setting == s and r.policy == p]
            if not runs:
                continue
            label = f"{p} (n={len(runs)})"
            _plot_band(ax, runs, key, color=colors[p], label=label, lw=1.6, alpha=0.18, scale=scale)
        ax.set_title(titles.get(s, s))
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def bytes_curves(results: Sequence[FinishedRun], key: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
    """Return mean cumulative MB sent down and mean accuracy per round over ``results``.

    Parameters
    ----------
    results : sequence of FinishedRun
        Runs to average.
    key : str
        Accuracy key (``accuracy`` or ``client_accuracy``).

    Returns
    -------
    mb, acc : np.ndarray
        Per round (round 0 first, at 0 MB): the mean over runs of the MB sent down in
        rounds ``1..r`` and of the accuracy; rounds where no run has both are left out.

    """
    rounds = sorted({int(r["round"]) for res in results for r in res.rounds})
    pos = {rnd: i for i, rnd in enumerate(rounds)}
    mb = np.full((len(results), len(rounds)), np.nan)
    acc = np.full_like(mb, np.nan)
    for i, res in enumerate(results):
        down = np.zeros(len(rounds))
        for r in res.rounds:
            j = pos[int(r["round"])]
            if int(r["round"]) >= 1:  # round 0 evaluates the initial model: nothing sent
                down[j] = finite_or_none(r.get("bytes_down")) or 0.0
            a = finite_or_none(r.get(key))
            acc[i, j] = np.nan if a is None else a
        mb[i] = np.cumsum(down) / 1e6
    ok = np.isfinite(acc)
    mb[~ok] = np.nan
    keep = ok.any(axis=0)
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        return np.nanmean(mb[:, keep], axis=0), np.nanmean(acc[:, keep], axis=0)


def plot_accuracy_vs_bytes(
    results: Sequence[FinishedRun],
    path: Path,
    *,
    settings: Sequence[Setting] | None = None,
    policies: Sequence[str] | None = None,
    targets: Mapping[tuple[str, str], float | None] | None = None,
) -> Path:
    """Plot accuracy against cumulative MB sent down, mean over seeds per policy.

    One column per setting, one row per view (global: ``accuracy``, personalized:
    ``client_accuracy``); a dashed line marks the (setting, view) target where given.

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished runs.
    path : Path
        Image file to write.
    settings : sequence of Setting, optional
        Column order and titles.
    policies : sequence of str, optional
        Legend order.
    targets : mapping, optional
        ``(setting, view) -> accuracy`` (``to_target.resolve_targets``).

    Returns
    -------
    Path
        ``path``.

    """
    plt, names, titles, pols = _figure_layout(results, settings, policies)
    colors = _policy_colors(pols)
    views = list(VIEWS.items())
    ncol = max(len(names), 1)
    fig, axes = plt.subplots(2, ncol, figsize=(5.5 * ncol, 7.5), squeeze=False)
    for j, s in enumerate(names):
        for i, (view, key) in enumerate(views):
            ax = axes[i][j]
            for p in pols:
                runs = [r for r in results if r.setting == s and r.policy == p]
                if runs:
                    mb, acc = bytes_curves(runs, key)
                    ax.plot(mb, 100 * acc, color=colors[p], label=f"{p} (n={len(runs)})", lw=1.6)
            target = (targets or {}).get((s, view))
            if target is not None:
                ax.axhline(100 * target, color="0.4", ls="--", lw=1, label=f"target {100 * target:.1f}%")
            ax.set_title(f"{titles.get(s, s)}: {view}")
            ax.set_xlabel("MB sent down (cumulative)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_expert_load(
    results: Sequence[FinishedRun],
    path: Path,
    *,
    settings: Sequence[Setting] | None = None,
    policies: Sequence[str] | None = None,
) -> Path:
    """Plot expert-load heat-maps (round x expert, share of the round's tokens) side by side.

    One row per setting, one panel per policy, each from the setting's lowest seed that
    has a finished run of that policy; one colour scale for all panels. The arguments and
    the return value are those of :func:`plot_accuracy`, ``settings`` giving the row
    order and ``policies`` the column order.
    """
    plt, names, titles, pols = _figure_layout(results, settings, policies)
    panels: dict[tuple[str, str], tuple[int, list[int], np.ndarray]] = {}
    for s in names:
        for p in pols:
            runs = sorted((r for r in results if r.setting == s and r.policy == p), key=lambda r: r.seed)
            if runs:
                rnds, mat = load_matrix(runs[0].rounds)
                if mat.size:
                    panels[(s, p)] = (runs[0].seed, rnds, mat)
    vmax = max((float(m.max()) for _, _, m in panels.values()), default=1.0) or 1.0
    nrow, ncol = max(len(names), 1), max(len(pols), 1)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.2 * ncol + 1.2, 3.6 * nrow), squeeze=False, gridspec_kw={"hspace": 0.35}
    )
    im = None
    for i, s in enumerate(names):
        for j, p in enumerate(pols):
            ax = axes[i][j]
            if (s, p) not in panels:
                ax.set_axis_off()
                continue
            seed, rnds, mat = panels[(s, p)]
            im = ax.imshow(
                mat,
                aspect="auto",
                cmap="viridis",
                vmin=0,
                vmax=vmax,
                extent=(-0.5, mat.shape[1] - 0.5, rnds[-1] + 0.5, rnds[0] - 0.5),
            )
            ax.set_title(f"{p}\n{titles.get(s, s)}, seed {seed}", fontsize=9)
            ax.xaxis.set_major_locator(_integer_ticks())
            ax.yaxis.set_major_locator(_integer_ticks())
            if i == nrow - 1:
                ax.set_xlabel("expert")
            if j == 0:
                ax.set_ylabel("round")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of the round's expert load")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_groups(
    results: Sequence[FinishedRun],
    path: Path,
    groups: Sequence[str],
    *,
    policies: Sequence[str] | None = None,
) -> Path:
    """Plot bits per byte per round of every group (``bpb_<group>``), one panel per group.

    Lines are policies (mean over seeds and settings, ± std band); the y axes are shared.

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished text runs.
    path : Path
        Image file to write.
    groups : sequence of str
        Group names, one panel each.
    policies : sequence of str, optional
        Legend order.

    Returns
    -------
    Path
        ``path``.

    """
    plt, _, _, pols = _figure_layout(results, None, policies)
    colors = _policy_colors(pols)
    ncol = min(4, max(len(groups), 1))
    nrow = -(-max(len(groups), 1) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False, sharey=True)
    for ax, g in zip(axes.ravel(), groups):
        for p in pols:
            runs = [r for r in results if r.policy == p]
            _plot_band(ax, runs, f"bpb_{g}", color=colors[p], label=p, lw=1.4, alpha=0.15)
        ax.set_title(g, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(_integer_ticks())
    for ax in axes.ravel()[len(groups) :]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("bits per byte")
    axes.ravel()[0].legend(fontsize=7)
    return _save(plt, fig, path)
