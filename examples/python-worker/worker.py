#!/usr/bin/env python3
"""koo example worker: runs the seed's AI and PDF tasks outside koo, on the SDK.

A command-line program around `koo.Worker` (sdks/python): `--serve` picks the
handlers, each a `@worker.task` function:

  ai     koo.tasks.ai_service.process_query        args [provider, prompt],
         kwargs {model, max_tokens, temperature, system}: one chat completion
         from an OpenAI-compatible endpoint (--ai-base-url).
  pdf    koo.tasks.pdf_processing.process_document args [path, document_id],
         kwargs {page_delay_seconds}: extracts a PDF's text with pypdf, page by
         page, reporting progress after each page.
  noop   --noop-name (default koo.examples.noop): returns {"ok": true}, for
         throughput benchmarks.
  ledger koo.examples.ledger kwargs {ms}: only when KOO_LEDGER_FILE names a
         file; appends one JSON line per execution start (task id, attempt,
         lease token, pid, time) to it, sleeps ms (at most 10 s) and returns
         the same facts. The chaos suite's record of what ran, kept outside koo.

The worker's events (the SDK's `on_event` hook) go to stdout as JSON lines
(see README.md); logs go to stderr. Exit status: 0 after SIGTERM/SIGINT
(running tasks get --grace seconds to finish), 2 when koo refuses the worker
(UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) or the command line is
wrong.

    .venv/bin/python worker.py --target 127.0.0.1:50051 --serve ai,pdf
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TextIO

from koo import Fatal, Retry, TaskContext, Worker, WorkerEvent, WorkerRejected

log = logging.getLogger("worker")

AI_TASK = "koo.tasks.ai_service.process_query"
PDF_TASK = "koo.tasks.pdf_processing.process_document"
DEFAULT_NOOP_TASK = "koo.examples.noop"
LEDGER_TASK = "koo.examples.ledger"
LEDGER_ENV = "KOO_LEDGER_FILE"
MAX_LEDGER_MS = 10_000

MAX_PAGE_DELAY_SECONDS = 60.0
TEXT_PREVIEW_CHARS = 200

NO_AI_ENDPOINT = "no AI endpoint configured: set OPENAI_BASE_URL or --ai-base-url"


# --------------------------------------------------------------------------
# AI: koo.tasks.ai_service.process_query
# --------------------------------------------------------------------------


def make_ai_handler(
    base_url: str | None, api_key: str | None, default_model: str, timeout: float = 60.0
) -> Callable[..., dict[str, Any]]:
    """Returns a handler that answers a prompt with one chat completion.

    `base_url` is an OpenAI-compatible API root such as
    `http://127.0.0.1:8080/v1`; the handler POSTs to `{base_url}/chat/completions`.
    It takes any arguments (and checks them itself) so that a malformed task
    fails with a message about the task, not about a Python signature.
    """

    def process_query(*args: Any, ctx: TaskContext, **options: Any) -> dict[str, Any]:
        if not base_url:
            raise Fatal(NO_AI_ENDPOINT)
        if len(args) < 2 or not all(isinstance(a, str) for a in args[:2]):
            raise Fatal("expected args [provider, prompt] (two strings)")
        provider, prompt = args[0], args[1]
        # SubmitAiQuery stores its options as the kwargs; also accept them
        # nested under "options" (as a SubmitTask caller might send them).
        nested = options.pop("options", None)
        if isinstance(nested, dict):
            options.update(nested)

        model = options.get("model") or default_model
        messages = []
        if options.get("system"):
            messages.append({"role": "system", "content": str(options["system"])})
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": model, "messages": messages}
        for key in ("max_tokens", "temperature"):
            if options.get(key) is not None:
                body[key] = options[key]

        ctx.progress(10, f"calling {model}")
        response = _post_json(f"{base_url.rstrip('/')}/chat/completions", body, api_key, timeout)
        try:
            choice = response["choices"][0]
            answer = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            # A proxy or a half-broken server: another attempt may do better.
            raise Retry(
                "AI endpoint returned no choices[0].message.content",
                details={"response": str(response)[:1000]},
            ) from None
        ctx.progress(100, "done")
        return {
            "provider": provider,
            "model": response.get("model", model),
            "answer": answer,
            "usage": response.get("usage"),
            "finish_reason": choice.get("finish_reason"),
        }

    return process_query


def _post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> dict[str, Any]:
    """POSTs JSON and returns the decoded JSON answer. Unreachable, timeouts,
    429 and 5xx raise `Retry`; other 4xx raise `Fatal`."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
        detail = _error_message(exc.read() if exc.fp else b"") or exc.reason
        kind = Retry if status == 429 or status >= 500 else Fatal
        raise kind(f"AI endpoint returned HTTP {status}: {detail}", details={"status": status}) from None
    except urllib.error.URLError as exc:  # refused, DNS, TLS...
        raise Retry(f"AI endpoint unreachable: {exc.reason}") from None
    except OSError as exc:  # read timeout, reset
        raise Retry(f"AI endpoint request failed: {exc}") from None
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise Retry("AI endpoint returned invalid JSON") from None
    if not isinstance(decoded, dict):
        raise Retry("AI endpoint returned JSON that is not an object")
    return decoded


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}),
    else the start of the body."""
    try:
        message = json.loads(raw)["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return raw.decode("utf-8", errors="replace").strip()[:500]


# --------------------------------------------------------------------------
# PDF: koo.tasks.pdf_processing.process_document
# --------------------------------------------------------------------------


def process_document(*args: Any, ctx: TaskContext, **kwargs: Any) -> dict[str, Any]:
    """Extracts a PDF's text page by page.

    args: [path, document_id]; kwargs: page_delay_seconds (0 to 60, waits
    before each page, interruptibly: tests use it to catch the task mid-run).
    A cancel, revoke or soft time limit stops it before the next page.
    """
    # Imported here so workers that do not serve PDFs need no pypdf.
    import pypdf
    from pypdf.errors import PyPdfError

    if not args or not isinstance(args[0], str) or not args[0]:
        raise Fatal("expected args [path, document_id]")
    path = Path(args[0])
    document_id = args[1] if len(args) > 1 else path.stem

    delay = kwargs.get("page_delay_seconds", 0) or 0
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_PAGE_DELAY_SECONDS:
        raise Fatal(f"page_delay_seconds must be a number from 0 to {MAX_PAGE_DELAY_SECONDS:g}, not {delay!r}")
    if not path.is_file():
        raise Fatal(f"document {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            raise Fatal(f"document {path} is encrypted")
        pages = len(reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        raise Fatal(f"document {path} is not a readable PDF: {exc}") from None
    except OSError as exc:  # permissions, I/O errors: maybe transient
        raise Retry(f"cannot read document {path}: {exc}") from None

    chars = 0
    preview = ""
    for i in range(1, pages + 1):
        if (delay and ctx.cancelled.wait(delay)) or ctx.cancelled.is_set():
            raise Fatal(f"stopped at page {i} of {pages}: {ctx.cancel_reason}")
        try:
            text = reader.pages[i - 1].extract_text() or ""
        except Exception as exc:  # pypdf raises many kinds on broken pages
            raise Fatal(f"page {i} of {path}: {exc}") from None
        chars += len(text)
        if len(preview) < TEXT_PREVIEW_CHARS:
            preview += ("\n" if preview else "") + text
        ctx.progress(100.0 * i / pages, f"page {i} of {pages}", {"page": i, "pages": pages, "chars": chars})

    return {
        "document_id": document_id,
        "pages": pages,
        "characters": chars,
        "text_preview": preview[:TEXT_PREVIEW_CHARS],
    }


# --------------------------------------------------------------------------
# noop, ledger
# --------------------------------------------------------------------------


async def noop(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Does nothing, for throughput benchmarks (a coroutine: no thread per task)."""
    return {"ok": True}


