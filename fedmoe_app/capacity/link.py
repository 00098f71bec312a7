"""Link speed measured from the timing and size of a real exchange (pure Python).

The server stamps every train message with its wall-clock send time (``sent-at``) and the
size of its arrays (``payload-bytes``); the client notes when its handler received it. One
such exchange gives a down-link sample (:func:`exchange_mbps`); the client keeps an
exponential moving average of its samples (:class:`LinkEstimate`) and reports it in its next
train reply and capacity profile. What the interval holds, and why the estimate is a lower
bound on the link's throughput, is in docs/CAPACITY.md ("Measured link speed").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .timing import ema_update

#: Weight of a new sample in a client's link estimate (exponential moving average).
LINK_EMA = 0.5
#: A sample below this (Mbit/s) is rejected as a stalled or skewed measurement.
MIN_MBPS = 0.01
#: A sample above this (Mbit/s, 100 Gbit/s) is rejected: no client link is that fast, and a
#: tiny or clock-skewed interval is the usual cause.
MAX_MBPS = 100_000.0
#: Payloads smaller than this (bytes) are not timed: their interval is fixed latency (polling,
#: process start), not transfer.
MIN_SAMPLE_BYTES = 1_000_000


def exchange_mbps(
    nbytes: Any, sent_at: Any, received_at: float, *, min_bytes: int | None = None
) -> float | None:
    """Return one transfer's throughput in Mbit/s, or None when it cannot be trusted.

    Parameters
    ----------
    nbytes : int
        Bytes transferred (the message's ``payload-bytes``).
    sent_at : float
        Sender's wall clock when the transfer started (Unix seconds, ``sent-at``).
    received_at : float
        Receiver's wall clock when it arrived (Unix seconds).
    min_bytes : int, optional
        Transfers below this size are not timed (default :data:`MIN_SAMPLE_BYTES`).

    Returns
    -------
    float or None
        ``8 * nbytes / (received_at - sent_at) / 1e6``; None for a missing or non-numeric
        value, a payload under ``min_bytes``, a non-positive interval (the two clocks are
        skewed: the receiver's runs behind) or a result outside ``[MIN_MBPS, MAX_MBPS]``.

    """
    values = (nbytes, sent_at, received_at)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None
    floor = MIN_SAMPLE_BYTES if min_bytes is None else min_bytes
    if not all(math.isfinite(float(v)) for v in values) or nbytes < max(floor, 1):
        return None
    seconds = float(received_at) - float(sent_at)
    if seconds <= 0.0:
        return None
    mbps = 8.0 * float(nbytes) / seconds / 1e6
    return mbps if MIN_MBPS <= mbps <= MAX_MBPS else None


@dataclass(frozen=True)
class LinkEstimate:
    """A client's smoothed link speed and how many exchanges fed it.

    Attributes
    ----------
    down_mbps : float or None
        EMA (:data:`LINK_EMA`) of the accepted down-link samples; None before the first.
    samples : int
        Accepted samples.
    rejected : int
        Exchanges that carried timing but gave no usable sample (:func:`exchange_mbps`).

    """

    down_mbps: float | None = None
    samples: int = 0
    rejected: int = 0

    def update(self, sample: float | None) -> LinkEstimate:
        """Return the estimate after one exchange (``None``: a rejected sample)."""
        if sample is None:
            return LinkEstimate(self.down_mbps, self.samples, self.rejected + 1)
        return LinkEstimate(ema_update(self.down_mbps, sample, LINK_EMA), self.samples + 1, self.rejected)

    def to_dict(self) -> dict[str, float | int]:
        """Flat scalars for a Flower ``ConfigRecord`` (the node's state between messages)."""
        out: dict[str, float | int] = {"samples": self.samples, "rejected": self.rejected}
        if self.down_mbps is not None:
            out["down-mbps"] = self.down_mbps
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LinkEstimate:
        """Read :meth:`to_dict` output back; anything missing or implausible starts afresh."""
        if not d:
            return cls()
        mbps = d.get("down-mbps")
        ok = isinstance(mbps, (int, float)) and not isinstance(mbps, bool) and MIN_MBPS <= mbps <= MAX_MBPS
        return cls(
            down_mbps=float(mbps) if ok else None,
            samples=int(d.get("samples", 0)) if ok else 0,
            rejected=int(d.get("rejected", 0)),
        )
