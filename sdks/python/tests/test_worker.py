"""Workers against a real koo: `Worker`, `@worker.task`, `python -m koo.worker`.

In-process workers run on a thread of their own (`running`); the SIGKILL and
SIGTERM tests run `python -m koo.worker tests.worker_app:worker` processes.
Every wait is on an event or a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from koo import Fatal, Retry, SyncTaskManager, TaskCategory, TaskContext, TaskFailed, TaskManager, TaskState, Worker
from koo.tasks.v1 import task_service_pb2 as tasks_pb
from koo.tasks.v1 import task_service_pb2_grpc as tasks_grpc

SDK_DIR = Path(__file__).resolve().parents[1]


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """Runs the worker on a thread until the block ends."""
    errors: list[BaseException] = []

    def main() -> None:
        try:
            worker.run(handle_signals=False)
        except BaseException as e:  # noqa: BLE001 (surfaced below)
            errors.append(e)

    t = threading.Thread(target=main, daemon=True)
    t.start()
    assert worker.connected.wait(10) or errors, "the worker did not connect"
    assert not errors, errors
    try:
        yield worker
    finally:
        worker.stop()
        t.join(15)
        assert not t.is_alive(), "the worker did not stop"


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Polls `cond` until true or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_async_and_sync_handlers_return_results(target: str, ns: str) -> None:
    """Both kinds of handler get args, kwargs and a context; results read back."""
    w = Worker(target, concurrency=4)
    seen: dict[str, Any] = {}

    @w.task(f"sdk.{ns}.add")
    async def add(a: int, b: int, *, scale: int = 1, ctx: TaskContext) -> dict[str, Any]:
        seen["attempt"] = ctx.attempt
        seen["task_id"] = ctx.task_id
        return {"sum": (a + b) * scale}

    @w.task(f"sdk.{ns}.upper")
    def upper(text: str) -> str:
        seen["thread"] = threading.current_thread().name
        return text.upper()

    async def scenario() -> None:
        tm = TaskManager(target)
        t1 = await tm.submit_task(f"sdk.{ns}.add", TaskCategory.RESEARCH, args=(2, 3), kwargs={"scale": 10})
        t2 = await tm.submit_task(f"sdk.{ns}.upper", TaskCategory.RESEARCH, args=("koo",))
        assert await tm.result(t1, timeout=15) == {"sum": 50}
        assert await tm.result(t2, timeout=15) == "KOO"
        assert seen["attempt"] == 1 and seen["task_id"] == t1
        assert seen["thread"] == "koo-task"
        # history keeps when the attempt started and how long it ran
        (h,) = await tm.get_task_history(TaskState.SUCCEEDED, name=f"sdk.{ns}.add")
        assert h.id == t1 and h.start_time and h.end_time and h.run_time is not None
        assert h.start_time + h.run_time == h.end_time

    with running(w):
        asyncio.run(scenario())


def test_progress_reaches_watch(target: str, ns: str) -> None:
    """`ctx.progress` shows in `watch` while the handler still runs."""
    w = Worker(target)
    release = threading.Event()

    @w.task(f"sdk.{ns}.prog")
    def prog(*, ctx: TaskContext) -> str:
        ctx.progress(42, "halfway", {"step": 2})
        release.wait(15)
        return "ok"

    async def scenario() -> None:
        tm = TaskManager(target)
        tid = await tm.submit_task(f"sdk.{ns}.prog", TaskCategory.RESEARCH)
        async for info in tm.watch(tid):
            if info.progress.percent == 42:
                assert info.state is TaskState.RUNNING
                assert info.progress.message == "halfway"
                assert info.progress.metadata == {"step": 2}
                release.set()
                break
        assert await tm.result(tid, timeout=15) == "ok"

    with running(w):
        try:
            asyncio.run(asyncio.wait_for(scenario(), 20))
        finally:
            release.set()


def test_progress_reported_just_before_returning_is_kept(target: str, ns: str) -> None:
    """The last progress a handler reports before it returns (async, and in
    a thread) is what the ended task shows: it reaches koo before the
    outcome, not after (when koo, the task ended, would refuse it)."""
    w = Worker(target)

    @w.task(f"sdk.{ns}.quick_async")
    async def quick_async(*, ctx: TaskContext) -> str:
        ctx.progress(50, "half", {"at": 1})
        return "ok"

    @w.task(f"sdk.{ns}.quick_sync")
    def quick_sync(*, ctx: TaskContext) -> str:
        ctx.progress(60, "more")
        return "ok"

    async def scenario() -> None:
        tm = TaskManager(target)
        for name, (percent, message) in (("quick_async", (50, "half")), ("quick_sync", (60, "more"))):
            tid = await tm.submit_task(f"sdk.{ns}.{name}", TaskCategory.RESEARCH)
            assert await tm.result(tid, timeout=15) == "ok"
            info = await tm.get_task_status(tid)
            assert (info.progress.percent, info.progress.message) == (percent, message), (name, info.progress)

    with running(w):
        asyncio.run(asyncio.wait_for(scenario(), 30))


def test_retry_then_success_and_fatal_fails(target: str, ns: str) -> None:
    """`Retry` fails the attempt retryably; `Fatal` (with details) ends FAILED at once."""
    w = Worker(target)
    attempts: list[int] = []

    @w.task(f"sdk.{ns}.flaky")
    async def flaky(*, ctx: TaskContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry("not yet")
        return "second time"

    @w.task(f"sdk.{ns}.doomed")
    def doomed() -> None:
        raise Fatal("bad input", details={"field": "x"})

    def parse(text: str) -> None:
        # a lone surrogate (a file name read as bytes) and control
        # characters (six bytes each as JSON) in the message
        raise ValueError(text.replace("SURROGATE", "\udcff").replace("CONTROL", "\x01" * 5000))

    @w.task(f"sdk.{ns}.broken")
    def broken(text: str) -> None:
        parse(text)

    async def scenario() -> None:
        tm = TaskManager(target)
        t1 = await tm.submit_task(f"sdk.{ns}.flaky", TaskCategory.RESEARCH, max_retries=3)
        t2 = await tm.submit_task(f"sdk.{ns}.doomed", TaskCategory.RESEARCH, max_retries=3)
        assert await tm.result(t1, timeout=20) == "second time"
        assert attempts == [1, 2]
        # the attempt log: the retried attempt, then the one that succeeded
        log = (await tm.get_task_status(t1)).attempt_log
        assert [(a.attempt, a.outcome) for a in log] == [(1, "failed"), (2, "succeeded")], log
        assert log[0].error == "not yet" and log[0].retry_time is not None
        with pytest.raises(TaskFailed) as e:
            await tm.result(t2, timeout=15)
        assert e.value.task.state is TaskState.FAILED
        assert e.value.task.attempts == 1
        assert "bad input" in (e.value.task.error or "")
        # a handler's details reach the caller
        assert e.value.task.error_details == {"field": "x"}
        assert e.value.task.to_dict()["attempt_log"][0]["outcome"] == "failed"
        t3 = await tm.submit_task(f"sdk.{ns}.doomed", TaskCategory.RESEARCH, args=(1,), max_retries=3)
        with pytest.raises(TaskFailed) as e:
            await tm.result(t3, timeout=15)
        assert e.value.task.attempts == 1 and "do not fit" in (e.value.task.error or "")
        # an exception's traceback is kept with the error (Celery's .traceback);
        # a huge exception message is cut in it (as in the error)
        short = await tm.submit_task(f"sdk.{ns}.broken", TaskCategory.RESEARCH, args=("nope",), max_retries=0)
        long = await tm.submit_task(f"sdk.{ns}.broken", TaskCategory.RESEARCH, args=("y" * 40_000,), max_retries=0)
        for tid in (short, long):
            with pytest.raises(TaskFailed) as e:
                await tm.result(tid, timeout=15)
            tb = e.value.task.traceback or ""
            assert e.value.task.error_details["exception"] == "ValueError"
            assert tb.startswith("Traceback") and "in parse" in tb, tb[:300]
            # the message line cut to 4,096 bytes: 40,013 with "ValueError: " and "\n"
            last = "ValueError: nope" if tid == short else "yyyy [35917 bytes cut]"
            assert tb.rstrip().endswith(last), tb[-300:]
        assert (await tm.get_task_status(t1)).traceback is None
        for odd, said in (("SURROGATE", "\\udcff"), ("CONTROL", "\x01\x01")):
            tid = await tm.submit_task(f"sdk.{ns}.broken", TaskCategory.RESEARCH, args=(odd,), max_retries=0)
            with pytest.raises(TaskFailed) as e:
                await tm.result(tid, timeout=15)
            # the report reached koo with its details (not a fallback without them)
            assert e.value.task.error_details["exception"] == "ValueError", e.value.task.error
            assert said in (e.value.task.traceback or ""), odd

    with running(w):
        asyncio.run(scenario())


def test_results_koo_cannot_take_fail_the_task_not_the_worker(target: str, ns: str) -> None:
    """A result nested deeper than koo accepts, larger than its message limit,
    or not JSON at all, fails its task for good; the worker stays connected
    (a message past the limit would end its stream) and runs the next task."""
    w = Worker(target)

    @w.task(f"sdk.{ns}.deep")
    async def deep(levels: int) -> Any:
        v: Any = "bottom"
        for _ in range(levels):
            v = [v]
        return v

    @w.task(f"sdk.{ns}.huge")
    def huge() -> str:
        return "x" * 5_000_000

    @w.task(f"sdk.{ns}.opaque")
    def opaque() -> object:
        return object()

    async def scenario() -> None:
        tm = TaskManager(target)
        too_deep = await tm.submit_task(f"sdk.{ns}.deep", TaskCategory.RESEARCH, args=[40], max_retries=3)
        with pytest.raises(TaskFailed) as e:
            await tm.result(too_deep, timeout=15)
        assert e.value.task.attempts == 1 and "nests deeper than 32" in (e.value.task.error or "")
        too_big = await tm.submit_task(f"sdk.{ns}.huge", TaskCategory.RESEARCH, max_retries=3)
        with pytest.raises(TaskFailed) as e:
            await tm.result(too_big, timeout=15)
        assert e.value.task.attempts == 1 and "result too large" in (e.value.task.error or "")
        not_json = await tm.submit_task(f"sdk.{ns}.opaque", TaskCategory.RESEARCH, max_retries=3)
        with pytest.raises(TaskFailed) as e:
            await tm.result(not_json, timeout=15)
        assert "result is not JSON" in (e.value.task.error or "")
        ok = await tm.submit_task(f"sdk.{ns}.deep", TaskCategory.RESEARCH, args=[31])
        assert await tm.result(ok, timeout=15) is not None

    with running(w):
        asyncio.run(scenario())
        assert w.connected.is_set()


def test_retry_countdown_replaces_the_backoff(target: str, ns: str) -> None:
    """`Retry(countdown=0.2)` runs attempt 2 after its countdown; a countdown of an hour leaves the
    task SCHEDULED with its next attempt due about an hour out (read, not waited for); a countdown
    outside 0 to 24 h is refused where it is raised."""
    w = Worker(target)
    attempts: list[int] = []
    began: list[float] = []

    @w.task(f"sdk.{ns}.soon")
    async def soon(*, ctx: TaskContext) -> str:
        attempts.append(ctx.attempt)
        began.append(time.monotonic())
        if ctx.attempt == 1:
            raise Retry("busy", countdown=0.2)
        return "second time"

    @w.task(f"sdk.{ns}.later")
    def later() -> None:
        raise Retry("rate limited", details={"retry_after": 3600}, countdown=3600)

    async def scenario() -> None:
        tm = TaskManager(target)
        t1 = await tm.submit_task(f"sdk.{ns}.soon", TaskCategory.RESEARCH, max_retries=3)
        assert await tm.result(t1, timeout=15) == "second time"
        assert attempts == [1, 2]
        assert began[1] - began[0] >= 0.2, "attempt 2 came before its countdown"
        t2 = await tm.submit_task(f"sdk.{ns}.later", TaskCategory.RESEARCH, max_retries=3)
        async for info in tm.watch(t2):
            if info.state is TaskState.SCHEDULED:
                break
        raised = time.time()
        async with grpc.aio.insecure_channel(target) as ch:
            raw = await tasks_grpc.TaskServiceStub(ch).GetTask(tasks_pb.GetTaskRequest(task_id=t2))
        assert raw.task.state == tasks_pb.TASK_STATE_SCHEDULED
        assert raw.task.attempts == 1 and "rate limited" in raw.task.error.message
        due = raw.task.attempt_log[-1].retry_time.ToMilliseconds() / 1000
        assert raised + 3600 - 60 < due <= raised + 3600, (due, raised)

    with running(w):
        asyncio.run(scenario())
    for bad in (-1, 24 * 3600 + 1, float("nan")):
        with pytest.raises(ValueError, match="countdown"):
            Retry("busy", countdown=bad)


def test_cancel_reaches_running_sync_and_async_handlers(target: str, ns: str) -> None:
    """A cancel sets the context's event in a thread and in a coroutine; both end CANCELLED."""
    w = Worker(target)
    started = {"sync": threading.Event(), "async": threading.Event()}
    stopped: dict[str, str] = {}

    @w.task(f"sdk.{ns}.sync")
    def sync_h(*, ctx: TaskContext) -> str:
        started["sync"].set()
        if ctx.cancelled.wait(15):
            stopped["sync"] = ctx.cancel_reason
        return "finished anyway"

    @w.task(f"sdk.{ns}.async")
    async def async_h(*, ctx: TaskContext) -> str:
        started["async"].set()
        await asyncio.wait_for(ctx.wait_cancelled(), 15)
        stopped["async"] = ctx.cancel_reason
        return "finished anyway"

    async def scenario() -> None:
        tm = TaskManager(target)
        for kind in ("sync", "async"):
            tid = await tm.submit_task(f"sdk.{ns}.{kind}", TaskCategory.RESEARCH)
            assert await asyncio.to_thread(started[kind].wait, 10)
            await tm.cancel(tid, reason="user gave up")
            with pytest.raises(TaskFailed) as e:
                await tm.result(tid, timeout=15)
            assert e.value.task.state is TaskState.CANCELLED
            assert stopped[kind] == "user gave up"  # the caller's reason

    with running(w):
        asyncio.run(scenario())


