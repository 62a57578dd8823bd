"""A small client library for koo's worker protocol (koo.worker.v1.WorkerService).

A `Worker` opens koo's bidirectional `Work` stream, says which task names it
serves, and runs the tasks koo pushes on a thread pool, one handler call per
task:

    def add(ctx: TaskContext):
        a, b = ctx.args
        ctx.progress(50, "adding")
        return {"sum": a + b}

    Worker("127.0.0.1:50051", "adder", {"my.tasks.add": add}).run()

The protocol, as this module implements it:

* The worker sends `hello {name, task_names, queues, concurrency}`; koo answers
  `welcome {worker_id, lease, heartbeat_interval}`.
* koo pushes `task {task, lease_token, lease_secret}`, never more held at once
  than the declared concurrency. Every report on a task quotes its lease token
  (a fencing token: a report on a lapsed lease is refused with ABORTED) and
  echoes its lease secret (the proof that the report comes from the lease's
  holder; koo needs it only when the report does not come on the stream that
  holds the task, but echoing it always costs nothing).
* The worker sends `heartbeat {}` every `heartbeat_interval`; one heartbeat
  extends every lease held on the stream.
* The worker sends `progress`, then `complete {result}` or
  `fail {message, retryable, details}`; koo answers each complete/fail (and a
  progress only when refused) with `reply {task_id, kind, code, state}`.
* koo may push `cancel` (stop and send `fail`: the task ends CANCELLED),
  `soft_time_limit` (stop soon) and `revoked` (stop and report nothing).
* When the stream ends, every lease on it ends with it. The worker reconnects
  with capped exponential backoff; tasks still running from the old stream are
  abandoned (their lease tokens are dead, so their outcomes are dropped).

Everything significant is written as one JSON object per line to the event
sink (stdout by default); logs for people go through `logging` (stderr).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import grpc
from google.protobuf import json_format, struct_pb2

# The generated stubs import each other as `koo.<pkg>.v1.<file>_pb2`, so the
# directory generate.sh writes them to must be on sys.path.
_GEN_DIR = Path(__file__).resolve().parent / "gen"
if str(_GEN_DIR) not in sys.path:
    sys.path.insert(0, str(_GEN_DIR))

try:
    from koo.tasks.v1 import task_service_pb2 as tasks_pb2  # noqa: E402
    from koo.worker.v1 import worker_service_pb2 as worker_pb2  # noqa: E402
    from koo.worker.v1 import worker_service_pb2_grpc as worker_grpc  # noqa: E402
except ImportError as exc:  # pragma: no cover - setup problem, not a bug
    raise ImportError(
        f"koo's generated stubs are missing from {_GEN_DIR}: run ./setup.sh "
        f"(or ./generate.sh) first ({exc})"
    ) from exc

__all__ = [
    "ConnectRejected",
    "Handler",
    "JsonLinesSink",
    "TaskContext",
    "TaskFailed",
    "Worker",
    "tasks_pb2",
    "worker_pb2",
    "worker_grpc",
    "value_to_python",
    "python_to_value",
    "python_to_struct",
]

log = logging.getLogger("koo_worker")

# google.rpc.Code values koo uses in replies.
CODE_OK = 0
CODE_INVALID_ARGUMENT = 3
CODE_ABORTED = 10
CODE_UNAVAILABLE = 14

# Reconnect backoff: 0.2 s, doubling, capped at 5 s; reset after a welcome.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0

# Limits from the proto, enforced here so a long message never gets a report
# refused.
MAX_PROGRESS_MESSAGE_BYTES = 1024
MAX_FAIL_MESSAGE_BYTES = 4096

# How often a complete/fail refused with UNAVAILABLE ("try again") is re-sent.
MAX_OUTCOME_RESENDS = 5

_REPLY_KIND = {
    worker_pb2.REPLY_KIND_PROGRESS: "progress",
    worker_pb2.REPLY_KIND_COMPLETE: "complete",
    worker_pb2.REPLY_KIND_FAIL: "fail",
}


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class TaskFailed(Exception):
    """Raised by a handler to fail its task with a chosen message.

    `retryable` says whether another attempt may succeed (koo retries after a
    backoff while retries remain); `details` is a JSON object kept with the
    error.
    """

    def __init__(
        self,
        message: str,
        retryable: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.details = dict(details) if details else None


class ConnectRejected(Exception):
    """koo refused the session for good (UNAUTHENTICATED, PERMISSION_DENIED
    or INVALID_ARGUMENT).

    Retrying cannot help: the token, its role or scope, or the hello is wrong.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# --------------------------------------------------------------------------
