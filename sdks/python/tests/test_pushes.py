"""`koo._pushes.PushClock`: how long a push waited, read on koo's clock."""

from __future__ import annotations

import time

import pytest

from koo._pushes import MAX_HOLD, PushClock
from koo.worker.v1 import worker_service_pb2 as wpb


def welcome(lease: float, koo_ahead: float | None) -> wpb.Welcome:
    """A welcome from a koo whose clock is `koo_ahead` seconds ahead of this one (None: no time)."""
    w = wpb.Welcome(worker_id="w")
    w.lease.FromNanoseconds(round(lease * 1e9))
    if koo_ahead is not None:
        w.time.FromNanoseconds(round((time.time() + koo_ahead) * 1e9))
    return w


def pushed(ago: float, koo_ahead: float) -> wpb.TaskAssignment:
    """A push koo stamped `ago` seconds before now."""
    a = wpb.TaskAssignment(lease_token=1)
    a.push_time.FromNanoseconds(round((time.time() + koo_ahead - ago) * 1e9))
    return a


def test_a_push_late_by_a_quarter_lease_is_late_whatever_the_clocks_offset() -> None:
    for koo_ahead in (-3600.0, 0.0, 3600.0):
        c = PushClock()
        c.welcome(welcome(30, koo_ahead))
        assert c.late(pushed(0.01, koo_ahead)) is None, koo_ahead
        assert c.late(pushed(5, koo_ahead)) is None, koo_ahead
        late = c.late(pushed(10, koo_ahead))
        assert late is not None and 9 < late < 11, (koo_ahead, late)
    assert c.hold() == MAX_HOLD
    short = PushClock()
    short.welcome(welcome(1, 0))
    assert short.hold() == 0.25


def test_a_wall_clock_step_here_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait is read on an elapsed clock, not on this host's wall clock."""
    c = PushClock()
    c.welcome(welcome(30, 0))
    stamp = pushed(0.01, 0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert c.late(stamp) is None


def test_without_koos_stamps_nothing_is_held() -> None:
    old = PushClock()
    old.welcome(welcome(30, None))  # a koo before Welcome.time
    assert old.late(pushed(1000, 0)) is None
    c = PushClock()
    c.welcome(welcome(30, 0))
    assert c.late(wpb.TaskAssignment(lease_token=1)) is None  # no push_time
