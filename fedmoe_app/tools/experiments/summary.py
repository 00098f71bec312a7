"""The summary of a grid: one row per (setting, policy), as Markdown and CSV.

:func:`summarize` aggregates finished runs over seeds (mean and sample std) and measures
rounds to a target set by the dense baseline; :func:`format_table`, :func:`rows_to_csv`
and :func:`summary_markdown` render the rows. Needs neither Flower nor torch.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import (
    FinishedRun,
    accuracy_key,
    best_accuracy,
    final_accuracy,
    last_n_mean,
    round_mean,
    round_total,
    rounds_to_target,
    window_mean,
)

#: Cell of a value that does not exist.
DASH = "—"


@dataclass
class SummaryRow:
    """One (setting, policy) line of the summary; accuracies are fractions in [0, 1].

    ``*_std`` are sample standard deviations over seeds (ddof = 1), None with one run.
    ``rounds_to_target`` is the mean over the runs that reached ``target`` (``reached``
    of ``runs``), None if none did or there is no target. Byte totals are summed over a
    run's rounds and averaged over runs; ``virtual_time_s`` is a run's sum of
    ``virtual_round_time_s`` (rounds where it is null skipped), averaged over runs that
    have one. ``view`` is the accuracy of the global-view columns: ``accuracy`` (central test),
    or ``client_accuracy`` for runs without central evaluation (``central-eval = false``).
    """

    setting: str
    policy: str
    runs: int
    seeds: list[int]
    final_acc: float | None
    final_acc_std: float | None
    best_acc: float | None
    last_n_acc: float | None
    last_n_acc_std: float | None
    personal_last_n: float | None  # clients' own experts on their local test (personalized view)
    personal_last_n_std: float | None
    worst10_last_n: float | None  # the worst 10 % of the evaluated clients, same view
    target: float | None
    rounds_to_target: float | None
    reached: int
    mb_down: float | None
    mb_up: float | None
    dense_mb_down: float | None
    load_cv: float | None
    virtual_time_s: float | None
    wall_time_s: float | None
    late_clients: float | None = None  # mean per round: past round-deadline-s (stragglers)
    partial_clients: float | None = None  # mean per round: asked for part of their local work
    last_n: int = 5
    view: str = (
        "accuracy"  # the accuracy key of the global-view columns: client_accuracy without central eval
    )


def _megabytes(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 1e6


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _mean(values: Sequence[float | None]) -> float | None:
    return _mean_std(values)[0]


def in_order(values: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """Return the distinct ``values``: those in ``order`` first, then the rest as they appear.

    Parameters
    ----------
    values : sequence of str
        Names, possibly repeated.
    order : sequence of str, optional
        Preferred order; names not in ``values`` are left out.

    Returns
    -------
    list of str
        Each name once.

    """
    first = [v for v in (order or ()) if v in values]
    return first + sorted(set(values) - set(first), key=values.index)


def run_groups(
    results: Sequence[FinishedRun],
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
) -> list[tuple[str, str, list[FinishedRun]]]:
    """Group runs by (setting, policy), setting-major, in the given order (:func:`in_order`).

    Parameters
    ----------
    results : sequence of FinishedRun
        Runs.
    settings, policies : sequence of str, optional
        Preferred order of settings and, within each setting, of its policies.

    Returns
    -------
    list of (str, str, list of FinishedRun)
        ``(setting, policy, runs)`` for every pair that has runs, the runs in the order
        of ``results``.

    """
    groups = []
    for s in in_order([r.setting for r in results], settings):
        for p in in_order([r.policy for r in results if r.setting == s], policies):
            groups.append((s, p, [r for r in results if r.setting == s and r.policy == p]))
    return groups


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a Markdown table: the first two columns left-aligned, the others right-aligned.

    Parameters
    ----------
    header : sequence of str
        Column names.
    rows : sequence of sequence of str
        Cells, one sequence per line.

    Returns
    -------
    str
        The table, one line per row after the header, ending in a newline.

    """
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _targets(
    results: Sequence[FinishedRun], baseline: str, target_fraction: float
) -> dict[str, float | None]:
    """Target accuracy of every setting: ``target_fraction`` x the baseline's mean final accuracy.

    None for a setting without a baseline run (or without a final accuracy).
    """
    by_key: dict[tuple[str, str], list[FinishedRun]] = {}
    for r in results:
        by_key.setdefault((r.setting, r.policy), []).append(r)
    targets: dict[str, float | None] = {}
    for s in {r.setting for r in results}:
        base = by_key.get((s, baseline), [])
        key = _view(base)
        base_final = _mean([final_accuracy(r.rounds, key) for r in base])
        targets[s] = None if base_final is None else target_fraction * base_final
    return targets


