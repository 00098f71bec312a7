"""Helpers shared by the benchmarks: argument types, machine summary, threads, environment, timed runs.

Also the folders and ``metrics.json`` rows of the app runs that some benchmarks launch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ...capacity.probe import usable_cpus


def int_list(text: str) -> list[int]:
    """Parse ``"1000,10000"`` into ``[1000, 10000]`` (an ``argparse`` type).

    Parameters
    ----------
    text : str
        Comma-separated positive integers.

    Returns
    -------
    list of int

    Raises
    ------
    argparse.ArgumentTypeError
        When an item is not an integer, is not positive, or there is none.

    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(allowed: Collection[str], what: str) -> Callable[[str], list[str]]:
    """Make an ``argparse`` type that parses ``"a,b"`` into ``["a", "b"]`` of known names.

    Parameters
    ----------
    allowed : collection of str
        The known names.
    what : str
        What the names are (plural), for the error message.

    Returns
    -------
    callable
        ``parse(text) -> list of str``; raises :class:`argparse.ArgumentTypeError` when a
        name is not in ``allowed`` or there is none.

    """

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}"
            )
        return values

    return parse


def machine_summary() -> str:
    """Describe the machine the benchmark runs on (CPU count, processor, Python, numpy).

    Returns
    -------
    str
        One line.

    """
    cpu = platform.processor() or platform.machine()
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{usable_cpus()} cores ({model or cpu}), Python {platform.python_version()}, numpy {np.__version__}"
    )


def median_min(values: Sequence[float]) -> tuple[float, float]:
    """Return the median and the minimum of ``values``.

    Parameters
    ----------
    values : sequence of float
        At least one value.

    Returns
    -------
    tuple of float
        ``(median, min)``.

    """
    return statistics.median(values), min(values)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (when ``threads`` > 0) and return the count in use.

    Parameters
    ----------
    threads : int
        Threads to use; 0 or less keeps torch's setting.

    Returns
    -------
    int
        ``torch.get_num_threads()`` afterwards.

    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextmanager
def environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (inherited by the processes started meanwhile).

    Parameters
    ----------
    overrides : mapping of str to str
        Variables to set; each is restored (or removed again) on exit.

    Yields
    ------
    None

    """
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def timed_launch(
    launch_fn: Callable[..., int], log_path: Path, markers: Mapping[str, str], **launch_kwargs: Any
) -> tuple[int, float, dict[str, float]]:
    """Call ``launch_fn(**launch_kwargs, stream_to=...)`` and time-stamp its log.

    The run's log is read through a pipe: each line goes to ``log_path`` prefixed by the
    seconds since the call, and the first line containing each marker's text gives that
    marker's time.

    Parameters
    ----------
    launch_fn : callable
        :func:`fedmoe_app.tools.launch.launch` or a stand-in with its signature.
    log_path : Path
        Where the time-stamped log is written.
    markers : Mapping[str, str]
        Name -> text whose first appearance in the log is timed.
    **launch_kwargs
        Passed to ``launch_fn``.

    Returns
    -------
    tuple
        ``(exit code, total seconds, {marker name: seconds})`` (markers never seen absent).

    """
    marks: dict[str, float] = {}
    read_fd, write_fd = os.pipe()
    t0 = time.perf_counter()

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as reader, open(log_path, "w") as log:
            for line in reader:
                now = time.perf_counter() - t0
                log.write(f"{now:8.2f} {line}")
                for name, text in markers.items():
                    if name not in marks and text in line:
                        marks[name] = now

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    with os.fdopen(write_fd, "w") as stream:
        code = launch_fn(**launch_kwargs, stream_to=stream)
    total = time.perf_counter() - t0
    reader.join(timeout=30)
    return code, total, marks


@contextmanager
def work_folder(keep: str, prefix: str) -> Iterator[Path]:
    """Yield the folder of a benchmark's logs and outputs: ``keep``, or a temporary one.

    Parameters
    ----------
    keep : str
        Folder to use (resolved, created if missing, left in place); empty: a temporary
        folder, removed on exit.
    prefix : str
        Name prefix of the temporary folder.

    Yields
    ------
    Path
        The folder.

    """
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(keep).resolve() if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder


def training_rounds(workdir: Path, run_name: str) -> list[dict[str, Any]]:
    """Read the training rounds (round 0 left out) of an app run's ``metrics.json``.

    Parameters
    ----------
    workdir : Path
        The folder whose ``outputs/<run_name>`` the run wrote.
    run_name : str
        The run's ``run-name``.

    Returns
    -------
    list of dict
        The rows with ``round >= 1``, in file order.

    """
    rows = json.loads((workdir / "outputs" / run_name / "metrics.json").read_text())
    return [r for r in rows if r["round"] >= 1]
