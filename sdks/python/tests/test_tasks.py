"""The tasks client against a real koo (embedded store, built-in workers only).

Tasks with a name no built-in worker serves stay QUEUED, which is what the
cancel, dependency and listing tests need; the built-in health check and
cache cleanup run to SUCCEEDED for `result` and `watch`.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from koo import (
    CacheLevel,
    KooCache,
    KooError,
    QueueInfo,
    Submission,
    SubmitManyError,
    TaskCategory,
    TaskFailed,
    TaskInfo,
    TaskManager,
    TaskPriority,
    TaskState,
    TaskTimeout,
)
from koo.cache.v1 import cache_service_pb2 as cache_pb
from koo.tasks.v1 import task_service_pb2 as pb


def test_submit_with_every_option_and_read_it_back(target: str, ns: str) -> None:
    """args, kwargs, priority, max_retries, queue and limits arrive as given."""

    async def scenario() -> None:
        tm = TaskManager(target)
        task_id = await tm.submit_task(
            f"sdk.{ns}.echo",
            TaskCategory.RESEARCH,
            args=("claude", 3, [1.5, None]),
            kwargs={"deep": True, "tags": ["a"]},
            priority=TaskPriority.CRITICAL,
            max_retries=0,
            queue="sdk-extra",
            soft_time_limit=30,
            time_limit=timedelta(minutes=1),
        )
        info = await tm.get_task_status(task_id)
        assert info.id == task_id
        assert info.name == f"sdk.{ns}.echo"
        assert info.state is TaskState.QUEUED and info.status == "queued"
        assert info.category is TaskCategory.RESEARCH
        assert info.queue == "sdk-extra"
        assert info.priority == TaskPriority.CRITICAL
        assert info.args == ["claude", 3, [1.5, None]]
        assert info.kwargs == {"deep": True, "tags": ["a"]}
        assert info.max_retries == 0
        assert info.create_time is not None and info.end_time is None
        assert (info.soft_time_limit, info.time_limit) == (timedelta(seconds=30), timedelta(minutes=1))
        assert (info.schedule, info.schedule_time, info.cache_result) == ("", None, None)
        d = info.to_dict()
        assert d["state"] == "queued" and d["category"] == "RESEARCH" and d["priority"] == "CRITICAL"
        assert d["kwargs"] == {"deep": True, "tags": ["a"]} and d["end_time"] is None
        assert (d["soft_time_limit"], d["time_limit"]) == (30.0, 60.0)
        assert json.loads(json.dumps(d)) == d
        await tm.cancel(task_id)

    asyncio.run(scenario())


def test_result_and_watch_of_a_built_in_task(target: str) -> None:
    """watch yields states up to SUCCEEDED; result returns the task's result."""

    async def scenario() -> None:
        tm = TaskManager(target)
        task_id = await tm.submit_task("koo.tasks.cache.cleanup", TaskCategory.CACHE)
        states = [info.state async for info in tm.watch(task_id)]
        assert states[-1] is TaskState.SUCCEEDED
        assert all(not s.is_final for s in states[:-1])
        other = await tm.submit_task("koo.tasks.health_check.run", TaskCategory.HEALTH_CHECK)
        result = await tm.result(other, timeout=30)
        assert isinstance(result, dict) and result
        assert (await tm.get_task_status(other)).result == result

    asyncio.run(scenario())


def test_result_times_out_and_fails(target: str, ns: str) -> None:
    """result gives up with TaskTimeout; a cancelled task raises TaskFailed."""

    async def scenario() -> None:
        tm = TaskManager(target)
        task_id = await tm.submit_task(f"sdk.{ns}.never", TaskCategory.RESEARCH)
        with pytest.raises(TaskTimeout):
            await tm.result(task_id, timeout=0.3)
        cancelled = await tm.cancel(task_id, reason="not today")
        assert cancelled.state is TaskState.CANCELLED
        with pytest.raises(TaskFailed) as err:
            await tm.result(task_id, timeout=5)
        assert err.value.task.state is TaskState.CANCELLED
        assert "not today" in (err.value.task.error or "")

    asyncio.run(scenario())