def test_sync_handler_past_hard_limit_is_abandoned(target: str, ns: str) -> None:
    """A blocked thread past `time_limit`: TIMED_OUT, and its slot serves the next task."""
    w = Worker(target, concurrency=1)
    block = threading.Event()
    started = threading.Event()

    @w.task(f"sdk.{ns}.stuck")
    def stuck() -> str:
        started.set()
        block.wait(30)  # ignores every signal
        return "too late"

    @w.task(f"sdk.{ns}.next")
    def next_h() -> str:
        return "next"

    async def scenario() -> None:
        tm = TaskManager(target)
        tid = await tm.submit_task(
            f"sdk.{ns}.stuck", TaskCategory.RESEARCH, soft_time_limit=0.5, time_limit=1, max_retries=0
        )
        with pytest.raises(TaskFailed) as e:
            await tm.result(tid, timeout=15)
        assert e.value.task.state is TaskState.TIMED_OUT
        assert started.is_set()
        t2 = await tm.submit_task(f"sdk.{ns}.next", TaskCategory.RESEARCH)
        assert await tm.result(t2, timeout=15) == "next"

    try:
        with running(w):
            asyncio.run(scenario())
    finally:
        block.set()


def spawn(target: str, ns: str, tmp: Path, grace: float = 10, args: Sequence[str] = ()) -> subprocess.Popen[str]:
    """`python -m koo.worker tests.worker_app:worker [args]` against `target`."""
    env = dict(os.environ, KOO_TARGET=target, KOO_TEST_NS=ns, KOO_TEST_DIR=str(tmp), KOO_TEST_GRACE=str(grace))
    proc = subprocess.Popen(
        [sys.executable, "-m", "koo.worker", "tests.worker_app:worker", *args],
        cwd=SDK_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    OUTPUT[proc.pid] = lines

    def pump() -> None:
        assert proc.stdout is not None
        while line := proc.stdout.readline():
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc


OUTPUT: dict[int, list[str]] = {}
"""What each spawned worker process wrote (its log), by pid."""


def started_files(tmp: Path) -> list[Path]:
    """The marker files handlers wrote when they started."""
    return sorted(tmp.glob("started-*"))


def runs_elsewhere(tm: SyncTaskManager, tid: str, target: str, ns: str, tmp: Path) -> subprocess.Popen[str]:
    """The task a stopped worker handed back: queued with its attempt given
    back, then run by a new worker process (returned, to reap)."""
    back = tm.get_task_status(tid)
    assert (back.state, back.attempts) == (TaskState.QUEUED, 0), back
    (tmp / "release").write_text("")
    other = spawn(target, ns, tmp)
    assert tm.result(tid, timeout=20)["pid"] == other.pid
    return other


def reap(*procs: subprocess.Popen[str] | None) -> None:
    """Kills the worker processes a test started that still run."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)


def test_sigkill_mid_task_loses_nothing(target: str, ns: str, tmp_path: Path) -> None:
    """A worker process killed mid-task: the task finishes on another worker process."""
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.slow", TaskCategory.RESEARCH, args=(7,), max_retries=3)
    first = spawn(target, ns, tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: (tmp_path / f"started-{tid}").exists(), 15, "the first worker to start the task")
        first.kill()
        first.wait(10)
        (tmp_path / "release").write_text("")
        second = spawn(target, ns, tmp_path)
        result = tm.result(tid, timeout=20)
        assert result["n"] == 7 and result["pid"] == second.pid
        info = tm.get_task_status(tid)
        assert info.state is TaskState.SUCCEEDED
    finally:
        reap(first, second)


def test_a_blocked_event_loop_is_diagnosed(target: str, ns: str, caplog: pytest.LogCaptureFixture) -> None:
    """An async handler running blocking code stops the worker's event loop
    (heartbeats wait, and past the lease the task runs elsewhere): the
    worker says so, naming the task, and again when the loop runs again."""
    import logging

    worker = Worker(target, concurrency=2, name="blocker", blocked_after=0.3)

    @worker.task(f"sdk.{ns}.blocks")
    async def blocks() -> str:
        time.sleep(1.2)  # noqa: ASYNC251 (blocking code in an async handler is what is diagnosed)
        return "done"

    tm = TaskManager(target).sync
    with caplog.at_level(logging.WARNING, logger="koo.worker"), running(worker):
        tid = tm.submit_task(f"sdk.{ns}.blocks", TaskCategory.RESEARCH)
        assert tm.result(tid, timeout=20) == "done"
        wait_for(lambda: any("ran again" in r.getMessage() for r in caplog.records), 10, "the all-clear")
    said = [r.getMessage() for r in caplog.records]
    blocked = [m for m in said if "event loop has been blocked" in m]
    assert blocked and tid in blocked[0] and f"sdk.{ns}.blocks" in blocked[0], said
    with pytest.raises(ValueError, match="blocked_after"):
        Worker(target, blocked_after=0)


def test_sigkill_of_a_silent_task_counts_its_attempt(target: str, ns: str, tmp_path: Path) -> None:
    """A task that began and said nothing (no progress) on a worker killed
    at once: the worker told koo it began, so the attempt counts and a task
    with no retries ends FAILED after one run, not handed back to run again
    (a task that kills its worker would otherwise run five times)."""
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.silent", TaskCategory.RESEARCH, args=(1,), max_retries=0)
    first = spawn(target, ns, tmp_path)
    try:
        wait_for(lambda: (tmp_path / f"started-{tid}").exists(), 15, "the worker to start the task")
        first.kill()
        first.wait(10)
        wait_for(lambda: tm.get_task_status(tid).state is TaskState.FAILED, 15, "the task to end FAILED")
        info = tm.get_task_status(tid)
        assert info.attempts == 1, info
        assert "worker" in (info.error or ""), info
    finally:
        reap(first)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_resumed_worker_does_not_start_what_koo_took_back(store: str, ns: str, tmp_path: Path) -> None:
    """A stopped worker (SIGSTOP) is pushed a task; a lease of silence
    later koo revokes it and queues it again. Resumed, the worker reads the
    push before the revoke: it holds the late push back, so the task runs
    once, when koo pushes it again, not twice (the second run's outcome
    refused). On Redis a task's start_time is Redis's clock, not koo's."""
    from tests.conftest import KooServer, RedisServer

    lease = 2.0
    redis = RedisServer() if store == "redis" else None
    env = {"KOO_TASK_LEASE": f"{lease:g}s", "KOO_TASK_SWEEP_INTERVAL": "100ms"}
    if redis is not None:
        env["REDIS_URL"] = redis.url
    server = KooServer(env)
    proc: subprocess.Popen[str] | None = None
    try:
        tm = TaskManager(server.target).sync
        proc = spawn(server.target, ns, tmp_path)
        wait_for(lambda: any("connected to koo" in line for line in OUTPUT[proc.pid]), 15, "the worker to connect")
        proc.send_signal(signal.SIGSTOP)
        tid = tm.submit_task(f"sdk.{ns}.noted", TaskCategory.RESEARCH, max_retries=3)
        # koo pushes it to the stopped worker (it has not missed a lease yet)
        wait_for(lambda: tm.get_task_status(tid).state is TaskState.RUNNING, 10, "koo to push the task")
        pushed = tm.get_task_status(tid).start_time
        assert pushed is not None
        # a lease of silence later, revoked and queued again
        wait_for(lambda: tm.get_task_status(tid).state is TaskState.QUEUED, 15, "koo to take the task back")
        # the push has waited unread past half a lease (what the worker sees)
        wait_for(lambda: time.time() > pushed.timestamp() + lease / 2, 5, "half a lease since the push")
        proc.send_signal(signal.SIGCONT)
        assert tm.result(tid, timeout=20)["pid"] == proc.pid
        runs = (tmp_path / "runs").read_text().splitlines()
        assert runs == [f"{tid} {tm.get_task_status(tid).attempts}"], runs
        assert any(f"task {tid} waited" in line for line in OUTPUT[proc.pid]), "".join(OUTPUT[proc.pid])
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        reap(proc)
        server.stop()
        if redis is not None:
            redis.stop()


def test_sigterm_finishes_within_the_grace(target: str, ns: str, tmp_path: Path) -> None:
    """SIGTERM: the running task finishes within the grace, a task submitted
    after the signal is not started here (koo, told the worker is stopping,
    pushes it nothing more; one pushed before koo read that is handed back),
    and the process exits 0."""
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.slow", TaskCategory.RESEARCH, args=(1,))
    proc = spawn(target, ns, tmp_path, grace=15)
    other: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: (tmp_path / f"started-{tid}").exists(), 15, "the worker to start the task")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("stopping:" in line for line in OUTPUT[proc.pid]), 10, "the worker to log its stop")
        late = tm.submit_task(f"sdk.{ns}.slow", TaskCategory.RESEARCH, args=(2,), max_retries=3)
        (tmp_path / "release").write_text("")
        assert proc.wait(15) == 0, "".join(OUTPUT[proc.pid])
        assert tm.result(tid, timeout=5)["pid"] == proc.pid
        assert not (tmp_path / f"started-{late}").exists()
        info = tm.get_task_status(late)
        assert (info.state, info.attempts) == (TaskState.QUEUED, 0), info
        other = spawn(target, ns, tmp_path)
        assert tm.result(late, timeout=15)["pid"] == other.pid
    finally:
        reap(proc, other)


