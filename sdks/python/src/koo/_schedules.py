"""koo's periodic schedules from Python: Celery beat's entries as
`ScheduleManager` calls (`ScheduleService`).

A schedule is a cron expression in a time zone and the task each tick
submits (`ScheduledTask`, what `TaskManager.submit` takes for one task).
koo fires each tick once across every instance; see koo's README,
"Schedules", for the rules (daylight saving, missed ticks, pausing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.protobuf import field_mask_pb2

from koo._connection import Client, blocking, rpc
from koo._enums import OpenEnum
from koo._submission import TaskCategory, TaskPriority
from koo._taskinfo import TaskInfo, TaskState
from koo._values import (
    Seconds,
    arguments,
    from_duration,
    from_proto_value,
    from_struct,
    from_timestamp,
    to_duration,
    to_struct,
)
from koo.schedule.v1 import schedule_service_pb2 as pb
from koo.schedule.v1 import schedule_service_pb2_grpc as pb_grpc


class MissedTickPolicy(OpenEnum):
    """What happens to ticks missed while no scheduler ran."""

    SKIP = pb.MISSED_TICK_POLICY_SKIP
    """Dropped; the schedule goes on from its next tick (the default)."""
    RUN_ONCE = pb.MISSED_TICK_POLICY_RUN_ONCE
    """The latest missed tick runs once when a scheduler is back, never a burst."""


@dataclass(frozen=True)
class ScheduledTask:
    """The task each tick submits (`None` and empty values: koo's defaults)."""

    name: str
    category: TaskCategory
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: TaskPriority = TaskPriority.NORMAL
    max_retries: int | None = None
    queue: str = ""
    soft_time_limit: Seconds | None = None
    time_limit: Seconds | None = None
    expire_after: Seconds | None = None
    """A fired task not started this long after its tick's submit expires
    (Celery beat's `expires`): a backlog never runs stale ticks late."""
    rate_limit_key: str = ""
    concurrency_key: str = ""

    def to_proto(self) -> pb.TaskTemplate:
        """koo's `TaskTemplate`."""
        t = pb.TaskTemplate(
            name=self.name,
            category=self.category.value,
            args=arguments(self.args),
            priority=self.priority.value,
            queue=self.queue,
            rate_limit_key=self.rate_limit_key,
            concurrency_key=self.concurrency_key,
        )
        if self.kwargs:
            t.kwargs.CopyFrom(to_struct(self.kwargs))
        if self.max_retries is not None:
            t.max_retries = self.max_retries
        for name in ("soft_time_limit", "time_limit", "expire_after"):
            value = getattr(self, name)
            if value is not None:
                getattr(t, name).CopyFrom(to_duration(value))
        return t

    @classmethod
    def from_proto(cls, t: pb.TaskTemplate) -> ScheduledTask:
        """Converts koo's `TaskTemplate` (durations as timedeltas)."""

        return cls(
            name=t.name,
            category=TaskCategory(t.category),
            args=[from_proto_value(v) for v in t.args],
            kwargs=from_struct(t.kwargs),
            priority=TaskPriority(t.priority) if t.priority else TaskPriority.NORMAL,
            max_retries=t.max_retries if t.HasField("max_retries") else None,
            queue=t.queue,
            soft_time_limit=from_duration(t.soft_time_limit) if t.HasField("soft_time_limit") else None,
            time_limit=from_duration(t.time_limit) if t.HasField("time_limit") else None,
            expire_after=from_duration(t.expire_after) if t.HasField("expire_after") else None,
            rate_limit_key=t.rate_limit_key,
            concurrency_key=t.concurrency_key,
        )


@dataclass(frozen=True)
class ScheduleRunInfo:
    """One firing of a schedule."""

    tick_time: datetime | None
    """The tick it ran for (the scheduled time); None for a trigger."""
    task_id: str
    state: TaskState | None
    """That task's state now (None once its record expired)."""
    end_time: datetime | None
    error: str
    triggered: bool


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as koo stores it."""

    name: str
    cron: str
    time_zone: str
    """IANA zone the expression is read in ("" is UTC)."""
    task: ScheduledTask
    missed_tick_policy: MissedTickPolicy
    paused: bool
    source: str
    """"config" (koo's KOO_SCHEDULE_* defaults) or "api"."""
    next_fire_times: list[datetime]
    """Up to five; none while paused."""
    last_run: ScheduleRunInfo | None
    create_time: datetime | None
    update_time: datetime | None

    @classmethod
    def from_proto(cls, s: pb.Schedule) -> ScheduleInfo:
        """Converts koo's `Schedule` message."""
        run = s.last_run if s.HasField("last_run") else None
        return cls(
            name=s.name,
            cron=s.cron,
            time_zone=s.time_zone,
            task=ScheduledTask.from_proto(s.task),
            missed_tick_policy=MissedTickPolicy(s.missed_tick_policy or pb.MISSED_TICK_POLICY_SKIP),
            paused=s.paused,
            source="config" if s.source == pb.SCHEDULE_SOURCE_CONFIG else "api",
            next_fire_times=[t for t in map(from_timestamp, s.next_fire_times) if t is not None],
            last_run=None
            if run is None
            else ScheduleRunInfo(
                tick_time=from_timestamp(run.tick_time),
                task_id=run.task_id,
                state=TaskState(run.state) if run.state else None,
                end_time=from_timestamp(run.end_time),
                error=run.error,
                triggered=run.triggered,
            ),
            create_time=from_timestamp(s.create_time),
            update_time=from_timestamp(s.update_time),
        )


class ScheduleManager(Client):
    """koo's schedules, asyncio-first (`.sync` for blocking calls).

    `ScheduleManager()` (no target) follows `koo.configure(...)` /
    `KOO_TARGET`. Failed calls raise `KooError`: a bad cron expression or
    zone `INVALID_ARGUMENT` quoting the parser, a name in use
    `ALREADY_EXISTS`, an unknown one `NOT_FOUND`.
    """

    _sync: SyncScheduleManager | None = None

    def _stub(self) -> pb_grpc.ScheduleServiceAsyncStub:
        return pb_grpc.ScheduleServiceStub(self._conn.channel())

    @property
    def sync(self) -> SyncScheduleManager:
        """The same client with blocking methods."""
        if self._sync is None:
            self._sync = SyncScheduleManager(self)
        return self._sync

    async def create(
        self,
        name: str,
        cron: str,
        task: ScheduledTask,
        *,
        time_zone: str = "",
        missed_tick_policy: MissedTickPolicy = MissedTickPolicy.SKIP,
        paused: bool = False,
    ) -> ScheduleInfo:
        """Creates a schedule (`paused=True`: it fires nothing until `resume`)."""
        s = pb.Schedule(
            name=name,
            cron=cron,
            time_zone=time_zone,
            task=task.to_proto(),
            missed_tick_policy=missed_tick_policy.value,
        )
        req = pb.CreateScheduleRequest(schedule=s, paused=paused)
        r = await rpc(self._stub().CreateSchedule(req, metadata=self._conn.metadata()))
        return ScheduleInfo.from_proto(r.schedule)

    async def get(self, name: str) -> ScheduleInfo:
        """One schedule, with its next fire times and its last run."""
        r = await rpc(self._stub().GetSchedule(pb.GetScheduleRequest(name=name), metadata=self._conn.metadata()))
        return ScheduleInfo.from_proto(r.schedule)

    async def list(self) -> list[ScheduleInfo]:
        """Every schedule, by name (all pages)."""
        out: list[ScheduleInfo] = []
        token = ""
        while True:
            req = pb.ListSchedulesRequest(page_size=1000, page_token=token)
            r = await rpc(self._stub().ListSchedules(req, metadata=self._conn.metadata()))
            out.extend(ScheduleInfo.from_proto(s) for s in r.schedules)
            token = r.next_page_token
            if not token:
                return out

    async def update(
        self,
        name: str,
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        task: ScheduledTask | None = None,
        missed_tick_policy: MissedTickPolicy | None = None,
    ) -> ScheduleInfo:
        """Changes the fields given (the others stay)."""
        s = pb.Schedule(name=name)
        paths: list[str] = []
        if cron is not None:
            s.cron = cron
            paths.append("cron")
        if time_zone is not None:
            s.time_zone = time_zone
            paths.append("time_zone")
        if task is not None:
            s.task.CopyFrom(task.to_proto())
            paths.append("task")
        if missed_tick_policy is not None:
            s.missed_tick_policy = missed_tick_policy.value
            paths.append("missed_tick_policy")
        if not paths:
            raise ValueError("update() needs at least one of cron, time_zone, task, missed_tick_policy")
        req = pb.UpdateScheduleRequest(schedule=s, update_mask=field_mask_pb2.FieldMask(paths=paths))
        r = await rpc(self._stub().UpdateSchedule(req, metadata=self._conn.metadata()))
        return ScheduleInfo.from_proto(r.schedule)

    async def pause(self, name: str) -> ScheduleInfo:
        """Stops it firing (missed ticks are never run) until `resume`."""
        r = await rpc(self._stub().PauseSchedule(pb.PauseScheduleRequest(name=name), metadata=self._conn.metadata()))
        return ScheduleInfo.from_proto(r.schedule)

    async def resume(self, name: str) -> ScheduleInfo:
        """Fires it again from its next tick."""
        req = pb.ResumeScheduleRequest(name=name)
        r = await rpc(self._stub().ResumeSchedule(req, metadata=self._conn.metadata()))
        return ScheduleInfo.from_proto(r.schedule)

    async def delete(self, name: str) -> None:
        """Removes it (tasks it fired are left alone)."""
        await rpc(self._stub().DeleteSchedule(pb.DeleteScheduleRequest(name=name), metadata=self._conn.metadata()))

    async def trigger(self, name: str) -> TaskInfo:
        """Submits its task now, outside its ticks; the task submitted."""
        req = pb.TriggerScheduleRequest(name=name)
        r = await rpc(self._stub().TriggerSchedule(req, metadata=self._conn.metadata()))
        return TaskInfo.from_proto(r.task)


class SyncScheduleManager:
    """Blocking twins of every `ScheduleManager` call (not from a coroutine)."""

    def __init__(self, manager: ScheduleManager | None = None) -> None:
        self._m = manager if manager is not None else ScheduleManager()

    create = blocking(ScheduleManager.create)
    get = blocking(ScheduleManager.get)
    list = blocking(ScheduleManager.list)
    update = blocking(ScheduleManager.update)
    pause = blocking(ScheduleManager.pause)
    resume = blocking(ScheduleManager.resume)
    delete = blocking(ScheduleManager.delete)
    trigger = blocking(ScheduleManager.trigger)