# protobuf <-> plain Python
# --------------------------------------------------------------------------


def value_to_python(value: struct_pb2.Value) -> Any:
    """Converts a google.protobuf.Value to plain Python (dict/list/str/...).

    JSON numbers travel as doubles; integral ones come back as `int` (so an
    argument submitted as 3 is 3, not 3.0).
    """
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        n = value.number_value
        if n.is_integer() and abs(n) <= 2**53:
            return int(n)
        return n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [value_to_python(v) for v in value.list_value.values]
    return None  # null_value, or unset


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Converts a google.protobuf.Struct to a dict."""
    return {k: value_to_python(v) for k, v in struct.fields.items()}


def _normalise_json(obj: Any, what: str) -> Any:
    """Round-trips `obj` through JSON: tuples become lists, and anything that
    is not JSON (sets, objects, NaN, infinities) raises ValueError."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from exc


def python_to_value(obj: Any) -> struct_pb2.Value:
    """Converts a JSON-able Python value to a google.protobuf.Value."""
    return json_format.ParseDict(_normalise_json(obj, "result"), struct_pb2.Value())


def python_to_struct(obj: Mapping[str, Any], what: str = "object") -> struct_pb2.Struct:
    """Converts a JSON-able dict to a google.protobuf.Struct."""
    plain = _normalise_json(obj, what)
    if not isinstance(plain, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(obj).__name__}")
    return json_format.ParseDict(plain, struct_pb2.Struct())


def _truncate_utf8(text: str, limit: int) -> str:
    """Cuts `text` to at most `limit` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


class JsonLinesSink:
    """Writes each event as one JSON object per line, flushed at once.

    Thread-safe: handler threads and the stream thread share it.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), default=str)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                # The reader went away (or stdout was closed at exit): events
                # are best effort, the worker keeps running.
                pass


EventSink = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------
# Task context
# --------------------------------------------------------------------------


