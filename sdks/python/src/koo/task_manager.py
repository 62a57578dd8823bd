"""The seed's `core.task_manager`, served by koo.

Change `from core.task_manager import ...` to `from koo.task_manager import ...`
and the seed's calls run as written::

    task_id = await task_manager.submit_task(
        task_name="koo.tasks.ai_service.process_query",
        category=TaskCategory.AI_SERVICE,
        args=("claude", "What are the latest advances in neurosurgery?"),
        priority=TaskPriority.HIGH,
        max_retries=3,
    )
    task_info = await task_manager.get_task_status(task_id)

`task_manager` connects lazily to `koo.configure(...)`'s target, else
`KOO_TARGET`, else `127.0.0.1:50051`. The workers that run the tasks are
`koo.Worker` (`python -m koo.worker`): see the package README.
"""

from __future__ import annotations

from typing import Any

from koo._limits import ConcurrencyPolicy
from koo._submission import TaskCategory, TaskPriority
from koo._tasks import (
    SyncTaskManager,
    TaskAttempt,
    TaskFailed,
    TaskInfo,
    TaskManager,
    TaskProgress,
    TaskState,
    TaskSummary,
    TaskTimeout,
)

__all__ = [
    "ConcurrencyPolicy",
    "SyncTaskManager",
    "TaskAttempt",
    "TaskCategory",
    "TaskFailed",
    "TaskInfo",
    "TaskManager",
    "TaskPriority",
    "TaskProgress",
    "TaskState",
    "TaskSummary",
    "TaskTimeout",
    "submit_ai_task",
    "submit_pdf_processing_task",
    "task_manager",
]

task_manager = TaskManager()
"""The default tasks client (lazy; see the module doc)."""


async def submit_ai_task(task_name: str, *args: Any, **kwargs: Any) -> str:
    """Submits an AI_SERVICE task at HIGH priority; returns its id."""
    return await task_manager.submit_ai_task(task_name, *args, **kwargs)


async def submit_pdf_processing_task(task_name: str, *args: Any, **kwargs: Any) -> str:
    """Submits a PDF_PROCESSING task; returns its id."""
    return await task_manager.submit_pdf_processing_task(task_name, *args, **kwargs)
