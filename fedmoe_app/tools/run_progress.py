"""Live progress of one run for ``fedmoe-launch``: round i/N, elapsed, ETA, last metrics, bytes.

The launcher passes every line of the streamed log through :class:`RunWatcher`, which learns
of the rounds from the ServerApp's own log lines (``[ROUND r/N]`` when a round starts,
``[ROUND r] acc ...`` when it ends, ``fedmoe: outputs in <folder>``) and reads the run folder's
``metrics.json`` when it changes for the numbers the log line lacks (loss, bpb, exact bytes).
Nothing depends on the app cooperating: lines it does not recognise only pass through, and
a run that fails simply stops updating the display.

Two displays: :class:`RichDisplay` (a progress bar kept under the scrolling log, for a
terminal) and :class:`PlainDisplay` (one ``fedmoe: progress ...`` line after each round, for
pipes, files and CI). Both write every log line unchanged.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from .experiments.progress import fmt_duration

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ROUND_START = re.compile(r"\[ROUND (\d+)/(\d+)\]")
ROUND_END = re.compile(r"\[ROUND (\d+)\] acc (\S+) \| down ([\d.]+) kB .*? up ([\d.]+) kB")
ROUND_ZERO = re.compile(r"\[ROUND 0\] central accuracy (\S+) loss (\S+)")
OUTPUTS = re.compile(r"fedmoe: outputs in (.+?)\s*$")
#: The modes of ``fedmoe-launch --progress``.
MODES = ("auto", "rich", "plain", "off")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass
class RunState:
    """What is known of a running run (times from ``time.monotonic()``)."""

    started: float = field(default_factory=time.monotonic)
    total: int | None = None  # num-server-rounds, from the first "[ROUND r/N]"
    current: int | None = None  # the round running now
    first_start: float | None = None  # when the first round of this launch started
    first_round: int | None = None
    done: int = 0  # the last round finished
    done_here: int = 0  # rounds finished in this launch (a resumed run starts past 0)
    last_done_at: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    bpb: float | None = None
    bytes_total: float = 0.0  # bytes down + up so far
    out_dir: Path | None = None

    def mean_round_s(self) -> float | None:
        """Return the mean seconds per round of this launch (first round's start to the last end)."""
        if not self.done_here or self.first_start is None or self.last_done_at is None:
            return None
        return (self.last_done_at - self.first_start) / self.done_here

    def eta_s(self, now: float | None = None) -> float | None:
        """Return the seconds until the last round ends (mean round time x rounds left), or None."""
        mean = self.mean_round_s()
        if mean is None or self.total is None or self.last_done_at is None:
            return None
        now = time.monotonic() if now is None else now
        return max(mean * (self.total - self.done) - (now - self.last_done_at), 0.0)

    def describe(self, now: float | None = None) -> str:
        """Return the one-line summary: round, elapsed, ETA, last metrics, bytes so far."""
        now = time.monotonic() if now is None else now
        total = "?" if self.total is None else str(self.total)
        mean = self.mean_round_s()
        parts = [
            f"round {self.done}/{total}",
            f"elapsed {fmt_duration(now - self.started)}",
            f"ETA {fmt_duration(self.eta_s(now))}" + ("" if mean is None else f" ({mean:.1f} s/round)"),
        ]
        metrics = " ".join(
            f"{name} {value:.4f}"
            for name, value in (("acc", self.accuracy), ("loss", self.loss), ("bpb", self.bpb))
            if value is not None
        )
        if metrics:
            parts.append(metrics)
        parts.append(f"{fmt_bytes(self.bytes_total)} sent")
        return " | ".join(parts)


def fmt_bytes(n: float) -> str:
    """Render a byte count as ``812 B``, ``4.1 kB``, ``2.4 MB`` or ``1.30 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class RunWatcher:
    """Follows a run from its streamed log lines (and its ``metrics.json``); keeps :class:`RunState`.

    Parameters
    ----------
    output_root : Path | None
        Where a relative ``fedmoe: outputs in`` folder resolves (``FEDMOE_OUTPUT_ROOT``).

    """

    def __init__(self, output_root: Path | None = None) -> None:
        self.state = RunState()
        self.output_root = output_root
        self._metrics_stamp: tuple[int, int] | None = None
        self.errors = 0  # lines that feed() failed on

    def feed(self, line: str) -> int | None:
        """Take one log line; return the round it finished, if it did."""
        text = ANSI.sub("", line)
        s, now = self.state, time.monotonic()
        finished = None
        if m := ROUND_START.search(text):
            s.current, s.total = int(m[1]), int(m[2])
            if s.first_start is None:
                s.first_start, s.first_round = now, s.current
        elif m := ROUND_END.search(text):
            finished = int(m[1])
            s.done, s.last_done_at, s.current = finished, now, None
            s.done_here += 1
            s.accuracy = _number(m[2])
            s.bytes_total += 1e3 * (float(m[3]) + float(m[4]))
        elif m := ROUND_ZERO.search(text):
            s.accuracy, s.loss = _number(m[1]), _number(m[2])
        elif m := OUTPUTS.search(text):
            out = Path(m[1])
            s.out_dir = out if out.is_absolute() or self.output_root is None else self.output_root / out
        self.read_metrics()
        return finished

    def safe_feed(self, line: str) -> int | None:
        """Return :meth:`feed`'s answer; None if it failed (the progress is a view: the log goes on)."""
        try:
            return self.feed(line)
        except Exception:
            self.errors += 1
            return None

    def read_metrics(self) -> bool:
        """Take the last round's numbers from ``metrics.json`` if it changed; return whether it was read.

        A missing, half-written or unexpected file is skipped (the log lines' numbers stay).
        """
        if self.state.out_dir is None:
            return False
        path = self.state.out_dir / "metrics.json"
        try:
            st = path.stat()
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._metrics_stamp:
            return False
        try:
            rows = json.loads(path.read_text())
            last = rows[-1]
            bytes_total = sum((r.get("bytes_down") or 0) + (r.get("bytes_up") or 0) for r in rows)
        except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError):
            return False
        self._metrics_stamp = stamp
        s = self.state
        if last.get("round", -1) < s.done:
            return True  # an older row: the log is ahead
        s.accuracy, s.loss, s.bpb = (_finite(last.get(k)) for k in ("accuracy", "loss", "bpb"))
        s.bytes_total = float(bytes_total)
        return True


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Display(Protocol):
    """Where the log lines and the progress go."""

    def line(self, text: str) -> None:
        """Write one log line (as received, newline included)."""

    def close(self) -> None:
        """Stop the display (after the last line)."""


