"""Experiment harness: compare alignment policies by running the real app over a grid.

``python -m fedmoe_app.tools.experiments compare`` runs the Flower app
(:func:`fedmoe_app.tools.launch.launch`, the same ServerApp and ClientApp code path as
``flwr run``) once per (setting, seed, policy) of a grid, each run with its own run name,
output folder and log, one after the other by default (``--jobs`` for more at a time). It
shows progress (run ``i/n``, rounds, last accuracy, an ETA from the completed runs'
durations) on stdout and in ``progress.json`` / ``experiment.log``, and after every
completed run rewrites the summary: ``summary.md``, ``summary.csv``, ``to_target.csv``,
``accuracy.png``, ``accuracy_vs_bytes.png`` and ``expert_load.png``.

It resumes: a run whose ``metrics.json`` already holds every round is skipped, and an
interrupted run resumes from its checkpoint, so re-running the same command continues an
interrupted grid. ``compare --quick`` is a few-minute smoke test on synthetic data,
``compare --dry-run`` lists the runs, and ``summarize <out>`` rewrites the summary of an
experiment folder.

The default grid (Fashion-MNIST, 20 clients, E = 8, capacities 1-4, four policies,
Dirichlet alpha 0.1 x 3 seeds and alpha 0.5 x 1 seed) is documented in docs/RESULTS.md.

Modules:

* :mod:`.grid`     -- the grid: :class:`ExperimentGrid`, :func:`build_grid`, defaults;
* :mod:`.metrics`  -- one run's ``metrics.json`` and its figures (:class:`FinishedRun`);
* :mod:`.summary`  -- :func:`summarize` and the Markdown / CSV summary;
* :mod:`.to_target` -- rounds, bytes and virtual time to a target accuracy, both views;
* :mod:`.plots`    -- accuracy curves (per round and per MB sent) and expert-load heat-maps;
* :mod:`.folder`   -- the experiment folder's layout and :func:`write_summary`;
* :mod:`.progress` -- run states, ETA and ``progress.json``;
* :mod:`.runner`   -- :func:`run_grid`, child processes, :class:`ExperimentLock`;
* :mod:`.cli`      -- the command line.

Importing this package (and summarizing) needs neither Flower nor torch; only running a
grid starts them, in child processes.
"""

from .cli import default_out, main
from .folder import collect_results, config_mismatch, log_path, run_dir, write_summary
from .grid import (
    DEFAULT_BASE,
    DEFAULT_POLICIES,
    DEFAULT_SEEDS,
    DEFAULT_SETTINGS,
    LOCAL_WORK,
    QUICK_BASE,
    ExperimentGrid,
    RunSpec,
    Setting,
    build_grid,
    parse_set,
    parse_value,
)
from .metrics import FinishedRun, final_accuracy, is_complete, last_n_mean, read_metrics, rounds_to_target
from .plots import accuracy_curves, load_matrix, plot_accuracy, plot_expert_load
from .progress import Progress, RunState, fmt_duration
from .runner import ExperimentLock, run_grid
from .summary import SummaryRow, format_table, rows_to_csv, summarize, summary_markdown

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_POLICIES",
    "DEFAULT_SEEDS",
    "DEFAULT_SETTINGS",
    "LOCAL_WORK",
    "QUICK_BASE",
    "ExperimentGrid",
    "ExperimentLock",
    "FinishedRun",
    "Progress",
    "RunSpec",
    "RunState",
    "Setting",
    "SummaryRow",
    "accuracy_curves",
    "build_grid",
    "collect_results",
    "config_mismatch",
    "default_out",
    "final_accuracy",
    "fmt_duration",
    "format_table",
    "is_complete",
    "last_n_mean",
    "load_matrix",
    "log_path",
    "main",
    "parse_set",
    "parse_value",
    "plot_accuracy",
    "plot_expert_load",
    "read_metrics",
    "rounds_to_target",
    "rows_to_csv",
    "run_dir",
    "run_grid",
    "summarize",
    "summary_markdown",
    "write_summary",
]
