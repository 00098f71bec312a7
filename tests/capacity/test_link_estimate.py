"""Link speed from one exchange's size and timing: the estimate, its bounds and its smoothing."""

import math

import pytest

from fedmoe_app.capacity import link
from fedmoe_app.capacity.link import LinkEstimate, exchange_mbps


def test_a_known_size_and_delay_give_the_expected_estimate():
    # 2.5 MB in 2 s: 20 Mbit in 2 s = 10 Mbit/s
    assert exchange_mbps(2_500_000, 1_000.0, 1_002.0) == pytest.approx(10.0)
    assert exchange_mbps(125_000_000, 50.0, 60.0) == pytest.approx(100.0)  # 1 Gbit in 10 s


@pytest.mark.parametrize(
    ("nbytes", "sent_at", "received_at", "why"),
    [
        (5_000_000, 1_002.0, 1_000.0, "the receiver's clock runs behind the sender's"),
        (5_000_000, 1_000.0, 1_000.0, "zero interval"),
        (5_000_000, 1_000.0, 1_000.0 + 1e-7, "400 Tbit/s: skew that left a tiny interval"),
        (5_000_000, 1_000.0, 1_000.0 + 1e6, "40 bit/s: a stalled node or a clock far ahead"),
        (500, 1_000.0, 1_001.0, "a payload too small to time"),
        (math.nan, 1_000.0, 1_001.0, "non-finite size"),
        (5_000_000, math.inf, 1_001.0, "non-finite send time"),
        (5_000_000, "1000", 1_001.0, "not a number"),
        (5_000_000, None, 1_001.0, "missing"),
        (True, 1_000.0, 1_001.0, "a bool"),
    ],
)
def test_implausible_timings_are_rejected(nbytes, sent_at, received_at, why):
    assert exchange_mbps(nbytes, sent_at, received_at) is None, why


def test_the_minimum_size_is_read_when_called(monkeypatch):
    assert exchange_mbps(500, 0.0, 1.0) is None
    monkeypatch.setattr(link, "MIN_SAMPLE_BYTES", 100)
    assert exchange_mbps(500, 0.0, 0.1) == pytest.approx(0.04)  # 4000 bit in 0.1 s
    assert exchange_mbps(500, 0.0, 0.1, min_bytes=1000) is None


def test_the_estimate_is_an_ema_that_ignores_rejected_samples():
    est = LinkEstimate()
    assert est.down_mbps is None and est.to_dict() == {"samples": 0, "rejected": 0}
    est = est.update(10.0).update(None).update(20.0)
    assert est.down_mbps == pytest.approx(link.LINK_EMA * 20.0 + (1 - link.LINK_EMA) * 10.0)
    assert (est.samples, est.rejected) == (2, 1)
    assert LinkEstimate.from_dict(est.to_dict()) == est


@pytest.mark.parametrize("stored", [None, {}, {"down-mbps": -3.0, "samples": 4}, {"down-mbps": "x"}])
def test_a_missing_or_implausible_stored_estimate_starts_afresh(stored):
    assert LinkEstimate.from_dict(stored).down_mbps is None
