"""Running a grid: one child process per run, resumable, with live progress.

:func:`run_grid` launches every unfinished run of a grid in a child process
(:func:`fedmoe_app.tools.launch.launch`: ``flwr run`` in local simulation with a private
SuperLink), ``jobs`` at a time, logs progress and rewrites the summary after every run.
Complete runs are skipped and runs with a checkpoint are resumed, so running the same grid
again continues it. :class:`ExperimentLock` keeps a second runner out of the folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import ConfigError
from ...files import atomic_write
from ...run.checkpoint import checkpoint_path
from .folder import config_mismatch, log_path, run_dir, write_summary
from .grid import ExperimentGrid, RunSpec
from .metrics import final_accuracy, is_complete, last_n_mean, read_metrics, rounds_done
from .progress import Progress, RunState, fmt_duration
from .summary import fmt_percent

logger = logging.getLogger(__name__)

#: The repository root: the Flower app (``pyproject.toml``) that runs by default.
REPO_ROOT = Path(__file__).resolve().parents[3]


def interrupt_once(signum: int, frame: Any) -> None:
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
    """Body of a run's child process: :func:`fedmoe_app.tools.launch.launch` into the run's log.

    SIGTERM becomes KeyboardInterrupt so that ``launch`` stops its SuperLink and every
    process it started. The exit code is ``launch``'s (130 when interrupted).
    """
    signal.signal(signal.SIGTERM, interrupt_once)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # nohup'ed / background: stays ignored
        signal.signal(signal.SIGINT, interrupt_once)
    from ..launch import launch, whole_if_integral

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
                num_cpus=whole_if_integral(client_cpus),
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
    """``<exp_dir>/.lock`` holding this process's PID; refuses a live second runner.

    Parameters
    ----------
    exp_dir : Path
        Experiment folder (must exist).

    Raises
    ------
    RuntimeError
        On entering, if another live process holds the lock.

    """

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


def _label(run: RunSpec, total: int) -> str:
    """Prefix of a run's progress lines: ``[i/n] <setting> <policy> seed <seed>``."""
    return f"[{run.index}/{total}] {run.setting} {run.policy} seed {run.seed}"


def _refuse_other_configs(exp_dir: Path, runs: Sequence[RunSpec]) -> None:
    """Raise ConfigError if a run folder was made with another config than the grid's."""
    for run in runs:
        diff = config_mismatch(run_dir(exp_dir, run), run.run_config)
        if diff:
            raise ConfigError(
                f"{run_dir(exp_dir, run)} was run with another config "
                f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                "use another --out or remove that folder"
            )


