"""What a submit is made of: `TaskCategory`, `TaskPriority`, `Submission`
(one task of `TaskManager.submit_many`), and the `SubmitTaskRequest` built
from them, shared by `submit` and `submit_many`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from koo._connection import KooError
from koo._enums import OpenEnum
from koo._values import Seconds, arguments, strings, to_duration, to_struct, to_timestamp
from koo.tasks.v1 import task_service_pb2 as pb

# koo's `SubmitTasks` takes at most this many tasks a call.
MAX_SUBMIT_BATCH = 100


class TaskCategory(OpenEnum):
    """The seed's six categories; each has its own queue."""

    AI_SERVICE = pb.TASK_CATEGORY_AI_SERVICE
    PDF_PROCESSING = pb.TASK_CATEGORY_PDF_PROCESSING
    DATABASE = pb.TASK_CATEGORY_DATABASE
    HEALTH_CHECK = pb.TASK_CATEGORY_HEALTH_CHECK
    RESEARCH = pb.TASK_CATEGORY_RESEARCH
    CACHE = pb.TASK_CATEGORY_CACHE


class TaskPriority(OpenEnum):
    """Higher runs first within a queue; FIFO within one priority."""

    LOW = pb.TASK_PRIORITY_LOW
    NORMAL = pb.TASK_PRIORITY_NORMAL
    HIGH = pb.TASK_PRIORITY_HIGH
    CRITICAL = pb.TASK_PRIORITY_CRITICAL


@dataclass(frozen=True)
class Submission:
    """One task of `TaskManager.submit_many`: `submit`'s arguments that a
    batch takes. koo's `SubmitTasks` takes no dependencies, idempotency keys
    or debounce keys: submit such tasks one by one."""

    task_name: str
    category: TaskCategory
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] | None = None
    priority: TaskPriority = TaskPriority.NORMAL
    max_retries: int | None = None
    countdown: Seconds | None = None
    eta: datetime | None = None
    queue: str | None = None
    soft_time_limit: Seconds | None = None
    time_limit: Seconds | None = None
    result_ttl: Seconds | None = None
    expires: datetime | Seconds | None = None
    rate_limit_key: str | None = None
    concurrency_key: str | None = None

    def request(self) -> pb.SubmitTaskRequest:
        """The task as koo's `SubmitTaskRequest`."""
        return submit_request(
            self.task_name,
            self.category,
            self.args,
            self.kwargs,
            self.priority,
            self.max_retries,
            countdown=self.countdown,
            eta=self.eta,
            queue=self.queue,
            soft_time_limit=self.soft_time_limit,
            time_limit=self.time_limit,
            result_ttl=self.result_ttl,
            expires=self.expires,
            rate_limit_key=self.rate_limit_key,
            concurrency_key=self.concurrency_key,
        )


class SubmitManyError(KooError):
    """`submit_many` stopped part-way: koo refused or failed one of its calls
    (the message names the task, counted from the first of the whole call).
    `stored` lists the ids koo reported stored, in order: the earlier calls'
    tasks and those koo listed in its refusal (on a Redis Cluster a batch's
    queues are stored apart, so these may include tasks after the one that
    failed). They are queued and run. A failure that lists none (a
    deadline, a lost connection) leaves the failing call's outcome unknown:
    some of its tasks may be stored; check with `get_task_status` before
    submitting them again."""

    def __init__(self, code: grpc.StatusCode, message: str, stored: list[str]) -> None:
        super().__init__(code, message)
        self.stored = stored


def submit_request(
    task_name: str,
    category: TaskCategory,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    priority: TaskPriority = TaskPriority.NORMAL,
    max_retries: int | None = None,
    *,
    countdown: Seconds | None = None,
    eta: datetime | None = None,
    depends_on: Iterable[str] = (),
    idempotency_key: str | None = None,
    queue: str | None = None,
    soft_time_limit: Seconds | None = None,
    time_limit: Seconds | None = None,
    result_ttl: Seconds | None = None,
    debounce_key: str | None = None,
    debounce_window: Seconds | None = None,
    expires: datetime | Seconds | None = None,
    rate_limit_key: str | None = None,
    concurrency_key: str | None = None,
) -> pb.SubmitTaskRequest:
    """The `SubmitTaskRequest` of `TaskManager.submit`'s arguments."""
    req = pb.SubmitTaskRequest(
        name=task_name,
        category=pb.TaskCategory.ValueType(category.value),
        args=arguments(args),
        priority=pb.TaskPriority.ValueType(priority.value),
        queue=queue or "",
        idempotency_key=idempotency_key or "",
        depends_on=strings("depends_on", depends_on),
        debounce_key=debounce_key or "",
        rate_limit_key=rate_limit_key or "",
        concurrency_key=concurrency_key or "",
    )
    if debounce_window is not None:
        req.debounce_window.CopyFrom(to_duration(debounce_window))
    if kwargs:
        req.kwargs.CopyFrom(to_struct(kwargs))
    if max_retries is not None:
        req.max_retries = max_retries
    if countdown is not None:
        req.countdown.CopyFrom(to_duration(countdown))
    if eta is not None:
        req.eta.CopyFrom(to_timestamp(eta))
    if soft_time_limit is not None:
        req.soft_time_limit.CopyFrom(to_duration(soft_time_limit))
    if time_limit is not None:
        req.time_limit.CopyFrom(to_duration(time_limit))
    if result_ttl is not None:
        req.result_ttl.CopyFrom(to_duration(result_ttl))
    if isinstance(expires, datetime):
        # Celery's `expires`: a datetime is the time, seconds or a timedelta
        # count from now
        req.expire_time.CopyFrom(to_timestamp(expires))
    elif expires is not None:
        req.expire_after.CopyFrom(to_duration(expires))
    return req


def stored_in_refusal(message: str) -> list[str]:
    """The ids koo lists after "tasks stored: " in a `SubmitTasks` refusal
    (the tasks of that call stored before the one that failed)."""
    _, found, rest = message.rpartition("; tasks stored: ")
    if not found or rest == "none":
        return []
    return rest.split(", ")


def renumbered(message: str, offset: int) -> str:
    """A `SubmitTasks` refusal's "tasks[i]" counted from the first task of
    the whole `submit_many` call, whose `offset`-th task began this batch."""
    prefix, bracket, rest = message.partition("tasks[")
    index, close, tail = rest.partition("]")
    if prefix or not bracket or not close or not index.isdigit():
        return message if offset == 0 else f"(the batch from tasks[{offset}]) {message}"
    return f"tasks[{int(index) + offset}]{tail}"
