"""Optional experiment tracking: every round's numeric metrics to TensorBoard or MLflow, offline.

``tracking = "tensorboard"`` writes TensorBoard event files to ``<tracking-dir>/<run-name>``;
``tracking = "mlflow"`` logs to a local MLflow store, the SQLite file
``<tracking-dir>/mlflow.db`` (experiment ``fedmoe``, one MLflow run per fedmoe run, found again
on resume). ``tracking-dir`` defaults to ``<run folder>/tracking``. Both get the run config as
parameters (TensorBoard: hparams) and, per round (the step), every finite number of the metrics
row and of its flat mappings (``timing_s/clients``); lists (expert loads) are left to the plots.

A tracker is optional: its package comes with the ``track`` extra, and a missing one is a
start-up error (:func:`tracking_problem`). Once running, a tracker that fails is logged and
counted (:class:`SafeTracker`), never fatal: the metrics files stay the record of the run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

from flwr.common import log

from ..config import ConfigError, TrackingSection

#: The package each tracker needs (all in the ``track`` extra).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: The MLflow experiment that holds fedmoe's runs.
MLFLOW_EXPERIMENT = "fedmoe"
#: The tag naming the run folder of an MLflow run (how a resumed run finds its MLflow run).
RUN_FOLDER_TAG = "fedmoe.run-folder"
_MLFLOW_BATCH = 1000  # MLflow takes at most 1000 metrics and 100 params per log_batch
_MLFLOW_PARAMS = 100


class Tracker(Protocol):
    """Where a run's per-round metrics go besides ``metrics.json``."""

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log one round's metrics row (the round number is the step)."""

    def close(self, failed: bool = False) -> None:
        """Flush and close; ``failed``: the run ended with an error."""


def tracking_problem(section: TrackingSection) -> str | None:
    """Return why the tracker of ``section`` cannot run here (its package is missing), or None."""
    package = PACKAGES.get(section.tracker)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (
        f"run-config key 'tracking' = {section.tracker!r} needs the package '{package}', which is not "
        "installed; install the extra: pip install 'fedmoe[track]' (or set tracking = \"none\")"
    )


def tracking_dir(section: TrackingSection, run_folder: Path) -> Path:
    """Return where the tracker writes: ``tracking-dir``, else ``<run folder>/tracking``.

    A relative ``tracking-dir`` resolves as ``output-dir`` does (``$FEDMOE_OUTPUT_ROOT`` or cwd).
    """
    if not section.tracking_dir:
        return Path(run_folder) / "tracking"
    root = Path(section.tracking_dir)
    if not root.is_absolute():
        root = Path(os.environ.get("FEDMOE_OUTPUT_ROOT", os.getcwd())) / root
    return root


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """Return the finite numbers of a metrics row, flat mappings as ``key/sub``; ``round`` left out.

    Booleans, strings, lists and non-finite values (``None`` in ``metrics.json``) are left out.
    """
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_np_number(value):
            return
        value = float(value)
        if math.isfinite(value):
            out[key] = value

    for key, value in row.items():
        if key == "round":
            continue
        if isinstance(value, Mapping):
            for sub, v in value.items():
                put(f"{key}/{sub}", v)
        else:
            put(str(key), value)
    return out


