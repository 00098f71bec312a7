"""The experiment grid: policies x data settings x seeds over a base run config.

:func:`build_grid` makes the default grid (or the ``--quick`` one) with the command line's
changes applied; :meth:`ExperimentGrid.runs` lists its runs (:class:`RunSpec`), each with
the complete run config it is launched with. :func:`parse_set` reads ``--set key=value``
items. Everything that sets what a run costs is :data:`LOCAL_WORK`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...alignment import POLICIES
from ...config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

#: Run-config keys the grid itself sets; ``--set`` may not override them.
GRID_KEYS = ("policy", "seed", "run-name", "output-dir", "resume")

#: How much local work a run does: THE place to change what a run costs. A full local epoch
#: on every client's whole partition (federated learning's usual unit of local work; capping
#: it at a fifth of an epoch kept every policy far below published FedAvg figures), the whole
#: official test set for the global view and every client's local test for the personalized
#: view, every round (docs/RESULTS.md has the cost of a run).
LOCAL_WORK: dict[str, Any] = {
    "max-samples-per-client": 0,  # 0: a client's whole partition (a full local epoch)
    "local-epochs": 1,
    "batch-size": 32,
    "central-eval-samples": 0,  # 0: the whole official test set, evaluated every round
    "fraction-evaluate": 1.0,  # every client evaluates its own experts on its local test
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
    # Heterogeneous capacity: profiled, emulated device classes (fedmoe_app/capacity/).
    # A phone holds 1 expert, a laptop 4, whatever the dataset and batch size;
    # ``experts-per-client`` (4, the app's default) caps profiled capacity.
    "capacity": "profiled",
    "device-mix": "phone=0.5,laptop=0.5",
    "experts-per-client": 4,
    "round-timeout-s": 600.0,
    **LOCAL_WORK,
}
DEFAULT_CLIENTS = 20
#: Policies of the default grid: every policy.
DEFAULT_POLICIES: tuple[str, ...] = POLICIES

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
    """Return the Dirichlet-``alpha`` setting, named ``alpha=<alpha>``.

    Parameters
    ----------
    alpha : float
        Dirichlet concentration of the label partition.
    seeds : sequence of int
        Seeds to run it with.

    Returns
    -------
    Setting
        Setting that overrides ``dirichlet-alpha``.

    """
    return Setting(
        f"alpha={alpha:g}", {"dirichlet-alpha": float(alpha)}, tuple(seeds), f"Dirichlet α={alpha:g}"
    )


def partitioner_setting(partitioner: str, seeds: Sequence[int]) -> Setting:
    """Return the one setting of a grid whose ``partitioner`` is not Dirichlet (e.g. ``natural``).

    Parameters
    ----------
    partitioner : str
        The run config's ``partitioner``; it names the setting.
    seeds : sequence of int
        Seeds to run it with.

    Returns
    -------
    Setting
        Setting without overrides of its own.

    """
    return Setting(partitioner, {}, tuple(seeds), f"partitioner {partitioner}")


#: Seeds of the default grid per Dirichlet alpha (others: seed 0).
DEFAULT_SEEDS: dict[float, tuple[int, ...]] = {0.1: (0, 1, 2), 0.5: (0,)}
DEFAULT_SETTINGS: tuple[Setting, ...] = tuple(alpha_setting(a, s) for a, s in DEFAULT_SEEDS.items())


def slug(text: str) -> str:
    """Return a file-name-safe version of ``text`` (``alpha=0.1`` -> ``alpha0.1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace(" ", "-")) or "x"


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid.

    Attributes
    ----------
    index : int
        1-based position in the grid's run order.
    setting : str
        Name of its :class:`Setting`.
    policy : str
        Alignment policy.
    seed : int
        Seed.
    run_config : Mapping[str, Any]
        Complete run config it is launched with.
    num_supernodes : int
        Simulated clients.

    """

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
    """Read a ``--set`` value.

    Parameters
    ----------
    text : str
        The text after ``=``.

    Returns
    -------
    bool, int, float or str
        ``true``/``false`` as a bool, else an int, else a float, else the string (with one
        pair of surrounding quotes stripped).

    """
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


def parse_set(
    items: Sequence[str],
    reserved: Sequence[str] = GRID_KEYS,
    why: str = "is set by the grid (use --policies / --seeds)",
) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as TOML scalars, else strings.

    Parameters
    ----------
    items : sequence of str
        ``key=value`` items.
    reserved : sequence of str
        Keys refused here (by default the grid's own, :data:`GRID_KEYS`).
    why : str
        The end of the error for a ``reserved`` key (after the key).

    Returns
    -------
    dict
        Run-config overrides, values read by :func:`parse_value`.

    Raises
    ------
    ConfigError
        For an item without ``=``, an unknown key or a ``reserved`` key.

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
        if key in reserved:
            raise ConfigError(f"--set {item!r}: {key!r} {why}")
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

    Returns
    -------
    ExperimentGrid
        The grid (not yet validated: see :meth:`ExperimentGrid.validate`).

    Raises
    ------
    ConfigError
        For an unknown policy.

    """
    base = dict(QUICK_BASE if quick else DEFAULT_BASE)
    base.update(overrides or {})
    if rounds is not None:
        base["num-server-rounds"] = int(rounds)
    partitioner = str(base.get("partitioner", "dirichlet"))
    if partitioner != "dirichlet":
        if alphas:
            raise ConfigError(
                f"--alphas needs partitioner 'dirichlet'; the grid's partitioner is {partitioner!r}"
            )
        settings = (partitioner_setting(partitioner, seeds if seeds is not None else (0,)),)
    else:
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