def make_ledger_handler(path: str) -> Callable[..., dict[str, Any]]:
    """Returns a handler that records each execution start in `path`.

    One os.write on an O_APPEND descriptor per line, so lines from several
    processes never interleave, and the line is on disk (in the page cache)
    before koo can hear of the execution.
    """

    def ledger(*args: Any, ctx: TaskContext, **kwargs: Any) -> dict[str, Any]:
        facts = {
            "task_id": ctx.task_id,
            "attempt": ctx.attempt,
            "token": ctx.lease_token,
            "pid": os.getpid(),
            "ms": int(time.time() * 1000),
        }
        line = (json.dumps(facts, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        ms = kwargs.get("ms", 0) or 0
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            ms = 0
        if ctx.cancelled.wait(min(max(float(ms), 0.0), MAX_LEDGER_MS) / 1000.0):
            raise Retry(f"stopped: {ctx.cancel_reason}")
        return facts

    return ledger


# --------------------------------------------------------------------------
# Events: the SDK's hook, printed as JSON lines
# --------------------------------------------------------------------------


class EventLines:
    """Prints the worker's events as the JSON lines the tests and benchmarks
    read (one object per line, flushed). The SDK's kinds keep their names,
    except koo's answers to outcomes: `accepted` prints as `completed` or
    `failed`, `refused` as `aborted` (ABORTED: the lease lapsed) or
    `reply_error`; `reported` and those say `kind` for the SDK's `outcome`.
    With `quiet_names`, tasks of those names print nothing but errors."""

    def __init__(self, quiet_names: Collection[str] = (), out: TextIO | None = None) -> None:
        self.quiet_names = set(quiet_names)
        self.quiet_ids: set[str] = set()
        self.out = out if out is not None else sys.stdout

    def __call__(self, ev: WorkerEvent) -> None:
        f = dict(ev.fields)
        name: str = ev.kind
        if ev.kind == "task" and f["name"] in self.quiet_names:
            self.quiet_ids.add(ev.task_id)
        quiet = ev.task_id in self.quiet_ids
        if ev.kind in ("reported", "accepted", "refused"):
            f["kind"] = f.pop("outcome")
        if ev.kind == "reported":
            f = {"kind": f["kind"]}
        elif ev.kind == "accepted":
            name = "completed" if f.pop("kind") == "complete" else "failed"
        elif ev.kind == "refused":
            name = "aborted" if f["code"] == 10 else "reply_error"
            if name == "aborted":
                del f["code"]
        elif ev.kind == "progress":
            f = {"percent": f["percent"]}
        if ev.kind in ("accepted", "refused", "revoked"):
            self.quiet_ids.discard(ev.task_id)
        if quiet and name in ("task", "progress", "reported", "completed", "failed"):
            return
        line = {"event": name, **({"task_id": ev.task_id} if ev.task_id else {}), **f}
        self.out.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
        self.out.flush()


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

SERVABLE = ("ai", "pdf", "noop", "ledger")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="koo example worker (Python): serves the seed's AI and PDF tasks.")
    p.add_argument(
        "--target",
        default=env("KOO_TARGET") or env("KOO_ADDR") or "127.0.0.1:50051",
        help="koo's gRPC address (env KOO_TARGET, or KOO_ADDR; default %(default)s)",
    )
    p.add_argument(
        "--name",
        default=f"python-worker@{socket.gethostname()}-{os.getpid()}",
        help="worker name shown by koo (default %(default)s)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="tasks run at once, 1 to 1024 (default 4)")
    p.add_argument(
        "--token",
        default=env("KOO_WORKER_TOKEN") or None,
        help="koo's worker token or worker API key (env KOO_WORKER_TOKEN)",
    )
    p.add_argument(
        "--queues",
        type=_comma_list,
        default=[],
        help="comma-separated queues to take tasks from (default: every category queue)",
    )
    p.add_argument(
        "--serve",
        type=_comma_list,
        default=["ai", "pdf"],
        help=f"comma-separated handlers to run, from {','.join(SERVABLE)} (default ai,pdf)",
    )
    p.add_argument("--noop-name", default=DEFAULT_NOOP_TASK, help="task name of the noop handler (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no per-task events for noop tasks (for benchmarks)")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="on SIGTERM/SIGINT, seconds running tasks get to finish before they are handed back (default %(default)s)",
    )
    p.add_argument(
        "--ai-base-url",
        default=env("OPENAI_BASE_URL") or None,
        help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1 (env OPENAI_BASE_URL)",
    )
    p.add_argument("--ai-api-key", default=env("OPENAI_API_KEY") or None, help="API key (env OPENAI_API_KEY)")
    p.add_argument(
        "--ai-model",
        default=env("KOO_AI_MODEL") or "gpt-4o-mini",
        help="model when the task names none (env KOO_AI_MODEL; default %(default)s)",
    )
    p.add_argument(
        "--ai-timeout", type=float, default=60.0, help="seconds to wait for the AI endpoint (default %(default)s)"
    )
    p.add_argument("--log-level", default="INFO", help="stderr log level (default %(default)s)")
    args = p.parse_args(argv)

    unknown = [s for s in args.serve if s not in SERVABLE]
    if unknown or not args.serve:
        p.error(f"--serve takes a comma list from {','.join(SERVABLE)}, got {args.serve!r}")
    if "ledger" in args.serve and not os.environ.get(LEDGER_ENV):
        p.error(f"--serve ledger needs {LEDGER_ENV} (the file to append to)")
    if not 1 <= args.concurrency <= 1024:
        p.error("--concurrency must be 1 to 1024")
    if args.ai_timeout <= 0:
        p.error("--ai-timeout must be positive")
    if args.grace < 0:
        p.error("--grace must not be negative")
    return args


def build_worker(args: argparse.Namespace) -> Worker:
    """The SDK worker with the handlers `--serve` names, printing events."""
    worker = Worker(
        args.target,
        token=args.token,
        concurrency=args.concurrency,
        queues=args.queues,
        name=args.name,
        grace=args.grace,
        on_event=EventLines({args.noop_name} if args.quiet else set()),
    )
    if "ai" in args.serve:
        worker.task(AI_TASK)(make_ai_handler(args.ai_base_url, args.ai_api_key, args.ai_model, args.ai_timeout))
    if "pdf" in args.serve:
        worker.task(PDF_TASK)(process_document)
    if "noop" in args.serve:
        worker.task(args.noop_name)(noop)
    if "ledger" in args.serve:
        worker.task(LEDGER_TASK)(make_ledger_handler(os.environ[LEDGER_ENV]))
    return worker


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if "ai" in args.serve and not args.ai_base_url:
        log.warning("%s (AI tasks will fail)", NO_AI_ENDPOINT)
    worker = build_worker(args)
    log.info("serving %s on %s as %s", ", ".join(sorted(worker.handlers)), args.target, args.name)
    try:
        worker.run()  # SIGTERM/SIGINT: stop taking tasks, finish within the grace
    except WorkerRejected as exc:
        hint = ""
        if str(exc).startswith("UNAUTHENTICATED"):
            hint = " (check --token / KOO_WORKER_TOKEN)"
        elif str(exc).startswith("PERMISSION_DENIED"):
            hint = " (the key's role or scope does not allow this: check --token, --queues, --serve)"
        print(f"worker.py: koo rejected the worker: {exc}{hint}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit now, without waiting for handler threads past the grace (a slow
    # HTTP call, say): the stream is closed, so koo has taken their tasks back.
    os._exit(code)
