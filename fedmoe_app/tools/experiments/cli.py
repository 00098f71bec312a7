"""Experiment grids over the real app: ``python -m fedmoe_app.tools.experiments compare``.

``compare`` builds a grid (:func:`.grid.build_grid`) from the command line and runs it
(:func:`.runner.run_grid`); ``summarize`` rewrites the summary files of an experiment
folder. Progress lines go to stdout and ``<out>/experiment.log``; the summary table is
printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...alignment import POLICIES
from ...config import ConfigError
from .folder import write_summary
from .grid import ExperimentGrid, build_grid, parse_set, slug
from .progress import fmt_duration
from .runner import REPO_ROOT, ExperimentLock, interrupt_once, run_grid
from .summary import format_table
from .to_target import parse_targets

logger = logging.getLogger(__name__)
#: The logger every module of the harness logs under; the CLI routes it to stdout and a file.
HARNESS_LOGGER = __name__.rpartition(".")[0]


def default_out(quick: bool, base: Mapping[str, Any]) -> Path:
    """Return the default experiment folder.

    Parameters
    ----------
    quick : bool
        Whether the grid is ``--quick``.
    base : Mapping
        The grid's base run config.

    Returns
    -------
    Path
        ``outputs/experiments/quick``, or ``outputs/experiments/compare`` with
        ``-<dataset>`` appended for a dataset other than Fashion-MNIST.

    """
    if quick:
        return Path("outputs/experiments/quick")
    ds = base.get("dataset", "fashion-mnist")
    return Path("outputs/experiments/compare" + ("" if ds == "fashion-mnist" else f"-{slug(str(ds))}"))


def _setup_logging(exp_dir: Path) -> list[logging.Handler]:
    """Send the harness's log records to stdout and ``<exp_dir>/experiment.log``."""
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    exp_dir.mkdir(parents=True, exist_ok=True)
    handlers.append(logging.FileHandler(exp_dir / "experiment.log"))
    harness = logging.getLogger(HARNESS_LOGGER)
    for h in handlers:
        h.setFormatter(fmt)
        harness.addHandler(h)
    harness.setLevel(logging.INFO)
    harness.propagate = False
    return handlers


def build_parser() -> argparse.ArgumentParser:
    """Return the command line's parser (``fedmoe-experiments``)."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmoe_app.tools.experiments", description=__doc__.splitlines()[0]
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
    cmp_.add_argument("--app-dir", type=Path, default=REPO_ROOT, help="the Flower app (default: this repo)")
    cmp_.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    summ = sub.add_parser("summarize", help="rewrite summary.md/csv and the plots of an experiment folder")
    summ.add_argument("out", type=Path)
    for p in (cmp_, summ):
        p.add_argument(
            "--target",
            dest="targets",
            action="append",
            default=None,
            metavar="[SETTING:]VIEW=VALUE",
            help="accuracy to reach, VIEW global or personalized (e.g. global=0.75, "
            "alpha=0.5:personalized=0.88); kept in <out>/targets.json (default: 95%% of dense's final)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit code: 0 when every run finished, 1 when some failed, 2 for a bad grid or a
        busy or mismatched experiment folder, 130 when interrupted.

    """
    args = build_parser().parse_args(argv)
    if args.command == "summarize":
        grid = ExperimentGrid.from_dict(json.loads((args.out / "experiment.json").read_text()))
        try:
            rows = write_summary(args.out, grid, targets=args.targets)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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
        parse_targets(args.targets or (), [s.name for s in grid.settings])
    except ValueError as exc:  # ConfigError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = (args.out or default_out(args.quick, grid.base)).resolve()
    if args.dry_run:
        for run in grid.runs():
            print(f"{run.index:3d} {run.name:32s} clients={run.num_supernodes} {json.dumps(run.run_config)}")
        return 0
    handlers = _setup_logging(out)
    # Ctrl-C / kill: stop the running run cleanly (once; later signals are ignored meanwhile)
    previous = {sig: signal.signal(sig, interrupt_once) for sig in (signal.SIGTERM, signal.SIGINT)}
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
    rows = write_summary(out, grid, targets=args.targets)
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
