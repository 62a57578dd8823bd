"""The tasks client: `TaskManager` (asyncio) and `SyncTaskManager`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import grpc
import grpc.aio

from koo._connection import Client, KooError, blocking, reopening, rpc
from koo._limits import ConcurrencyLimitInfo, ConcurrencyPolicy, RateLimitInfo
from koo._submission import (
    MAX_SUBMIT_BATCH,
    Submission,
    SubmitManyError,
    TaskCategory,
    TaskPriority,
    renumbered,
    stored_in_refusal,
    submit_request,
)
from koo._taskinfo import (
    QueueInfo,
    TaskAttempt,
    TaskEvent,
    TaskFailed,
    TaskInfo,
    TaskProgress,
    TaskState,
    TaskSummary,
    TaskTimeout,
)
from koo._values import (
    Seconds,
    from_timestamp,
    strings,
    to_duration,
    to_struct,
)
from koo.tasks.v1 import task_service_pb2 as pb
from koo.tasks.v1 import task_service_pb2_grpc as pb_grpc

__all__ = [
    "QueueInfo",
    "SyncTaskManager",
    "TaskAttempt",
    "TaskEvent",
    "TaskFailed",
    "TaskInfo",
    "TaskManager",
    "TaskProgress",
    "TaskState",
    "TaskSummary",
    "TaskTimeout",
]


class TaskManager(Client):
    """koo's background tasks, asyncio-first, with the seed's method names.

    `TaskManager()` (no target) follows `koo.configure(...)` / `KOO_TARGET`.
    Failed calls raise `KooError`.
    """

    _sync: SyncTaskManager | None = None

    def _stub(self) -> pb_grpc.TaskServiceAsyncStub:
        return pb_grpc.TaskServiceStub(self._conn.channel())

    @property
    def sync(self) -> SyncTaskManager:
        """The same client with blocking methods."""
        if self._sync is None:
            self._sync = SyncTaskManager(self)
        return self._sync

    async def submit(
        self,
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
    ) -> tuple[TaskInfo, bool]:
        """Submits a task; returns it and whether an earlier submit took it
        (`deduplicated`): the task first stored with the same idempotency key,
        or the unstarted task holding the same `debounce_key`, which this
        submit replaced (its arguments win; it starts `debounce_window`
        from now). A debounce key needs a window (more than 0, at most 24 h)
        and takes no countdown, eta, dependencies or idempotency key.

        `rate_limit_key` (a provider, a tenant): the task starts only when the
        key's rate limit (`keys/<key>`, else `keys/*`) has a token and no
        worker's `RateLimited` back-off holds the key. `concurrency_key`: at
        most the key's cap of its tasks run at once, and a queue serves its
        keys round robin."""
        req = submit_request(
            task_name,
            category,
            args,
            kwargs,
            priority,
            max_retries,
            countdown=countdown,
            eta=eta,
            depends_on=depends_on,
            idempotency_key=idempotency_key,
            queue=queue,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            result_ttl=result_ttl,
            debounce_key=debounce_key,
            debounce_window=debounce_window,
            expires=expires,
            rate_limit_key=rate_limit_key,
            concurrency_key=concurrency_key,
        )
        r = await rpc(self._stub().SubmitTask(req, metadata=self._conn.metadata()))
        return TaskInfo.from_proto(r.task), r.deduplicated

    async def submit_many(self, tasks: Iterable[Submission]) -> list[TaskInfo]:
        """Submits many tasks in few calls (koo's `SubmitTasks`, 100 tasks a
        call, in order; Celery's `group(...).apply_async()` without the
        group) and returns them stored, in order. Every task is built (and
        checked here) before the first call, and koo validates each call's
        tasks before it stores any of them. A call that fails raises
        `SubmitManyError`: its `stored` lists the ids koo reported stored
        (queued: they run), those of the earlier calls and those koo listed
        in its refusal. A failure without such a list (a deadline, a lost
        connection) leaves the failing call's outcome unknown: some of its
        tasks may be stored. Not retried: a retry would submit stored tasks
        again."""
        requests = []
        for i, task in enumerate(tasks):
            if not isinstance(task, Submission):
                raise TypeError(f"tasks[{i}]: a Submission, not {type(task).__name__}")
            try:
                requests.append(task.request())
            except (TypeError, ValueError) as e:
                # not type(e): some (UnicodeEncodeError) take other arguments
                raise (TypeError if isinstance(e, TypeError) else ValueError)(f"tasks[{i}]: {e}") from e
        stored: list[TaskInfo] = []
        for start in range(0, len(requests), MAX_SUBMIT_BATCH):
            batch = pb.SubmitTasksRequest(tasks=requests[start : start + MAX_SUBMIT_BATCH])
            try:
                r = await rpc(self._stub().SubmitTasks(batch, metadata=self._conn.metadata()))
            except KooError as e:
                ids = [t.id for t in stored] + stored_in_refusal(e.message)
                raise SubmitManyError(e.code, renumbered(e.message, start), ids) from None
            stored.extend(TaskInfo.from_proto(t) for t in r.tasks)
        return stored

    async def submit_task(
        self,
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
    ) -> str:
        """The seed's call: submits a task and returns its id.

        `max_retries` None means koo's default (3); `countdown` (seconds or
        timedelta) or `eta` delays it; `depends_on` names tasks that must
        succeed first; `idempotency_key` makes a repeated submit return the
        first task's id; `debounce_key` with `debounce_window` makes a burst
        of submits one task, which runs once with the last one's arguments
        (see `submit`); `expires` (a datetime, or seconds or a timedelta
        from now: Celery's `expires`) ends it CANCELLED ("cancelled:
        expired") if it has not started by then instead of running late (not
        with a debounce key); `rate_limit_key` and `concurrency_key` put it
        under the keys' rate limit and concurrency cap (see `submit`).
        """
        task, _ = await self.submit(
            task_name,
            category,
            args,
            kwargs,
            priority,
            max_retries,
            countdown=countdown,
            eta=eta,
            depends_on=depends_on,
            idempotency_key=idempotency_key,
            queue=queue,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            result_ttl=result_ttl,
            debounce_key=debounce_key,
            debounce_window=debounce_window,
            expires=expires,
            rate_limit_key=rate_limit_key,
            concurrency_key=concurrency_key,
        )
        return task.id

    async def get_task_status(self, task_id: str) -> TaskInfo:
        """The task now: state, progress, attempts, result or error."""
        r = await rpc(self._stub().GetTask(pb.GetTaskRequest(task_id=task_id), metadata=self._conn.metadata()))
        return TaskInfo.from_proto(r.task)

    async def watch(self, task_id: str) -> AsyncIterator[TaskInfo]:
        """The task now, then at every state change and progress report; ends
        after its final state, and only then. A slow reader may miss
        intermediate updates, never the final one. A koo restart or outage
        on the way is watched through (the watch is opened again, with
        backoff, and says the task as it then stands), as `result` does; any
        other refusal (an unknown task, a bad id) raises `KooError`."""
        req = pb.WatchTaskRequest(task_id=task_id)
        stream = reopening(lambda: self._stub().WatchTask(req, metadata=self._conn.metadata()))
        async with contextlib.aclosing(stream) as updates:
            async for r in updates:
                info = TaskInfo.from_proto(r.task)
                yield info
                if info.is_final:
                    return

    async def result(self, task_id: str, timeout: Seconds | None = None) -> Any:
        """Waits for the task to end and returns its result.

        Raises `TaskFailed` when it ends otherwise, `TaskTimeout` after
        `timeout` (seconds or timedelta; None waits as long as it takes; 0
        looks once). A koo restart or outage on the way is waited through
        (the watch is opened again, with backoff, within the timeout): a
        task still running is never reported as ended.
        """
        secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        try:
            if secs is not None and secs <= 0:
                info = await self.get_task_status(task_id)
                if not info.is_final:
                    raise asyncio.TimeoutError
            else:
                info = await asyncio.wait_for(self._final(task_id), secs)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"task {task_id} did not end within {secs} s") from None
        if info.state is not TaskState.SUCCEEDED:
            raise TaskFailed(info)
        return info.result

    async def _final(self, task_id: str) -> TaskInfo:
        """The task once ended, watched through koo's restarts and outages
        (UNAVAILABLE, or a watch that ends before the task does)."""
        async for info in self.watch(task_id):
            if info.is_final:
                return info
        raise AssertionError("watch() ends only after the final state")

    async def cancel(self, task_id: str, reason: str = "") -> TaskInfo:
        """Cancels a task that has not ended (a running one is told to stop)."""
        req = pb.CancelTaskRequest(task_id=task_id, reason=reason)
        r = await rpc(self._stub().CancelTask(req, metadata=self._conn.metadata()))
        return TaskInfo.from_proto(r.task)

    async def cancel_task(self, task_id: str) -> bool:
        """The seed's name: cancels a task; True when it is (being) cancelled,
        False when it had already ended (`cancel()` raises instead)."""
        try:
            info = await self.cancel(task_id)
        except KooError as e:
            if e.code is grpc.StatusCode.FAILED_PRECONDITION:
                return False
            raise
        return info.state in (TaskState.CANCELLED, TaskState.RUNNING)

    async def retry(self, task_id: str) -> TaskInfo:
        """Runs a FAILED, TIMED_OUT or CANCELLED task again, same id."""
        r = await rpc(self._stub().RetryTask(pb.RetryTaskRequest(task_id=task_id), metadata=self._conn.metadata()))
        return TaskInfo.from_proto(r.task)

    async def retry_task(self, task_id: str) -> str:
        """The seed's name: retries a task and returns its id."""
        return (await self.retry(task_id)).id

    async def get_active_tasks(
        self,
        category: TaskCategory | None = None,
        *,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 500,
    ) -> list[TaskInfo]:
        """Running, queued and scheduled tasks (up to `limit`)."""
        out: list[TaskInfo] = []
        token = ""
        while len(out) < limit:
            req = pb.ListActiveTasksRequest(
                category=pb.TaskCategory.ValueType(category.value if category else 0),
                queue=queue or "",
                name=name or "",
                page_size=min(500, limit - len(out)),
                page_token=token,
            )
            r = await rpc(self._stub().ListActiveTasks(req, metadata=self._conn.metadata()))
            out.extend(TaskInfo.from_proto(t) for t in r.tasks)
            token = r.next_page_token
            if not token:
                break
        return out

    async def get_task_history(
        self,
        state: TaskState | None = None,
        category: TaskCategory | None = None,
        *,
        name: str | None = None,
        limit: int = 100,
    ) -> list[TaskSummary]:
        """Ended tasks, newest first (up to `limit`)."""
        out: list[TaskSummary] = []
        token = ""
        while len(out) < limit:
            req = pb.ListTaskHistoryRequest(
                state=pb.TaskState.ValueType(state.value if state else 0),
                category=pb.TaskCategory.ValueType(category.value if category else 0),
                name=name or "",
                page_size=min(500, limit - len(out)),
                page_token=token,
            )
            r = await rpc(self._stub().ListTaskHistory(req, metadata=self._conn.metadata()))
            out.extend(
                TaskSummary(
                    id=t.id,
                    name=t.name,
                    category=TaskCategory(t.category) if t.category else None,
                    state=TaskState(t.state),
                    attempts=t.attempts,
                    end_time=from_timestamp(t.end_time),
                    start_time=from_timestamp(t.start_time),
                    run_time=t.run_duration.ToTimedelta() if t.HasField("run_duration") else None,
                )
                for t in r.tasks
            )
            token = r.next_page_token
            if not token:
                break
        return out

    async def get_task_metrics(self) -> pb.GetTaskMetricsResponse:
        """Each queue's depth, oldest wait and outcome counts, its run and wait-time
        percentiles over `times_window` (per task name in `by_name`); live workers."""
        req = pb.GetTaskMetricsRequest()
        return await rpc(self._stub().GetTaskMetrics(req, metadata=self._conn.metadata()))

    async def list_queues(self) -> list[QueueInfo]:
        """Every queue with its state (running or paused) and depths."""
        r = await rpc(self._stub().ListQueues(pb.ListQueuesRequest(), metadata=self._conn.metadata()))
        return [QueueInfo.from_proto(q) for q in r.queues]

    async def pause_queue(self, queue: str, reason: str = "") -> QueueInfo:
        """Pauses `queue` (e.g. "ai_service"): it accepts submits and hands out nothing until
        `resume_queue`; running tasks finish. Needs the admin role."""
        req = pb.PauseQueueRequest(queue=queue, reason=reason)
        r = await rpc(self._stub().PauseQueue(req, metadata=self._conn.metadata()))
        return QueueInfo.from_proto(r.queue)

    async def resume_queue(self, queue: str) -> QueueInfo:
        """Resumes a paused `queue`. Needs the admin role."""
        req = pb.ResumeQueueRequest(queue=queue)
        r = await rpc(self._stub().ResumeQueue(req, metadata=self._conn.metadata()))
        return QueueInfo.from_proto(r.queue)

    async def set_rate_limit(self, name: str, limit: int, per: Seconds, burst: int = 1) -> RateLimitInfo:
        """Creates or replaces a global rate limit: at most `limit` tasks of `name`
        (`queues/<queue>`, `tasks/<task name>`, `keys/<key>`, `keys/*`) start per `per`
        (seconds or a timedelta), `burst` at once, across every koo process and worker.
        Needs the admin role."""
        rl = pb.RateLimit(name=name, limit=limit, period=to_duration(per), burst=burst)
        r = await rpc(self._stub().SetRateLimit(pb.SetRateLimitRequest(rate_limit=rl), metadata=self._conn.metadata()))
        return RateLimitInfo.from_proto(r.rate_limit)

    async def get_rate_limit(self, name: str) -> RateLimitInfo:
        """One rate limit with its state (KooError NOT_FOUND when there is none)."""
        req = pb.GetRateLimitRequest(name=name)
        r = await rpc(self._stub().GetRateLimit(req, metadata=self._conn.metadata()))
        return RateLimitInfo.from_proto(r.rate_limit)

    async def list_rate_limits(self) -> list[RateLimitInfo]:
        """Every rate limit, by name."""
        req = pb.ListRateLimitsRequest()
        r = await rpc(self._stub().ListRateLimits(req, metadata=self._conn.metadata()))
        return [RateLimitInfo.from_proto(x) for x in r.rate_limits]

    async def delete_rate_limit(self, name: str) -> None:
        """Removes a rate limit (KooError NOT_FOUND when there is none). Needs the admin role."""
        req = pb.DeleteRateLimitRequest(name=name)
        await rpc(self._stub().DeleteRateLimit(req, metadata=self._conn.metadata()))

    async def set_concurrency_limit(
        self, name: str, max_running: int, policy: ConcurrencyPolicy = ConcurrencyPolicy.WAIT
    ) -> ConcurrencyLimitInfo:
        """Creates or replaces a cap: at most `max_running` tasks with the concurrency key of
        `name` (`keys/<key>`, `keys/*`) run at once, cluster-wide. Needs the admin role."""
        cap = pb.ConcurrencyLimit(
            name=name, max_running=max_running, policy=pb.ConcurrencyPolicy.ValueType(policy.value)
        )
        req = pb.SetConcurrencyLimitRequest(concurrency_limit=cap)
        r = await rpc(self._stub().SetConcurrencyLimit(req, metadata=self._conn.metadata()))
        return ConcurrencyLimitInfo.from_proto(r.concurrency_limit)

    async def get_concurrency_limit(self, name: str) -> ConcurrencyLimitInfo:
        """One cap with its key's running count (KooError NOT_FOUND when there is none)."""
        req = pb.GetConcurrencyLimitRequest(name=name)
        r = await rpc(self._stub().GetConcurrencyLimit(req, metadata=self._conn.metadata()))
        return ConcurrencyLimitInfo.from_proto(r.concurrency_limit)

    async def list_concurrency_limits(self) -> list[ConcurrencyLimitInfo]:
        """Every cap, by name."""
        req = pb.ListConcurrencyLimitsRequest()
        r = await rpc(self._stub().ListConcurrencyLimits(req, metadata=self._conn.metadata()))
        return [ConcurrencyLimitInfo.from_proto(x) for x in r.concurrency_limits]

    async def delete_concurrency_limit(self, name: str) -> None:
        """Removes a cap (KooError NOT_FOUND when there is none). Needs the admin role."""
        req = pb.DeleteConcurrencyLimitRequest(name=name)
        await rpc(self._stub().DeleteConcurrencyLimit(req, metadata=self._conn.metadata()))

    async def watch_tasks(
        self,
        categories: Iterable[TaskCategory] = (),
        *,
        name: str | None = None,
        resume_token: str = "",
    ) -> AsyncIterator[TaskEvent]:
        """Every task's state changes and progress reports, as they happen
        on any koo instance (a dashboard's feed), of `categories` (none:
        all) and task `name`, until the consumer stops. A koo restart or
        outage is watched through: the stream is opened again after the
        last event received, so none is missed while koo keeps it (about
        10,000 per queue). A reader too slow for koo is `KooError`
        RESOURCE_EXHAUSTED; a `resume_token` koo no longer keeps,
        OUT_OF_RANGE."""
        cats = [pb.TaskCategory.ValueType(c.value) for c in categories]
        last = resume_token

        def open_call() -> Any:
            req = pb.WatchTasksRequest(categories=cats, name=name or "", resume_token=last)
            return self._stub().WatchTasks(req, metadata=self._conn.metadata())

        async with contextlib.aclosing(reopening(open_call)) as events:
            async for e in events:
                event = TaskEvent.from_proto(e)
                last = event.resume_token or last
                yield event

    async def requeue_dead_letters(self, task_ids: Iterable[str] = (), *, every: bool = False) -> list[str]:
        """Runs dead letters (FAILED or TIMED_OUT) again, as `retry` does:
        the ones named, or with `every=True` all of them (up to 1000 per
        queue per call); the ids requeued."""
        req = pb.RequeueDeadLettersRequest(task_ids=strings("task_ids", task_ids), all=every)
        r = await rpc(self._stub().RequeueDeadLetters(req, metadata=self._conn.metadata()))
        return list(r.task_ids)

    async def submit_health_check(self) -> str:
        """Submits koo's built-in health check (Redis latency, queue depths
        and ages: the seed's `/tasks/health-check`); its task id."""
        r = await rpc(self._stub().SubmitHealthCheck(pb.SubmitHealthCheckRequest(), metadata=self._conn.metadata()))
        return r.task.id

    async def submit_ai_query(
        self,
        provider: str,
        prompt: str,
        options: Mapping[str, Any] | None = None,
        max_retries: int | None = None,
    ) -> str:
        """Submits the seed's `koo.tasks.ai_service.process_query` (AI_SERVICE,
        HIGH: the seed's `/tasks/ai/query`); its task id. It waits in queue
        `ai_service` for a worker that serves that name."""
        req = pb.SubmitAiQueryRequest(provider=provider, prompt=prompt)
        if options:
            req.options.CopyFrom(to_struct(options))
        if max_retries is not None:
            req.max_retries = max_retries
        r = await rpc(self._stub().SubmitAiQuery(req, metadata=self._conn.metadata()))
        return r.task.id

    async def cleanup_old_tasks(self, hours_old: float = 24, include_dead_letters: bool = False) -> int:
        """Removes tasks that ended more than `hours_old` hours ago; returns how many."""
        req = pb.CleanupTasksRequest(
            older_than=to_duration(timedelta(hours=hours_old)), include_dead_letters=include_dead_letters
        )
        r = await rpc(self._stub().CleanupTasks(req, metadata=self._conn.metadata()))
        return r.removed_tasks + r.removed_dead_letters

    async def submit_ai_task(self, task_name: str, *args: Any, **kwargs: Any) -> str:
        """The seed's helper: an AI_SERVICE task at HIGH priority."""
        return await self.submit_task(task_name, TaskCategory.AI_SERVICE, args, kwargs, TaskPriority.HIGH)

    async def submit_pdf_processing_task(self, task_name: str, *args: Any, **kwargs: Any) -> str:
        """The seed's helper: a PDF_PROCESSING task at NORMAL priority."""
        return await self.submit_task(task_name, TaskCategory.PDF_PROCESSING, args, kwargs, TaskPriority.NORMAL)