def test_cancel_and_retry(target: str, ns: str) -> None:
    """A cancelled task can be retried under its id; an ended one cannot be cancelled again."""

    async def scenario() -> None:
        tm = TaskManager(target)
        task_id = await tm.submit_task(f"sdk.{ns}.job", TaskCategory.DATABASE)
        assert await tm.cancel_task(task_id)
        with pytest.raises(KooError) as err:
            await tm.cancel(task_id)
        assert err.value.code.name == "FAILED_PRECONDITION"
        # the seed's name answers False for a task that already ended
        assert await tm.cancel_task(task_id) is False
        again = await tm.retry(task_id)
        assert again.id == task_id and again.state is TaskState.QUEUED
        await tm.cancel(task_id)
        assert await tm.retry_task(task_id) == task_id
        await tm.cancel(task_id)

    asyncio.run(scenario())


def test_countdown_eta_and_dependencies(target: str, ns: str) -> None:
    """countdown and eta schedule; depends_on waits PENDING and ends with its dependency."""

    async def scenario() -> None:
        tm = TaskManager(target)
        later = await tm.submit_task(f"sdk.{ns}.later", TaskCategory.RESEARCH, countdown=3600)
        eta = await tm.submit_task(
            f"sdk.{ns}.eta", TaskCategory.RESEARCH, eta=datetime.now(timezone.utc) + timedelta(hours=1)
        )
        assert (await tm.get_task_status(later)).state is TaskState.SCHEDULED
        assert (await tm.get_task_status(eta)).state is TaskState.SCHEDULED
        first = await tm.submit_task(f"sdk.{ns}.first", TaskCategory.RESEARCH)
        second = await tm.submit_task(f"sdk.{ns}.second", TaskCategory.RESEARCH, depends_on=[first])
        info = await tm.get_task_status(second)
        assert info.state is TaskState.PENDING and info.depends_on == [first]
        await tm.cancel(first)
        final = [i async for i in tm.watch(second)][-1]
        assert final.state is TaskState.CANCELLED
        for t in (later, eta):
            await tm.cancel(t)

    asyncio.run(scenario())


def test_expires_as_celery_takes_it(target: str, ns: str) -> None:
    """expires= takes seconds, a timedelta or a datetime; a task not started by
    then ends CANCELLED ("cancelled: expired"); a bad expiry is refused."""

    async def scenario() -> None:
        tm = TaskManager(target)
        before = datetime.now(timezone.utc)
        soon = await tm.submit_task(f"sdk.{ns}.stale", TaskCategory.RESEARCH, expires=0.3)
        later, _ = await tm.submit(f"sdk.{ns}.fresh", TaskCategory.RESEARCH, expires=timedelta(hours=1))
        at = before + timedelta(hours=2)
        fixed, _ = await tm.submit(f"sdk.{ns}.fixed", TaskCategory.RESEARCH, expires=at)
        assert later.expire_time is not None
        assert timedelta(minutes=59) < later.expire_time - before < timedelta(minutes=61)
        assert fixed.expire_time is not None and abs(fixed.expire_time - at) < timedelta(milliseconds=2)
        assert later.to_dict()["expire_time"] == later.expire_time.isoformat()
        final = [i async for i in tm.watch(soon)][-1]
        assert final.state is TaskState.CANCELLED and final.error == "cancelled: expired"
        assert final.attempts == 0 and final.start_time is None
        assert (await tm.get_task_status(later.id)).state is TaskState.QUEUED
        with pytest.raises(KooError) as err:
            await tm.submit_task(f"sdk.{ns}.late", TaskCategory.RESEARCH, countdown=60, expires=30)
        assert err.value.code.name == "INVALID_ARGUMENT" and "expire_after" in err.value.message
        with pytest.raises(KooError) as err:
            await tm.submit_task(f"sdk.{ns}.past", TaskCategory.RESEARCH, expires=before - timedelta(minutes=1))
        assert err.value.code.name == "INVALID_ARGUMENT" and "expire_time" in err.value.message
        for t in (later.id, fixed.id):
            await tm.cancel(t)

    asyncio.run(scenario())


def test_idempotency_key(target: str, ns: str) -> None:
    """The same key and content returns the first task; other content is refused."""

    async def scenario() -> None:
        tm = TaskManager(target)
        one = await tm.submit_task(f"sdk.{ns}.once", TaskCategory.RESEARCH, args=(1,), idempotency_key=ns)
        info, dedup = await tm.submit(f"sdk.{ns}.once", TaskCategory.RESEARCH, args=(1,), idempotency_key=ns)
        assert info.id == one and dedup
        with pytest.raises(KooError) as err:
            await tm.submit_task(f"sdk.{ns}.once", TaskCategory.RESEARCH, args=(2,), idempotency_key=ns)
        assert err.value.code.name == "ALREADY_EXISTS"
        await tm.cancel(one)

    asyncio.run(scenario())


