#!/usr/bin/env python3
"""A tiny local stand-in for the OpenAI API, for tests (stdlib only).

    python3 fake_openai.py --port 0 [--api-key KEY] [--model NAME]

Binds 127.0.0.1 and prints `{"port": N}` as its first stdout line. Speaks:

  POST /v1/chat/completions  a chat.completion whose answer is
                             "echo: " + the last user message, the requested
                             model echoed, a `usage` block (tokens counted as
                             words), finish_reason "length" when max_tokens
                             cut the answer, else "stop".
  GET  /v1/models            one model.
  anything else              404 with an OpenAI-style error body.

Test hooks: a last user message of the form `!error NNN [message]` answers
HTTP NNN with an OpenAI-style error (e.g. `!error 503`, `!error 400 bad`);
`!sleep S` waits S seconds (at most 30) before answering normally.
With --api-key, requests without `Authorization: Bearer KEY` get 401.

In-process use (tests):

    server = FakeOpenAI.start(api_key=None)
    ... server.base_url ...   # "http://127.0.0.1:PORT/v1"
    server.stop()
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "gpt-4o-mini"
MAX_BODY_BYTES = 1 << 20

_ERROR_HOOK = re.compile(r"^!error\s+(\d{3})(?:\s+(.*))?$", re.S)
_SLEEP_HOOK = re.compile(r"^!sleep\s+([0-9.]+)\s*$")
_ids = itertools.count(1)


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _words(text: str) -> int:
    return len(text.split())


class _Handler(BaseHTTPRequestHandler):
    server: "FakeOpenAI"
    protocol_version = "HTTP/1.1"

    # -- plumbing -----------------------------------------------------------

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write("fake_openai: " + (fmt % args) + "\n")

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._send_json(
            HTTPStatus.NOT_FOUND,
            _error_body(
                f"Unknown request URL: {self.command} {self.path}.",
                "invalid_request_error",
                "unknown_url",
            ),
        )

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send_json(
            HTTPStatus.UNAUTHORIZED,
            _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
        )
        return False

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        return json.loads(self.rfile.read(length) or b"null")

    # -- routes -------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path != "/v1/models":
            return self._not_found()
        if not self._authorized():
            return
        self._send_json(
            HTTPStatus.OK,
            {
                "object": "list",
                "data": [
                    {"id": self.server.model, "object": "model", "created": 0, "owned_by": "koo-fake"}
                ],
            },
        )

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            # Drain the body so the connection stays usable.
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return self._not_found()
        if not self._authorized():
            return
        try:
            body = self._read_json()
        except ValueError as exc:
            return self._send_json(
                HTTPStatus.BAD_REQUEST,
                _error_body(f"We could not parse the JSON body of your request: {exc}",
                            "invalid_request_error", None),
            )
        self.server.record(body)
        problem = self._validate(body)
        if problem:
            return self._send_json(
                HTTPStatus.BAD_REQUEST, _error_body(problem, "invalid_request_error", None)
            )

        user = [m for m in body["messages"] if m.get("role") == "user"]
        prompt = str(user[-1].get("content", "")) if user else ""

        hook = _ERROR_HOOK.match(prompt.strip())
        if hook:
            status = int(hook.group(1))
            message = hook.group(2) or f"simulated error {status}"
            type_ = "server_error" if status >= 500 else "invalid_request_error"
            return self._send_json(status, _error_body(message, type_, None))
        sleep = _SLEEP_HOOK.match(prompt.strip())
        if sleep:
            time.sleep(min(float(sleep.group(1)), 30.0))

        words = f"echo: {prompt}".split(" ")
        finish_reason = "stop"
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words = words[:max_tokens]
            finish_reason = "length"
        answer = " ".join(words)
        prompt_tokens = sum(_words(str(m.get("content", ""))) for m in body["messages"])
        completion_tokens = _words(answer)
        self._send_json(
            HTTPStatus.OK,
            {
                "id": f"chatcmpl-fake-{next(_ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    @staticmethod
    def _validate(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "The request body must be a JSON object."
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array"
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return "each message must be an object with a 'role'"
        return None


class FakeOpenAI(ThreadingHTTPServer):
    """The server. `requests` keeps the JSON bodies of chat requests."""

    daemon_threads = True

    def __init__(self, port: int = 0, api_key: str | None = None,
                 model: str = DEFAULT_MODEL, verbose: bool = False) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.api_key = api_key
        self.model = model
        self.verbose = verbose
        self.requests: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def record(self, body: Any) -> None:
        with self._lock:
            self.requests.append(body)

    @classmethod
    def start(cls, port: int = 0, api_key: str | None = None, **kwargs: Any) -> "FakeOpenAI":
        """Starts a server on a background thread and returns it."""
        server = cls(port, api_key, **kwargs)
        server._thread = threading.Thread(target=server.serve_forever, name="fake-openai", daemon=True)
        server._thread.start()
        return server

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A tiny local stand-in for the OpenAI API.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model listed by /v1/models")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args()

    server = FakeOpenAI(args.port, args.api_key, args.model, args.verbose)
    print(json.dumps({"port": server.port}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
