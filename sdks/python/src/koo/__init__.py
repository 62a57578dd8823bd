"""koo's Python SDK: the cache and the task queue of a koo server.

Layout:

- `koo.redis_cache`: the seed's cache names (`redis_cache`, `CacheLevel`,
  `cached`, `cache_api_response`, `get_cached_api_response`).
- `koo.task_manager`: the seed's task names (`task_manager`, `TaskCategory`,
  `TaskPriority`, `submit_ai_task`, `submit_pdf_processing_task`).
- `koo.TaskDef`: a task name and its submit defaults, shared by the code
  that submits it (`.delay(...)`, `.apply_async(...)`) and the worker that
  runs it (`@worker.task(defn)`): Celery's `@app.task(...)` options.
- `koo.Worker`, `TaskContext`, `Retry`, `RateLimited`, `Fatal`: task workers
  (`@worker.task("name")`, `python -m koo.worker module:worker`);
  `WorkerEvent`: what a worker's `on_event` hook sees.
- `koo.ScheduleManager`, `ScheduledTask`: periodic schedules (Celery
  beat's entries), created and managed at run time.
- `koo.NearCache`: an in-process L1 in front of `KooCache`, kept fresh by
  koo's invalidation stream.
- `koo.configure(...)`: where the default clients connect.
- `koo.cache.v1`, `koo.tasks.v1`, `koo.worker.v1`, `koo.schedule.v1`: the
  generated gRPC stubs (from koo's `proto/`).
"""

from koo._cache import CacheHit, CacheLevel, KooCache, SyncKooCache
from koo._cached import cache_key, cached
from koo._compute import Computed, Locked
from koo._connection import DEFAULT_TARGET, KooError, Settings, configure
from koo._events import EventHook, WorkerEvent
from koo._limits import ConcurrencyLimitInfo, ConcurrencyPolicy, RateLimitInfo
from koo._near import NearCache, NearCacheStats
from koo._outcomes import Fatal, RateLimited, Retry, WorkerRejected
from koo._schedules import (
    MissedTickPolicy,
    ScheduledTask,
    ScheduleInfo,
    ScheduleManager,
    ScheduleRunInfo,
    SyncScheduleManager,
)
from koo._submission import Submission, SubmitManyError, TaskCategory, TaskPriority
from koo._taskdef import SyncTaskDef, TaskDef
from koo._tasks import (
    QueueInfo,
    SyncTaskManager,
    TaskAttempt,
    TaskEvent,
    TaskFailed,
    TaskInfo,
    TaskManager,
    TaskProgress,
    TaskState,
    TaskSummary,
    TaskTimeout,
)
from koo._worker import TaskContext, Worker

__all__ = [
    "DEFAULT_TARGET",
    "CacheHit",
    "CacheLevel",
    "Computed",
    "ConcurrencyLimitInfo",
    "ConcurrencyPolicy",
    "EventHook",
    "Fatal",
    "KooCache",
    "KooError",
    "Locked",
    "MissedTickPolicy",
    "NearCache",
    "NearCacheStats",
    "QueueInfo",
    "RateLimitInfo",
    "RateLimited",
    "Retry",
    "ScheduleInfo",
    "ScheduleManager",
    "ScheduleRunInfo",
    "ScheduledTask",
    "Settings",
    "Submission",
    "SubmitManyError",
    "SyncKooCache",
    "SyncScheduleManager",
    "SyncTaskDef",
    "SyncTaskManager",
    "TaskAttempt",
    "TaskCategory",
    "TaskContext",
    "TaskDef",
    "TaskEvent",
    "TaskFailed",
    "TaskInfo",
    "TaskManager",
    "TaskPriority",
    "TaskProgress",
    "TaskState",
    "TaskSummary",
    "TaskTimeout",
    "Worker",
    "WorkerEvent",
    "WorkerRejected",
    "cache_key",
    "cached",
    "configure",
]
