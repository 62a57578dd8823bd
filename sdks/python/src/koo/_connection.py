"""Where koo is and how to reach it: settings, channels, errors.

A client holds `Settings` and opens its gRPC channel lazily, one per asyncio
event loop (a `grpc.aio` channel belongs to the loop it was made in), so a
module-level client such as `koo.redis_cache.redis_cache` works from any loop,
including the fresh ones `asyncio.run` makes. Clients made without a target
read the process-wide defaults (`koo.configure(...)`, else `KOO_TARGET`, else
`127.0.0.1:50051`) when they first connect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
import grpc.aio

from koo import _otel
from koo._otel import trace_metadata

# While koo is unreachable, gRPC waits longer and longer between connection
# attempts (1 s growing to 2 min by default), and every call in between
# fails at once: a koo back after 7 s was reached at 10 s. A second at most
# between attempts, so that clients (a worker carrying tasks through a koo
# restart above all) reach koo within a second of its return.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where clients connect when neither `configure` nor `KOO_TARGET` says."""

T = TypeVar("T")


class KooError(Exception):
    """A call to koo failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Settings:
    """How to reach koo.

    `tls`: False for plaintext, True for TLS with the system's roots, or
    `grpc.ChannelCredentials` of your own (e.g. with a private CA).
    `api_key` is sent as `authorization: Bearer <key>` on every call.
    `timeout`: the deadline, in seconds, of every unary call that sets none
    of its own (None: `KOO_CLIENT_TIMEOUT`, else `DEFAULT_TIMEOUT`, 30 s;
    `KOO_CLIENT_TIMEOUT=none` sets no deadline). A healthy koo bounds its
    own work (`KOO_REQUEST_TIMEOUT`); this bounds a koo that hangs or a
    network path that drops without a reset, which would otherwise hold a
    call for ever. Streams (`watch`, a worker's session) are not cut by it.
    """

    target: str | None = None
    api_key: str | None = None
    tls: bool | grpc.ChannelCredentials = False
    timeout: float | None = None

    def resolved(self) -> Settings:
        """These settings with the process-wide defaults filled in.

        A client given its own target uses only its own key and TLS choice, so
        the default key is never sent to another server.
        """
        if self.target:
            return self
        base = _defaults
        if base.target:
            return base
        return Settings(
            target=os.environ.get("KOO_TARGET") or DEFAULT_TARGET,
            api_key=base.api_key if base.api_key is not None else os.environ.get("KOO_API_KEY") or None,
            tls=base.tls,
            timeout=base.timeout,
        )


DEFAULT_TIMEOUT = 30.0
"""The deadline of a unary call when neither the call, the client nor
`KOO_CLIENT_TIMEOUT` sets one (seconds)."""


def env_timeout() -> float | None:
    """`KOO_CLIENT_TIMEOUT` (as the CLI reads it): seconds, or with a unit
    (`500ms`, `10s`, `2m`); unset or empty means `DEFAULT_TIMEOUT`, `none`
    no deadline."""
    text = os.environ.get("KOO_CLIENT_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    if text.lower() == "none":
        return None
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0))
    number, scale = text, 1.0
    for unit, factor in units:
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            number, scale = text[: -len(unit)], factor
            break
    try:
        seconds = float(number) * scale
    except ValueError:
        raise ValueError(f"KOO_CLIENT_TIMEOUT: {text!r} is not a duration (e.g. 10, 10s, 500ms)") from None
    if not seconds > 0:
        raise ValueError(f"KOO_CLIENT_TIMEOUT: {text!r} must be above zero")
    return seconds


class _Deadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives every unary call that has no deadline of its own `timeout`."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self._timeout)
        return await continuation(client_call_details, request)


def split_target(target: str, tls: bool | grpc.ChannelCredentials) -> tuple[str, bool | grpc.ChannelCredentials]:
    """`host:port` and the TLS choice for a target that may carry a scheme,
    as the `koo` CLI reads `KOO_TARGET`: `https://host:port` means TLS (the
    system's roots unless `tls` gives credentials), `http://host:port`
    plaintext unless `tls` says otherwise."""
    for scheme, secure in (("https://", True), ("http://", False)):
        if target.startswith(scheme):
            host = target[len(scheme) :].rstrip("/")
            return host, (True if secure and tls is False else tls)
    return target, tls


_defaults = Settings()
_generation = 0


def configure(
    target: str | None = None,
    *,
    api_key: str | None = None,
    tls: bool | grpc.ChannelCredentials = False,
    timeout: float | None = None,
) -> None:
    """Sets where the default clients (`redis_cache`, `task_manager`) connect.

    Call it before their first use, or again to move them: they reconnect on
    their next call.
    """
    global _defaults, _generation
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be above zero, not {timeout!r}")
    _defaults = Settings(target=target, api_key=api_key, tls=tls, timeout=timeout)
    _generation += 1


class Connection:
    """Lazily opened channels (one per event loop) and the call metadata."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, grpc.aio.Channel]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        # (configure() generation, the resolved call deadline)
        self._timeout: tuple[int, float | None] | None = None

    @property
    def settings(self) -> Settings:
        """The settings as they apply now (defaults filled in)."""
        return self._settings.resolved()

    def call_timeout(self) -> float | None:
        """The deadline (seconds) a unary call of this connection gets when
        it sets none: the client's `timeout`, else `KOO_CLIENT_TIMEOUT`,
        else `DEFAULT_TIMEOUT`; None when `KOO_CLIENT_TIMEOUT=none`. Read
        once per `configure()`, as the channels are, not on every call."""
        held = self._timeout
        if held is None or held[0] != _generation:
            s = self.settings
            held = (_generation, s.timeout if s.timeout is not None else env_timeout())
            self._timeout = held
        return held[1]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries."""
        key = self.settings.api_key
        auth = (("authorization", f"Bearer {key}"),) if key else ()
        # the caller's trace context, when opentelemetry-api is installed
        return auth + trace_metadata() if _otel.ENABLED else auth

    def channel(self) -> grpc.aio.Channel:
        """The running loop's channel, opened on first use."""
        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._channels.get(loop)
            if held is not None and held[0] == _generation:
                return held[1]
            s = self.settings
            assert s.target is not None
            target, tls = split_target(s.target, s.tls)
            # KOO_CLIENT_TIMEOUT read here, once per channel, not per call
            timeout = self.call_timeout()
            interceptors = [_Deadline(timeout)] if timeout else None
            if tls is False:
                ch = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
            else:
                creds = grpc.ssl_channel_credentials() if tls is True else tls
                ch = grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS, interceptors=interceptors)
            self._channels[loop] = (_generation, ch)
            return ch

    async def close(self) -> None:
        """Closes the running loop's channel (a later call opens a new one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._channels.pop(loop, None)
        if held is not None:
            await held[1].close()


async def rpc(call: Awaitable[T]) -> T:
    """Awaits one unary call, turning gRPC errors into `KooError`."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise KooError(e.code(), e.details() or "") from None


# A watch opens its stream again through these: koo restarting, or out of
# reach for a while.
WAIT_THROUGH = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# Its pause before opening it again, doubling (seconds).
REOPEN_INITIAL = 0.2
REOPEN_MAX = 5.0


async def reopening(open_call: Callable[[], Any]) -> AsyncGenerator[Any, None]:
    """The messages of the server stream `open_call()` opens, opened again
    (with backoff) whenever it ends or fails with one of `WAIT_THROUGH`, so
    that a watch outlives a koo restart; any other failure raises
    `KooError`. Runs until the consumer stops (use `contextlib.aclosing`, so
    that the call is cancelled then, not when the generator is collected)."""
    delay = REOPEN_INITIAL
    while True:
        call = open_call()
        try:
            async for message in call:
                delay = REOPEN_INITIAL
                yield message
        except grpc.aio.AioRpcError as e:
            if e.code() not in WAIT_THROUGH:
                raise KooError(e.code(), e.details() or "") from None
        finally:
            call.cancel()
        await asyncio.sleep(delay)
        delay = min(delay * 2, REOPEN_MAX)


class Client:
    """What koo's clients share: a `Connection` from the arguments every
    client takes (`target` None follows `koo.configure(...)` /
    `KOO_TARGET`), and `close()`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        timeout: float | None = None,
    ) -> None:
        self._conn = Connection(Settings(target=target, api_key=api_key, tls=tls, timeout=timeout))

    async def close(self) -> None:
        """Closes this loop's channel; the next call reconnects."""
        await self._conn.close()


class LoopThread:
    """A private event loop on a daemon thread, behind the sync facades.

    One per process (`shared_loop()`); the clients open their own channel on
    it, as on any loop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="koo-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the private loop and waits for its result.

        With OpenTelemetry, the coroutine runs in the caller's context (its
        current span), which a plain `run_coroutine_threadsafe` would lose.
        """
        if not _otel.ENABLED:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            task = self._loop.create_task(coro)  # in the caller's context

            def finished(t: asyncio.Task[T]) -> None:
                if t.cancelled():
                    done.cancel()
                elif (e := t.exception()) is not None:
                    done.set_exception(e)
                else:
                    done.set_result(t.result())

            task.add_done_callback(finished)

        self._loop.call_soon_threadsafe(start, context=contextvars.copy_context())
        return done.result()


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process's loop thread for sync calls, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared


_P = ParamSpec("_P")
_R = TypeVar("_R")
_M = TypeVar("_M")


def blocking(
    method: Callable[Concatenate[_M, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Any, _P], _R]:
    """An async client's `method` as a blocking method of its sync facade
    (whose `_m` is the async client), run on the SDK's own loop, with the
    same parameters (so that a type checker catches a misspelt one)."""

    def run(self: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return shared_loop().run(method(self._m, *args, **kwargs))

    # its name, docstring and signature (help(), IDEs) are the method's
    functools.update_wrapper(run, method)
    run.__qualname__ = f"Sync{method.__qualname__}"
    run.__doc__ = f"Blocking `{method.__qualname__}`.\n\n{method.__doc__ or ''}"
    return run
