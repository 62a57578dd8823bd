"""`koo._pushes.PushClock`: a push's wait read whatever the clocks' offset."""

from __future__ import annotations

import time

from koo._pushes import PushClock
from koo.tasks.v1 import task_service_pb2 as tasks_pb
from koo.worker.v1 import worker_service_pb2 as wpb


def leased(ago: float, offset: float = 0.0) -> tasks_pb.Task:
    """A task leased `ago` seconds before now, by a clock `offset` ahead of this one."""
    t = tasks_pb.Task(id="research~01")
    t.start_time.FromNanoseconds(round((time.time() - ago + offset) * 1e9))
    return t


def welcome(lease: float, offset: float | None) -> wpb.Welcome:
    w = wpb.Welcome(worker_id="w")
    w.lease.FromNanoseconds(round(lease * 1e9))
    if offset is not None:
        w.time.FromNanoseconds(round((time.time() + offset) * 1e9))
    return w


def test_a_push_late_by_half_a_lease_is_late_whatever_the_clocks_offset() -> None:
    for offset in (-3600.0, 0.0, 3600.0):
        c = PushClock()
        c.welcome(welcome(30, offset))
        assert c.late(leased(0.01, offset)) is None, offset
        late = c.late(leased(20, offset))
        assert late is not None and 19 < late < 21, (offset, late)
        assert c.late(leased(10, offset)) is None, offset


def test_without_koos_clock_the_quickest_push_is_the_reference() -> None:
    c = PushClock()
    c.welcome(welcome(30, None))  # an older koo: no time in its welcome
    offset = 120.0  # the store's clock two minutes ahead
    assert c.late(leased(0.5, offset)) is None  # the first push sets the offset
    assert c.late(leased(0.01, offset)) is None  # a quicker one lowers it
    late = c.late(leased(16, offset))
    assert late is not None and 15 < late < 17, late


def test_a_task_with_no_start_time_or_no_lease_is_never_late() -> None:
    c = PushClock()
    c.welcome(welcome(30, 0))
    assert c.late(tasks_pb.Task(id="research~01")) is None
    c = PushClock()
    c.welcome(welcome(0, 0))
    assert c.late(leased(1000)) is None