class TaskContext:
    """What a handler gets: the task's arguments and ways to talk to koo.

    Attributes:
        task_id, name: the task.
        args: positional arguments as plain Python (list).
        kwargs: keyword arguments as plain Python (dict).
        attempt: this attempt's number, 1-based.
        task: the raw koo.tasks.v1.Task message (time limits, queue...).
        cancelled: set when koo cancels or revokes the task, or when the
            worker loses the stream or shuts down: stop as soon as you can.
        soft_limit: set when the task passes its soft time limit.
    """

    def __init__(self, run: "_TaskRun", task: tasks_pb2.Task, lease_token: int) -> None:
        self._run = run
        self.task = task
        self.task_id: str = task.id
        self.name: str = task.name
        self.lease_token: int = lease_token
        self.attempt: int = task.attempts
        self.args: list[Any] = [value_to_python(v) for v in task.args]
        self.kwargs: dict[str, Any] = struct_to_python(task.kwargs)
        self.cancelled = threading.Event()
        self.soft_limit = threading.Event()
        # Set together with either of the two above, so sleep() can wait on
        # one event.
        self._stop = threading.Event()
        self._stop_reason: str | None = None

    def progress(
        self,
        percent: float,
        message: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Reports progress (0 to 100) to koo; visible in GetTask/WatchTask.

        Does nothing once the task was stopped by koo or the stream is gone.
        """
        self._run.report_progress(percent, message, metadata)

    def should_stop(self) -> bool:
        """True once the task was cancelled, revoked, abandoned, or passed its
        soft time limit."""
        return self._stop.is_set()

    @property
    def stop_reason(self) -> str | None:
        """Why should_stop() is true (e.g. "cancelled"), or None."""
        return self._stop_reason

    def sleep(self, seconds: float) -> bool:
        """Sleeps up to `seconds`, returning early when should_stop().

        Returns True when it slept the whole time, False when interrupted.
        """
        if seconds <= 0:
            return not self._stop.is_set()
        return not self._stop.wait(seconds)

    # Called by the worker (stream thread).
    def _signal(self, reason: str, soft: bool = False) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        (self.soft_limit if soft else self.cancelled).set()
        self._stop.set()


Handler = Callable[[TaskContext], Any]


# --------------------------------------------------------------------------
# Internals: one session (stream) and one task run
# --------------------------------------------------------------------------

_CLOSE = object()  # ends a session's request iterator


class _Outcome:
    """A complete or fail sent to koo and not yet answered."""

    __slots__ = ("msg", "sends", "quiet")

    def __init__(self, msg: worker_pb2.WorkRequest, sends: int, quiet: bool) -> None:
        self.msg = msg
        self.sends = sends  # how many times it was sent
        self.quiet = quiet  # no completed/failed event for it


class _TaskRun:
    """One task held on one session."""

    def __init__(self, worker: "Worker", session: "_Session", assignment: Any) -> None:
        self.worker = worker
        self.session = session
        self.task_id: str = assignment.task.id
        self.lease_token: int = assignment.lease_token
        self.lease_secret: str = assignment.lease_secret
        self.quiet = assignment.task.name in worker._quiet_names
        self.cancel_requested = False  # koo sent `cancel`: report `fail`
        self.ctx = TaskContext(self, assignment.task, assignment.lease_token)

    def report_progress(
        self, percent: float, message: str, metadata: Mapping[str, Any] | None
    ) -> None:
        if not self.session.holds(self):
            return  # revoked, finished, or the stream is gone
        try:
            pct = float(percent)
        except (TypeError, ValueError):
            raise ValueError(f"progress percent must be a number, not {percent!r}") from None
        if math.isnan(pct):
            raise ValueError("progress percent must be a number, not NaN")
        pct = min(100.0, max(0.0, pct))
        msg = worker_pb2.Progress(
            task_id=self.task_id,
            lease_token=self.lease_token,
            lease_secret=self.lease_secret,
            percent=pct,
            message=_truncate_utf8(str(message), MAX_PROGRESS_MESSAGE_BYTES),
        )
        if metadata:
            msg.metadata.CopyFrom(python_to_struct(metadata, "progress metadata"))
        if self.session.send(worker_pb2.WorkRequest(progress=msg)) and not self.quiet:
            self.worker._emit({"event": "progress", "task_id": self.task_id, "percent": pct})


class _Session:
    """One Work stream: its outbound queue and the tasks held on it."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.outbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.held: dict[str, _TaskRun] = {}
        # Outcomes sent and not yet answered.
        self.unacked: dict[str, _Outcome] = {}
        self.worker_id = ""
        self.executor = ThreadPoolExecutor(
            max_workers=worker.concurrency, thread_name_prefix="koo-task"
        )

    def requests(self, hello: worker_pb2.WorkRequest) -> Iterator[worker_pb2.WorkRequest]:
        """The request iterator gRPC reads from: hello, then the outbox."""
        yield hello
        while True:
            item = self.outbox.get()
            if item is _CLOSE:
                return
            yield item

    def send(self, msg: worker_pb2.WorkRequest) -> bool:
        """Queues a message for koo; False (and dropped) once closed."""
        if self.closed.is_set():
            return False
        self.outbox.put(msg)
        return True

    def holds(self, run: _TaskRun) -> bool:
        with self.lock:
            return self.held.get(run.task_id) is run

    def close(self, reason: str) -> list[_TaskRun]:
        """Ends the session: stops the request iterator and the heartbeats,
        tells every running handler to stop, and returns the abandoned runs."""
        self.closed.set()
        self.outbox.put(_CLOSE)
        with self.lock:
            abandoned = list(self.held.values())
            self.held.clear()
            self.unacked.clear()
        for run in abandoned:
            run.ctx._signal(reason)
        # Handlers still running finish in the background; their outcomes are
        # dropped (their leases died with the stream).
        self.executor.shutdown(wait=False, cancel_futures=True)
        return abandoned


# --------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------


class Worker:
    """Runs koo tasks over a WorkerService.Work stream.

    Args:
        target: koo's gRPC address, e.g. "127.0.0.1:50051".
        name: a name for people (1 to 128 bytes); koo adds a unique suffix.
        handlers: task name -> handler. A handler takes a TaskContext and
            returns a JSON-able result (the task SUCCEEDS), raises TaskFailed
            (the task fails with that message), or raises anything else (a
            retryable failure with the exception's text).
        queues: queues to take the handlers' tasks from; empty means every
            category queue.
        concurrency: tasks held (and run) at once, 1 to 1024.
        token: koo's worker token (sent as `authorization: Bearer <token>`).
        events: where JSON-lines events go; default stdout.
        quiet_names: task names whose per-task events (task, progress,
            completed, failed) are not emitted, for benchmarks. Errors still
            are.
        channel: an existing gRPC channel to use instead of opening one.
    """

    def __init__(
        self,
        target: str,
        name: str,
        handlers: Mapping[str, Handler],
        queues: Iterable[str] = (),
        concurrency: int = 4,
        token: str | None = None,
        events: EventSink | None = None,
        quiet_names: Iterable[str] = (),
        channel: grpc.Channel | None = None,
    ) -> None:
        if not handlers:
            raise ValueError("a worker needs at least one handler")
        if not 1 <= concurrency <= 1024:
            raise ValueError(f"concurrency must be 1 to 1024, not {concurrency}")
        if not 1 <= len(name.encode("utf-8")) <= 128:
            raise ValueError("name must be 1 to 128 bytes")
        self.target = target
        self.name = name
        self.handlers = dict(handlers)
        self.queues = [q for q in queues if q]
        self.concurrency = concurrency
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._emit_event: EventSink = events if events is not None else JsonLinesSink()
        self._quiet_names = frozenset(quiet_names)
        self._own_channel = channel is None
        self._channel = channel if channel is not None else grpc.insecure_channel(target)
        self._stub = worker_grpc.WorkerServiceStub(self._channel)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None  # the current Work call, to cancel on stop()

    # -- public -----------------------------------------------------------

    def run(self) -> None:
        """Connects and runs tasks until stop() is called.

        Reconnects (with backoff) whenever the stream ends. Raises
        ConnectRejected when koo refuses the session for good.
        """
        backoff = BACKOFF_INITIAL
        try:
            while not self._stopping.is_set():
                welcomed = self._run_session()
                if self._stopping.is_set():
                    break
                if welcomed:
                    backoff = BACKOFF_INITIAL
                log.info("reconnecting in %.1fs", backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if self._own_channel:
                self._channel.close()

    def stop(self) -> None:
        """Stops taking work and makes run() return soon. Thread-safe.

        Tasks in flight are abandoned: closing the stream ends their leases
        and koo puts them back in their queues.
        """
        self._stopping.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    # -- session loop -----------------------------------------------------

    def _run_session(self) -> bool:
        """Runs one Work stream to its end; returns whether it was
        welcomed."""
        session = _Session(self)
        hello = worker_pb2.WorkRequest(
            hello=worker_pb2.Hello(
                name=self.name,
                task_names=sorted(self.handlers),
                queues=self.queues,
                concurrency=self.concurrency,
            )
        )
        welcomed = False
        error: str
        call = self._stub.Work(session.requests(hello), metadata=self._metadata)
        with self._lock:
            self._call = call
        if self._stopping.is_set():  # stop() raced with the connect
            call.cancel()
        try:
            for response in call:
                if response.HasField("welcome"):
                    welcomed = True
                self._dispatch(session, response)
            error = "stream closed by koo"
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                self._end_session(session, f"{code.name}: {exc.details()}")
                raise ConnectRejected(code, exc.details() or "") from None
            error = f"{code.name}: {exc.details()}"
        finally:
            with self._lock:
                self._call = None
        if self._stopping.is_set():
            self._end_session(session, "worker stopping")
            return welcomed
        self._emit({"event": "disconnected", "error": error})
        log.warning("stream ended: %s", error)
        self._end_session(session, "stream lost")
        return welcomed

    def _end_session(self, session: _Session, reason: str) -> None:
        abandoned = session.close(reason)
        for run in abandoned:
            log.warning(
                "abandoning task %s (%s): its lease ended with the stream (%s)",
                run.task_id,
                run.ctx.name,
                reason,
            )

    # -- messages from koo -------------------------------------------------

    def _dispatch(self, session: _Session, response: worker_pb2.WorkResponse) -> None:
        kind = response.WhichOneof("message")
        if kind == "task":
            self._on_task(session, response.task)
        elif kind == "reply":
            self._on_reply(session, response.reply)
        elif kind == "welcome":
            self._on_welcome(session, response.welcome)
        elif kind == "cancel":
            self._on_cancel(session, response.cancel)
        elif kind == "soft_time_limit":
            self._on_soft_time_limit(session, response.soft_time_limit)
        elif kind == "revoked":
            self._on_revoked(session, response.revoked)
        else:  # a newer koo: ignore what we do not know
            log.debug("ignoring unknown message %r", kind)

    def _on_welcome(self, session: _Session, welcome: worker_pb2.Welcome) -> None:
        session.worker_id = welcome.worker_id
        lease = welcome.lease.ToTimedelta().total_seconds()
        interval = welcome.heartbeat_interval.ToTimedelta().total_seconds()
        if interval <= 0:  # be defensive: a third of the lease, or 10 s
            interval = lease / 3 if lease > 0 else 10.0
        self._emit(
            {
                "event": "welcome",
                "worker_id": welcome.worker_id,
                "lease_seconds": lease,
                "heartbeat_seconds": interval,
            }
        )
        log.info("connected to %s as %s (heartbeat every %.1fs)", self.target, welcome.worker_id, interval)
        threading.Thread(
            target=self._heartbeats,
            args=(session, interval),
            name="koo-heartbeat",
            daemon=True,
        ).start()

    @staticmethod
    def _heartbeats(session: _Session, interval: float) -> None:
        beat = worker_pb2.WorkRequest(heartbeat=worker_pb2.Heartbeat())
        while not session.closed.wait(interval):
            session.send(beat)

    def _on_task(self, session: _Session, assignment: worker_pb2.TaskAssignment) -> None:
        run = _TaskRun(self, session, assignment)
        with session.lock:
            previous = session.held.get(run.task_id)
            session.held[run.task_id] = run
            held = len(session.held)
        if previous is not None:
            # koo re-leased a task we still run: the old lease lapsed, so the
            # old run's outcome must not be reported.
            previous.ctx._signal("lease lapsed")
            log.warning("task %s pushed again; dropping the earlier run", run.task_id)
        if not run.quiet:
            self._emit(
                {
                    "event": "task",
                    "task_id": run.task_id,
                    "name": run.ctx.name,
                    "attempt": run.ctx.attempt,
                    "held": held,
                }
            )
        try:
            session.executor.submit(self._execute, run)
        except RuntimeError:  # executor shut down: the session is closing
            pass

    def _on_cancel(self, session: _Session, cancel: worker_pb2.CancelRequested) -> None:
        self._emit({"event": "cancel", "task_id": cancel.task_id, "reason": cancel.reason})
        with session.lock:
            run = session.held.get(cancel.task_id)
        if run is not None:
            run.cancel_requested = True
            run.ctx._signal("cancelled")

    def _on_soft_time_limit(self, session: _Session, msg: worker_pb2.SoftTimeLimitReached) -> None:
        self._emit({"event": "soft_time_limit", "task_id": msg.task_id})
        with session.lock:
            run = session.held.get(msg.task_id)
        if run is not None:
            run.ctx._signal("soft time limit reached", soft=True)

    def _on_revoked(self, session: _Session, msg: worker_pb2.LeaseRevoked) -> None:
        with session.lock:
            run = session.held.pop(msg.task_id, None)
            session.unacked.pop(msg.task_id, None)
            held = len(session.held)
        self._emit({"event": "revoked", "task_id": msg.task_id, "reason": msg.reason, "held": held})
        if run is not None:
            run.ctx._signal("revoked")

    def _on_reply(self, session: _Session, reply: worker_pb2.Reply) -> None:
        kind = _REPLY_KIND.get(reply.kind, "unknown")
        with session.lock:
            held = len(session.held)
            run = session.held.get(reply.task_id)
            sent = session.unacked.pop(reply.task_id, None) if kind != "progress" else None

        if reply.code == CODE_OK:
            if kind in ("complete", "fail") and not (sent is not None and sent.quiet):
                self._emit(
                    {
                        "event": "completed" if kind == "complete" else "failed",
                        "task_id": reply.task_id,
                        "state": tasks_pb2.TaskState.Name(reply.state),
                        "held": held,
                    }
                )
            return

        if reply.code == CODE_ABORTED:
            # The lease lapsed: the task is someone else's now.
            if kind == "progress" and run is not None:
                with session.lock:
                    if session.held.get(reply.task_id) is run:
                        del session.held[reply.task_id]
                    held = len(session.held)
                run.ctx._signal("lease lapsed")
            self._emit(
                {
                    "event": "aborted",
                    "task_id": reply.task_id,
                    "kind": kind,
                    "message": reply.message,
                    "held": held,
                }
            )
            log.warning("koo refused %s of task %s: %s", kind, reply.task_id, reply.message)
            return

        self._emit(
            {
                "event": "reply_error",
                "task_id": reply.task_id,
                "kind": kind,
                "code": reply.code,
                "message": reply.message,
            }
        )
        log.warning(
            "koo refused %s of task %s (code %d): %s", kind, reply.task_id, reply.code, reply.message
        )
        if sent is not None:
            self._recover_outcome(session, reply, sent)

    def _recover_outcome(
        self,
        session: _Session,
        reply: worker_pb2.Reply,
        sent: _Outcome,
    ) -> None:
        """A complete/fail was refused: make sure the task still ends.

        koo keeps extending a refused task's lease with every heartbeat, so
        giving up would leave it held forever.
        """
        msg = sent.msg
        if reply.code == CODE_UNAVAILABLE and sent.sends < MAX_OUTCOME_RESENDS:
            # "Try again": re-send the same outcome after a short pause.
            delay = min(BACKOFF_INITIAL * 2**sent.sends, BACKOFF_MAX)
            retry = _Outcome(msg, sent.sends + 1, sent.quiet)
            timer = threading.Timer(delay, self._send_outcome, args=(session, reply.task_id, retry))
            timer.daemon = True
            timer.start()
            return
        if msg.HasField("complete") or (msg.HasField("fail") and msg.fail.HasField("details")):
            # The result (or the details) was refused, e.g. too large: fail
            # the task with the reason, without the payload.
            what = "result" if msg.HasField("complete") else "failure details"
            held = msg.complete if msg.HasField("complete") else msg.fail
            fallback = worker_pb2.WorkRequest(
                fail=worker_pb2.Fail(
                    task_id=reply.task_id,
                    lease_token=held.lease_token,
                    lease_secret=held.lease_secret,
                    message=_truncate_utf8(
                        f"koo refused the {what}: {reply.message or f'code {reply.code}'}",
                        MAX_FAIL_MESSAGE_BYTES,
                    ),
                    retryable=False,
                )
            )
            self._send_outcome(session, reply.task_id, _Outcome(fallback, 1, sent.quiet))
        else:
            log.error("giving up reporting task %s", reply.task_id)

    @staticmethod
    def _send_outcome(session: _Session, task_id: str, outcome: _Outcome) -> None:
        with session.lock:
            session.unacked[task_id] = outcome
        session.send(outcome.msg)

    # -- running a task (handler threads) ----------------------------------

    def _execute(self, run: _TaskRun) -> None:
        ctx = run.ctx
        handler = self.handlers.get(ctx.name)
        result: Any = None
        failure: TaskFailed | None = None
        try:
            if handler is None:
                raise TaskFailed(f"this worker has no handler for {ctx.name!r}", retryable=False)
            result = handler(ctx)
        except TaskFailed as exc:
            failure = exc
        except Exception as exc:  # any other error: retryable, with its text
            if not ctx.should_stop():
                log.exception("task %s (%s) raised", ctx.task_id, ctx.name)
            failure = TaskFailed(f"{type(exc).__name__}: {exc}", retryable=True)
        self._finish(run, result, failure)

    def _finish(self, run: _TaskRun, result: Any, failure: TaskFailed | None) -> None:
        session = run.session
        with session.lock:
            if session.held.get(run.task_id) is not run:
                # Revoked, re-leased, or the stream is gone: report nothing.
                reason = run.ctx.stop_reason or "no longer held"
                drop = True
            else:
                del session.held[run.task_id]
                drop = False
        if drop:
            log.info("dropping the outcome of task %s (%s)", run.task_id, reason)
            return

        if run.cancel_requested:
            failure = TaskFailed("cancelled", retryable=False)
        if failure is None:
            try:
                value = python_to_value(result)
            except ValueError as exc:
                failure = TaskFailed(str(exc), retryable=False)
            else:
                msg = worker_pb2.WorkRequest(
                    complete=worker_pb2.Complete(
                        task_id=run.task_id,
                        lease_token=run.lease_token,
                        lease_secret=run.lease_secret,
                        result=value,
                    )
                )
        if failure is not None:
            fail = worker_pb2.Fail(
                task_id=run.task_id,
                lease_token=run.lease_token,
                lease_secret=run.lease_secret,
                message=_truncate_utf8(failure.message or "task failed", MAX_FAIL_MESSAGE_BYTES),
                retryable=failure.retryable,
            )
            if failure.details:
                try:
                    fail.details.CopyFrom(python_to_struct(failure.details, "failure details"))
                except ValueError as exc:
                    log.warning("task %s: dropping failure details: %s", run.task_id, exc)
            msg = worker_pb2.WorkRequest(fail=fail)
            if not run.quiet:
                log.info("task %s failed: %s", run.task_id, fail.message)
        if not run.quiet:
            kind = "complete" if msg.HasField("complete") else "fail"
            self._emit({"event": "reported", "task_id": run.task_id, "kind": kind})
        self._send_outcome(session, run.task_id, _Outcome(msg, 1, run.quiet))

    # -- events -----------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self._emit_event(event)
        except Exception:  # a broken sink must not break the worker
            log.exception("event sink failed")

