"""A worker module for the process tests: `python -m koo.worker tests.worker_app:worker`.

Its task name is `sdk.$KOO_TEST_NS.slow`; the handler writes
`$KOO_TEST_DIR/started-<task id>` when it starts, then returns once
`$KOO_TEST_DIR/release` exists (polling), so a test can kill or stop the
process while the task runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from koo import TaskContext, Worker

worker = Worker(concurrency=2, name="sdk-test-proc", grace=float(os.environ.get("KOO_TEST_GRACE", "10")))
_dir = Path(os.environ.get("KOO_TEST_DIR", "."))


@worker.task(f"sdk.{os.environ.get('KOO_TEST_NS', 'x')}.slow")
def slow(n: int, *, ctx: TaskContext) -> dict[str, object]:
    # it speaks about the task: a stream closed now would count it lost
    ctx.progress(1, "started")
    (_dir / f"started-{ctx.task_id}").write_text(str(os.getpid()))
    while not (_dir / "release").exists():
        time.sleep(0.02)
    return {"n": n, "pid": os.getpid()}


@worker.task(f"sdk.{os.environ.get('KOO_TEST_NS', 'x')}.silent")
def silent(n: int, *, ctx: TaskContext) -> dict[str, object]:
    # says nothing about the task: only the worker's `started` tells koo,
    # within koo._session.STARTED_WINDOW of the start (its first work here
    # takes longer than that, so a kill after the marker comes after it)
    time.sleep(0.05)
    (_dir / f"started-{ctx.task_id}").write_text(str(os.getpid()))
    while not (_dir / "release").exists():
        time.sleep(0.02)
    return {"n": n, "pid": os.getpid()}


@worker.task(f"sdk.{os.environ.get('KOO_TEST_NS', 'x')}.noted")
def noted(*, ctx: TaskContext) -> dict[str, object]:
    # one line per run that started, with its attempt's fencing token
    with open(_dir / "runs", "a") as f:
        f.write(f"{ctx.task_id} {ctx.lease_token}\n")
    return {"pid": os.getpid()}