def _summary_row(
    setting: str, policy: str, runs: Sequence[FinishedRun], target: float | None, last_n: int
) -> SummaryRow:
    """Aggregate the runs (sorted by seed) of one (setting, policy) into its :class:`SummaryRow`."""
    key = _view(runs)
    final, final_std = _mean_std([final_accuracy(r.rounds, key) for r in runs])
    lastn, lastn_std = _mean_std([last_n_mean(r.rounds, last_n, key) for r in runs])
    personal, personal_std = _mean_std([last_n_mean(r.rounds, last_n, "client_accuracy") for r in runs])
    worst10 = _mean([last_n_mean(r.rounds, last_n, "client_accuracy_worst10") for r in runs])
    hits = [rounds_to_target(r.rounds, target, key) for r in runs] if target is not None else []
    hits = [h for h in hits if h is not None]
    mb = {
        k: _mean([_megabytes(round_total(r.rounds, k)) for r in runs])
        for k in ("bytes_down", "bytes_up", "dense_bytes_down")
    }
    return SummaryRow(
        setting=setting,
        policy=policy,
        runs=len(runs),
        seeds=[r.seed for r in runs],
        final_acc=final,
        final_acc_std=final_std,
        best_acc=_mean([best_accuracy(r.rounds, key) for r in runs]),
        last_n_acc=lastn,
        last_n_acc_std=lastn_std,
        personal_last_n=personal,
        personal_last_n_std=personal_std,
        worst10_last_n=worst10,
        target=target,
        rounds_to_target=float(np.mean(hits)) if hits else None,
        reached=len(hits),
        mb_down=mb["bytes_down"],
        mb_up=mb["bytes_up"],
        dense_mb_down=mb["dense_bytes_down"],
        load_cv=_mean([round_mean(r.rounds, "load_cv") for r in runs]),
        virtual_time_s=_mean([round_total(r.rounds, "virtual_round_time_s") for r in runs]),
        wall_time_s=_mean([round_total(r.rounds, "wall_time_s") for r in runs]),
        late_clients=_mean([round_mean(r.rounds, "late_clients") for r in runs]),
        partial_clients=_mean([round_mean(r.rounds, "partial_clients") for r in runs]),
        last_n=last_n,
        view=key,
    )


def _view(runs: Sequence[FinishedRun]) -> str:
    """Accuracy key of the global-view columns: central if any run has it, else the clients'."""
    keys = {accuracy_key(r.rounds) for r in runs}
    return "accuracy" if "accuracy" in keys or not keys else "client_accuracy"


def summarize(
    results: Sequence[FinishedRun],
    *,
    target_fraction: float = 0.95,
    last_n: int = 5,
    baseline: str = "dense",
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
    targets: Mapping[str, float | None] | None = None,
) -> list[SummaryRow]:
    """Aggregate runs into one :class:`SummaryRow` per (setting, policy).

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished runs.
    target_fraction : float
        The target accuracy of a setting is ``target_fraction`` x the mean (over seeds)
        final accuracy of the ``baseline`` policy in that setting.
    last_n : int
        Rounds averaged for the "last rounds" accuracy.
    baseline : str
        Policy that defines the target (no target in a setting without it).
    settings, policies : sequence of str, optional
        Row order (others follow in order of appearance).
    targets : mapping, optional
        Global-view target accuracy per setting, replacing the one from the baseline
        (``to_target.resolve_targets`` gives them from the command line's ``--target``).

    Returns
    -------
    list of SummaryRow
        Setting-major, in the given order.

    """
    targets = {**_targets(results, baseline, target_fraction), **(targets or {})}
    return [
        _summary_row(s, p, sorted(runs, key=lambda r: r.seed), targets.get(s), last_n)
        for s, p, runs in run_groups(results, settings, policies)
    ]


