"""`python -m koo.worker module:worker`: runs a `Worker` defined in a module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from koo._outcomes import WorkerRejected
from koo._worker import Worker


def load(spec: str) -> Worker:
    """Imports `module:attribute` (the attribute defaults to `worker`)."""
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, ".")
    module = importlib.import_module(module_name)
    obj = getattr(module, attr or "worker")
    if not isinstance(obj, Worker):
        raise SystemExit(f"{spec} is not a koo Worker")
    return obj


def _concurrency(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"must be 1 to 1024, got {n}")
    return n


def _grace(text: str) -> float:
    s = float(text)
    if not s >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return s


def _queues(text: str) -> list[str]:
    names = [q.strip() for q in text.split(",") if q.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no queue: {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and runs the worker until SIGTERM/SIGINT; exits 2
    when koo refuses the worker for good."""
    parser = argparse.ArgumentParser(prog="python -m koo.worker", description="Runs a koo task worker.")
    parser.add_argument("worker", help="module:attribute of a koo.Worker, e.g. myapp.tasks:worker")
    parser.add_argument(
        "--concurrency", type=_concurrency, help="tasks run at once, 1 to 1024 (overrides the Worker's)"
    )
    parser.add_argument("--grace", type=_grace, help="seconds running tasks get on SIGTERM")
    parser.add_argument(
        "-Q",
        "--queues",
        type=_queues,
        help="comma-separated queues to serve, as Celery's -Q (overrides the Worker's; "
        "the queues of its tasks' queue= are served too)",
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = load(ns.worker)
    if ns.concurrency is not None:
        worker.set_concurrency(ns.concurrency)
    if ns.grace is not None:
        worker.grace = ns.grace
    if ns.queues is not None:
        worker.queues = ns.queues
    try:
        worker.run()
    except WorkerRejected as e:  # retrying cannot help: the key, its scope or the hello is wrong
        logging.getLogger("koo.worker").error("koo refused this worker: %s", e)
        raise SystemExit(2) from None
