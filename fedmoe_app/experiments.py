"""Experiment grids over the real app: ``python -m fedmoe_app.experiments compare``.

``compare`` runs the Flower app (:func:`fedmoe_app.launch.launch`, the same ServerApp and
ClientApp code path as ``flwr run``) once per (setting, seed, policy) of a grid, each run
with its own run name, output folder and log, one after the other by default. It shows
progress (run ``i/n``, rounds, last accuracy, an ETA from the completed runs' durations)
on stdout and in ``progress.json`` / ``experiment.log``, and after every completed run
rewrites the summary: ``summary.md``, ``summary.csv``, ``accuracy.png`` and
``expert_load.png``. A run whose ``metrics.json`` already holds every round is skipped,
and an interrupted run resumes from its checkpoint, so re-running the same command
continues an interrupted grid.

Layout of an experiment folder::

    <out>/experiment.json        the grid (base run config, settings, policies, seeds)
    <out>/progress.json          live status of every run, ETA (rewritten every few seconds)
    <out>/experiment.log         the progress lines printed on stdout
    <out>/runs/<run-name>/       each run's outputs (metrics.json, plots, checkpoint, ...)
    <out>/logs/<run-name>.log    each run's `flwr run` log
    <out>/summary.{md,csv}, accuracy.png, expert_load.png

The default grid (Fashion-MNIST, 20 clients, E = 8, capacities 1-4, four policies,
Dirichlet alpha 0.1 x 3 seeds and alpha 0.5 x 1 seed) is documented in docs/RESULTS.md.
The summary functions (:func:`summarize`, :func:`format_table`, ...) need neither Flower
nor torch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import POLICIES, ConfigError, RunConfig
from .results import atomic_write

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
#: File name of a run's checkpoint (``fedmoe_app.checkpoint.FILENAME``; not imported here
#: because that module pulls in torch and Flower).
CHECKPOINT_FILE = "checkpoint.npz"
#: Run-config keys the grid itself sets; ``--set`` may not override them.
GRID_KEYS = ("policy", "seed", "run-name", "output-dir", "resume")
#: Keys whose change does not make an earlier run of the same name a different experiment
#: (more rounds extend a run by resuming it).
IGNORED_WHEN_COMPARING = ("num-server-rounds", "resume", "run-name", "output-dir", "round-timeout-s")

# ----------------------------------------------------------------------------- the grid
#: How much local work a run does: THE place to change what a run costs. Chosen so that
#: the default 16-run grid fits in about 90 minutes on 2 shared CPU cores (docs/RESULTS.md
#: has the measurement behind these numbers).
LOCAL_WORK: dict[str, Any] = {
    "max-samples-per-client": 500,  # local training samples per client per epoch (cap)
    "local-epochs": 1,
    "batch-size": 32,
    "central-eval-samples": 2000,  # server-side test subsample, evaluated every round
    "fraction-evaluate": 0.25,  # clients asked for a local-test evaluation per round
    "min-evaluate-nodes": 1,
}

#: Run config shared by every run of the default grid.
DEFAULT_BASE: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "partitioner": "dirichlet",
    "num-server-rounds": 30,
    "fraction-train": 0.5,  # 10 of 20 clients per round
    "min-train-nodes": 2,
    "num-experts": 8,
    "top-k": 2,
    # Heterogeneous capacity: profiled, emulated device classes (fedmoe_app/capacity.py).
    # A phone holds 1 expert, a laptop 4, whatever the dataset and batch size.
    # ``experts-per-client`` caps profiled capacity (the app's default of 2 keeps the
    # default job sparse); here the cap is the laptop's 4, so capacities are really 1-4.
    "capacity": "profiled",
    "device-mix": "phone=0.5,laptop=0.5",
    "experts-per-client": 4,
    "round-timeout-s": 600.0,
    **LOCAL_WORK,
}
DEFAULT_CLIENTS = 20
DEFAULT_POLICIES: tuple[str, ...] = ("random", "greedy", "load_balanced", "dense")

#: ``--quick``: a smoke test of the whole pipeline on the synthetic dataset.
QUICK_BASE: dict[str, Any] = {
    "dataset": "synthetic",
    "partitioner": "dirichlet",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "min-train-nodes": 1,
    "fraction-evaluate": 0.5,
    "min-evaluate-nodes": 1,
    "num-experts": 8,
    "top-k": 2,
    "capacity": "profiled",
    "device-mix": "phone=0.5,laptop=0.5",
    "experts-per-client": 4,
    "max-samples-per-client": 0,
    "central-eval-samples": 0,
    "batch-size": 32,
    "local-epochs": 1,
    "round-timeout-s": 120.0,
}
QUICK_CLIENTS = 4
QUICK_POLICIES: tuple[str, ...] = ("greedy", "load_balanced")


@dataclass(frozen=True)
class Setting:
    """One data setting of a grid: run-config overrides and the seeds to run them with.

    Attributes
    ----------
    name : str
        Short name, used in run names and tables (e.g. ``"alpha=0.1"``).
    overrides : Mapping[str, Any]
        Run-config keys this setting sets on top of the grid's base.
    seeds : tuple of int
        Seeds to run (each seed changes data split, init, sampling and planning).
    label : str
        Human title for plots; defaults to ``name``.

    """

    name: str
    overrides: Mapping[str, Any]
    seeds: tuple[int, ...]
    label: str = ""

    @property
    def title(self) -> str:
        """Plot title."""
        return self.label or self.name


def alpha_setting(alpha: float, seeds: Sequence[int]) -> Setting:
    """Dirichlet-``alpha`` setting named ``alpha=<alpha>``."""
    return Setting(
        f"alpha={alpha:g}", {"dirichlet-alpha": float(alpha)}, tuple(seeds), f"Dirichlet α={alpha:g}"
    )


#: Seeds of the default grid per Dirichlet alpha (others: seed 0).
DEFAULT_SEEDS: dict[float, tuple[int, ...]] = {0.1: (0, 1, 2), 0.5: (0,)}
DEFAULT_SETTINGS: tuple[Setting, ...] = tuple(alpha_setting(a, s) for a, s in DEFAULT_SEEDS.items())


def slug(text: str) -> str:
    """File-name-safe version of ``text`` (``alpha=0.1`` -> ``alpha0.1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace(" ", "-")) or "x"


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid."""

    index: int
    setting: str
    policy: str
    seed: int
    run_config: Mapping[str, Any]
    num_supernodes: int

    @property
    def name(self) -> str:
        """Run name (output folder and log name)."""
        return f"{slug(self.setting)}-{self.policy}-s{self.seed}"

    @property
    def num_rounds(self) -> int:
        """Rounds of the run."""
        return int(self.run_config["num-server-rounds"])


@dataclass
class ExperimentGrid:
    """Policies x settings x seeds over a base run config.

    Attributes
    ----------
    base : dict
        Run config shared by every run.
    settings : tuple of Setting
        Data settings, each with its seeds.
    policies : tuple of str
        Alignment policies.
    num_clients : int
        Simulated SuperNodes (clients) of every run.

    """

    base: dict[str, Any]
    settings: tuple[Setting, ...]
    policies: tuple[str, ...]
    num_clients: int

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major: all policies of a (setting, seed) run back to back.

        The first seed of every setting comes first, so a partial grid already compares
        all policies in every setting.
        """
        keys = []
        for si, s in enumerate(self.settings):
            for ki, seed in enumerate(s.seeds):
                keys.append((ki, si, seed))
        out = []
        for _, si, seed in sorted(keys):
            s = self.settings[si]
            for policy in self.policies:
                cfg = {**self.base, **s.overrides, "policy": policy, "seed": int(seed)}
                spec = RunSpec(len(out) + 1, s.name, policy, int(seed), cfg, self.num_clients)
                cfg["run-name"] = spec.name
                cfg["output-dir"] = "runs"
                out.append(spec)
        return out

    def validate(self) -> None:
        """Check every run config with :meth:`RunConfig.from_run_config`.

        Raises
        ------
        ConfigError
            For the first invalid run config, naming the run.

        """
        if self.num_clients < 1:
            raise ConfigError(f"number of clients must be >= 1, got {self.num_clients}")
        names = [r.name for r in self.runs()]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names are not unique: {names}")
        for run in self.runs():
            try:
                RunConfig.from_run_config(run.run_config)
            except ConfigError as exc:
                raise ConfigError(f"run {run.name}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``experiment.json``)."""
        return {
            "base": self.base,
            "settings": [
                {"name": s.name, "overrides": dict(s.overrides), "seeds": list(s.seeds), "label": s.label}
                for s in self.settings
            ],
            "policies": list(self.policies),
            "num_clients": self.num_clients,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentGrid:
        """Inverse of :meth:`to_dict`."""
        settings = tuple(
            Setting(s["name"], dict(s["overrides"]), tuple(int(x) for x in s["seeds"]), s.get("label", ""))
            for s in d["settings"]
        )
        return cls(dict(d["base"]), settings, tuple(d["policies"]), int(d["num_clients"]))


def parse_value(text: str) -> Any:
    """Read a ``--set`` value: ``true``/``false``, an int, a float, else a string (quotes stripped)."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as TOML scalars, else strings.

    Raises
    ------
    ConfigError
        For an item without ``=``, an unknown key or a key the grid controls.

    """
    out: dict[str, Any] = {}
    allowed = RunConfig.keys()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key not in allowed:
            raise ConfigError(
                f"--set {item!r}: unknown run-config key {key!r}; allowed: {', '.join(allowed)}"
            )
        if key in GRID_KEYS:
            raise ConfigError(f"--set {item!r}: {key!r} is set by the grid (use --policies / --seeds)")
        out[key] = parse_value(text)
    return out


def build_grid(
    *,
    quick: bool = False,
    rounds: int | None = None,
    policies: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    alphas: Sequence[float] | None = None,
    clients: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ExperimentGrid:
    """Build the default (or ``quick``) grid with command-line changes applied.

    Parameters
    ----------
    quick : bool
        Synthetic data, policies greedy and load_balanced, seed 0, 3 rounds, 4 clients.
    rounds : int, optional
        ``num-server-rounds`` of every run.
    policies : sequence of str, optional
        Policies to compare.
    seeds : sequence of int, optional
        Seeds for every setting (default: per setting, :data:`DEFAULT_SEEDS`).
    alphas : sequence of float, optional
        Dirichlet alphas, one setting each (default: 0.1 and 0.5; quick: 0.5).
    clients : int, optional
        Simulated clients per run.
    overrides : Mapping, optional
        Run-config values for every run (``--set``); the setting's own keys win.

    """
    base = dict(QUICK_BASE if quick else DEFAULT_BASE)
    base.update(overrides or {})
    if rounds is not None:
        base["num-server-rounds"] = int(rounds)
    if alphas is None:
        alphas = (0.5,) if quick else tuple(DEFAULT_SEEDS)
    if overrides and "dirichlet-alpha" in overrides:
        logger.warning("--set dirichlet-alpha is overridden by the settings; use --alphas")
    settings = tuple(
        alpha_setting(a, seeds if seeds is not None else ((0,) if quick else DEFAULT_SEEDS.get(a, (0,))))
        for a in alphas
    )
    pol = tuple(policies) if policies else (QUICK_POLICIES if quick else DEFAULT_POLICIES)
    unknown = [p for p in pol if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policies {unknown}; allowed: {', '.join(POLICIES)}")
    num = clients if clients is not None else (QUICK_CLIENTS if quick else DEFAULT_CLIENTS)
    return ExperimentGrid(base, settings, pol, int(num))


# ----------------------------------------------------------------------------- run results
@dataclass
class RunResult:
    """Metrics of one finished run (``metrics.json`` rows, round 0 included)."""

    setting: str
    policy: str
    seed: int
    rounds: list[dict[str, Any]]


def read_metrics(run_dir: Path) -> list[dict[str, Any]] | None:
    """``metrics.json`` of ``run_dir`` (sorted by round), or None if absent or unreadable."""
    path = Path(run_dir) / "metrics.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rows, list):
        return None
    return sorted((r for r in rows if isinstance(r, dict) and "round" in r), key=lambda r: r["round"])


def rounds_done(rows: Sequence[Mapping[str, Any]] | None) -> int:
    """Highest training round recorded (0 if none)."""
    return max((int(r["round"]) for r in rows or ()), default=0)


def is_complete(rows: Sequence[Mapping[str, Any]] | None, num_rounds: int) -> bool:
    """Whether ``rows`` hold every training round ``1..num_rounds``."""
    have = {int(r["round"]) for r in rows or ()}
    return all(r in have for r in range(1, num_rounds + 1))


def _training_rounds(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((r for r in rows if int(r["round"]) >= 1), key=lambda r: r["round"])


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _accuracies(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    out = []
    for r in _training_rounds(rows):
        a = _num(r.get("accuracy"))
        if a is not None:
            out.append((int(r["round"]), a))
    return out


def final_accuracy(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Accuracy of the last training round that has one."""
    acc = _accuracies(rows)
    return acc[-1][1] if acc else None


def last_n_mean(rows: Sequence[Mapping[str, Any]], n: int = 5) -> float | None:
    """Mean accuracy of the last ``n`` training rounds (fewer if the run is shorter)."""
    acc = [a for _, a in _accuracies(rows)][-n:]
    return float(np.mean(acc)) if acc else None


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """First training round whose accuracy is ``>= target``; None if never."""
    return next((rnd for rnd, a in _accuracies(rows) if a >= target), None)


def _total(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [_num(r.get(key)) for r in _training_rounds(rows)]
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [_num(r.get(key)) for r in _training_rounds(rows)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- summary
@dataclass
class SummaryRow:
    """One (setting, policy) line of the summary; accuracies are fractions in [0, 1].

    ``*_std`` are sample standard deviations over seeds (ddof = 1), None with one run.
    ``rounds_to_target`` is the mean over the runs that reached ``target`` (``reached``
    of ``runs``), None if none did or there is no target. Byte totals are summed over a
    run's rounds and averaged over runs; ``virtual_time_s`` is a run's sum of
    ``virtual_round_time_s`` (rounds where it is null skipped), averaged over runs that
    have one.
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
    target: float | None
    rounds_to_target: float | None
    reached: int
    mb_down: float | None
    mb_up: float | None
    dense_mb_down: float | None
    load_cv: float | None
    virtual_time_s: float | None
    wall_time_s: float | None
    last_n: int = 5


def _megabytes(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 1e6


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _ordered(values: Sequence[str], order: Sequence[str] | None) -> list[str]:
    first = [v for v in (order or ()) if v in values]
    return first + sorted(set(values) - set(first), key=values.index)


def summarize(
    results: Sequence[RunResult],
    *,
    target_fraction: float = 0.95,
    last_n: int = 5,
    baseline: str = "dense",
    settings: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
) -> list[SummaryRow]:
    """Aggregate runs into one :class:`SummaryRow` per (setting, policy).

    Parameters
    ----------
    results : sequence of RunResult
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

    Returns
    -------
    list of SummaryRow
        Setting-major, in the given order.

    """
    by_key: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        by_key.setdefault((r.setting, r.policy), []).append(r)
    targets: dict[str, float | None] = {}
    for s in {r.setting for r in results}:
        base_final, _ = _mean_std([final_accuracy(r.rounds) for r in by_key.get((s, baseline), [])])
        targets[s] = None if base_final is None else target_fraction * base_final
    rows = []
    for s in _ordered([r.setting for r in results], settings):
        for p in _ordered([r.policy for r in results if r.setting == s], policies):
            runs = sorted(by_key.get((s, p), []), key=lambda r: r.seed)
            if not runs:
                continue
            final, final_std = _mean_std([final_accuracy(r.rounds) for r in runs])
            lastn, lastn_std = _mean_std([last_n_mean(r.rounds, last_n) for r in runs])
            best, _ = _mean_std([max((a for _, a in _accuracies(r.rounds)), default=None) for r in runs])
            target = targets.get(s)
            hits = [rounds_to_target(r.rounds, target) for r in runs] if target is not None else []
            hits = [h for h in hits if h is not None]
            mb = {
                k: _mean_std([_megabytes(_total(r.rounds, k)) for r in runs])[0]
                for k in ("bytes_down", "bytes_up", "dense_bytes_down")
            }
            rows.append(
                SummaryRow(
                    setting=s,
                    policy=p,
                    runs=len(runs),
                    seeds=[r.seed for r in runs],
                    final_acc=final,
                    final_acc_std=final_std,
                    best_acc=best,
                    last_n_acc=lastn,
                    last_n_acc_std=lastn_std,
                    target=target,
                    rounds_to_target=float(np.mean(hits)) if hits else None,
                    reached=len(hits),
                    mb_down=mb["bytes_down"],
                    mb_up=mb["bytes_up"],
                    dense_mb_down=mb["dense_bytes_down"],
                    load_cv=_mean_std([_mean_of(r.rounds, "load_cv") for r in runs])[0],
                    virtual_time_s=_mean_std([_total(r.rounds, "virtual_round_time_s") for r in runs])[0],
                    wall_time_s=_mean_std([_total(r.rounds, "wall_time_s") for r in runs])[0],
                    last_n=last_n,
                )
            )
    return rows


DASH = "—"


def _pct(mean: float | None, std: float | None = None) -> str:
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


TABLE_COLUMNS = (
    "setting",
    "policy",
    "final acc. (%)",
    "best acc. (%)",
    "last-{n} mean (%)",
    "rounds to target",
    "MB down",
    "MB up",
    "load CV",
    "virtual time (s)",
    "runs",
)


def format_table(rows: Sequence[SummaryRow]) -> str:
    """Markdown table of summary rows (accuracies in %, mean ± sample std over seeds).

    ``—`` marks a value that does not exist (a target never reached, no virtual time);
    ``12.5 (2/3)`` means 2 of 3 runs reached the target, after 12.5 rounds on average.
    """
    n = rows[0].last_n if rows else 5
    header = [c.format(n=n) for c in TABLE_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in rows:
        cells = [
            r.setting,
            r.policy,
            _pct(r.final_acc, r.final_acc_std),
            _pct(r.best_acc),
            _pct(r.last_n_acc, r.last_n_acc_std),
            _rounds_cell(r),
            _fmt(r.mb_down, ".1f"),
            _fmt(r.mb_up, ".1f"),
            _fmt(r.load_cv, ".3f"),
            _fmt(r.virtual_time_s, ".1f"),
            str(r.runs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[SummaryRow]) -> str:
    """CSV of summary rows: raw numbers (accuracies as fractions), empty where None."""
    buf = io.StringIO()
    names = [f for f in SummaryRow.__dataclass_fields__]
    writer = csv.writer(buf)
    writer.writerow(names)
    for r in rows:
        d = asdict(r)
        d["seeds"] = ";".join(str(s) for s in r.seeds)
        writer.writerow(
            ["" if d[k] is None else (f"{d[k]:.6g}" if isinstance(d[k], float) else d[k]) for k in names]
        )
    return buf.getvalue()


def summary_markdown(
    rows: Sequence[SummaryRow], *, title: str, complete: int, total: int, plots: Sequence[str] = ()
) -> str:
    """Render the ``summary.md`` document: table, definitions, targets and plots."""
    targets = {r.setting: r.target for r in rows}
    n = rows[0].last_n if rows else 5
    lines = [
        f"# {title}",
        "",
        f"{complete} of {total} runs complete (updated {dt.datetime.now().isoformat(timespec='seconds')}).",
        "",
        format_table(rows),
        "Accuracy: central test accuracy, mean ± sample std over seeds (one seed: no ±); "
        f"best: the run's best round; last-{n} mean: the mean of a run's last {n} rounds "
        "(judge policies on this, DESIGN.md). Rounds to target: first round reaching 95% of "
        "dense's mean final accuracy in the same setting, mean over the runs that reached it "
        "((k/n): only k of n did; —: none). MB: bytes sent down/up over the whole run "
        "(10^6 bytes), mean over runs. Load CV: mean over rounds of the coefficient of "
        "variation of clients per expert. Virtual time: sum of the simulated round times "
        "(slowest participant per round), — where not measured.",
        "",
    ]
    if any(t is not None for t in targets.values()):
        lines += [
            "Targets: " + ", ".join(f"{s}: {_pct(t)}%" for s, t in targets.items() if t is not None),
            "",
        ]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _policy_colors(policies: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    fixed = {p: cmap(i) for i, p in enumerate(POLICIES)}
    extra = [p for p in policies if p not in fixed]
    fixed.update({p: cmap(len(POLICIES) + i) for i, p in enumerate(extra)})
    return fixed


def accuracy_curves(results: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(rounds, mean, std)`` of accuracy per round over ``results`` (NaN-aware, ddof 0)."""
    rounds = sorted({int(r["round"]) for res in results for r in res.rounds})
    mat = np.full((len(results), len(rounds)), np.nan)
    pos = {rnd: i for i, rnd in enumerate(rounds)}
    for i, res in enumerate(results):
        for r in res.rounds:
            a = _num(r.get("accuracy"))
            if a is not None:
                mat[i, pos[int(r["round"])]] = a
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        mean = np.nanmean(mat, axis=0)
        std = np.nanstd(mat, axis=0)
    return np.asarray(rounds), mean, std


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def plot_accuracy(
    results: Sequence[RunResult],
    path: Path,
    *,
    settings: Sequence[Setting] | None = None,
    policies: Sequence[str] | None = None,
) -> Path:
    """Accuracy per round, mean ± std band over seeds per policy, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = _ordered([r.setting for r in results], [s.name for s in settings or ()])
    titles = {s.name: s.title for s in settings or ()}
    pols = _ordered([r.policy for r in results], policies)
    colors = _policy_colors(pols)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5.5 * max(len(names), 1), 4), squeeze=False)
    for ax, s in zip(axes[0], names):
        for p in pols:
            runs = [r for r in results if r.setting == s and r.policy == p]
            if not runs:
                continue
            x, mean, std = accuracy_curves(runs)
            label = f"{p} (n={len(runs)})"
            ax.plot(x, 100 * mean, color=colors[p], label=label, lw=1.6)
            if len(runs) > 1:
                ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=colors[p], alpha=0.18, lw=0)
        ax.set_title(titles.get(s, s))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("central test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def load_matrix(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], np.ndarray]:
    """Return ``(rounds, [R, E] share of each round's expert load)`` from ``expert_load`` rows."""
    pairs = [(int(r["round"]), r["expert_load"]) for r in rows if r.get("expert_load")]
    if not pairs:
        return [], np.zeros((0, 0))
    width = max(len(v) for _, v in pairs)
    mat = np.zeros((len(pairs), width))
    for i, (_, v) in enumerate(pairs):
        mat[i, : len(v)] = [_num(x) or 0.0 for x in v]
    total = mat.sum(axis=1, keepdims=True)
    return [r for r, _ in pairs], np.divide(mat, total, out=np.zeros_like(mat), where=total > 0)


def plot_expert_load(
    results: Sequence[RunResult],
    path: Path,
    *,
    settings: Sequence[Setting] | None = None,
    policies: Sequence[str] | None = None,
) -> Path:
    """Expert-load heat-maps (round x expert, share of the round's tokens) side by side.

    One row per setting, one panel per policy, each from the setting's lowest seed that
    has a finished run of that policy; one colour scale for all panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = _ordered([r.setting for r in results], [s.name for s in settings or ()])
    titles = {s.name: s.title for s in settings or ()}
    pols = _ordered([r.policy for r in results], policies)
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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if i == nrow - 1:
                ax.set_xlabel("expert")
            if j == 0:
                ax.set_ylabel("round")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of the round's expert load")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- experiment folder
def run_dir(exp_dir: Path, run: RunSpec) -> Path:
    """Output folder of ``run`` (``output-dir`` ``runs`` under the experiment folder)."""
    return Path(exp_dir) / str(run.run_config["output-dir"]) / run.name


def log_path(exp_dir: Path, run: RunSpec) -> Path:
    """``flwr run`` log of ``run``."""
    return Path(exp_dir) / "logs" / f"{run.name}.log"


def collect_results(exp_dir: Path, grid: ExperimentGrid) -> tuple[list[RunResult], int]:
    """Finished runs of ``grid`` found under ``exp_dir``, and the grid's size."""
    runs = grid.runs()
    out = []
    for run in runs:
        rows = read_metrics(run_dir(exp_dir, run))
        if rows is not None and is_complete(rows, run.num_rounds):
            rows = [r for r in rows if int(r["round"]) <= run.num_rounds]
            out.append(RunResult(run.setting, run.policy, run.seed, rows))
    return out, len(runs)


def write_summary(exp_dir: Path, grid: ExperimentGrid, *, title: str | None = None) -> list[SummaryRow]:
    """Rewrite ``summary.md``, ``summary.csv`` and the plots from the finished runs."""
    exp_dir = Path(exp_dir)
    results, total = collect_results(exp_dir, grid)
    rows = summarize(results, settings=[s.name for s in grid.settings], policies=list(grid.policies))
    plots: list[str] = []
    if results:
        kw: dict[str, Any] = {"settings": grid.settings, "policies": grid.policies}
        plots.append(str(plot_accuracy(results, exp_dir / "accuracy.png", **kw)))
        plots.append(str(plot_expert_load(results, exp_dir / "expert_load.png", **kw)))
    title = title or f"fedmoe policy comparison: {exp_dir.name}"
    atomic_write(
        exp_dir / "summary.md",
        summary_markdown(rows, title=title, complete=len(results), total=total, plots=plots),
    )
    atomic_write(exp_dir / "summary.csv", rows_to_csv(rows))
    return rows


def config_mismatch(run_directory: Path, run_config: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys where a run folder's ``config.json`` differs from ``run_config``: ``{key: (old, new)}``."""
    try:
        saved = json.loads((Path(run_directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {
        k: (saved.get(k), v)
        for k, v in run_config.items()
        if k not in IGNORED_WHEN_COMPARING and k in saved and saved[k] != v
    }


# ----------------------------------------------------------------------------- progress
def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class RunState:
    """Live state of one run in ``progress.json``."""

    index: int
    name: str
    setting: str
    policy: str
    seed: int
    num_rounds: int
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted
    rounds_done: int = 0
    first_round: int | None = None  # (round, seconds into the run) when rounds were first seen
    first_round_s: float | None = None
    last_accuracy: float | None = None
    started_at: float | None = None
    duration_s: float | None = None
    returncode: int | None = None
    run_dir: str = ""
    log: str = ""


class Progress:
    """Keeps ``progress.json`` and the ETA of a grid.

    The ETA is ``(mean duration of the runs completed in this invocation) x (runs not
    started)`` plus what the running runs still need (from their own pace once they have
    recorded rounds: start-up until the first round, then seconds per round), divided by
    the parallel jobs. Before any run has completed, a running run's pace stands in for
    the mean duration.
    """

    def __init__(self, exp_dir: Path, runs: Sequence[RunSpec], jobs: int) -> None:
        self.exp_dir = Path(exp_dir)
        self.jobs = max(1, jobs)
        self.started = time.time()
        self.states = [
            RunState(
                r.index,
                r.name,
                r.setting,
                r.policy,
                r.seed,
                r.num_rounds,
                run_dir=str(run_dir(exp_dir, r)),
                log=str(log_path(exp_dir, r)),
            )
            for r in runs
        ]
        self.status = "running"

    def count(self, status: str) -> int:
        """Count the runs with ``status``."""
        return sum(s.status == status for s in self.states)

    def run_estimate(self, now: float | None = None) -> float | None:
        """Return the expected duration of one run (seconds), or None before any estimate."""
        now = time.time() if now is None else now
        done = [s.duration_s for s in self.states if s.status == "done" and s.duration_s]
        if done:
            return float(np.mean(done))
        rates = [self._running_estimate(s, now) for s in self.states if s.status == "running"]
        rates = [r for r in rates if r is not None]
        return float(np.mean(rates)) if rates else None

    @staticmethod
    def _running_estimate(s: RunState, now: float) -> float | None:
        """Duration of a running run: start-up until its first seen round, then its round rate."""
        if s.started_at is None or s.rounds_done <= 0:
            return None
        elapsed = now - s.started_at
        if s.first_round is None or s.first_round_s is None or s.rounds_done <= s.first_round:
            return elapsed / s.rounds_done * s.num_rounds
        per_round = (elapsed - s.first_round_s) / (s.rounds_done - s.first_round)
        return s.first_round_s + per_round * (s.num_rounds - s.first_round)

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until the grid is through, or None before there is any estimate."""
        now = time.time() if now is None else now
        per_run = self.run_estimate(now)
        if per_run is None:
            return None if self.count("pending") or self.count("running") else 0.0
        left = per_run * self.count("pending")
        for s in self.states:
            if s.status == "running":
                own = self._running_estimate(s, now)  # its own pace once it has rounds
                expected = per_run if own is None else own
                left += max(expected - (now - (now if s.started_at is None else s.started_at)), 0.0)
        return left / self.jobs

    def write(self) -> None:
        """Rewrite ``progress.json`` (atomically)."""
        now = time.time()
        doc = {
            "experiment": str(self.exp_dir),
            "pid": os.getpid(),
            "status": self.status,
            "started_at": dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "updated_at": dt.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
            "elapsed_s": round(now - self.started, 1),
            "total": len(self.states),
            **{k: self.count(k) for k in ("done", "skipped", "failed", "running", "pending", "interrupted")},
            "eta_s": None if (eta := self.eta_s(now)) is None else round(eta, 1),
            "runs": [asdict(s) for s in self.states],
        }
        atomic_write(self.exp_dir / "progress.json", json.dumps(doc, indent=1))


# ----------------------------------------------------------------------------- running
def _interrupt_once(signum: int, frame: Any) -> None:
    """Signal handler: raise KeyboardInterrupt once, then ignore SIGINT and SIGTERM.

    Ignoring later signals lets the cleanup that the first one started (stopping a
    SuperLink and its workers) run to the end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _child_main(
    app_dir: str,
    num_supernodes: int,
    run_config: dict[str, Any],
    output_root: str,
    log_file: str,
    timeout: float | None,
    client_cpus: float,
) -> None:
    """Body of a run's child process: :func:`fedmoe_app.launch.launch` into the run's log.

    SIGTERM becomes KeyboardInterrupt so that ``launch`` stops its SuperLink and every
    process it started. The exit code is ``launch``'s (130 when interrupted).
    """
    signal.signal(signal.SIGTERM, _interrupt_once)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # nohup'ed / background: stays ignored
        signal.signal(signal.SIGINT, _interrupt_once)
    from .launch import launch

    code = 1
    with open(log_file, "a", buffering=1) as log:
        log.write(
            f"\n=== fedmoe experiment run {run_config.get('run-name')} started {dt.datetime.now()} ===\n"
        )
        log.flush()
        try:
            code = launch(
                app_dir,
                num_supernodes=num_supernodes,
                run_config=run_config,
                output_root=output_root,
                timeout=timeout,
                stream_to=log,
                # flwr wants an int where the value is whole ("1.0" is rejected)
                num_cpus=int(client_cpus) if float(client_cpus).is_integer() else client_cpus,
            )
        except KeyboardInterrupt:
            log.write("=== interrupted ===\n")
            code = 130
        except Exception:  # noqa: BLE001 - the log gets the traceback, the parent the code
            traceback.print_exc(file=log)
            code = 1
        log.write(f"=== exit code {code} ===\n")
    sys.exit(code)


class ExperimentLock:
    """``<exp_dir>/.lock`` holding this process's PID; refuses a live second runner."""

    def __init__(self, exp_dir: Path) -> None:
        self.path = Path(exp_dir) / ".lock"

    def __enter__(self) -> ExperimentLock:
        import psutil

        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid and pid != os.getpid() and psutil.pid_exists(pid):
            raise RuntimeError(f"another `compare` (pid {pid}) is running in {self.path.parent}")
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def run_grid(
    grid: ExperimentGrid,
    exp_dir: Path,
    *,
    jobs: int = 1,
    app_dir: Path = ROOT,
    run_timeout: float | None = None,
    client_cpus: float = 1.0,
    poll_s: float = 5.0,
) -> Progress:
    """Run every unfinished run of ``grid`` under ``exp_dir``; rewrite the summary as runs end.

    Each run is a child process calling :func:`fedmoe_app.launch.launch` (``flwr run`` in
    local simulation with a private SuperLink). Runs whose ``metrics.json`` holds every
    round are skipped; a run with a checkpoint but missing rounds is resumed
    (``resume = true``).

    Parameters
    ----------
    grid : ExperimentGrid
        The runs.
    exp_dir : Path
        Experiment folder.
    jobs : int
        Runs at the same time (1: sequential).
    app_dir : Path
        The Flower app (folder with ``pyproject.toml``).
    run_timeout : float, optional
        Seconds after which a run is stopped and counted as failed.
    client_cpus : float
        Ray CPUs per simulated client.
    poll_s : float
        Seconds between progress updates.

    Returns
    -------
    Progress
        Final state of every run.

    Raises
    ------
    ConfigError
        If a run config is invalid or an existing run folder was made with another config.
    KeyboardInterrupt
        On Ctrl-C / SIGTERM, after the running runs were stopped.

    """
    exp_dir = Path(exp_dir).resolve()
    grid.validate()
    runs = grid.runs()
    for run in runs:
        diff = config_mismatch(run_dir(exp_dir, run), run.run_config)
        if diff:
            raise ConfigError(
                f"{run_dir(exp_dir, run)} was run with another config "
                f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "use another --out or remove that folder"
            )
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(exp_dir / "experiment.json", json.dumps(grid.to_dict(), indent=2))
    progress = Progress(exp_dir, runs, jobs)
    n = len(runs)
    for run, st in zip(runs, progress.states):
        rows = read_metrics(run_dir(exp_dir, run))
        if is_complete(rows, run.num_rounds):
            st.status, st.rounds_done = "skipped", run.num_rounds
            st.last_accuracy = final_accuracy(rows or [])
    skipped = progress.count("skipped")
    logger.info(
        "experiment %s: %d runs (%d complete, skipped), %d to run, %d at a time",
        exp_dir,
        n,
        skipped,
        n - skipped,
        jobs,
    )
    if skipped:
        write_summary(exp_dir, grid)
    progress.write()

    ctx = mp.get_context("spawn")
    active: dict[int, tuple[RunSpec, RunState, Any]] = {}
    queue = [(r, s) for r, s in zip(runs, progress.states) if s.status == "pending"]
    try:
        while queue or active:
            while queue and len(active) < max(1, jobs):
                run, st = queue.pop(0)
                cfg = dict(run.run_config)
                if (run_dir(exp_dir, run) / CHECKPOINT_FILE).is_file():
                    cfg["resume"] = True
                proc = ctx.Process(
                    target=_child_main,
                    args=(
                        str(app_dir),
                        run.num_supernodes,
                        cfg,
                        str(exp_dir),
                        str(log_path(exp_dir, run)),
                        run_timeout,
                        client_cpus,
                    ),
                    name=f"fedmoe-{run.name}",
                )
                proc.start()
                st.status, st.started_at = "running", time.time()
                active[run.index] = (run, st, proc)
                logger.info(
                    "[%d/%d] %s %s seed %d: start%s (log: %s)",
                    run.index,
                    n,
                    run.setting,
                    run.policy,
                    run.seed,
                    " (resuming)" if cfg.get("resume") else "",
                    os.path.relpath(st.log, exp_dir),
                )
            progress.write()
            deadline = time.monotonic() + poll_s
            while time.monotonic() < deadline and all(p.is_alive() for _, _, p in active.values()):
                time.sleep(0.2)
            for idx, (run, st, proc) in list(active.items()):
                rows = read_metrics(run_dir(exp_dir, run))
                done_now = rounds_done(rows)
                if done_now > st.rounds_done:
                    if st.first_round is None:
                        st.first_round, st.first_round_s = done_now, time.time() - (st.started_at or 0.0)
                    st.rounds_done = done_now
                    st.last_accuracy = final_accuracy(rows or [])
                    logger.info(
                        "[%d/%d] %s %s seed %d: round %d/%d acc %s%% (%s) | ETA %s",
                        run.index,
                        n,
                        run.setting,
                        run.policy,
                        run.seed,
                        done_now,
                        run.num_rounds,
                        _pct(st.last_accuracy),
                        fmt_duration(time.time() - (st.started_at or time.time())),
                        fmt_duration(progress.eta_s()),
                    )
                if proc.is_alive():
                    continue
                proc.join()
                del active[idx]
                st.returncode = proc.exitcode
                st.duration_s = time.time() - (st.started_at or time.time())
                complete = is_complete(rows, run.num_rounds)
                st.status = "done" if proc.exitcode == 0 and complete else "failed"
                if st.status == "done":
                    write_summary(exp_dir, grid)
                    logger.info(
                        "[%d/%d] %s %s seed %d: done in %s, final acc %s%%, last-5 %s%% | "
                        "%d done, %d skipped, %d failed, %d left | ETA %s",
                        run.index,
                        n,
                        run.setting,
                        run.policy,
                        run.seed,
                        fmt_duration(st.duration_s),
                        _pct(final_accuracy(rows or [])),
                        _pct(last_n_mean(rows or [])),
                        progress.count("done"),
                        progress.count("skipped"),
                        progress.count("failed"),
                        progress.count("pending") + progress.count("running"),
                        fmt_duration(progress.eta_s()),
                    )
                else:
                    logger.warning(
                        "[%d/%d] %s %s seed %d: FAILED (exit code %s, %d/%d rounds) after %s; see %s",
                        run.index,
                        n,
                        run.setting,
                        run.policy,
                        run.seed,
                        proc.exitcode,
                        rounds_done(rows),
                        run.num_rounds,
                        fmt_duration(st.duration_s),
                        st.log,
                    )
                progress.write()
    except BaseException:
        progress.status = "interrupted"
        for _run, st, proc in active.values():
            st.status = "interrupted"
            # SIGTERM (a no-op if a Ctrl-C already reached the child): the child stops
            # its SuperLink and every process that started, then exits
            proc.terminate()
        for _run, _st, proc in active.values():
            proc.join(timeout=90)
            if proc.is_alive():
                proc.kill()
                proc.join()
        progress.write()
        raise
    progress.status = "finished"
    progress.write()
    write_summary(exp_dir, grid)
    return progress


# ----------------------------------------------------------------------------- CLI
def default_out(quick: bool, base: Mapping[str, Any]) -> Path:
    """``outputs/experiments/quick`` or ``outputs/experiments/compare[-<dataset>]``."""
    if quick:
        return Path("outputs/experiments/quick")
    ds = base.get("dataset", "fashion-mnist")
    return Path("outputs/experiments/compare" + ("" if ds == "fashion-mnist" else f"-{slug(str(ds))}"))


def _setup_logging(exp_dir: Path) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    exp_dir.mkdir(parents=True, exist_ok=True)
    handlers.append(logging.FileHandler(exp_dir / "experiment.log"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handlers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_app.experiments", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser(
        "compare",
        help="run the policy comparison grid (resumable) and summarize it",
        description="Run policies x settings x seeds with the real app; re-running continues a grid.",
    )
    cmp_.add_argument(
        "--quick", action="store_true", help="synthetic data, 2 policies, 1 seed, 3 rounds, 4 clients"
    )
    cmp_.add_argument(
        "--out", type=Path, default=None, help="experiment folder (default outputs/experiments/...)"
    )
    cmp_.add_argument("--jobs", type=int, default=1, help="runs at the same time (default 1)")
    cmp_.add_argument("--rounds", type=int, default=None, help="rounds per run (default 30; quick 3)")
    cmp_.add_argument("--policies", nargs="+", default=None, choices=POLICIES, metavar="POLICY")
    cmp_.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds for every setting")
    cmp_.add_argument("--alphas", nargs="+", type=float, default=None, help="Dirichlet alphas (settings)")
    cmp_.add_argument("--clients", type=int, default=None, help="simulated clients (default 20; quick 4)")
    cmp_.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="run-config value"
    )
    cmp_.add_argument("--run-timeout", type=float, default=7200.0, help="seconds before a run is stopped")
    cmp_.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per simulated client")
    cmp_.add_argument("--app-dir", type=Path, default=ROOT, help="the Flower app (default: this repo)")
    cmp_.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    summ = sub.add_parser("summarize", help="rewrite summary.md/csv and the plots of an experiment folder")
    summ.add_argument("out", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    if args.command == "summarize":
        grid = ExperimentGrid.from_dict(json.loads((args.out / "experiment.json").read_text()))
        rows = write_summary(args.out, grid)
        print(format_table(rows), end="")
        return 0
    try:
        grid = build_grid(
            quick=args.quick,
            rounds=args.rounds,
            policies=args.policies,
            seeds=args.seeds,
            alphas=args.alphas,
            clients=args.clients,
            overrides=parse_set(args.overrides),
        )
        grid.validate()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = (args.out or default_out(args.quick, grid.base)).resolve()
    if args.dry_run:
        for run in grid.runs():
            print(f"{run.index:3d} {run.name:32s} clients={run.num_supernodes} {json.dumps(run.run_config)}")
        return 0
    handlers = _setup_logging(out)
    # Ctrl-C / kill: stop the running run cleanly (once; later signals are ignored meanwhile)
    previous = {sig: signal.signal(sig, _interrupt_once) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.time()
    try:
        with ExperimentLock(out):
            progress = run_grid(
                grid,
                out,
                jobs=args.jobs,
                app_dir=args.app_dir,
                run_timeout=args.run_timeout,
                client_cpus=args.client_cpus,
            )
    except (ConfigError, RuntimeError) as exc:
        logger.error("error: %s", exc)
        return 2
    except KeyboardInterrupt:
        logger.warning(
            "interrupted after %s; re-run the same command to continue", fmt_duration(time.time() - t0)
        )
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    rows = write_summary(out, grid)
    logger.info(
        "finished in %s: %d done, %d skipped, %d failed; summary in %s",
        fmt_duration(time.time() - t0),
        progress.count("done"),
        progress.count("skipped"),
        progress.count("failed"),
        out / "summary.md",
    )
    for h in handlers:
        h.flush()
    print()
    print(format_table(rows), end="")
    return 1 if progress.count("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