def test_debounce_key(target: str, ns: str) -> None:
    """Submits with one debounce key make one task, run once with the last
    submit's arguments; a key without a window, or with an idempotency key,
    is refused."""

    async def scenario() -> None:
        tm = TaskManager(target)
        key, window = f"doc-{ns}", timedelta(milliseconds=300)
        answers = [
            await tm.submit(
                "koo.diagnostics.echo",
                TaskCategory.RESEARCH,
                kwargs={"result": i},
                debounce_key=key,
                debounce_window=window,
            )
            for i in range(3)
        ]
        assert len({info.id for info, _ in answers}) == 1
        assert [dedup for _, dedup in answers] == [False, True, True]
        first = answers[0][0]
        assert first.state is TaskState.SCHEDULED and first.debounce_key == key
        assert answers[-1][0].kwargs == {"result": 2}
        assert await tm.result(first.id, timeout=20) == 2
        done = await tm.get_task_status(first.id)
        assert done.attempts == 1
        # started, so the key makes a new task
        again = await tm.submit_task(
            "koo.diagnostics.echo", TaskCategory.RESEARCH, debounce_key=key, debounce_window=0.3
        )
        assert again != first.id
        for bad in ({"debounce_key": key}, {"debounce_key": key, "debounce_window": 1, "idempotency_key": ns}):
            with pytest.raises(KooError) as err:
                await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, **bad)
            assert err.value.code.name == "INVALID_ARGUMENT"
        await tm.cancel(again)

    asyncio.run(scenario())


def test_listing_metrics_and_cleanup(target: str, ns: str) -> None:
    """Active tasks and history filter by name; metrics list the queues."""

    async def scenario() -> None:
        tm = TaskManager(target)
        ids = [await tm.submit_task(f"sdk.{ns}.list", TaskCategory.RESEARCH, args=(i,)) for i in range(3)]
        active = await tm.get_active_tasks(TaskCategory.RESEARCH, name=f"sdk.{ns}.list")
        assert sorted(t.id for t in active) == sorted(ids)
        assert await tm.get_active_tasks(name=f"sdk.{ns}.list", limit=2) != []
        for t in ids:
            await tm.cancel(t)
        history = await tm.get_task_history(TaskState.CANCELLED, name=f"sdk.{ns}.list")
        assert sorted(h.id for h in history) == sorted(ids)
        assert all(h.state is TaskState.CANCELLED and h.end_time for h in history)
        # cancelled while queued: they never ran
        assert all(h.start_time is None and h.run_time is None for h in history)
        metrics = await tm.get_task_metrics()
        research = [q for q in metrics.queues if q.queue == "research"]
        assert research and research[0].submitted >= 3
        # run and wait-time percentiles cover the last hour (55 to 60 min)
        assert 55 * 60 <= metrics.times_window.ToTimedelta().total_seconds() <= 3600
        assert all(n.name for n in research[0].by_name)
        assert await tm.cleanup_old_tasks(hours_old=24) >= 0

    asyncio.run(scenario())


def test_seed_helpers_and_sync_facade(target: str, ns: str) -> None:
    """submit_ai_task is AI_SERVICE at HIGH; submit_pdf_processing_task is PDF_PROCESSING; sync twins work."""
    tm = TaskManager(target)
    sync = tm.sync
    ai = sync.get_task_status(
        asyncio.run(tm.submit_ai_task("koo.tasks.ai_service.process_query", "claude", "Explain brain anatomy"))
    )
    assert ai.category is TaskCategory.AI_SERVICE and ai.priority == TaskPriority.HIGH
    assert ai.args == ["claude", "Explain brain anatomy"] and ai.queue == "ai_service"
    pdf = sync.get_task_status(
        asyncio.run(tm.submit_pdf_processing_task(f"sdk.{ns}.pdf", "/path/to/document.pdf", "doc_123"))
    )
    assert pdf.category is TaskCategory.PDF_PROCESSING and pdf.priority == TaskPriority.NORMAL
    task_id = sync.submit_task("koo.tasks.health_check.run", TaskCategory.HEALTH_CHECK)
    assert isinstance(sync.result(task_id, timeout=30), dict)
    for t in (ai.id, pdf.id):
        assert sync.cancel(t).state is TaskState.CANCELLED
    assert sync.retry(ai.id).state is TaskState.QUEUED
    sync.cancel(ai.id)


