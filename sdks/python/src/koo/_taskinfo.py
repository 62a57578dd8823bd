"""What koo says of tasks, as the SDK shows them: `TaskState`, `TaskInfo`
(a task), `TaskAttempt`, `TaskProgress`, `TaskSummary` (history), `QueueInfo`,
`TaskEvent` (`WatchTasks`), and the errors `result()` raises."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from koo._cache import LEVEL_OF_PROTO, CacheLevel
from koo._enums import OpenEnum
from koo._submission import TaskCategory, TaskPriority
from koo._values import from_duration, from_proto_value, from_struct, from_timestamp
from koo.tasks.v1 import task_service_pb2 as pb


class TaskState(OpenEnum):
    """Where a task is in its life."""

    UNKNOWN = pb.TASK_STATE_UNSPECIFIED
    PENDING = pb.TASK_STATE_PENDING
    SCHEDULED = pb.TASK_STATE_SCHEDULED
    QUEUED = pb.TASK_STATE_QUEUED
    RUNNING = pb.TASK_STATE_RUNNING
    SUCCEEDED = pb.TASK_STATE_SUCCEEDED
    FAILED = pb.TASK_STATE_FAILED
    CANCELLED = pb.TASK_STATE_CANCELLED
    TIMED_OUT = pb.TASK_STATE_TIMED_OUT

    @property
    def is_final(self) -> bool:
        """Whether the task has ended (it changes again only on retry)."""
        return self in _FINAL


_FINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT})


@dataclass(frozen=True)
class TaskProgress:
    """A handler's latest progress report."""

    percent: float = 0.0
    message: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskAttempt:
    """One ended attempt of a task (its attempt log)."""

    attempt: int
    worker: str
    outcome: str
    """succeeded, failed, timed_out, lost or handed_back."""
    error: str
    end_time: datetime | None
    retry_time: datetime | None
    """When the next attempt was due, for an attempt that was retried."""

    @classmethod
    def from_proto(cls, a: pb.TaskAttempt) -> TaskAttempt:
        """Converts koo's `TaskAttempt` message."""
        return cls(
            attempt=a.attempt,
            worker=a.worker,
            outcome=a.outcome,
            error=a.error,
            end_time=from_timestamp(a.end_time),
            retry_time=from_timestamp(a.retry_time),
        )


@dataclass(frozen=True)
class TaskInfo:
    """A task as koo reports it (`get_task_status`, `watch`, listings)."""

    id: str
    name: str
    state: TaskState
    category: TaskCategory | None
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int
    max_retries: int
    worker: str
    progress: TaskProgress
    result: Any
    error: str | None
    error_retryable: bool
    depends_on: list[str]
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    debounce_key: str = ""
    """The debounce key it was submitted with ("" for none)."""
    # When it expires if not started by then (`expires=` on submit), if it does.
    expire_time: datetime | None = None
    rate_limit_key: str = ""
    """The rate-limit key it was submitted with ("" for none)."""
    concurrency_key: str = ""
    """The concurrency key it was submitted with ("" for none)."""
    error_details: dict[str, Any] = field(default_factory=dict)
    """The latest error's details: a handler's `Fatal(..., details=...)` or
    `Retry(..., details=...)`, or, for an exception the handler raised,
    `{"exception": "ValueError", "traceback": "Traceback (most recent..."}`."""
    attempt_log: list[TaskAttempt] = field(default_factory=list)
    """Every ended attempt, oldest first (Celery keeps no such log)."""
    soft_time_limit: timedelta | None = None
    """Its soft time limit (the handler is told), as koo applies it."""
    time_limit: timedelta | None = None
    """Its hard time limit (the attempt ends TIMED_OUT), as koo applies it."""
    schedule: str = ""
    """The schedule whose tick submitted it ("" for none)."""
    schedule_time: datetime | None = None
    """That tick's scheduled time (not when it fired)."""
    cache_result: dict[str, Any] | None = None
    """Where its result is cached when it succeeds (`level`, `key`, `ttl`
    seconds, `tags`, `soft_ttl` seconds), or None."""

    @property
    def traceback(self) -> str | None:
        """The traceback of the exception that ended the latest attempt, as
        Python printed it in the worker (Celery's `AsyncResult.traceback`;
        its start cut past 16 KiB); None when no Python SDK worker raised."""
        tb = self.error_details.get("traceback")
        return tb if isinstance(tb, str) else None

    @property
    def is_final(self) -> bool:
        """Whether the task has ended: a final state, or a state a newer koo
        added (`UNRECOGNIZED_<n>`) with an end time, so that `result()` and
        `watch()` end on it rather than wait for ever."""
        if self.state.is_final:
            return True
        return self.state.name.startswith("UNRECOGNIZED_") and self.end_time is not None

    @property
    def status(self) -> str:
        """The state's name in lower case (`succeeded`), as the seed's dicts had it."""
        return self.state.name.lower()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (enums by name, times in ISO 8601, time
        limits in seconds), e.g. for an API response."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, OpenEnum):
                v = v.name.lower() if isinstance(v, TaskState) else v.name
            elif isinstance(v, datetime):
                v = v.isoformat()
            elif isinstance(v, timedelta):
                v = v.total_seconds()
            elif f.name == "cache_result" and v is not None:
                v = {**v, "level": v["level"].value}
            elif isinstance(v, TaskProgress):
                v = {"percent": v.percent, "message": v.message, "metadata": v.metadata}
            elif f.name == "attempt_log":
                v = [
                    {
                        "attempt": a.attempt,
                        "worker": a.worker,
                        "outcome": a.outcome,
                        "error": a.error,
                        "end_time": a.end_time.isoformat() if a.end_time else None,
                        "retry_time": a.retry_time.isoformat() if a.retry_time else None,
                    }
                    for a in v
                ]
            out[f.name] = v
        out["priority"] = TaskPriority(self.priority).name if self.priority else None
        return out

    @classmethod
    def from_proto(cls, t: pb.Task) -> TaskInfo:
        """Converts koo's `Task` message."""
        return cls(
            id=t.id,
            name=t.name,
            state=TaskState(t.state),
            category=TaskCategory(t.category) if t.category else None,
            queue=t.queue,
            priority=int(t.priority),
            args=[from_proto_value(v) for v in t.args],
            kwargs=from_struct(t.kwargs),
            attempts=t.attempts,
            max_retries=t.max_retries,
            worker=t.worker,
            progress=TaskProgress(t.progress.percent, t.progress.message, from_struct(t.progress.metadata)),
            result=from_proto_value(t.result) if t.HasField("result") else None,
            error=t.error.message if t.HasField("error") else None,
            error_retryable=t.error.retryable,
            depends_on=list(t.depends_on),
            create_time=from_timestamp(t.create_time),
            start_time=from_timestamp(t.start_time),
            end_time=from_timestamp(t.end_time),
            debounce_key=t.debounce_key,
            expire_time=from_timestamp(t.expire_time),
            rate_limit_key=t.rate_limit_key,
            concurrency_key=t.concurrency_key,
            error_details=from_struct(t.error.details) if t.error.HasField("details") else {},
            attempt_log=[TaskAttempt.from_proto(a) for a in t.attempt_log],
            soft_time_limit=from_duration(t.soft_time_limit) if t.HasField("soft_time_limit") else None,
            time_limit=from_duration(t.time_limit) if t.HasField("time_limit") else None,
            schedule=t.schedule,
            schedule_time=from_timestamp(t.schedule_time),
            cache_result=_cache_target(t.cache_result) if t.HasField("cache_result") else None,
        )


