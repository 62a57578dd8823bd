"""`ScheduleManager`: Celery beat's entries created and managed from Python,
against a real koo (the embedded store)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from koo import (
    KooError,
    MissedTickPolicy,
    ScheduledTask,
    ScheduleManager,
    TaskCategory,
    TaskManager,
    TaskPriority,
    TaskState,
)


def test_a_schedule_round_trips_and_is_paused_updated_triggered_and_deleted(target: str, ns: str) -> None:
    """Every field of the task template comes back as given; pause, resume,
    update (only the fields named), trigger (a task in history carrying the
    schedule's name) and delete."""
    name = f"{ns}-nightly"
    task = ScheduledTask(
        "koo.diagnostics.noop",
        TaskCategory.RESEARCH,
        args=(1, "a"),
        kwargs={"report": "daily"},
        priority=TaskPriority.HIGH,
        max_retries=2,
        soft_time_limit=30,
        time_limit=timedelta(minutes=1),
        expire_after=600,
        rate_limit_key="reports",
    )

    async def scenario() -> None:
        sm = ScheduleManager(target)
        made = await sm.create(
            name, "30 2 * * *", task, time_zone="Europe/Paris", missed_tick_policy=MissedTickPolicy.RUN_ONCE
        )
        assert (made.name, made.cron, made.time_zone, made.source) == (name, "30 2 * * *", "Europe/Paris", "api")
        assert made.missed_tick_policy is MissedTickPolicy.RUN_ONCE and not made.paused
        assert len(made.next_fire_times) == 5 and made.last_run is None
        t = made.task
        assert (t.name, t.category, list(t.args), dict(t.kwargs)) == (
            "koo.diagnostics.noop",
            TaskCategory.RESEARCH,
            [1, "a"],
            {"report": "daily"},
        )
        assert (t.priority, t.max_retries, t.rate_limit_key) == (TaskPriority.HIGH, 2, "reports")
        assert (t.soft_time_limit, t.time_limit, t.expire_after) == (
            timedelta(seconds=30),
            timedelta(minutes=1),
            timedelta(minutes=10),
        )
        assert (await sm.pause(name)).paused and not (await sm.get(name)).next_fire_times
        assert not (await sm.resume(name)).paused
        changed = await sm.update(name, cron="0 3 * * *")
        assert (changed.cron, changed.time_zone, changed.task.rate_limit_key) == (
            "0 3 * * *",
            "Europe/Paris",
            "reports",
        )
        fired = await sm.trigger(name)
        assert fired.schedule == name and fired.name == "koo.diagnostics.noop"
        await TaskManager(target).result(fired.id, timeout=15)  # raises unless it SUCCEEDED
        assert (await TaskManager(target).get_task_status(fired.id)).state is TaskState.SUCCEEDED
        last = (await sm.get(name)).last_run
        assert last is not None and last.task_id == fired.id and last.triggered
        assert name in {s.name for s in await sm.list()}
        await sm.delete(name)
        with pytest.raises(KooError) as gone:
            await sm.get(name)
        assert gone.value.code is grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_refusals_name_what_is_wrong(target: str, ns: str) -> None:
    """A bad cron expression is INVALID_ARGUMENT quoting it; a name in use
    ALREADY_EXISTS; an update naming nothing a ValueError; the sync facade
    says the same."""
    sm = ScheduleManager(target).sync
    task = ScheduledTask("koo.diagnostics.noop", TaskCategory.RESEARCH)
    with pytest.raises(KooError) as bad:
        sm.create(f"{ns}-bad", "61 * * * *", task)
    assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT and "61 * * * *" in str(bad.value)
    sm.create(f"{ns}-once", "@daily", task, paused=True)
    assert sm.get(f"{ns}-once").paused
    with pytest.raises(KooError) as twice:
        sm.create(f"{ns}-once", "@daily", task)
    assert twice.value.code is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(ValueError, match="at least one"):
        sm.update(f"{ns}-once")
    sm.delete(f"{ns}-once")
