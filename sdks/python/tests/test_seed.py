"""The seed document's usage examples, run against a real koo.

Each example's code is copied from ../../../../shared/seed (the "Usage
Examples" of the caching and task sections) with only its import line
changed (`core.` -> `koo.`). Around it: the seed writes top-level `await`, so
each example sits in a coroutine that returns what the test asserts on; the
names the seed leaves undefined (`user_data`, `database`, `results`) are
stubbed; and the seed's unannotated `get_research_results` carries a
`type: ignore` for mypy --strict.
"""

from __future__ import annotations

import asyncio
from typing import Any

from koo.task_manager import TaskState
from koo.task_manager import task_manager as tasks

# The seed's free names.
user_data: dict[str, Any] = {"theme": "dark", "language": "en", "notifications": True}
results: list[dict[str, Any]] = [{"title": "Neurosurgery advances", "score": 0.92}]
queries: list[str] = []


class _Database:
    async def query(self, query: str) -> list[dict[str, Any]]:
        queries.append(query)
        return [{"query": query, "rows": 2}]


database = _Database()


def test_basic_cache_operations(default_clients: str) -> None:
    """set, get and delete at the APPLICATION level, as the seed calls them."""

    async def example(user_data: dict[str, Any]) -> Any:
        from koo.redis_cache import redis_cache, CacheLevel

        # Set cache value
        await redis_cache.set("user_preferences", user_data, ttl=3600, level=CacheLevel.APPLICATION)

        # Get cache value
        user_data = await redis_cache.get("user_preferences", CacheLevel.APPLICATION)

        # Delete cache value
        await redis_cache.delete("user_preferences", CacheLevel.APPLICATION)
        return user_data

    assert asyncio.run(example(user_data)) == user_data
    assert asyncio.run(read_app_key("user_preferences")) is None


async def read_app_key(key: str) -> Any:
    """Reads an APPLICATION-level key with the default client."""
    from koo.redis_cache import redis_cache

    return await redis_cache.get(key)


def test_cache_decorator(default_clients: str) -> None:
    """@cached(ttl=1800, level=CacheLevel.DATABASE, key_prefix="research") runs the query once."""
    from koo.redis_cache import cached, CacheLevel
    from koo.redis_cache import redis_cache

    @cached(ttl=1800, level=CacheLevel.DATABASE, key_prefix="research")
    async def get_research_results(query: str):  # type: ignore[no-untyped-def]
        # Expensive database operation
        return await database.query(query)

    async def scenario() -> None:
        await get_research_results.invalidate("brain tumours")
        first = await get_research_results("brain tumours")
        second = await get_research_results("brain tumours")
        assert first == second == [{"query": "brain tumours", "rows": 2}]
        assert queries.count("brain tumours") == 1
        key = get_research_results.cache_key("brain tumours")
        assert key.startswith("research:")
        hit = await redis_cache.get_entry(key, CacheLevel.DATABASE)
        assert hit is not None and hit.ttl.total_seconds() <= 1800

    asyncio.run(scenario())


def test_convenience_functions(default_clients: str) -> None:
    """cache_api_response and get_cached_api_response."""

    async def example() -> Any:
        from koo.redis_cache import cache_api_response, get_cached_api_response

        # Cache API response
        await cache_api_response("search_results", results, ttl=300)

        # Get cached API response
        cached_results = await get_cached_api_response("search_results")
        return cached_results

    assert asyncio.run(example()) == results


def test_submitting_tasks(default_clients: str) -> None:
    """submit_task with the seed's keywords, then get_task_status."""

    async def example() -> Any:
        from koo.task_manager import task_manager, TaskCategory, TaskPriority

        # Submit AI processing task
        task_id = await task_manager.submit_task(
            task_name="koo.tasks.ai_service.process_query",
            category=TaskCategory.AI_SERVICE,
            args=("claude", "What are the latest advances in neurosurgery?"),
            priority=TaskPriority.HIGH,
            max_retries=3,
        )

        # Check task status
        task_info = await task_manager.get_task_status(task_id)
        return task_info

    info = asyncio.run(example())
    assert info.name == "koo.tasks.ai_service.process_query"
    assert info.args == ["claude", "What are the latest advances in neurosurgery?"]
    assert info.max_retries == 3
    assert info.state is TaskState.QUEUED  # no AI worker runs in this test
    asyncio.run(tasks.cancel(info.id))


def test_task_convenience_functions(default_clients: str) -> None:
    """submit_ai_task and submit_pdf_processing_task."""

    async def example() -> str:
        from koo.task_manager import submit_ai_task, submit_pdf_processing_task

        # Submit AI task
        task_id = await submit_ai_task("koo.tasks.ai_service.process_query", "claude", "Explain brain anatomy")

        # Submit PDF processing task
        task_id = await submit_pdf_processing_task(
            "koo.tasks.pdf_processing.process_document", "/path/to/document.pdf", "doc_123"
        )
        return task_id

    async def check() -> None:
        pdf = await example()
        pdf_info = await tasks.get_task_status(pdf)
        assert pdf_info.queue == "pdf_processing" and pdf_info.args == ["/path/to/document.pdf", "doc_123"]
        # The AI task is the only one of its name still active (the other tests cancel theirs).
        active = await tasks.get_active_tasks(name="koo.tasks.ai_service.process_query")
        mine = [t for t in active if t.args == ["claude", "Explain brain anatomy"]]
        assert len(mine) == 1 and mine[0].queue == "ai_service" and mine[0].priority == 3
        for t in (pdf, mine[0].id):
            await tasks.cancel(t)

    asyncio.run(check())