def fmt_percent(mean: float | None, std: float | None = None) -> str:
    """Render a fraction as a percentage with two decimals (``± std`` if given); ``—`` for None."""
    if mean is None:
        return DASH
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _fmt(v: float | None, spec: str) -> str:
    return DASH if v is None else format(v, spec)


def _rounds_cell(row: SummaryRow) -> str:
    if row.rounds_to_target is None:
        return DASH
    cell = f"{row.rounds_to_target:.1f}"
    return cell if row.reached == row.runs else f"{cell} ({row.reached}/{row.runs})"


#: Columns of :func:`format_table` (``{n}``: the summary's ``last_n``).
TABLE_COLUMNS = (
    "setting",
    "policy",
    "final acc. (%)",
    "best acc. (%)",
    "last-{n} mean (%)",
    "personalized last-{n} (%)",
    "worst 10% last-{n} (%)",
    "rounds to target",
    "MB down",
    "MB up",
    "load CV",
    "virtual time (s)",
    "runs",
)


def format_table(rows: Sequence[SummaryRow]) -> str:
    """Render summary rows as a Markdown table (accuracies in %, mean ± sample std over seeds).

    ``—`` marks a value that does not exist (a target never reached, no virtual time);
    ``12.5 (2/3)`` means 2 of 3 runs reached the target, after 12.5 rounds on average.

    Parameters
    ----------
    rows : sequence of SummaryRow
        Rows from :func:`summarize`.

    Returns
    -------
    str
        The table, one line per row after the header, ending in a newline.

    """
    n = rows[0].last_n if rows else 5
    cells = [
        [
            r.setting,
            r.policy + (" (clients)" if r.view != "accuracy" else ""),
            fmt_percent(r.final_acc, r.final_acc_std),
            fmt_percent(r.best_acc),
            fmt_percent(r.last_n_acc, r.last_n_acc_std),
            fmt_percent(r.personal_last_n, r.personal_last_n_std),
            fmt_percent(r.worst10_last_n),
            _rounds_cell(r),
            _fmt(r.mb_down, ".1f"),
            _fmt(r.mb_up, ".1f"),
            _fmt(r.load_cv, ".3f"),
            _fmt(r.virtual_time_s, ".1f"),
            str(r.runs),
        ]
        for r in rows
    ]
    return markdown_table([c.format(n=n) for c in TABLE_COLUMNS], cells)


def rows_to_csv(rows: Sequence[SummaryRow]) -> str:
    """Render summary rows as CSV: raw numbers (accuracies as fractions), empty where None.

    The header holds the :class:`SummaryRow` field names; then comes one line per row,
    seeds joined with ``;``, floats to 6 significant digits.
    """
    return fields_csv(
        list(SummaryRow.__dataclass_fields__),
        [{**asdict(r), "seeds": ";".join(str(s) for s in r.seeds)} for r in rows],
    )


