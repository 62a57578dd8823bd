"""Task workers: `Worker`, `@worker.task`, `TaskContext`, `Retry`, `Fatal`.

A `Worker` holds one `koo.worker.v1.WorkerService.Work` stream: it says
hello (its task names, queues and concurrency), heartbeats, runs the tasks
koo pushes (async handlers on its event loop, plain ones on threads of their
own), and reports progress and outcomes quoting each lease's token and
secret. When the stream breaks it reconnects with capped exponential backoff
(0.2 s doubling to 5 s). When koo stopped or died, the tasks of the lost
stream run on and are re-attached to the next stream, to this koo or
another, within a window that depends on how the stream ended (see
`koo._carry`): a koo restart or deploy restarts none of them. A koo that
cannot adopt one (its lease lapsed) revokes it, and the handler is told to
stop.

Failure rule: `Fatal` fails the task for good; `Retry` and any other
exception fail it retryably (koo retries while the task's retries last,
after the task's backoff or after `Retry(..., countdown=seconds)`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from koo import _otel
from koo._carry import Carried, carry_for
from koo._connection import Connection, Settings, rpc
from koo._events import EventHook, EventHooks
from koo._loopwatch import LoopWatch
from koo._outcomes import (
    MAX_FAIL_MESSAGE_BYTES,
    Fatal,
    RateLimited,
    Retry,
    WorkerRejected,
    _cut,
    _traceback_of,
)
from koo._session import BATCH_BYTES, _Session, on_loop
from koo._taskdef import TaskDef
from koo._threads import Threads
from koo._values import from_proto_value, from_struct, strings, to_proto_value, to_struct
from koo.tasks.v1 import task_service_pb2 as tasks_pb
from koo.tasks.v1 import task_service_pb2_grpc as tasks_grpc
from koo.worker.v1 import worker_service_pb2 as wpb
from koo.worker.v1 import worker_service_pb2_grpc as wgrpc

log = logging.getLogger("koo.worker")

F = TypeVar("F", bound=Callable[..., Any])

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
# The reconnect backoff's cap while tasks of a lost stream are carried
# (their window may be a third of a lease: see koo._carry).
CARRY_BACKOFF = 0.5
MAX_PROGRESS_MESSAGE_BYTES = 1024
MAX_OUTCOME_SENDS = 5
CODE_ABORTED = 10
# Bytes kept free under koo's message limit for the gRPC frame and a
# batch's envelope around one outcome.
MESSAGE_HEADROOM = 1024
# How long a stopping worker waits for koo to take back the tasks it
# releases before it closes the stream (seconds).
RELEASE_WAIT = 2.0
CODE_UNAVAILABLE = 14
_FOR_GOOD = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


class TaskContext:
    """What a handler gets besides its arguments.

    `cancelled` (a `threading.Event`, usable from threads and, via
    `await ctx.wait_cancelled()`, from coroutines) is set when koo cancels
    the task, at its soft time limit (`soft_limit_reached` tells which), when
    koo revokes it (a task koo could not re-attach after a lost stream is
    revoked too), and when the worker stops. `cancel_reason`
    then says why: for a cancel, the reason its caller gave
    (`TaskManager.cancel(id, reason=...)`, else `cancelled by request`).
    """

    def __init__(self, run: _Run, task: tasks_pb.Task) -> None:
        self._run = run
        self.task = task
        self.task_id: str = task.id
        self.name: str = task.name
        self.attempt: int = task.attempts
        self.queue: str = task.queue
        self.depends_on: list[str] = list(task.depends_on)
        self.cancelled = threading.Event()
        self.soft_limit_reached = False
        self.cancel_reason = ""
        # The attempt's fencing token: for records kept outside koo (an
        # audit ledger) that must tell two attempts of one task apart. It
        # grows, within the attempt, when the task is re-attached to a new
        # stream (see koo._carry).
        self.lease_token: int = run.assignment.lease_token

    def progress(self, percent: float, message: str = "", metadata: Mapping[str, Any] | None = None) -> None:
        """Reports progress (0 to 100); callable from any thread."""
        self._run.progress(percent, message, metadata)

    async def wait_cancelled(self) -> None:
        """Returns once `cancelled` is set."""
        await self._run.cancelled_async.wait()

    async def dependency_results(self) -> dict[str, Any]:
        """The results of the tasks this one depended on, by id (read with
        `GetTask`, so the worker's key needs the reader role)."""
        return await self._run.worker._dependency_results(self.depends_on)

    def dependency_results_sync(self) -> dict[str, Any]:
        """`dependency_results()` for plain handlers (not from the worker's loop)."""
        fut = asyncio.run_coroutine_threadsafe(self.dependency_results(), self._run.loop)
        return fut.result()

    def _signal(self, reason: str, soft: bool = False) -> None:
        if not self.cancel_reason:
            self.cancel_reason = reason
        self.soft_limit_reached = self.soft_limit_reached or soft
        self.cancelled.set()
        self._run.loop.call_soon_threadsafe(self._run.cancelled_async.set)

    def _abandon(self, reason: str) -> None:
        """The task is no longer ours: signal it, and cancel a coroutine
        (a thread cannot be stopped; its outcome is dropped)."""
        self._signal(reason)
        run = self._run
        if run.is_async and run.handle is not None and not run.handle.done():
            run.loop.call_soon_threadsafe(run.handle.cancel)


@dataclass
class _Registered:
    fn: Callable[..., Any]
    is_async: bool
    wants_ctx: bool
    queue: str | None
    signature: inspect.Signature


@dataclass(eq=False)
class _Run:
    worker: Worker
    session: _Session
    assignment: wpb.TaskAssignment
    loop: asyncio.AbstractEventLoop
    cancelled_async: asyncio.Event = field(default_factory=asyncio.Event)
    handle: asyncio.Task[None] | None = None
    is_async: bool = False
    cancel_requested: bool = False
    ctx: TaskContext = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = TaskContext(self, self.assignment.task)

    @property
    def task_id(self) -> str:
        return self.assignment.task.id

    def progress(self, percent: float, message: str, metadata: Mapping[str, Any] | None) -> None:
        pct = float(percent)
        if math.isnan(pct):
            raise ValueError("progress percent must be a number")
        text = _cut(str(message), MAX_PROGRESS_MESSAGE_BYTES)
        details = to_struct(metadata) if metadata else None
        # Built and sent on the loop (at once from an async handler; queued,
        # in order with the handler's outcome, from a thread): the lease's
        # token and the stream are read there, after any re-attach that
        # changed them meanwhile.
        if on_loop(self.loop):
            self._send_progress(pct, text, details)
        else:
            self.loop.call_soon_threadsafe(self._send_progress, pct, text, details)

    def _send_progress(self, pct: float, message: str, metadata: Any) -> None:
        if self.session.closed or self.session.held.get(self.task_id) is not self:
            return  # the stream is gone (the task may be carried), or the task is no longer held
        msg = wpb.Progress(
            task_id=self.task_id,
            lease_token=self.assignment.lease_token,
            lease_secret=self.assignment.lease_secret,
            percent=min(100.0, max(0.0, pct)),
            message=message,
        )
        if metadata is not None:
            msg.metadata.CopyFrom(metadata)
        self.session.send(wpb.WorkRequest(progress=msg))
        self.worker._events.emit("progress", self.task_id, percent=msg.percent, message=msg.message)


class Worker:
    """Runs koo tasks with your functions.

    ```python
    worker = Worker("127.0.0.1:50051", concurrency=8)

    @worker.task("reports.build", queue="reports")
    async def build(report_id: str, *, ctx: TaskContext) -> dict:
        ctx.progress(50, "halfway")
        return {"id": report_id}

    worker.run()  # or: python -m koo.worker mymodule:worker
    ```

    `target`, `api_key` (koo's worker key or token) and `tls` work as for the
    other clients (`None`: `koo.configure`, `KOO_TARGET`, `KOO_API_KEY`).
    `queues`: the queues to serve (none: every queue, plus those of the
    tasks' `queue=`). `grace`: on SIGTERM, how long running tasks may take to
    finish before the worker hands them back by closing its stream.
    `token` is another name for `api_key` (koo's `KOO_WORKER_TOKEN`).
    `on_event`: a hook called with a `WorkerEvent` for what the worker does
    (welcome, task, progress, outcomes, cancel...; see `koo._events`); more
    with `@worker.on_event`.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        concurrency: int = 4,
        queues: Iterable[str] = (),
        name: str | None = None,
        grace: float = 10.0,
        token: str | None = None,
        on_event: EventHook | None = None,
        blocked_after: float = 2.0,
    ) -> None:
        if not 1 <= concurrency <= 1024:
            raise ValueError("concurrency must be 1 to 1024")
        if not blocked_after > 0:
            raise ValueError(f"blocked_after must be above zero, not {blocked_after!r}")
        # the event loop blocked this long (seconds) is logged, with the
        # async handlers running (see koo._loopwatch)
        self.blocked_after = blocked_after
        self._conn = Connection(Settings(target=target, api_key=api_key or token, tls=tls))
        self.concurrency = concurrency
        self.queues = [q for q in strings("queues", queues) if q]
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.grace = grace
        self.handlers: dict[str, _Registered] = {}
        self._stopping: asyncio.Event | None = None
        # a second signal: the grace is over at once
        self._forced = False
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call: Any = None
        self.worker_id = ""
        self.connected = threading.Event()
        self._started: set[_Run] = set()
        # tasks of a lost stream, re-attached to the next (see koo._carry)
        self._carried = Carried()
        self._events = EventHooks(on_event)
        # plain handlers' threads, kept for the next task (see koo._threads)
        self._threads = Threads(concurrency)

    def set_concurrency(self, concurrency: int) -> None:
        """Changes how many tasks run at once (1 to 1024), before `run()`."""
        if not 1 <= concurrency <= 1024:
            raise ValueError("concurrency must be 1 to 1024")
        self.concurrency = concurrency
        self._threads = Threads(concurrency)

    def task(self, name: str | TaskDef, *, queue: str | None = None) -> Callable[[F], F]:
        """Registers a handler for the task name, or for a `TaskDef`'s name
        (its queue, when given here or by the definition, is served; a
        definition without one has its category's queue served)."""
        if isinstance(name, TaskDef):
            # where its submits go: its queue, else its category's
            queue = queue or name.queue or name.category.name.lower()
            name = name.name

        def register(fn: F) -> F:
            sig = inspect.signature(fn)
            self.handlers[name] = _Registered(fn, inspect.iscoroutinefunction(fn), "ctx" in sig.parameters, queue, sig)
            return fn

        return register

    def on_event(self, hook: EventHook) -> EventHook:
        """Adds an event hook (usable as a decorator); see `WorkerEvent`."""
        self._events.add(hook)
        return hook

    # -- running ------------------------------------------------------------

    def run(self, *, handle_signals: bool = True) -> None:
        """Runs until SIGTERM/SIGINT (or `stop()`)."""
        asyncio.run(self.serve(handle_signals=handle_signals))

    def stop(self) -> None:
        """Stops taking tasks; running ones get `grace` to finish. Thread-safe."""
        loop, ev = self._loop, self._stopping
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the loop has already ended
                pass

    def _on_signal(self) -> None:
        """The first SIGTERM/SIGINT stops the worker within its grace; a
        second one (Ctrl-C twice, as Celery's cold shutdown) ends the grace
        at once: what still runs is handed back now."""
        assert self._stopping is not None
        if self._stopping.is_set():
            if not self._forced:
                log.warning("second signal: handing back what still runs, now")
            self._forced = True
        self._stopping.set()

    async def serve(self, *, handle_signals: bool = False) -> None:
        """Runs on the current loop until `stop()` (or SIGTERM/SIGINT)."""
        if not self.handlers:
            raise ValueError("no tasks registered (@worker.task)")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        self._forced = False
        self._draining = False
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
        watch = LoopWatch(loop, self._running_async, self.blocked_after)
        watch.start()
        try:
            backoff = BACKOFF_INITIAL
            while not self._stopping.is_set():
                welcomed = await self._session(loop)
                if self._stopping.is_set():
                    break
                if welcomed:
                    backoff = BACKOFF_INITIAL
                # tasks carried from a lost stream have a short window:
                # try often within it
                wait = min(backoff, CARRY_BACKOFF) if self._carried else backoff
                try:
                    await asyncio.wait_for(self._stopping.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            watch.stop()
            self._carried.drop(
                "the worker stopped while koo was unreachable: koo takes them back when their leases lapse"
            )
        await self._conn.close()

    def _running_async(self) -> list[str]:
        """The async handlers running now, `task id (name)` (read from the
        loop watch's thread while the loop is stuck)."""
        return [f"{r.task_id} ({r.ctx.name})" for r in list(self._started) if r.is_async]

    async def _session(self, loop: asyncio.AbstractEventLoop) -> bool:
        assert self._stopping is not None
        session = _Session(loop)
        session.batch_size = max(1, self.concurrency // 2)
        queues = set(self.queues)
        if queues:
            queues |= {h.queue for h in self.handlers.values() if h.queue}
        self._carried.expire(loop)
        hello = wpb.WorkRequest(
            hello=wpb.Hello(
                name=_cut(self.name, 128),
                task_names=sorted(self.handlers),
                queues=sorted(queues),
                concurrency=self.concurrency,
                accept_batches=True,
                held=self._carried.claims(lambda r: r in self._started),
                reattach=True,
            )
        )
        stub = wgrpc.WorkerServiceStub(self._conn.channel())
        call = stub.Work(session.requests(hello), metadata=self._conn.metadata())
        welcomed = False
        # how long to carry the tasks on when the stream ends (see koo._carry)
        carrying: float | None = None
        hb: asyncio.Task[None] | None = None
        stopper = asyncio.ensure_future(self._drain_then_close(session, call))
        try:
            async for resp in call:
                kind = resp.WhichOneof("message")
                if kind == "welcome":
                    welcomed = True
                    self.worker_id = resp.welcome.worker_id
                    session.batches = resp.welcome.accepts_batches
                    session.releases = resp.welcome.accepts_release
                    session.starts = resp.welcome.accepts_started
                    session.clock.welcome(resp.welcome)
                    session.adopts = resp.welcome.adopts_held
                    session.lease = resp.welcome.lease.ToTimedelta().total_seconds() or session.lease
                    reattached = self._reattach(session, resp.welcome)
                    if resp.welcome.max_message_size > 0:
                        session.max_message = resp.welcome.max_message_size
                        session.batch_bytes = min(BATCH_BYTES, resp.welcome.max_message_size // 2)
                    self.connected.set()
                    log.info(
                        "connected to koo at %s as %s: %s, %d at once",
                        self._conn.settings.target,
                        self.worker_id,
                        ", ".join(sorted(self.handlers)) or "no task names",
                        self.concurrency,
                    )
                    iv = resp.welcome.heartbeat_interval.ToTimedelta().total_seconds() or 10.0
                    hb = asyncio.ensure_future(self._heartbeats(session, iv))
                    self._events.emit(
                        "welcome",
                        worker_id=self.worker_id,
                        lease_seconds=resp.welcome.lease.ToTimedelta().total_seconds(),
                        heartbeat_seconds=iv,
                        reattached=reattached,
                    )
                elif kind == "batch":
                    for one in resp.batch.responses:
                        self._on_message(session, one, loop)
                else:
                    self._on_message(session, resp, loop)
            self._events.emit("disconnected", error="stream closed by koo")
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise  # not our call.cancel(): someone cancels serve()
        except grpc.aio.AioRpcError as e:
            # refused at hello: for good; a stream koo ends later (a key
            # revoked, a message it could not read) is opened again, and
            # a refused hello then ends the worker
            if e.code() in _FOR_GOOD and not welcomed:
                raise WorkerRejected(f"{e.code().name}: {e.details()}") from None
            if not self._stopping.is_set():
                log.warning("stream ended: %s: %s", e.code().name, e.details())
                self._events.emit("disconnected", error=f"{e.code().name}: {e.details()}")
            carrying = carry_for(e, session.lease)
        finally:
            self.connected.clear()
            session.closed = True
            session.outbox.put_nowait(None)
            stopper.cancel()
            if hb is not None:
                hb.cancel()
            if carrying is not None and session.adopts and not self._stopping.is_set():
                self._carried.keep(session, loop.time() + carrying)
            for run in list(session.held.values()):
                run.ctx._abandon("stream lost")
            session.held.clear()
        return welcomed

    def _reattach(self, session: _Session, welcome: wpb.Welcome) -> int:
        """Moves what the lost stream carried onto `session`, just welcomed:
        the runs koo adopted are held again and their outcomes sent, each
        under the lease token and secret the welcome gives (adopting takes
        the lease over); the others are stopped (koo revokes them too). A
        koo that adopts nothing (an older release) is sent the outcomes as
        they were, and the runs are stopped. How many tasks the hello named
        that koo adopted."""
        runs, outcomes = self._carried.take()
        if not session.adopts:
            for tid, msg in outcomes.items():
                self._send_outcome(session, tid, msg, 1)
            for run in runs.values():
                run.ctx._abandon("stream lost (this koo does not re-attach tasks)")
            return 0
        adopted = {a.task_id: a for a in welcome.adopted}
        for tid, msg in outcomes.items():
            lease = adopted.get(tid)
            if lease is not None:
                o = msg.complete if msg.HasField("complete") else msg.fail
                o.lease_token, o.lease_secret = lease.lease_token, lease.lease_secret
                self._send_outcome(session, tid, msg, 1)
        for tid, run in runs.items():
            lease = adopted.get(tid)
            if lease is None:
                # revoked, or named as never started (koo handed it back)
                run.ctx._abandon("stream lost, and koo did not re-attach the task")
                continue
            run.assignment.lease_token, run.assignment.lease_secret = lease.lease_token, lease.lease_secret
            run.ctx.lease_token = lease.lease_token
            run.session = session
            session.held[tid] = run
        if adopted:
            log.info("re-attached %d of %d tasks of the lost stream", len(adopted), len(runs) + len(outcomes))
        return len(adopted)

    def _on_message(self, session: _Session, resp: wpb.WorkResponse, loop: asyncio.AbstractEventLoop) -> None:
        """One of koo's messages after the welcome (alone or from a batch)."""
        kind = resp.WhichOneof("message")
        if kind == "task":
            self._on_task(session, resp.task, loop)
        elif kind == "reply":
            self._on_reply(session, resp.reply)
        elif kind == "cancel":
            run = session.held.get(resp.cancel.task_id)
            self._events.emit("cancel", resp.cancel.task_id, reason=resp.cancel.reason)
            if run is not None:
                run.cancel_requested = True
                run.ctx._signal(resp.cancel.reason or "cancelled")
        elif kind == "soft_time_limit":
            run = session.held.get(resp.soft_time_limit.task_id)
            self._events.emit("soft_time_limit", resp.soft_time_limit.task_id)
            if run is not None:
                run.ctx._signal("soft time limit", soft=True)
        elif kind == "revoked":
            run = session.held.pop(resp.revoked.task_id, None)
            session.unacked.pop(resp.revoked.task_id, None)
            self._events.emit("revoked", resp.revoked.task_id, reason=resp.revoked.reason, held=len(session.held))
            if run is not None:
                run.ctx._abandon("revoked: " + resp.revoked.reason)

    async def _drain_then_close(self, session: _Session, call: Any) -> None:
        """On stop: start nothing new, let running tasks finish within the
        grace, then close the stream (koo takes back what is left)."""
        assert self._stopping is not None
        await self._stopping.wait()
        self._draining = True
        if session.adopts:
            # koo pushes nothing more, and hands the tasks back should it
            # stop first (this worker will not re-attach them)
            session.send(wpb.WorkRequest(draining=wpb.Draining()))
        log.info("stopping: no new tasks; running ones get %.1f s", self.grace)
        deadline = asyncio.get_running_loop().time() + self.grace
        # Running tasks, and outcomes koo has not answered yet (closing the
        # stream earlier could drop a `complete` still in the outbox).
        while session.unacked or any(r in self._started for r in session.held.values()):
            if asyncio.get_running_loop().time() > deadline or self._forced:
                break
            await asyncio.sleep(0.05)
        if session.releases and session.held:
            # hand back what is left rather than leave koo to count it lost
            for run in list(session.held.values()):
                self._started.discard(run)
                why = "a second signal ended the grace" if self._forced else f"its grace of {self.grace:g} s is over"
                session.release(run, f"worker stopping: {why}")
            # their replies, so that the stream closes after koo took them
            until = asyncio.get_running_loop().time() + RELEASE_WAIT
            while session.releasing and not session.closed and asyncio.get_running_loop().time() < until:
                await asyncio.sleep(0.02)
        call.cancel()

    async def _heartbeats(self, session: _Session, interval: float) -> None:
        while not session.closed:
            await asyncio.sleep(interval)
            session.send(wpb.WorkRequest(heartbeat=wpb.Heartbeat()))

    def _on_task(self, session: _Session, a: wpb.TaskAssignment, loop: asyncio.AbstractEventLoop) -> None:
        run = _Run(self, session, a, loop)
        old = session.held.get(run.task_id)
        if old is not None:
            old.ctx._abandon("leased again")
        session.held[run.task_id] = run
        self._events.emit("task", run.task_id, name=run.ctx.name, attempt=run.ctx.attempt, held=len(session.held))
        late = session.clock.late(a)
        if late is not None and not self._draining:
            # read long after koo pushed it (was this process stopped?): a
            # revoke may be right behind it
            hold = session.clock.hold()
            log.warning(
                "task %s waited %.1f s unread since koo pushed it: held back %.2f s in case koo took it back",
                run.task_id,
                late,
                hold,
            )
            loop.call_later(hold, self._start, session, run)
            return
        self._start(session, run)

    def _start(self, session: _Session, run: _Run) -> None:
        """Starts a pushed task that is still this stream's."""
        if session.closed or session.held.get(run.task_id) is not run:
            return  # revoked while held back (it runs elsewhere), or the stream is gone
        if self._draining:
            if session.releases:
                session.release(run, "worker stopping: not started")
            return  # not started: handed back (or when the stream closes)
        self._started.add(run)
        reg = self.handlers.get(run.ctx.name)
        run.is_async = reg is not None and reg.is_async
        run.handle = asyncio.ensure_future(self._execute(run))
        session.begin(run.task_id)

    def _on_reply(self, session: _Session, reply: wpb.Reply) -> None:
        """koo's answer to a complete or fail (or a refused progress)."""
        self._events.reply(reply, held=len(session.held))
        if reply.kind == wpb.REPLY_KIND_RELEASE:
            session.releasing.discard(reply.task_id)
            if reply.code:
                log.warning("koo refused the hand-back of %s: %s", reply.task_id, reply.message)
            return
        if reply.kind == wpb.REPLY_KIND_PROGRESS:
            if reply.code == CODE_ABORTED:
                run = session.held.pop(reply.task_id, None)
                if run is not None:
                    run.ctx._abandon("lease lapsed")
            return
        sent = session.unacked.pop(reply.task_id, None)
        if reply.code == 0 or reply.code == CODE_ABORTED or sent is None:
            if reply.code:
                log.warning("koo refused the outcome of %s: %s", reply.task_id, reply.message)
            return
        msg, sends = sent
        if reply.code == CODE_UNAVAILABLE and sends < MAX_OUTCOME_SENDS:
            delay = min(BACKOFF_INITIAL * 2**sends, BACKOFF_MAX)
            session.loop.call_later(delay, self._send_outcome, session, reply.task_id, msg, sends + 1)
            return
        log.warning("koo refused the outcome of %s (code %d): %s", reply.task_id, reply.code, reply.message)
        held = msg.complete if msg.HasField("complete") else msg.fail
        if msg.HasField("complete") or msg.fail.HasField("details") or msg.fail.HasField("key_retry_after"):
            # The result (or the details, or the key's back-off) was refused,
            # e.g. too large: fail without it, so that the task still ends.
            fallback = wpb.Fail(
                task_id=reply.task_id,
                lease_token=held.lease_token,
                lease_secret=held.lease_secret,
                message=_cut(f"koo refused the outcome: {reply.message or reply.code}", MAX_FAIL_MESSAGE_BYTES),
                retryable=False,
            )
            self._send_outcome(session, reply.task_id, wpb.WorkRequest(fail=fallback), MAX_OUTCOME_SENDS)

    @staticmethod
    def _send_outcome(session: _Session, task_id: str, msg: wpb.WorkRequest, sends: int) -> None:
        if session.closed:
            return
        session.unacked[task_id] = (msg, sends)
        session.send(msg)

    async def _execute(self, run: _Run) -> None:
        reg = self.handlers.get(run.ctx.name)
        t = run.assignment.task
        args = [from_proto_value(v) for v in t.args]
        kwargs = from_struct(t.kwargs)
        result: Any = None
        # message, retryable, details, retry countdown (seconds; None: the backoff)
        failure: tuple[str, bool, dict[str, Any] | None, float | None] | None = None
        # a RateLimited's back-off of the task's rate-limit key (seconds)
        key_retry_after: float | None = None
        # the handler's span (with opentelemetry-api): a child of the submitter's
        span = _otel.task_span(t)
        traced = span.__enter__()
        try:
            if reg is None:
                raise Fatal(f"no handler for {run.ctx.name!r}")
            if reg.wants_ctx:
                kwargs["ctx"] = run.ctx
            try:
                reg.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise Fatal(f"the task's arguments do not fit {run.ctx.name!r}: {e}") from None
            if reg.is_async:
                result = await reg.fn(*args, **kwargs)
            else:
                result = await self._threads.run(_otel.in_current_context(lambda: reg.fn(*args, **kwargs)))
        except Fatal as e:
            failure = (e.message, False, e.details, None)
        except RateLimited as e:
            if t.rate_limit_key:
                key_retry_after = e.retry_after
                failure = (e.message, True, e.details, e.countdown)
            else:
                log.warning("task %s raised RateLimited without a rate_limit_key: it alone waits", run.task_id)
                wait = e.retry_after if e.countdown is None else e.countdown
                failure = (e.message, True, e.details, wait)
        except Retry as e:
            failure = (e.message, True, e.details, e.countdown)
        except asyncio.CancelledError:
            failure = ("cancelled", False, None, None)
        except Exception as e:
            if not run.ctx.cancelled.is_set():
                log.exception("task %s (%s) raised", run.task_id, run.ctx.name)
            raised = {"exception": type(e).__name__, "traceback": _traceback_of(e)}
            failure = (f"{type(e).__name__}: {e}", True, raised, None)
        finally:
            self._started.discard(run)
            traced.outcome("succeeded" if failure is None else "failed", None if failure is None else failure[0])
            span.__exit__(None, None, None)
        session = run.session
        carried = self._carried.owns(run)
        if not carried and (session.held.get(run.task_id) is not run or session.closed):
            return  # revoked, leased again, or dropped with a lost stream
        if not carried:
            del session.held[run.task_id]
        if run.cancel_requested:
            failure = (run.ctx.cancel_reason or "cancelled", False, None, None)
        tok, sec = run.assignment.lease_token, run.assignment.lease_secret
        if failure is None:
            try:
                value = to_proto_value(result)
            except (TypeError, ValueError) as e:
                failure = (f"result is not JSON: {e}", False, None, None)
            else:
                done = wpb.WorkRequest(
                    complete=wpb.Complete(task_id=run.task_id, lease_token=tok, lease_secret=sec, result=value)
                )
                # koo ends a stream on a message past its limit (and with it
                # every task the stream holds): fail this one alone instead
                size = done.ByteSize()
                if size > session.max_message - MESSAGE_HEADROOM:
                    limit = session.max_message
                    why = f"result too large: {size} bytes encoded, koo reads at most {limit} (KOO_MAX_MESSAGE_SIZE)"
                    failure = (why, False, None, None)
                else:
                    self._events.emit("reported", run.task_id, outcome="complete")
                    self._report(run, done, carried)
                    return
        msg, retryable, details, countdown = failure
        fail = wpb.Fail(
            task_id=run.task_id,
            lease_token=tok,
            lease_secret=sec,
            message=_cut(msg or "failed", MAX_FAIL_MESSAGE_BYTES),
            retryable=retryable,
        )
        if countdown is not None:
            fail.retry_delay.FromNanoseconds(round(countdown * 1e9))
        if key_retry_after is not None and not run.cancel_requested:
            fail.key_retry_after.FromNanoseconds(round(key_retry_after * 1e9))
        if details:
            try:
                fail.details.CopyFrom(to_struct(details))
            except (TypeError, ValueError):
                pass
        self._events.emit("reported", run.task_id, outcome="fail", message=fail.message, retryable=retryable)
        self._report(run, wpb.WorkRequest(fail=fail), carried)

    def _report(self, run: _Run, msg: wpb.WorkRequest, carried: bool) -> None:
        """Sends a run's outcome, or keeps it for the next stream when the
        run is carried from a lost one."""
        if carried:
            self._carried.ended(run, msg)
        else:
            self._send_outcome(run.session, run.task_id, msg, 1)

    async def _dependency_results(self, ids: Sequence[str]) -> dict[str, Any]:
        stub = tasks_grpc.TaskServiceStub(self._conn.channel())
        out: dict[str, Any] = {}
        for i in ids:
            r = await rpc(stub.GetTask(tasks_pb.GetTaskRequest(task_id=i), metadata=self._conn.metadata()))
            out[i] = from_proto_value(r.task.result)
        return out
