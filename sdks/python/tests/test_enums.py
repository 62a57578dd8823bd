"""The SDK reads what a newer koo sends: enum values it does not know
(protobuf enums are open, and v1 grows by adding values) become
`UNRECOGNIZED_<n>` members instead of raising, and enums print by name."""

from __future__ import annotations

import json

from koo import ConcurrencyPolicy, MissedTickPolicy, TaskCategory, TaskPriority, TaskState
from koo._limits import ConcurrencyLimitInfo
from koo._schedules import ScheduleInfo
from koo._taskinfo import QueueInfo, TaskEvent, TaskInfo
from koo.schedule.v1 import schedule_service_pb2 as spb
from koo.tasks.v1 import task_service_pb2 as pb

NEW = 97  # a value no release of koo has used
STATE = pb.TaskState.ValueType(NEW)
CATEGORY = pb.TaskCategory.ValueType(NEW)
PRIORITY = pb.TaskPriority.ValueType(NEW)


def test_a_task_with_a_newer_koo_s_state_category_and_priority_is_read() -> None:
    t = pb.Task(id="t1", name="n", state=STATE, category=CATEGORY, priority=PRIORITY)
    info = TaskInfo.from_proto(t)
    assert info.state == NEW and info.state.name == "UNRECOGNIZED_97"
    assert isinstance(info.state, TaskState) and not info.state.is_final
    assert info.category == NEW and isinstance(info.category, TaskCategory)
    assert info.status == "unrecognized_97"
    # not final until it has an end time (result() and watch() end on it)
    assert not info.is_final
    ended = pb.Task(id="t1", name="n", state=STATE)
    ended.end_time.FromSeconds(1_800_000_000)
    assert TaskInfo.from_proto(ended).is_final
    assert TaskInfo.from_proto(pb.Task(id="t2", name="n", state=pb.TASK_STATE_FAILED)).is_final
    plain = info.to_dict()
    assert plain["state"] == "unrecognized_97"
    assert plain["category"] == "UNRECOGNIZED_97"
    assert plain["priority"] == "UNRECOGNIZED_97"
    json.dumps(plain)
    assert TaskPriority(NEW) == NEW


def test_events_queues_schedules_and_limits_with_new_values_are_read() -> None:
    e = TaskEvent.from_proto(pb.WatchTasksResponse(task_id="t1", state=STATE))
    assert e.state == NEW
    q = QueueInfo.from_proto(pb.Queue(name="q", category=CATEGORY))
    assert q.category == NEW
    s = spb.Schedule(name="s", cron="* * * * *", missed_tick_policy=spb.MissedTickPolicy.ValueType(NEW))
    s.task.category = CATEGORY
    s.last_run.state = STATE
    info = ScheduleInfo.from_proto(s)
    assert info.missed_tick_policy == NEW and isinstance(info.missed_tick_policy, MissedTickPolicy)
    assert info.task.category == NEW
    assert info.last_run is not None and info.last_run.state == NEW
    c = ConcurrencyLimitInfo.from_proto(
        pb.ConcurrencyLimit(name="keys/k", max_running=1, policy=pb.ConcurrencyPolicy.ValueType(NEW))
    )
    assert c.policy == NEW and isinstance(c.policy, ConcurrencyPolicy)


def test_known_values_are_the_members_and_print_by_name() -> None:
    assert TaskState(pb.TASK_STATE_RUNNING) is TaskState.RUNNING
    assert TaskState.SUCCEEDED.is_final
    assert str(TaskState.RUNNING) == "RUNNING"
    assert f"{TaskCategory.DATABASE}" == "DATABASE"
    assert f"{TaskPriority.HIGH:>6}" == "  HIGH"
    assert f"{TaskPriority.HIGH:d}" == str(pb.TASK_PRIORITY_HIGH)
    assert f"{TaskState.RUNNING:03d}" == f"{pb.TASK_STATE_RUNNING:03d}"
    assert int(TaskPriority.HIGH) == pb.TASK_PRIORITY_HIGH
    for bad in ("RUNNING", 1.5, None):
        try:
            TaskState(bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError(f"TaskState({bad!r}) was accepted")