def _is_np_number(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def params_of(config: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """Return the run config as tracker parameters (scalars kept, anything else as JSON)."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)
        for k, v in config.items()
    }


class TensorBoardTracker:
    """TensorBoard event files in ``log_dir``: the config as hparams and text, one scalar per metric.

    Parameters
    ----------
    log_dir : Path
        The run's event-file folder (``<tracking-dir>/<run-name>``).
    config : Mapping[str, Any]
        The run config.

    """

    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        params = params_of(config)
        file_writer = self.writer._get_file_writer()
        for summary in hparams(params, {"accuracy": 0.0, "loss": 0.0, "bpb": 0.0}):
            file_writer.add_summary(summary)
        self.writer.add_text("run-config", "```\n" + json.dumps(params, indent=1) + "\n```", 0)
        self.writer.flush()

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Add every number of ``row`` as a scalar at step ``row["round"]``; flush."""
        step = int(row["round"])
        for key, value in numeric_metrics(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        """Close the event file."""
        self.writer.close()


class MlflowTracker:
    """A run in the local MLflow store ``sqlite:///<folder>/mlflow.db`` (experiment ``fedmoe``).

    A resumed fedmoe run (same run folder) continues its MLflow run; parameters already set
    keep their first value (MLflow's parameters are immutable).

    Parameters
    ----------
    folder : Path
        The tracking folder (``mlflow.db``, and ``mlflow-artifacts/`` for any artifacts).
    run_name : str
        The MLflow run's name (the run folder's name).
    run_folder : Path
        The fedmoe run folder (tagged, so that a resumed run finds its MLflow run).
    config : Mapping[str, Any]
        The run config (parameters).

    """

    def __init__(self, folder: Path, run_name: str, run_folder: Path, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = store_uri(self.folder)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=(self.folder / "mlflow-artifacts").resolve().as_uri()
            )
        )
        folder_tag = str(Path(run_folder).resolve())
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_FOLDER_TAG}` = '{_quoted(folder_tag)}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            known = set(found[0].data.params)
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={RUN_FOLDER_TAG: folder_tag})
            self.run_id, known = run.info.run_id, set()
        params = [Param(k, str(v)) for k, v in params_of(config).items() if k not in known]
        for i in range(0, len(params), _MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_PARAMS])
        self.client.log_batch(self.run_id, tags=[RunTag("fedmoe.config", json.dumps(params_of(config)))])

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log every number of ``row`` at step ``row["round"]``."""
        from mlflow.entities import Metric

        step, now = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in numeric_metrics(row).items()]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _MLFLOW_BATCH])

    def close(self, failed: bool = False) -> None:
        """Mark the MLflow run finished (or failed)."""
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def store_uri(folder: Path) -> str:
    """Return the tracking URI of the MLflow SQLite store in ``folder`` (``--backend-store-uri``)."""
    return "sqlite:///" + str(Path(folder).resolve() / "mlflow.db")


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _mlflow_key(key: str) -> str:
    """Return ``key`` as an MLflow metric name: other than word characters, - . / and space: ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", key)


class SafeTracker:
    """Wraps a tracker so that its failures are logged and counted, never raised.

    Parameters
    ----------
    tracker : Tracker | None
        The tracker; None if it failed to start (then nothing is logged).
    name : str
        Its name in the log (``tensorboard``, ``mlflow``).
    failures : int
        Failures so far (1 for a tracker that failed to start).

    """

    def __init__(self, tracker: Tracker | None, name: str, failures: int = 0) -> None:
        self.tracker, self.name, self.failures = tracker, name, failures

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log the round; a failure is logged (with its traceback) and counted."""
        if self.tracker is None:
            return
        try:
            self.tracker.log_round(row)
        except Exception:
            self.failures += 1
            log(
                WARNING,
                "fedmoe: %s tracking of round %s failed (%d so far); the run goes on",
                self.name,
                row.get("round"),
                self.failures,
                exc_info=True,
            )

    def close(self, failed: bool = False) -> None:
        """Close the tracker; a failure is logged and counted."""
        if self.tracker is None:
            return
        try:
            self.tracker.close(failed)
        except Exception:
            self.failures += 1
            log(WARNING, "fedmoe: closing the %s tracker failed", self.name, exc_info=True)


def open_tracker(section: TrackingSection, run_folder: Path, config: Mapping[str, Any]) -> SafeTracker | None:
    """Start the tracker that ``section`` asks for; None for ``tracking = "none"``.

    Raises
    ------
    ConfigError
        Naming the key and the extra to install, if the tracker's package is missing.

    """
    if section.tracker == "none":
        return None
    problem = tracking_problem(section)
    if problem:
        raise ConfigError(problem)
    folder = tracking_dir(section, run_folder)
    run_folder = Path(run_folder)
    try:
        if section.tracker == "tensorboard":
            tracker: Tracker = TensorBoardTracker(folder / run_folder.name, config)
            where = f"event files in {folder / run_folder.name} (tensorboard --logdir {folder})"
        else:
            tracker = MlflowTracker(folder, run_folder.name, run_folder, config)
            where = f"store {store_uri(folder)} (mlflow ui --backend-store-uri {store_uri(folder)})"
    except Exception:
        log(
            ERROR,
            "fedmoe: the %s tracker failed to start; the run goes on without it",
            section.tracker,
            exc_info=True,
        )
        return SafeTracker(None, section.tracker, failures=1)
    log(INFO, "fedmoe: %s tracking: %s", section.tracker, where)
    return SafeTracker(tracker, section.tracker)