def test_pause_list_and_resume_a_queue(target: str) -> None:
    """A paused queue is listed with who paused it and why, keeps a submitted task, and runs it once
    resumed; an unknown queue is INVALID_ARGUMENT."""

    async def scenario() -> None:
        tm = TaskManager(target)
        try:
            paused = await tm.pause_queue("research", reason="sdk test")
            assert isinstance(paused, QueueInfo)
            assert paused.paused and paused.pause_reason == "sdk test" and paused.paused_by == "anonymous"
            assert paused.category is TaskCategory.RESEARCH and paused.pause_time is not None
            task_id = await tm.submit_task("koo.diagnostics.noop", TaskCategory.RESEARCH)
            listed = {q.name: q for q in await tm.list_queues()}
            assert listed["research"].paused and listed["research"].queued >= 1
            assert not listed["cache"].paused and listed["cache"].paused_by is None
        finally:
            resumed = await tm.resume_queue("research")
        assert not resumed.paused
        assert await tm.result(task_id, timeout=20) is None
        with pytest.raises(KooError) as err:
            await tm.pause_queue("nope")
        assert err.value.code.name == "INVALID_ARGUMENT" and "queue" in str(err.value)

    asyncio.run(scenario())


def test_result_waits_through_a_koo_restart() -> None:
    """`result()` of a task that outlives its koo process: the watch ends with
    koo (or fails while it is down), and `result()` watches again once koo is
    back, rather than reporting the queued task as ended or raising. So do
    `watch()` (it ends only with the final state, never silently when koo
    goes away) and the cache's `watch_metrics()` (snapshots resume)."""
    import socket

    from .conftest import KooServer, RedisServer

    redis = RedisServer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    env = {"KOO_LISTEN": addr, "REDIS_URL": redis.url}
    # no built-in worker: the task waits, queued, until the second koo
    server = KooServer({**env, "KOO_WORKER_CONCURRENCY": "0"})

    async def scenario() -> None:
        nonlocal server
        tm = TaskManager(addr)
        tid = await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, kwargs={"result": "back"})
        waiting = asyncio.ensure_future(tm.result(tid, timeout=60))
        watched: list[TaskState] = []

        async def follow() -> None:
            async for info in tm.watch(tid):
                watched.append(info.state)

        watching = asyncio.ensure_future(follow())
        snapshots = 0
        snapshot = asyncio.Event()

        async def metrics() -> None:
            nonlocal snapshots
            cache = KooCache(addr)
            try:
                async for _ in cache.watch_metrics(0.2):
                    snapshots += 1
                    snapshot.set()
            finally:
                await cache.close()

        sampling = asyncio.ensure_future(metrics())
        await asyncio.wait_for(snapshot.wait(), 20)
        info = await tm.get_task_status(tid)
        assert info.state is TaskState.QUEUED
        await asyncio.to_thread(server.stop)
        server = await asyncio.to_thread(KooServer, env)
        assert await waiting == "back"
        await asyncio.wait_for(watching, 20)
        assert watched[0] is TaskState.QUEUED and watched[-1] is TaskState.SUCCEEDED, watched
        before = snapshots
        snapshot.clear()
        await asyncio.wait_for(snapshot.wait(), 20)
        assert snapshots > before and not sampling.done()
        sampling.cancel()
        # a timeout of 0 looks once: an ended task's result, not a timeout
        assert await tm.result(tid, timeout=0) == "back"

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
        redis.stop()


def test_integers_a_double_cannot_hold_are_refused_not_rounded(target: str, ns: str) -> None:
    """2**53 travels exactly; 2**53 + 1 (a snowflake id, say) would arrive as
    another number, so the submit refuses it, naming the way out."""

    async def scenario() -> None:
        tm = TaskManager(target)
        ok = await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, kwargs={"result": 2**53})
        assert await tm.result(ok, timeout=15) == 2**53
        for big in (2**53 + 1, -(2**53) - 1, 1234567890123456789):
            with pytest.raises(ValueError, match="pass it as a str"):
                await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, kwargs={"id": big})

    asyncio.run(scenario())