def test_sigterm_hands_back_after_the_grace(target: str, ns: str, tmp_path: Path) -> None:
    """SIGTERM with a task that outlasts the grace: the process exits and the
    task runs elsewhere, its attempt given back (with no retry left, a
    restart must not fail it), although the handler had reported progress."""
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.slow", TaskCategory.RESEARCH, args=(2,), max_retries=0)
    proc = spawn(target, ns, tmp_path, grace=0.5)
    other: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: tm.get_task_status(tid).progress.percent == 1, 15, "the worker to start the task")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        other = runs_elsewhere(tm, tid, target, ns, tmp_path)
    finally:
        reap(proc, other)


def test_dependency_results_and_async_hard_limit(target: str, ns: str) -> None:
    """A dependent task reads its dependencies' results (async and in a thread);
    an async handler past its hard limit is cancelled and the task ends TIMED_OUT."""
    w = Worker(target)
    cancelled = threading.Event()

    @w.task(f"sdk.{ns}.first")
    def first(x: int) -> int:
        return x * 2

    @w.task(f"sdk.{ns}.then")
    async def then(*, ctx: TaskContext) -> Any:
        return await ctx.dependency_results()

    @w.task(f"sdk.{ns}.then_sync")
    def then_sync(*, ctx: TaskContext) -> Any:
        return ctx.dependency_results_sync()

    @w.task(f"sdk.{ns}.hang")
    async def hang() -> None:
        try:
            await asyncio.Event().wait()  # ignores ctx.cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        tm = TaskManager(target)
        a = await tm.submit_task(f"sdk.{ns}.first", TaskCategory.RESEARCH, args=(21,))
        b = await tm.submit_task(f"sdk.{ns}.then", TaskCategory.RESEARCH, depends_on=[a])
        c = await tm.submit_task(f"sdk.{ns}.then_sync", TaskCategory.RESEARCH, depends_on=[a])
        assert await tm.result(b, timeout=15) == {a: 42}
        assert await tm.result(c, timeout=15) == {a: 42}
        h = await tm.submit_task(
            f"sdk.{ns}.hang", TaskCategory.RESEARCH, soft_time_limit=0.5, time_limit=1, max_retries=0
        )
        with pytest.raises(TaskFailed) as e:
            await tm.result(h, timeout=15)
        assert e.value.task.state is TaskState.TIMED_OUT
        assert await asyncio.to_thread(cancelled.wait, 5)

    with running(w):
        asyncio.run(scenario())