class SyncTaskManager:
    """Blocking twins of every `TaskManager` call (not from a coroutine),
    except `watch` (a stream: iterate it in a coroutine, or poll
    `get_task_status`)."""

    def __init__(self, manager: TaskManager | None = None) -> None:
        self._m = manager if manager is not None else TaskManager()

    submit = blocking(TaskManager.submit)
    submit_task = blocking(TaskManager.submit_task)
    submit_many = blocking(TaskManager.submit_many)
    submit_ai_task = blocking(TaskManager.submit_ai_task)
    submit_pdf_processing_task = blocking(TaskManager.submit_pdf_processing_task)
    get_task_status = blocking(TaskManager.get_task_status)
    result = blocking(TaskManager.result)
    cancel = blocking(TaskManager.cancel)
    cancel_task = blocking(TaskManager.cancel_task)
    retry = blocking(TaskManager.retry)
    retry_task = blocking(TaskManager.retry_task)
    get_active_tasks = blocking(TaskManager.get_active_tasks)
    get_task_history = blocking(TaskManager.get_task_history)
    get_task_metrics = blocking(TaskManager.get_task_metrics)
    cleanup_old_tasks = blocking(TaskManager.cleanup_old_tasks)
    requeue_dead_letters = blocking(TaskManager.requeue_dead_letters)
    submit_health_check = blocking(TaskManager.submit_health_check)
    submit_ai_query = blocking(TaskManager.submit_ai_query)
    list_queues = blocking(TaskManager.list_queues)
    pause_queue = blocking(TaskManager.pause_queue)
    resume_queue = blocking(TaskManager.resume_queue)
    set_rate_limit = blocking(TaskManager.set_rate_limit)
    get_rate_limit = blocking(TaskManager.get_rate_limit)
    list_rate_limits = blocking(TaskManager.list_rate_limits)
    delete_rate_limit = blocking(TaskManager.delete_rate_limit)
    set_concurrency_limit = blocking(TaskManager.set_concurrency_limit)
    get_concurrency_limit = blocking(TaskManager.get_concurrency_limit)
    list_concurrency_limits = blocking(TaskManager.list_concurrency_limits)
    delete_concurrency_limit = blocking(TaskManager.delete_concurrency_limit)
