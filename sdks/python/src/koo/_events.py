"""Worker events: `WorkerEvent` and the hook that observes a `Worker`.

A hook (`Worker(on_event=fn)` or `@worker.on_event`) sees what the worker
does on the wire, like Celery's signals (`worker_ready`, `task_prerun`,
`task_success`/`task_failure`, `task_revoked`): to log, to count, to print
progress lines. It is called on the worker's event loop, so it must be quick
and must not block; one that raises is logged and the worker carries on (an
observer must never take tasks down with it).

The kinds, and their `fields`:

| kind | fields | when |
| --- | --- | --- |
| `welcome` | `worker_id`, `lease_seconds`, `heartbeat_seconds`, `reattached` | koo accepted the hello (`reattached`: tasks of a lost stream koo adopted, see `koo._carry`) |
| `task` | `name`, `attempt`, `held` | koo pushed a task (`held`: tasks held now) |
| `progress` | `percent`, `message` | a progress report was sent |
| `reported` | `outcome` (`complete` or `fail`), `message`, `retryable` (fail only) | an outcome was sent |
| `accepted` | `outcome`, `state` (e.g. `TASK_STATE_SUCCEEDED`), `held` | koo accepted an outcome |
| `refused` | `outcome` (`complete`, `fail` or `progress`), `code`, `message`, `held` | koo refused a report (`code` 10, ABORTED: the lease lapsed) |
| `cancel` | `reason` | koo asked to stop a task |
| `soft_time_limit` | | a task passed its soft time limit |
| `revoked` | `reason`, `held` | the task is no longer this worker's |
| `disconnected` | `error` | the stream ended; the worker reconnects |

`task_id` is empty for `welcome` and `disconnected`. Fields may be added,
never removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from koo.tasks.v1 import task_service_pb2 as tasks_pb
from koo.worker.v1 import worker_service_pb2 as wpb

log = logging.getLogger("koo.worker")

EventKind = Literal[
    "welcome",
    "task",
    "progress",
    "reported",
    "accepted",
    "refused",
    "cancel",
    "soft_time_limit",
    "revoked",
    "disconnected",
]

_OUTCOMES = {
    wpb.REPLY_KIND_COMPLETE: "complete",
    wpb.REPLY_KIND_FAIL: "fail",
    wpb.REPLY_KIND_PROGRESS: "progress",
    wpb.REPLY_KIND_RELEASE: "release",
}


@dataclass(frozen=True)
class WorkerEvent:
    """One thing a worker did: `kind`, the task it concerns (if any), and the
    kind's `fields` (see the table in this module's doc)."""

    kind: EventKind
    task_id: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)


EventHook = Callable[[WorkerEvent], None]


class EventHooks:
    """The hooks of one worker, and the calls that feed them."""

    def __init__(self, hook: EventHook | None = None) -> None:
        self.hooks: list[EventHook] = [hook] if hook is not None else []

    def add(self, hook: EventHook) -> None:
        self.hooks.append(hook)

    def emit(self, kind: EventKind, task_id: str = "", **fields: Any) -> None:
        """Calls every hook (on the worker's loop); a raising hook is logged."""
        if not self.hooks:
            return
        event = WorkerEvent(kind, task_id, fields)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                log.exception("worker event hook %r raised on %s", hook, kind)

    def reply(self, reply: wpb.Reply, held: int) -> None:
        """koo's answer to a report: `accepted` or `refused`."""
        if not self.hooks:
            return
        outcome = _OUTCOMES.get(reply.kind, "unknown")
        if reply.code == 0:
            if outcome != "progress":
                state = _state_name(reply.state)
                self.emit("accepted", reply.task_id, outcome=outcome, state=state, held=held)
        else:
            self.emit("refused", reply.task_id, outcome=outcome, code=reply.code, message=reply.message, held=held)


def _state_name(state: tasks_pb.TaskState.ValueType) -> str:
    try:
        return tasks_pb.TaskState.Name(state)
    except ValueError:  # a newer koo's state
        return str(state)