def _cache_target(c: pb.CacheTarget) -> dict[str, Any]:
    """A task's `cache_result` as plain data (durations in seconds)."""
    return {
        "level": LEVEL_OF_PROTO.get(c.level, CacheLevel.APPLICATION),
        "key": c.key,
        "ttl": from_duration(c.ttl).total_seconds() if c.HasField("ttl") else None,
        "tags": list(c.tags),
        "soft_ttl": from_duration(c.soft_ttl).total_seconds() if c.HasField("soft_ttl") else None,
    }


@dataclass(frozen=True)
class TaskSummary:
    """What history keeps of an ended task."""

    id: str
    name: str
    category: TaskCategory | None
    state: TaskState
    attempts: int
    end_time: datetime | None
    start_time: datetime | None = None
    """When its last attempt started (None: it never ran)."""
    run_time: timedelta | None = None
    """How long its last attempt ran (`end_time - start_time`)."""


@dataclass(frozen=True)
class TaskEvent:
    """One event of `TaskManager.watch_tasks`: a task changed state or
    reported progress."""

    task_id: str
    name: str
    queue: str
    state: TaskState
    progress: TaskProgress | None
    """With a progress report (state RUNNING), else None."""
    event_time: datetime | None
    resume_token: str
    """Pass to `watch_tasks(resume_token=...)` to go on after this event."""

    @classmethod
    def from_proto(cls, e: pb.WatchTasksResponse) -> TaskEvent:
        """Converts koo's `WatchTasksResponse`."""
        p = e.progress
        return cls(
            task_id=e.task_id,
            name=e.name,
            queue=e.queue,
            state=TaskState(e.state),
            progress=TaskProgress(p.percent, p.message, from_struct(p.metadata)) if e.HasField("progress") else None,
            event_time=from_timestamp(e.event_time),
            resume_token=e.resume_token,
        )


@dataclass(frozen=True)
class QueueInfo:
    """A task queue, its state and depths (`TaskManager.list_queues`)."""

    name: str
    category: TaskCategory | None
    """The category whose queue it is (None: a configured extra queue)."""
    paused: bool
    """Paused queues accept submits and hand out nothing until resumed."""
    paused_by: str | None
    pause_reason: str | None
    pause_time: datetime | None
    queued: int
    running: int
    scheduled: int
    pending: int
    dead_letters: int

    @classmethod
    def from_proto(cls, q: pb.Queue) -> QueueInfo:
        """Converts koo's `Queue` message."""
        paused = q.state == pb.QUEUE_STATE_PAUSED
        m = q.metrics
        return cls(
            name=q.name,
            category=TaskCategory(q.category) if q.category else None,
            paused=paused,
            paused_by=q.pause.principal if paused else None,
            pause_reason=q.pause.reason if paused else None,
            pause_time=from_timestamp(q.pause.pause_time) if paused else None,
            queued=m.queued,
            running=m.running,
            scheduled=m.scheduled,
            pending=m.pending,
            dead_letters=m.dead_letters,
        )


class TaskFailed(Exception):
    """`result()` of a task that ended without succeeding."""

    def __init__(self, task: TaskInfo) -> None:
        super().__init__(f"task {task.id} ({task.name}) ended {task.state.name}: {task.error or ''}")
        self.task = task


class TaskTimeout(TimeoutError):
    """`result()` gave up waiting; the task goes on."""