class _Scheduler:
    """Starts the pending runs of a grid, ``jobs`` at a time, and follows them to the end."""

    def __init__(
        self,
        grid: ExperimentGrid,
        exp_dir: Path,
        progress: Progress,
        runs: Sequence[RunSpec],
        *,
        jobs: int,
        app_dir: Path,
        run_timeout: float | None,
        client_cpus: float,
        poll_s: float,
    ) -> None:
        self.grid, self.exp_dir, self.progress = grid, exp_dir, progress
        self.total = len(runs)
        self.jobs, self.app_dir, self.run_timeout = jobs, app_dir, run_timeout
        self.client_cpus, self.poll_s = client_cpus, poll_s
        self.ctx = mp.get_context("spawn")
        self.active: dict[int, tuple[RunSpec, RunState, Any]] = {}
        self.queue = [(r, s) for r, s in zip(runs, progress.states) if s.status == "pending"]

    def run(self) -> None:
        """Run the queue; on any exception (Ctrl-C included) stop the running runs and re-raise."""
        try:
            while self.queue or self.active:
                while self.queue and len(self.active) < max(1, self.jobs):
                    self._start(*self.queue.pop(0))
                self.progress.write()
                deadline = time.monotonic() + self.poll_s
                while time.monotonic() < deadline and all(p.is_alive() for _, _, p in self.active.values()):
                    time.sleep(0.2)
                for idx, (run, st, proc) in list(self.active.items()):
                    self._poll(idx, run, st, proc)
        except BaseException:
            self._stop_all()
            raise

    def _start(self, run: RunSpec, st: RunState) -> None:
        cfg = dict(run.run_config)
        if checkpoint_path(run_dir(self.exp_dir, run)).is_file():
            cfg["resume"] = True
        proc = self.ctx.Process(
            target=_child_main,
            args=(
                str(self.app_dir),
                run.num_supernodes,
                cfg,
                str(self.exp_dir),
                str(log_path(self.exp_dir, run)),
                self.run_timeout,
                self.client_cpus,
            ),
            name=f"fedmoe-{run.name}",
        )
        proc.start()
        st.status, st.started_at = "running", time.time()
        self.active[run.index] = (run, st, proc)
        logger.info(
            "%s: start%s (log: %s)",
            _label(run, self.total),
            " (resuming)" if cfg.get("resume") else "",
            os.path.relpath(st.log, self.exp_dir),
        )

    def _poll(self, idx: int, run: RunSpec, st: RunState, proc: Any) -> None:
        """Record a run's new rounds; once its process has ended, count it done or failed."""
        rows = read_metrics(run_dir(self.exp_dir, run))
        done_now = rounds_done(rows)
        if done_now > st.rounds_done:
            if st.first_round is None:
                st.first_round, st.first_round_s = done_now, time.time() - (st.started_at or 0.0)
            st.rounds_done = done_now
            st.last_accuracy = final_accuracy(rows or [])
            logger.info(
                "%s: round %d/%d acc %s%% (%s) | ETA %s",
                _label(run, self.total),
                done_now,
                run.num_rounds,
                fmt_percent(st.last_accuracy),
                fmt_duration(time.time() - (st.started_at or time.time())),
                fmt_duration(self.progress.eta_s()),
            )
        if proc.is_alive():
            return
        proc.join()
        del self.active[idx]
        st.returncode = proc.exitcode
        st.duration_s = time.time() - (st.started_at or time.time())
        complete = is_complete(rows, run.num_rounds)
        st.status = "done" if proc.exitcode == 0 and complete else "failed"
        if st.status == "done":
            write_summary(self.exp_dir, self.grid)
            count = self.progress.count
            logger.info(
                "%s: done in %s, final acc %s%%, last-5 %s%% | "
                "%d done, %d skipped, %d failed, %d left | ETA %s",
                _label(run, self.total),
                fmt_duration(st.duration_s),
                fmt_percent(final_accuracy(rows or [])),
                fmt_percent(last_n_mean(rows or [])),
                count("done"),
                count("skipped"),
                count("failed"),
                count("pending") + count("running"),
                fmt_duration(self.progress.eta_s()),
            )
        else:
            logger.warning(
                "%s: FAILED (exit code %s, %d/%d rounds) after %s; see %s",
                _label(run, self.total),
                proc.exitcode,
                rounds_done(rows),
                run.num_rounds,
                fmt_duration(st.duration_s),
                st.log,
            )
        self.progress.write()

    def _stop_all(self) -> None:
        self.progress.status = "interrupted"
        for _run, st, proc in self.active.values():
            st.status = "interrupted"
            # SIGTERM (a no-op if a Ctrl-C already reached the child): the child stops
            # its SuperLink and every process that started, then exits
            proc.terminate()
        for _run, _st, proc in self.active.values():
            proc.join(timeout=90)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.progress.write()


def _prepare_folder(grid: ExperimentGrid, exp_dir: Path) -> list[RunSpec]:
    """Validate ``grid``, check and prepare ``exp_dir`` for it; return the grid's runs.

    Creates ``exp_dir/logs`` and (re)writes ``exp_dir/experiment.json``; raises ConfigError
    if a run config is invalid or an existing run folder was made with another config.
    """
    grid.validate()
    runs = grid.runs()
    _refuse_other_configs(exp_dir, runs)
    (exp_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write(exp_dir / "experiment.json", json.dumps(grid.to_dict(), indent=2))
    return runs


def _start_progress(grid: ExperimentGrid, exp_dir: Path, runs: Sequence[RunSpec], jobs: int) -> Progress:
    """Return the grid's progress record, every run already complete marked skipped.

    Logs how many runs there are to run, and writes ``progress`` (and the summary, if some
    runs are complete already) into ``exp_dir``.
    """
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
    return progress


def run_grid(
    grid: ExperimentGrid,
    exp_dir: Path,
    *,
    jobs: int = 1,
    app_dir: Path = REPO_ROOT,
    run_timeout: float | None = None,
    client_cpus: float = 1.0,
    poll_s: float = 5.0,
) -> Progress:
    """Run every unfinished run of ``grid`` under ``exp_dir``; rewrite the summary as runs end.

    Each run is a child process calling :func:`fedmoe_app.tools.launch.launch` (``flwr run``
    in local simulation with a private SuperLink). Runs whose ``metrics.json`` holds every
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
    runs = _prepare_folder(grid, exp_dir)
    progress = _start_progress(grid, exp_dir, runs, jobs)
    _Scheduler(
        grid,
        exp_dir,
        progress,
        runs,
        jobs=jobs,
        app_dir=app_dir,
        run_timeout=run_timeout,
        client_cpus=client_cpus,
        poll_s=poll_s,
    ).run()
    progress.status = "finished"
    progress.write()
    write_summary(exp_dir, grid)
    return progress