class PlainDisplay:
    """Log lines unchanged, plus a ``fedmoe: progress ...`` line after each round (for pipes and CI).

    Parameters
    ----------
    out : TextIO
        Where everything goes.
    watcher : RunWatcher
        Follows the run.

    """

    def __init__(self, out: TextIO, watcher: RunWatcher) -> None:
        self.out, self.watcher = out, watcher

    def line(self, text: str) -> None:
        """Write ``text``; after a round's line, the progress line."""
        self.out.write(text)
        if self.watcher.safe_feed(text) is not None:
            self.out.write(f"fedmoe: progress {self.watcher.state.describe()}\n")
        self.out.flush()

    def close(self) -> None:
        """Flush."""
        self.out.flush()


class QuietDisplay(PlainDisplay):
    """Log lines only (``--progress off``)."""

    def line(self, text: str) -> None:
        """Write ``text``."""
        self.out.write(text)
        self.out.flush()


class RichDisplay:
    """The log scrolling above a live progress bar (``rich``), for a terminal.

    Parameters
    ----------
    out : TextIO
        The terminal.
    watcher : RunWatcher
        Follows the run.

    """

    def __init__(self, out: TextIO, watcher: RunWatcher) -> None:
        from rich.console import Console
        from rich.live import Live

        self.watcher = watcher
        self.console = Console(file=out, force_terminal=True, highlight=False)
        self.live = Live(self, console=self.console, refresh_per_second=2, transient=False)
        self.live.start()

    def __rich__(self) -> Any:
        """Return the bar and the summary line (rendered at every refresh: the clock ticks)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        s = self.watcher.state
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text("fedmoe", style="bold cyan"),
            ProgressBar(total=float(s.total or 1), completed=float(s.done if s.total else 0), width=40),
        )
        return Group(bar, Text(s.describe(), style="cyan"))

    def line(self, text: str) -> None:
        """Print ``text`` above the bar (its colours kept)."""
        from rich.text import Text

        self.watcher.safe_feed(text)
        self.console.print(Text.from_ansi(text.rstrip("\n")), soft_wrap=True)

    def close(self) -> None:
        """Stop the live bar, leaving its last state on screen."""
        self.live.refresh()
        self.live.stop()


def make_display(mode: str, out: TextIO, output_root: Path | None = None) -> Display:
    """Return the display of ``--progress`` ``mode`` (``auto``: rich on a terminal, else plain).

    Raises
    ------
    ValueError
        If ``mode`` is not one of :data:`MODES`.

    """
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is invalid; allowed: one of {', '.join(MODES)}")
    watcher = RunWatcher(output_root)
    if mode == "auto":
        isatty = getattr(out, "isatty", None)
        mode = "rich" if callable(isatty) and isatty() else "plain"
    if mode == "rich":
        return RichDisplay(out, watcher)
    if mode == "plain":
        return PlainDisplay(out, watcher)
    return QuietDisplay(out, watcher)
