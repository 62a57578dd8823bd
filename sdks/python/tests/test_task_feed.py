"""The TaskManager calls for the seed's other task endpoints and the
dashboard's feed: `watch_tasks` (with resuming), `requeue_dead_letters`,
`submit_health_check`, `submit_ai_query`, against a real koo."""

from __future__ import annotations

import asyncio

import pytest

from koo import Fatal, TaskCategory, TaskEvent, TaskFailed, TaskManager, TaskPriority, TaskState, Worker
from tests.test_worker import running


def test_watch_tasks_follows_every_task_and_resumes_after_an_event(cache_target: str) -> None:
    """A feed filtered by name sees a built-in task QUEUED, RUNNING and
    SUCCEEDED in order; opened again with the resume token of its first
    event, it replays the events after it (on each store: on Redis the
    events travel through a stream)."""
    target = cache_target

    async def scenario() -> None:
        tm = TaskManager(target)
        seen: list[TaskEvent] = []
        mine: set[str] = set()

        async def follow() -> str:
            """The first of our tasks seen from QUEUED to SUCCEEDED."""
            queued: set[str] = set()
            async for e in tm.watch_tasks([TaskCategory.HEALTH_CHECK], name="koo.tasks.health_check.run"):
                seen.append(e)
                if e.state is TaskState.QUEUED:
                    queued.add(e.task_id)
                if e.task_id in mine and e.task_id in queued and e.state is TaskState.SUCCEEDED:
                    return e.task_id
            raise AssertionError("the feed ended")

        async def submit_until_seen() -> str:
            # the feed starts at the stream's head once it is open, and
            # nothing says when that is: submit until one of ours is seen whole
            feed = asyncio.ensure_future(follow())
            while not feed.done():
                mine.add(await tm.submit_health_check())
                await asyncio.wait({feed}, timeout=0.5)
            return await feed

        task_id = await asyncio.wait_for(submit_until_seen(), 30)
        done = next(e for e in seen if e.task_id == task_id and e.state is TaskState.SUCCEEDED)
        states = [e.state for e in seen if e.task_id == done.task_id]
        assert states[0] is TaskState.QUEUED and states[-1] is TaskState.SUCCEEDED, states
        assert TaskState.RUNNING in states, states
        first = next(e for e in seen if e.task_id == done.task_id)
        assert (first.name, first.queue) == ("koo.tasks.health_check.run", "health_check")
        assert first.resume_token and first.event_time is not None
        replay: list[TaskState] = []

        async def resume() -> None:
            async for e in tm.watch_tasks(resume_token=first.resume_token):
                if e.task_id == done.task_id:
                    replay.append(e.state)
                    if e.state is TaskState.SUCCEEDED:
                        return

        await asyncio.wait_for(resume(), 15)
        assert replay == states[1:], (replay, states)

    asyncio.run(scenario())


def test_dead_letters_are_requeued_and_the_seed_endpoints_submit(target: str, ns: str) -> None:
    """A task that failed for good is requeued (it runs again, its attempt
    log kept); the AI query and health check submit the seed's tasks."""
    worker = Worker(target, name="requeue")

    @worker.task(f"sdk.{ns}.boom")
    def boom() -> None:
        raise Fatal("no")

    tm = TaskManager(target).sync
    with running(worker):
        tid = tm.submit_task(f"sdk.{ns}.boom", TaskCategory.RESEARCH, max_retries=0)
        with pytest.raises(TaskFailed):
            tm.result(tid, timeout=15)
        assert tm.requeue_dead_letters([tid]) == [tid]
        with pytest.raises(TaskFailed):
            tm.result(tid, timeout=15)
        again = tm.get_task_status(tid)
        assert again.state is TaskState.FAILED and len(again.attempt_log) == 2, again
    health = tm.submit_health_check()
    assert tm.get_task_status(health).category is TaskCategory.HEALTH_CHECK
    tm.result(health, timeout=15)
    ai = tm.submit_ai_query("openai", "hello", options={"temperature": 0.2}, max_retries=1)
    info = tm.get_task_status(ai)
    assert (info.name, info.category, info.priority, info.max_retries) == (
        "koo.tasks.ai_service.process_query",
        TaskCategory.AI_SERVICE,
        TaskPriority.HIGH,
        1,
    )
    assert (info.args, info.kwargs) == (["openai", "hello"], {"temperature": 0.2})
    tm.cancel(ai)