def test_submit_many_stores_in_order_and_says_what_a_failure_left(target: str, ns: str) -> None:
    """submit_many sends 100 tasks a call, in order; a task koo refuses
    stops it with the ids stored before it (whole calls only: koo checks a
    call's tasks before it stores any), counted across the calls; a task
    that cannot be built is refused before anything is sent."""
    name = f"sdk.{ns}.many"

    def many(n: int) -> list[Submission]:
        return [Submission(name, TaskCategory.RESEARCH, args=(i,), queue="sdk-extra", countdown=3600) for i in range(n)]

    async def scenario() -> None:
        tm = TaskManager(target)
        stored = await tm.submit_many(many(205))
        assert [t.args for t in stored] == [[i] for i in range(205)]
        assert {t.state for t in stored} == {TaskState.SCHEDULED} and len({t.id for t in stored}) == 205
        assert (await tm.get_task_status(stored[204].id)).args == [204]
        assert await tm.submit_many([]) == []

        bad = many(150)
        bad[130] = Submission(name, TaskCategory.RESEARCH, queue="no-such-queue")
        with pytest.raises(SubmitManyError) as e:
            await tm.submit_many(bad)
        assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith("tasks[130].queue")
        assert len(e.value.stored) == 100
        assert [(await tm.get_task_status(i)).args for i in e.value.stored[98:]] == [[98], [99]]

        with pytest.raises(TypeError, match=r"tasks\[1\]: .*a list"):
            await tm.submit_many([*many(1), Submission(name, TaskCategory.RESEARCH, args="abc")])
        with pytest.raises(TypeError, match=r"tasks\[0\]: a Submission, not dict"):
            await tm.submit_many([{"task_name": name}])  # type: ignore[list-item]

    asyncio.run(scenario())
    assert len(TaskManager(target).sync.submit_many(many(2))) == 2


def test_submit_many_reads_koos_refusals() -> None:
    """The parts of a SubmitTasks refusal submit_many reads: the ids koo
    stored (none listed: a failure with no list, whose outcome is unknown)
    and the failing task counted from the first of the whole call."""
    from koo._submission import renumbered, stored_in_refusal

    assert stored_in_refusal("tasks[3]: backend unavailable; tasks stored: a~1, b~2") == ["a~1", "b~2"]
    assert stored_in_refusal("tasks[0]: backend unavailable; tasks stored: none") == []
    assert stored_in_refusal("backend did not answer within the deadline") == []
    assert renumbered("tasks[30].queue: unknown", 100) == "tasks[130].queue: unknown"
    assert renumbered("tasks[2]: x", 0) == "tasks[2]: x"
    assert renumbered("deadline exceeded", 200) == "(the batch from tasks[200]) deadline exceeded"
    assert renumbered("deadline exceeded", 0) == "deadline exceeded"


def test_the_sync_twin_has_every_call(target: str, ns: str) -> None:
    """Every coroutine of TaskManager but the stream (`watch`) and `close` has
    a blocking twin with its parameters, and they work from plain code."""
    import inspect

    from koo._tasks import SyncTaskManager

    calls = {
        name
        for name, fn in inspect.getmembers(TaskManager, inspect.iscoroutinefunction)
        if not name.startswith("_") and name not in ("watch", "close")
    }
    missing = {name for name in calls if not hasattr(SyncTaskManager, name)}
    assert not missing, missing
    assert inspect.signature(SyncTaskManager.submit_task).parameters.keys() == (
        inspect.signature(TaskManager.submit_task).parameters.keys()
    )
    tm = TaskManager(target).sync
    tid = tm.submit_task(f"sdk.{ns}.job", TaskCategory.DATABASE, countdown=3600)
    assert any(t.id == tid for t in tm.get_active_tasks(category=TaskCategory.DATABASE))
    assert tm.cancel_task(tid) is True
    assert tm.cancel_task(tid) is False
    assert tm.get_task_metrics() is not None


def test_a_scheduled_compute_task_reads_its_schedule_and_cache_target() -> None:
    """TaskInfo carries what the Task message says of its schedule and cache target."""
    t = pb.Task(id="cache~01", name="reports.build", schedule="nightly", state=pb.TASK_STATE_QUEUED)
    t.schedule_time.FromSeconds(1_800_000_000)
    t.cache_result.level = cache_pb.CACHE_LEVEL_DB
    t.cache_result.key = "report:42"
    t.cache_result.ttl.FromSeconds(600)
    t.cache_result.tags.append("reports")
    info = TaskInfo.from_proto(t)
    assert info.schedule == "nightly"
    assert info.schedule_time is not None and info.schedule_time.timestamp() == 1_800_000_000
    assert info.cache_result == {
        "level": CacheLevel.DATABASE,
        "key": "report:42",
        "ttl": 600.0,
        "tags": ["reports"],
        "soft_ttl": None,
    }
    d = info.to_dict()
    assert d["cache_result"]["level"] == "db" and d["schedule"] == "nightly"
    assert json.loads(json.dumps(d)) == d
