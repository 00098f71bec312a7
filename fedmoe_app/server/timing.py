"""Where a round's wall time goes on the server: its own work vs waiting on the Grid.

:class:`TimedGrid` wraps the ServerApp's :class:`~flwr.serverapp.Grid` and adds up the
seconds spent inside its calls: ``send_and_receive`` (clients working, messages in flight)
apart from the others (``get_node_ids`` and the like: the SuperLink answering). A phase of
the round minus the Grid time inside it is the server's own time (:func:`server_time`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class TimedGrid:
    """A :class:`~flwr.serverapp.Grid` that counts the seconds spent in its calls.

    Parameters
    ----------
    grid : Grid
        The Grid to forward every call to.

    Attributes
    ----------
    clients_s : float
        Seconds inside ``send_and_receive`` so far.
    link_s : float
        Seconds inside the Grid's other methods so far.

    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.clients_s = 0.0
        self.link_s = 0.0

    @property
    def waited_s(self) -> float:
        """Seconds inside any Grid call so far."""
        return self.clients_s + self.link_s

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Forward to the Grid; the replies as a list (their time counts in :attr:`clients_s`)."""
        t0 = time.perf_counter()
        try:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        finally:
            self.clients_s += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._grid, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.link_s += time.perf_counter() - t0

        return timed


def server_time(grid: TimedGrid, phase: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run ``phase(*args)``; return its result and its wall time minus the Grid time inside it."""
    t0, waited = time.perf_counter(), grid.waited_s
    result = phase(*args)
    return result, (time.perf_counter() - t0) - (grid.waited_s - waited)
