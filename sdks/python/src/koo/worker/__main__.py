"""Runs a koo worker: python -m koo.worker module:worker."""

from koo._worker_main import main

main()