def test_reconnects_when_koo_comes_back() -> None:
    """koo restarted on the same address: the worker reconnects (backoff) and runs new tasks."""
    from tests.conftest import KooServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    server = KooServer({"KOO_LISTEN": addr})
    w = Worker(addr)

    @w.task("sdk.reconnect.ping")
    def ping() -> str:
        return "pong"

    try:
        with running(w):
            first_id = w.worker_id
            server.stop()
            wait_for(lambda: not w.connected.is_set(), 10, "the worker to see koo gone")
            server = KooServer({"KOO_LISTEN": addr})
            assert w.connected.wait(15), "the worker did not reconnect"
            assert w.worker_id != first_id
            tm = TaskManager(addr).sync
            tid = tm.submit_task("sdk.reconnect.ping", TaskCategory.RESEARCH)
            assert tm.result(tid, timeout=15) == "pong"
    finally:
        server.stop()


def test_heartbeats_keep_a_long_task_leased() -> None:
    """With a 1 s lease, a task that runs 2.5 s (its workload, not a wait for
    anything) keeps its lease through the SDK's heartbeats: one attempt."""
    from tests.conftest import KooServer

    server = KooServer({"KOO_TASK_LEASE": "1s", "KOO_TASK_SWEEP_INTERVAL": "100ms"})
    w = Worker(server.target)

    @w.task("sdk.heartbeat.long")
    def long(*, ctx: TaskContext) -> str:
        return "interrupted" if ctx.cancelled.wait(2.5) else "done"

    try:
        with running(w):
            tm = TaskManager(server.target).sync
            tid = tm.submit_task("sdk.heartbeat.long", TaskCategory.RESEARCH, max_retries=2)
            assert tm.result(tid, timeout=15) == "done"
            assert tm.get_task_status(tid).attempts == 1
    finally:
        server.stop()


