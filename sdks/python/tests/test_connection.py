"""Connection settings: API keys, configure() and KOO_TARGET, against a koo with a keys file."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import koo
from koo import KooCache, KooError, TaskCategory, TaskManager
from koo._connection import Settings
from koo.redis_cache import redis_cache

from .conftest import KooServer, koo_binary


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KooServer, str]]:
    """A koo that needs an API key (KOO_AUTH_FILE), and an admin key for it."""
    out = subprocess.run(
        [koo_binary(), "auth", "new-key", "--name", "sdk-test", "--role", "admin"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = next(line for line in out.splitlines() if line.startswith("koo_"))
    keys: Path = tmp_path_factory.mktemp("auth") / "keys.toml"
    keys.write_text(out[out.index("[[key]]") :])
    server = KooServer({"KOO_AUTH_FILE": str(keys)})
    yield server, key
    server.stop()


def test_api_key_is_sent(secured: tuple[KooServer, str]) -> None:
    """Without the key koo refuses (UNAUTHENTICATED); with it the cache and tasks answer."""
    server, key = secured
    with pytest.raises(KooError) as err:
        KooCache(server.target).sync.get("k")
    assert err.value.code.name == "UNAUTHENTICATED"
    cache = KooCache(server.target, api_key=key).sync
    assert cache.set("k", "v") and cache.get("k") == "v"
    tm = TaskManager(server.target, api_key=key)
    task_id = tm.sync.submit_task("koo.tasks.health_check.run", TaskCategory.HEALTH_CHECK)
    assert isinstance(tm.sync.result(task_id, timeout=30), dict)


def test_configure_moves_the_default_clients(secured: tuple[KooServer, str], target: str) -> None:
    """configure() reconnects redis_cache on its next call, with the new key."""
    server, key = secured

    async def scenario() -> None:
        koo.configure(target)
        await redis_cache.set("where", "memory")
        koo.configure(server.target, api_key=key)
        assert await redis_cache.get("where") is None
        await redis_cache.set("where", "secured")
        koo.configure(target)
        assert await redis_cache.get("where") == "memory"

    try:
        asyncio.run(scenario())
    finally:
        koo.configure(None)


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """KOO_TARGET and KOO_API_KEY apply when configure() said nothing; else 127.0.0.1:50051."""
    monkeypatch.delenv("KOO_TARGET", raising=False)
    monkeypatch.delenv("KOO_API_KEY", raising=False)
    assert Settings().resolved().target == koo.DEFAULT_TARGET
    monkeypatch.setenv("KOO_TARGET", "koo.internal:7000")
    monkeypatch.setenv("KOO_API_KEY", "koo_secret")
    s = Settings().resolved()
    assert (s.target, s.api_key, s.tls) == ("koo.internal:7000", "koo_secret", False)
    assert Settings(target="other:1").resolved().api_key is None
    koo.configure("configured:1", api_key="conf")
    try:
        assert Settings().resolved() == Settings("configured:1", "conf")
    finally:
        koo.configure(None)


def test_a_target_may_carry_its_scheme(target: str) -> None:
    """`https://host:port` means TLS and `http://host:port` plaintext, as the
    CLI reads KOO_TARGET; credentials given still win."""
    from koo._connection import split_target

    assert split_target("https://koo.internal:443", False) == ("koo.internal:443", True)
    assert split_target("http://koo.internal:80/", False) == ("koo.internal:80", False)
    assert split_target("koo.internal:1", False) == ("koo.internal:1", False)
    creds = grpc.ssl_channel_credentials()
    assert split_target("https://koo.internal:443", creds) == ("koo.internal:443", creds)
    # a real call through a target with its scheme
    tm = TaskManager(f"http://{target}")
    assert asyncio.run(tm.get_task_metrics()) is not None


def test_a_timeout_bounds_calls_to_a_hung_koo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A koo that stopped answering (SIGSTOP) fails a call with a deadline
    (the client's `timeout`, or KOO_CLIENT_TIMEOUT) instead of blocking it
    for ever; `@cached` keeps to that deadline (not its lock_ttl + 5 s) and
    runs the function uncached. Without a setting, calls get 30 s."""
    import signal

    from koo import cached

    server = KooServer({})
    try:
        tm = TaskManager(server.target, timeout=0.5)
        asyncio.run(tm.get_task_metrics())  # connected while it answers
        runs = 0

        @cached(cache=KooCache(server.target, timeout=0.5), ttl=60)
        async def double(n: int) -> int:
            nonlocal runs
            runs += 1
            return n * 2

        assert asyncio.run(double(4)) == 8  # connected while it answers
        server.proc.send_signal(signal.SIGSTOP)
        try:
            # lock_ttl is 30 s: only the client's deadline can end this in 10
            assert asyncio.run(asyncio.wait_for(double(5), 10)) == 10
            assert runs == 2
            for client in (tm, TaskManager(server.target)):
                if client is not tm:
                    monkeypatch.setenv("KOO_CLIENT_TIMEOUT", "500ms")
                # the deadline, not the guard around it, ends the call
                with pytest.raises(KooError) as err:
                    asyncio.run(asyncio.wait_for(client.get_task_metrics(), 20))
                assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        server.stop()
    from koo._connection import DEFAULT_TIMEOUT, env_timeout

    assert env_timeout() == 0.5
    monkeypatch.setenv("KOO_CLIENT_TIMEOUT", "none")
    assert env_timeout() is None
    monkeypatch.delenv("KOO_CLIENT_TIMEOUT")
    assert env_timeout() == DEFAULT_TIMEOUT == 30.0
    monkeypatch.setenv("KOO_CLIENT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="KOO_CLIENT_TIMEOUT"):
        env_timeout()
