"""Live progress of a grid: every run's state, the ETA, and ``progress.json``."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...files import atomic_write
from .folder import log_path, run_dir
from .grid import RunSpec


def fmt_duration(seconds: float | None) -> str:
    """Render a duration as ``1h02m``, ``4m05s`` or ``12s``; ``?`` for None or not finite."""
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

    Parameters
    ----------
    exp_dir : Path
        Experiment folder (``progress.json`` is written there).
    runs : sequence of RunSpec
        The grid's runs, all pending.
    jobs : int
        Runs at the same time.

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
        """Return the seconds until the grid is through, or None before there is any estimate."""
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