def fields_csv(names: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """Render ``records`` as CSV with header ``names``: floats to 6 significant digits, None empty."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(names)
    for d in records:
        writer.writerow(
            ["" if d[k] is None else (f"{d[k]:.6g}" if isinstance(d[k], float) else d[k]) for k in names]
        )
    return buf.getvalue()


def round_windows(num_rounds: int, parts: int = 3) -> list[tuple[int, int]]:
    """Split rounds ``1..num_rounds`` into ``parts`` consecutive windows (1-20, 21-40, 41-60)."""
    edges = np.linspace(0, num_rounds, parts + 1).round().astype(int)
    return [(int(a) + 1, int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def window_table(
    results: Sequence[FinishedRun],
    windows: Sequence[tuple[int, int]],
    *,
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
) -> str:
    """Mean accuracy per round window, mean ± std over seeds, global and personalized view.

    Parameters
    ----------
    results : sequence of FinishedRun
        Runs (complete or not: a window counts the rounds a run has).
    windows : sequence of (int, int)
        Inclusive round ranges.
    settings, policies : sequence of str, optional
        Row order.

    Returns
    -------
    str
        A Markdown table: one row per (setting, policy), ``global a-b`` and
        ``personalized a-b`` columns per window, in %.

    """
    views = (("global", "accuracy"), ("personalized", "client_accuracy"))
    header = ["setting", "policy"] + [f"{v} {a}-{b}" for v, _ in views for a, b in windows]
    rows = []
    for s, p, runs in run_groups(results, settings, policies):
        cells = [s, p]
        for _, key in views:
            for a, b in windows:
                per_run = [window_mean(r.rounds, key, a, b) for r in runs]
                cells.append(fmt_percent(*_mean_std(per_run)))
        rows.append(cells)
    return markdown_table(header, rows)


def summary_markdown(
    rows: Sequence[SummaryRow],
    *,
    title: str,
    complete: int,
    total: int,
    plots: Sequence[str] = (),
    windows: str = "",
    text: str = "",
    to_target: str = "",
) -> str:
    """Render the ``summary.md`` document: table, definitions, targets and plots.

    Parameters
    ----------
    rows : sequence of SummaryRow
        Rows from :func:`summarize`.
    title : str
        Heading.
    complete, total : int
        Finished runs and runs of the grid.
    plots : sequence of str
        Image files next to ``summary.md``, linked by file name.
    windows : str
        A :func:`window_table` to include (none if empty).
    text : str
        A text grid's bits-per-byte table (``text_summary.text_table``), shown first.
    to_target : str
        The time-and-bytes-to-target table (``to_target.target_table``), shown after the
        targets (none if empty).

    Returns
    -------
    str
        The Markdown document.

    """
    targets = {r.setting: r.target for r in rows}
    n = rows[0].last_n if rows else 5
    lines = [
        f"# {title}",
        "",
        f"{complete} of {total} runs complete (updated {dt.datetime.now().isoformat(timespec='seconds')}).",
        "",
    ]
    if text:
        lines += [
            f"Bits per byte, last-{n} mean ± std over seeds (lower is better): global, the full model on "
            "every group's held-out text; personalized, the clients' own experts on their local held-out "
            "text; one column per group (full model). MB down per round: mean over rounds and runs.",
            "",
            text,
            "Accuracy below is next-token accuracy (next-byte accuracy for byte-level text).",
            "",
        ]
    lines += [
        format_table(rows),
        "Accuracy (global view): central test accuracy of the full model, mean ± sample std "
        "over seeds (one seed: no ±); best: the run's best round; last-"
        f"{n} mean: the mean of a run's last {n} rounds (judge policies on this). Personalized: "
        "the clients' own experts on their local test split (example-weighted over the clients "
        f"evaluated each round), last-{n} mean; worst 10%: the mean of the worst tenth of those "
        "clients (at least one). Rounds to target: first round reaching the setting's global "
        "target (below; by default 95% of dense's mean final accuracy), mean over the runs that "
        "reached it ((k/n): only k of n did; —: none). MB: bytes sent down/up over the whole run "
        "(10^6 bytes), mean over runs. Load CV: mean over rounds of the coefficient of "
        "variation of clients per expert. Virtual time: sum of the simulated round times "
        "(slowest participant per round), — where not measured.",
        "",
    ]
    if any(r.view != "accuracy" for r in rows):
        lines += [
            "(clients): runs without central evaluation (central-eval = false); their final, best, "
            "last-n and rounds-to-target columns are the clients' accuracy on their local test split.",
            "",
        ]
    if any(t is not None for t in targets.values()):
        lines += [
            "Targets: " + ", ".join(f"{s}: {fmt_percent(t)}%" for s, t in targets.items() if t is not None),
            "",
        ]
    if any(r.late_clients or r.partial_clients for r in rows):
        lines += [
            "Under the round deadline, clients per round (mean over rounds and runs): late, past "
            "the deadline on the virtual clock (stragglers the round waits for); partial, asked "
            "for part of their local work to meet it.",
            "",
            markdown_table(
                ["setting", "policy", "late", "partial", "virtual time (s)"],
                [
                    [r.setting, r.policy, _fmt(r.late_clients, ".2f"), _fmt(r.partial_clients, ".2f")]
                    + [_fmt(r.virtual_time_s, ".1f")]
                    for r in rows
                ],
            ),
        ]
    if to_target:
        lines += [
            "Time and bytes to target, both views: the first round at or above the target, the MB "
            "sent down and the virtual seconds summed up to that round, mean ± std over the seeds "
            "that reached it (reached: how many did); bytes / dense: MB down to target over dense's. "
            "Global: the full model on the central test; personalized: the clients' own experts on "
            "their local test.",
            "",
            to_target,
        ]
    if windows:
        lines += ["Mean accuracy per round window (%, mean ± std over seeds):", "", windows]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"
