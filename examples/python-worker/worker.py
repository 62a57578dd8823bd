#!/usr/bin/env python3
"""koo example worker: runs the seed's AI and PDF tasks outside koo.

Connects to koo's WorkerService and serves, depending on --serve:

  ai    koo.tasks.ai_service.process_query       args [provider, prompt],
        kwargs {model, max_tokens, temperature, system}: one chat completion
        from an OpenAI-compatible endpoint (--ai-base-url).
  pdf   koo.tasks.pdf_processing.process_document args [path, document_id],
        kwargs {page_delay_seconds}: extracts a PDF's text with pypdf, page by
        page, reporting progress after each page.
  noop  --noop-name (default koo.examples.noop): returns {"ok": true}, for
        throughput benchmarks.
  ledger koo.examples.ledger kwargs {ms}: only when KOO_LEDGER_FILE names a
        file; appends one JSON line per execution start (task id, attempt,
        lease token, pid, time) to it, sleeps ms (at most 10 s) and returns
        the same facts. The chaos suite's record of what ran, kept outside
        koo.

Events go to stdout as JSON lines (see README.md); logs go to stderr.
Exit status: 0 after SIGTERM/SIGINT, 2 when koo rejects the worker
(UNAUTHENTICATED, INVALID_ARGUMENT) or the command line is wrong.

    .venv/bin/python worker.py --target 127.0.0.1:50051 --serve ai,pdf
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from koo_worker import ConnectRejected, TaskContext, TaskFailed, Worker

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
    base_url: str | None,
    api_key: str | None,
    default_model: str,
    timeout: float = 60.0,
) -> Callable[[TaskContext], dict[str, Any]]:
    """Returns a handler that answers a prompt with one chat completion.

    `base_url` is an OpenAI-compatible API root such as
    `http://127.0.0.1:8080/v1`; the handler POSTs to `{base_url}/chat/completions`.
    """

    def process_query(ctx: TaskContext) -> dict[str, Any]:
        if not base_url:
            raise TaskFailed(NO_AI_ENDPOINT, retryable=False)
        if len(ctx.args) < 2 or not all(isinstance(a, str) for a in ctx.args[:2]):
            raise TaskFailed("expected args [provider, prompt] (two strings)", retryable=False)
        provider, prompt = ctx.args[0], ctx.args[1]
        # SubmitAiQuery stores its options as the kwargs; also accept them
        # nested under "options" (as a SubmitTask caller might send them).
        options = dict(ctx.kwargs)
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
            raise TaskFailed(
                "AI endpoint returned no choices[0].message.content",
                retryable=True,
                details={"response": str(response)[:1000]},
            ) from None
        result = {
            "provider": provider,
            "model": response.get("model", model),
            "answer": answer,
            "usage": response.get("usage"),
            "finish_reason": choice.get("finish_reason"),
        }
        ctx.progress(100, "done")
        return result

    return process_query


def _post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> dict[str, Any]:
    """POSTs JSON and returns the decoded JSON answer, mapping errors to
    TaskFailed: unreachable, timeouts, 429 and 5xx are retryable; other
    4xx are not."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
        detail = _error_message(exc.read() if exc.fp else b"") or exc.reason
        retryable = status == 429 or status >= 500
        raise TaskFailed(
            f"AI endpoint returned HTTP {status}: {detail}",
            retryable=retryable,
            details={"status": status},
        ) from None
    except urllib.error.URLError as exc:  # refused, DNS, TLS...
        raise TaskFailed(f"AI endpoint unreachable: {exc.reason}", retryable=True) from None
    except (TimeoutError, ConnectionError, OSError) as exc:  # read timeout, reset
        raise TaskFailed(f"AI endpoint request failed: {exc}", retryable=True) from None
    try:
        decoded = json.loads(raw)
    except ValueError:
        raise TaskFailed("AI endpoint returned invalid JSON", retryable=True) from None
    if not isinstance(decoded, dict):
        raise TaskFailed("AI endpoint returned JSON that is not an object", retryable=True)
    return decoded


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}),
    else the start of the body."""
    try:
        decoded = json.loads(raw)
        message = decoded["error"]["message"]
        if isinstance(message, str) and message:
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return raw.decode("utf-8", errors="replace").strip()[:500]


# --------------------------------------------------------------------------
# PDF: koo.tasks.pdf_processing.process_document
# --------------------------------------------------------------------------


def process_document(ctx: TaskContext) -> dict[str, Any]:
    """Extracts a PDF's text page by page.

    args: [path, document_id]; kwargs: page_delay_seconds (0 to 60, sleeps
    before each page, interruptibly: tests use it to catch the task mid-run).
    """
    # Imported here so workers that do not serve PDFs need no pypdf.
    import pypdf
    from pypdf.errors import PyPdfError

    if not ctx.args or not isinstance(ctx.args[0], str) or not ctx.args[0]:
        raise TaskFailed("expected args [path, document_id]", retryable=False)
    path = Path(ctx.args[0])
    document_id = ctx.args[1] if len(ctx.args) > 1 else path.stem

    delay = ctx.kwargs.get("page_delay_seconds", 0) or 0
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (
        0 <= delay <= MAX_PAGE_DELAY_SECONDS
    ):
        raise TaskFailed(
            f"page_delay_seconds must be a number from 0 to {MAX_PAGE_DELAY_SECONDS:g}, not {delay!r}",
            retryable=False,
        )

    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise TaskFailed(f"document {path} {what}", retryable=False)
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            raise TaskFailed(f"document {path} is encrypted", retryable=False)
        pages = len(reader.pages)
    except TaskFailed:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        raise TaskFailed(f"document {path} is not a readable PDF: {exc}", retryable=False) from None
    except OSError as exc:  # permissions, I/O errors: maybe transient
        raise TaskFailed(f"cannot read document {path}: {exc}", retryable=True) from None

    chars = 0
    preview = ""
    for i in range(1, pages + 1):
        if delay:
            ctx.sleep(delay)
        if ctx.should_stop():
            raise TaskFailed(
                f"stopped at page {i} of {pages}: {ctx.stop_reason}", retryable=False
            )
        try:
            text = reader.pages[i - 1].extract_text() or ""
        except Exception as exc:  # pypdf raises many kinds on broken pages
            raise TaskFailed(f"page {i} of {path}: {exc}", retryable=False) from None
        chars += len(text)
        if len(preview) < TEXT_PREVIEW_CHARS:
            preview += ("\n" if preview else "") + text
        ctx.progress(
            100.0 * i / pages,
            f"page {i} of {pages}",
            {"page": i, "pages": pages, "chars": chars},
        )

    return {
        "document_id": document_id,
        "pages": pages,
        "characters": chars,
        "text_preview": preview[:TEXT_PREVIEW_CHARS],
    }


# --------------------------------------------------------------------------
# noop
# --------------------------------------------------------------------------


def noop(ctx: TaskContext) -> dict[str, Any]:
    """Does nothing, for throughput benchmarks."""
    return {"ok": True}


# --------------------------------------------------------------------------
# ledger (diagnostics for the chaos suite)
# --------------------------------------------------------------------------


def make_ledger_handler(path: str) -> Callable[[TaskContext], dict[str, Any]]:
    """Returns a handler that records each execution start in `path`.

    One os.write on an O_APPEND descriptor per line, so lines from several
    processes never interleave, and the line is on disk (in the page cache)
    before koo can hear of the execution.
    """

    def ledger(ctx: TaskContext) -> dict[str, Any]:
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
        ms = ctx.kwargs.get("ms", 0) or 0
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            ms = 0
        ctx.sleep(min(max(float(ms), 0.0), MAX_LEDGER_MS) / 1000.0)
        if ctx.should_stop():
            raise TaskFailed(f"stopped: {ctx.stop_reason}", retryable=True)
        return facts

    return ledger


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

SERVABLE = ("ai", "pdf", "noop", "ledger")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="koo example worker (Python): serves the seed's AI and PDF tasks.",
    )
    parser.add_argument(
        "--target",
        default=env("KOO_ADDR") or "127.0.0.1:50051",
        help="koo's gRPC address (env KOO_ADDR; default %(default)s)",
    )
    parser.add_argument(
        "--name",
        default=f"python-worker@{socket.gethostname()}-{os.getpid()}",
        help="worker name shown by koo (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="tasks run at once, 1 to 1024 (default 4)"
    )
    parser.add_argument(
        "--token",
        default=env("KOO_WORKER_TOKEN") or None,
        help="koo's worker token or worker API key (env KOO_WORKER_TOKEN)",
    )
    parser.add_argument(
        "--queues",
        type=_comma_list,
        default=[],
        help="comma-separated queues to take tasks from (default: every category queue)",
    )
    parser.add_argument(
        "--serve",
        type=_comma_list,
        default=["ai", "pdf"],
        help=f"comma-separated handlers to run, from {','.join(SERVABLE)} (default ai,pdf)",
    )
    parser.add_argument(
        "--noop-name",
        default=DEFAULT_NOOP_TASK,
        help="task name of the noop handler (default %(default)s)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no per-task events for noop tasks (for benchmarks)",
    )
    parser.add_argument(
        "--ai-base-url",
        default=env("OPENAI_BASE_URL") or None,
        help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1 (env OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--ai-api-key", default=env("OPENAI_API_KEY") or None, help="API key (env OPENAI_API_KEY)"
    )
    parser.add_argument(
        "--ai-model",
        default=env("KOO_AI_MODEL") or "gpt-4o-mini",
        help="model when the task names none (env KOO_AI_MODEL; default %(default)s)",
    )
    parser.add_argument(
        "--ai-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the AI endpoint (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="stderr log level (default %(default)s)"
    )
    args = parser.parse_args(argv)

    unknown = [s for s in args.serve if s not in SERVABLE]
    if unknown or not args.serve:
        parser.error(f"--serve takes a comma list from {','.join(SERVABLE)}, got {args.serve!r}")
    if "ledger" in args.serve and not os.environ.get(LEDGER_ENV):
        parser.error(f"--serve ledger needs {LEDGER_ENV} (the file to append to)")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be 1 to 1024")
    if args.ai_timeout <= 0:
        parser.error("--ai-timeout must be positive")
    return args


def build_handlers(args: argparse.Namespace) -> dict[str, Callable[[TaskContext], Any]]:
    handlers: dict[str, Callable[[TaskContext], Any]] = {}
    if "ai" in args.serve:
        handlers[AI_TASK] = make_ai_handler(
            args.ai_base_url, args.ai_api_key, args.ai_model, args.ai_timeout
        )
    if "pdf" in args.serve:
        handlers[PDF_TASK] = process_document
    if "noop" in args.serve:
        handlers[args.noop_name] = noop
    if "ledger" in args.serve:
        handlers[LEDGER_TASK] = make_ledger_handler(os.environ[LEDGER_ENV])
    return handlers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if "ai" in args.serve and not args.ai_base_url:
        log.warning("%s (AI tasks will fail)", NO_AI_ENDPOINT)

    try:
        worker = Worker(
            target=args.target,
            name=args.name,
            handlers=build_handlers(args),
            queues=args.queues,
            concurrency=args.concurrency,
            token=args.token,
            quiet_names=[args.noop_name] if args.quiet else [],
        )
    except ValueError as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        # stop() cancels the gRPC call; do it off the signal handler, which
        # runs inside whatever the main thread was doing.
        threading.Thread(target=worker.stop, name="koo-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log.info("serving %s on %s as %s", ", ".join(sorted(worker.handlers)), args.target, args.name)
    try:
        worker.run()
    except ConnectRejected as exc:
        hint = ""
        if exc.code.name == "UNAUTHENTICATED":
            hint = " (check --token / KOO_WORKER_TOKEN)"
        elif exc.code.name == "PERMISSION_DENIED":
            hint = " (the key's role or scope does not allow this: check --token, --queues, --serve)"
        print(f"worker.py: koo rejected the worker: {exc}{hint}", file=sys.stderr)
        return 2
    log.info("stopped")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit now, without joining handler threads still running abandoned
    # tasks (a slow HTTP call, say): their leases ended with the stream and
    # koo re-queues them.
    os._exit(code)
