"""Test fixtures: real koo processes (and a real redis-server) on free ports.

koo binds `127.0.0.1:0` and the fixture reads the address it logs; the
binary is `$KOO_TEST_BINARY`, else the repo's `target/debug/koo` (what
`scripts/test` builds). redis-server gets a port the OS just handed out.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import koo

REPO = Path(__file__).resolve().parents[3]
ADDR = re.compile(r"koo serving gRPC addr=(\S+)")


def koo_binary() -> str:
    """The koo binary under test."""
    path = os.environ.get("KOO_TEST_BINARY") or str(REPO / "target" / "debug" / "koo")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no koo binary at {path} (build it, or set KOO_TEST_BINARY)")
    return path


class KooServer:
    """A `koo serve` process; `target` is its gRPC address."""

    def __init__(self, extra_env: dict[str, str]) -> None:
        env = dict(os.environ)
        env.update(
            {
                "KOO_LISTEN": "127.0.0.1:0",
                # the HTTP listener's default port would collide between servers
                "KOO_HTTP_LISTEN": "off",
                "KOO_LOG_FORMAT": "text",
                "KOO_SHUTDOWN_DRAIN": "10ms",
                "KOO_SHUTDOWN_GRACE": "1s",
                "NO_COLOR": "1",
            }
        )
        env.pop("REDIS_URL", None)
        env.update(extra_env)
        self.proc = subprocess.Popen(
            [koo_binary(), "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        found = threading.Event()
        self.target = ""

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                m = ADDR.search(line)
                if m and not found.is_set():
                    self.target = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(20) or not self.target:
            self.stop()
            raise RuntimeError("koo did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        """Stops koo (SIGTERM, then SIGKILL)."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RedisServer:
    """A throw-away redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stops redis-server."""
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def koo_memory() -> Iterator[KooServer]:
    """One koo on the embedded store for the whole session."""
    server = KooServer({"KOO_TASK_QUEUES": "sdk-extra"})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def koo_redis() -> Iterator[KooServer]:
    """One koo on a fresh redis-server for the whole session."""
    redis = RedisServer()
    try:
        server = KooServer({"REDIS_URL": redis.url})
        try:
            yield server
        finally:
            server.stop()
    finally:
        redis.stop()


@pytest.fixture(params=["memory", "redis"])
def cache_target(request: pytest.FixtureRequest) -> str:
    """A koo target: the cache tests run once per store."""
    server: KooServer = request.getfixturevalue(f"koo_{request.param}")
    return server.target


@pytest.fixture
def target(koo_memory: KooServer) -> str:
    """The embedded-store koo's target."""
    return koo_memory.target


@pytest.fixture
def default_clients(target: str) -> Iterator[str]:
    """Points the module-level default clients at the test koo."""
    koo.configure(target)
    yield target
    koo.configure(None)


@pytest.fixture
def ns() -> str:
    """A key namespace of this test's own."""
    return f"t-{uuid.uuid4().hex[:12]}"