def test_worker_token_is_sent_and_a_wrong_one_is_rejected() -> None:
    """With `KOO_WORKER_TOKEN`, `token=` gets the worker in; no token raises `WorkerRejected`."""
    from koo import WorkerRejected
    from tests.conftest import KooServer

    server = KooServer({"KOO_WORKER_TOKEN": "sdk-secret"})
    try:
        bad = Worker(server.target)
        bad.task("sdk.auth.x")(lambda: None)
        with pytest.raises(WorkerRejected, match="UNAUTHENTICATED"):
            bad.run(handle_signals=False)
        good = Worker(server.target, token="sdk-secret")
        good.task("sdk.auth.x")(lambda: None)
        with running(good):
            assert good.worker_id
    finally:
        server.stop()


def test_the_command_line_refuses_a_bad_concurrency_or_grace() -> None:
    """`--concurrency 0` was ignored and `-3` reached koo; both are usage
    errors now (argparse's exit 2), as is a negative grace."""
    bad = (["--concurrency", "0"], ["--concurrency", "-3"], ["--concurrency", "5000"], ["--grace", "-1"], ["-Q", " , "])
    for args in bad:
        out = subprocess.run(
            [sys.executable, "-m", "koo.worker", "tests.worker_app:worker", *args],
            cwd=SDK_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert "must be" in out.stderr or "names no queue" in out.stderr, (args, out.stderr)
    # log levels as Celery users type them; a wrong one is a usage error too
    for level, code, said in (("info", 2, "must be"), ("loud", 2, "invalid choice")):
        out = subprocess.run(
            [sys.executable, "-m", "koo.worker", "tests.worker_app:worker", "--log-level", level, "--concurrency", "0"],
            cwd=SDK_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == code and said in out.stderr, (level, out.stderr)


def test_queues_on_the_command_line_choose_what_a_worker_serves(target: str, ns: str, tmp_path: Path) -> None:
    """`-Q sdk-extra` (Celery's -Q): the worker takes that queue's task and
    leaves the research queue's to others."""
    tm = TaskManager(target).sync
    elsewhere = tm.submit_task(f"sdk.{ns}.noted", TaskCategory.RESEARCH)
    here = tm.submit_task(f"sdk.{ns}.noted", TaskCategory.RESEARCH, queue="sdk-extra")
    proc = spawn(target, ns, tmp_path, args=["-Q", "sdk-extra"])
    try:
        assert tm.result(here, timeout=20)["pid"] == proc.pid
        assert tm.get_task_status(elsewhere).state is TaskState.QUEUED
    finally:
        reap(proc)
        tm.cancel(elsewhere)


def test_a_worker_says_where_it_connected(target: str, ns: str, tmp_path: Path) -> None:
    """At INFO, a worker process says the koo it reached, its id, what it
    serves and how many at once (Celery's banner, in one line)."""
    proc = spawn(target, ns, tmp_path)
    try:
        wait_for(lambda: any("connected to koo at" in line for line in OUTPUT[proc.pid]), 15, "the connected line")
        line = next(line for line in OUTPUT[proc.pid] if "connected to koo at" in line)
        assert target in line and f"sdk.{ns}.slow" in line and "2 at once" in line, line
    finally:
        reap(proc)


def test_a_second_signal_ends_the_grace(target: str, ns: str, tmp_path: Path) -> None:
    """Ctrl-C twice (Celery's cold shutdown): the worker does not wait out a
    long grace; the running task is handed back and runs elsewhere."""
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.slow", TaskCategory.RESEARCH, args=(3,), max_retries=0)
    proc = spawn(target, ns, tmp_path, grace=600)
    other: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: tm.get_task_status(tid).progress.percent == 1, 15, "the worker to start the task")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: any("stopping:" in line for line in OUTPUT[proc.pid]), 10, "the worker to log its stop")
        proc.send_signal(signal.SIGINT)
        # within the test's bound, far inside the 600 s grace
        assert proc.wait(15) == 0, "".join(OUTPUT[proc.pid])
        # the hand-back says why (the pipe's last lines may still be read)
        wait_for(lambda: any("a second signal ended the grace" in line for line in OUTPUT[proc.pid]), 10, "the reason")
        assert not any("grace of 600 s is over" in line for line in OUTPUT[proc.pid])
        other = runs_elsewhere(tm, tid, target, ns, tmp_path)
    finally:
        reap(proc, other)
