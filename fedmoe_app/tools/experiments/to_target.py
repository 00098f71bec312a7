"""Time and bytes to a target accuracy, per (setting, policy) and view, over seeds.

A target is an accuracy per setting and view (``global``: the full model on the central
test, or the clients' accuracy in a run without central evaluation; ``personalized``:
the clients' own experts on their local test). Given on the command line as
``[SETTING:]VIEW=VALUE`` (:func:`parse_targets`), or by default ``fraction`` x the
baseline policy's mean final accuracy in that setting and view (:func:`resolve_targets`).
:func:`to_target` measures, for each (setting, policy, view), the rounds, the bytes sent
down and the virtual seconds (the deterministic clock) a run spent until it first reached
the target, as mean ± sample std over the seeds that reached it, and the bytes relative to
the baseline's. Needs neither Flower nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .metrics import FinishedRun, accuracy_key, final_accuracy, reach
from .summary import DASH, _mean_std, fields_csv, fmt_percent, markdown_table, run_groups

#: View name -> the per-round accuracy key of that view (``global`` falls back to the clients'
#: accuracy in a run without central evaluation, as the summary's global columns do).
VIEWS = {"global": "accuracy", "personalized": "client_accuracy"}
#: Setting name that stands for every setting in a parsed target.
ANY_SETTING = "*"

#: Targets: setting (or :data:`ANY_SETTING`) -> view -> accuracy (a fraction).
Targets = dict[str, dict[str, float]]


def parse_targets(specs: Sequence[str], settings: Sequence[str] | None = None) -> Targets:
    """Parse ``[SETTING:]VIEW=VALUE`` target options.

    Parameters
    ----------
    specs : sequence of str
        E.g. ``global=0.75`` (every setting) or ``alpha=0.5:personalized=0.88``; a setting's
        own target wins over one for every setting.
    settings : sequence of str, optional
        The grid's setting names; a target naming another setting is an error.

    Returns
    -------
    Targets
        ``{setting or "*": {view: value}}``.

    Raises
    ------
    ValueError
        On a malformed option, an unknown view or setting, or a value outside ``(0, 1]``.

    """
    out: Targets = {}
    for spec in specs:
        left, eq, text = spec.rpartition("=")
        setting, _, view = left.rpartition(":")
        setting = setting or ANY_SETTING
        if not eq or view not in VIEWS:
            raise ValueError(
                f"target {spec!r} is invalid; allowed: [SETTING:]VIEW=VALUE with VIEW one of "
                f"{', '.join(VIEWS)} (e.g. global=0.75)"
            )
        if settings is not None and setting != ANY_SETTING and setting not in settings:
            raise ValueError(f"target {spec!r} names setting {setting!r}; allowed: {', '.join(settings)}")
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"target {spec!r} has value {text!r}; allowed: an accuracy in (0, 1]")
        out.setdefault(setting, {})[view] = value
    return out


def _key(runs: Sequence[FinishedRun], view: str) -> str:
    """Return the accuracy key of ``view`` for ``runs`` (global without central eval: the clients')."""
    if view == "global" and runs and all(accuracy_key(r.rounds) != "accuracy" for r in runs):
        return "client_accuracy"
    return VIEWS[view]


def resolve_targets(
    results: Sequence[FinishedRun],
    targets: Targets | None = None,
    *,
    baseline: str = "dense",
    fraction: float = 0.95,
) -> dict[tuple[str, str], float | None]:
    """Return the target of every (setting, view) of ``results``.

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished runs.
    targets : Targets, optional
        Given targets (:func:`parse_targets`); a setting's own beats :data:`ANY_SETTING`'s.
    baseline : str
        Policy whose mean final accuracy sets the targets not given.
    fraction : float
        The share of that accuracy a default target is.

    Returns
    -------
    dict
        ``(setting, view) -> target``; None where no target is given and the setting has no
        baseline run.

    """
    targets = targets or {}
    out: dict[tuple[str, str], float | None] = {}
    for s in dict.fromkeys(r.setting for r in results):
        base = [r for r in results if r.setting == s and r.policy == baseline]
        for view in VIEWS:
            given = targets.get(s, {}).get(view, targets.get(ANY_SETTING, {}).get(view))
            if given is not None:
                out[(s, view)] = given
                continue
            finals = [final_accuracy(r.rounds, _key(base, view)) for r in base]
            finals = [f for f in finals if f is not None]
            out[(s, view)] = fraction * float(np.mean(finals)) if finals else None
    return out


@dataclass
class TargetRow:
    """Time and bytes to a target of one (setting, policy, view), over the seeds that reached it.

    ``*_std`` are sample standard deviations (ddof = 1), None with fewer than two runs that
    reached the target; every figure is None when none did. ``bytes_vs_baseline`` is
    ``mb_down`` over the baseline policy's ``mb_down`` in the same setting and view.
    """

    setting: str
    policy: str
    view: str
    target: float | None
    runs: int
    reached: int
    rounds: float | None
    rounds_std: float | None
    mb_down: float | None
    mb_down_std: float | None
    virtual_s: float | None
    virtual_s_std: float | None
    bytes_vs_baseline: float | None


def to_target(
    results: Sequence[FinishedRun],
    targets: Targets | None = None,
    *,
    baseline: str = "dense",
    fraction: float = 0.95,
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
) -> list[TargetRow]:
    """Measure rounds, bytes down and virtual seconds to the target, per (setting, policy, view).

    Parameters
    ----------
    results : sequence of FinishedRun
        Finished runs.
    targets, baseline, fraction
        As in :func:`resolve_targets`; ``baseline`` also scales ``bytes_vs_baseline``.
    settings, policies : sequence of str, optional
        Row order (others follow in order of appearance).

    Returns
    -------
    list of TargetRow
        Setting-major, then view (global first), then policy.

    """
    resolved = resolve_targets(results, targets, baseline=baseline, fraction=fraction)
    groups = run_groups(results, settings, policies)
    rows: list[TargetRow] = []
    for setting in dict.fromkeys(s for s, _, _ in groups):
        for view in VIEWS:
            target = resolved[(setting, view)]
            block = []
            for _, policy, runs in (g for g in groups if g[0] == setting):
                hits = [reach(r.rounds, target, _key(runs, view)) for r in runs] if target is not None else []
                hits = [h for h in hits if h is not None]
                rnd = _mean_std([float(h.round) for h in hits])
                mb = _mean_std([None if h.bytes_down is None else h.bytes_down / 1e6 for h in hits])
                vt = _mean_std([h.virtual_time_s for h in hits])
                counts = (len(runs), len(hits))
                block.append(TargetRow(setting, policy, view, target, *counts, *rnd, *mb, *vt, None))
            base_mb = next((r.mb_down for r in block if r.policy == baseline), None)
            for r in block:
                if r.mb_down is not None and base_mb:
                    r.bytes_vs_baseline = r.mb_down / base_mb
            rows += block
    return rows


def _cell(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return DASH
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def target_table(rows: Sequence[TargetRow], baseline: str = "dense") -> str:
    """Render :func:`to_target` rows as a Markdown table (mean ± std over the seeds that reached).

    ``—`` marks a target no seed reached (or no target); ``reached`` counts the seeds that did.
    """
    header = [
        "setting",
        "policy",
        "view",
        "target (%)",
        "rounds",
        "MB down",
        f"bytes / {baseline}",
        "virtual time (s)",
        "reached",
    ]
    cells = [
        [
            r.setting,
            r.policy,
            r.view,
            fmt_percent(r.target),
            _cell(r.rounds, r.rounds_std, ".1f"),
            _cell(r.mb_down, r.mb_down_std, ".1f"),
            _cell(r.bytes_vs_baseline, None, ".2f"),
            _cell(r.virtual_s, r.virtual_s_std, ".0f"),
            f"{r.reached}/{r.runs}",
        ]
        for r in rows
    ]
    return markdown_table(header, cells)


def target_csv(rows: Sequence[TargetRow]) -> str:
    """Render :func:`to_target` rows as CSV: the :class:`TargetRow` fields, empty where None."""
    return fields_csv(list(TargetRow.__dataclass_fields__), [asdict(r) for r in rows])
