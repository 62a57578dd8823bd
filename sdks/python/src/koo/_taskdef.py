"""`TaskDef`: a task's name and its submit defaults in one place.

Why: with Celery a task's options (`max_retries`, time limits, its queue)
are declared once, on the task (`@app.task(...)`), and every `.delay()`
uses them. koo takes its options per submit, so without this each call
site repeats them and one that forgets gets koo's defaults. A `TaskDef` is
what both sides import: the code that submits (`.delay(...)`,
`.apply_async(...)`, `.submission(...)` for `submit_many`) and the worker
that runs it (`@worker.task(defn)` serves its name, and its queue when it
names one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from koo._connection import blocking
from koo._submission import Submission, TaskCategory, TaskPriority
from koo._tasks import SyncTaskManager, TaskInfo, TaskManager
from koo._values import Seconds
from koo.task_manager import task_manager


def _manager(manager: TaskManager | SyncTaskManager | None) -> TaskManager:
    """The client a submit goes through: the one given (a blocking one's
    async client: its calls run on the SDK's own loop, as these do), else
    the default `koo.task_manager.task_manager`."""
    if isinstance(manager, SyncTaskManager):
        return manager._m
    return task_manager if manager is None else manager


@dataclass(frozen=True)
class TaskDef:
    """A task name with the options every submit of it takes unless the
    call says otherwise (Celery's `@app.task(...)` options)::

        resize = TaskDef("images.resize", TaskCategory.PDF_PROCESSING,
                         max_retries=5, time_limit=120)

        info = await resize.delay("a.png", width=640)          # TaskInfo
        info = await resize.apply_async(("a.png",), countdown=10, max_retries=1)

        @worker.task(resize)                                  # in the worker
        def run(path: str, width: int = 1024) -> str: ...

    `None` (and `priority` NORMAL) leaves an option to koo's defaults, as
    `TaskManager.submit` does."""

    name: str
    category: TaskCategory
    priority: TaskPriority = TaskPriority.NORMAL
    max_retries: int | None = None
    queue: str | None = None
    """The queue its submits go to (None: its category's); a worker
    registering the definition serves that queue."""
    soft_time_limit: Seconds | None = None
    time_limit: Seconds | None = None
    result_ttl: Seconds | None = None
    expires: Seconds | None = None
    """Not started this long after its submit, it ends CANCELLED."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: a non-empty task name, not {self.name!r}")
        if not isinstance(self.category, TaskCategory):
            raise TypeError(f"category: a TaskCategory, not {type(self.category).__name__}")

    async def delay(self, *args: Any, **kwargs: Any) -> TaskInfo:
        """Submits `name(*args, **kwargs)` with the defaults, through the
        default client (`koo.task_manager.task_manager`): Celery's
        `delay`. The task as stored; `TaskManager.result(info.id)` waits
        for its result."""
        return await self.apply_async(args, kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        manager: TaskManager | SyncTaskManager | None = None,
        priority: TaskPriority | None = None,
        max_retries: int | None = None,
        queue: str | None = None,
        soft_time_limit: Seconds | None = None,
        time_limit: Seconds | None = None,
        result_ttl: Seconds | None = None,
        expires: datetime | Seconds | None = None,
        countdown: Seconds | None = None,
        eta: datetime | None = None,
        depends_on: Iterable[str] = (),
        idempotency_key: str | None = None,
        debounce_key: str | None = None,
        debounce_window: Seconds | None = None,
        rate_limit_key: str | None = None,
        concurrency_key: str | None = None,
    ) -> TaskInfo:
        """Submits with the options given here over the defaults (Celery's
        `apply_async`), through `manager` or the default client. The options
        are `TaskManager.submit`'s; the task as stored (`submit` also says
        whether an idempotency or debounce key deduplicated it)."""
        # the defaults merged once, as for a batch
        s = self.submission(
            args,
            kwargs,
            priority=priority,
            max_retries=max_retries,
            queue=queue,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            result_ttl=result_ttl,
            countdown=countdown,
            eta=eta,
            expires=expires,
            rate_limit_key=rate_limit_key,
            concurrency_key=concurrency_key,
        )
        info, _ = await _manager(manager).submit(
            s.task_name,
            s.category,
            s.args,
            s.kwargs,
            s.priority,
            s.max_retries,
            countdown=s.countdown,
            eta=s.eta,
            depends_on=depends_on,
            idempotency_key=idempotency_key,
            queue=s.queue,
            soft_time_limit=s.soft_time_limit,
            time_limit=s.time_limit,
            result_ttl=s.result_ttl,
            debounce_key=debounce_key,
            debounce_window=debounce_window,
            expires=s.expires,
            rate_limit_key=s.rate_limit_key,
            concurrency_key=s.concurrency_key,
        )
        return info

    def submission(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: TaskPriority | None = None,
        max_retries: int | None = None,
        queue: str | None = None,
        soft_time_limit: Seconds | None = None,
        time_limit: Seconds | None = None,
        result_ttl: Seconds | None = None,
        countdown: Seconds | None = None,
        eta: datetime | None = None,
        expires: datetime | Seconds | None = None,
        rate_limit_key: str | None = None,
        concurrency_key: str | None = None,
    ) -> Submission:
        """One task of `TaskManager.submit_many`, with the defaults (Celery's
        `signature` in a `group`)."""
        return Submission(
            self.name,
            self.category,
            args,
            kwargs,
            self.priority if priority is None else priority,
            self.max_retries if max_retries is None else max_retries,
            countdown=countdown,
            eta=eta,
            queue=self.queue if queue is None else queue,
            soft_time_limit=self.soft_time_limit if soft_time_limit is None else soft_time_limit,
            time_limit=self.time_limit if time_limit is None else time_limit,
            result_ttl=self.result_ttl if result_ttl is None else result_ttl,
            expires=self.expires if expires is None else expires,
            rate_limit_key=rate_limit_key,
            concurrency_key=concurrency_key,
        )

    @property
    def sync(self) -> SyncTaskDef:
        """The same definition with blocking `delay` and `apply_async` (not
        from a coroutine)."""
        return SyncTaskDef(self)


class SyncTaskDef:
    """Blocking twins of a `TaskDef`'s `delay` and `apply_async` (`defn.sync`)."""

    def __init__(self, defn: TaskDef) -> None:
        self._m = defn

    delay = blocking(TaskDef.delay)
    apply_async = blocking(TaskDef.apply_async)
