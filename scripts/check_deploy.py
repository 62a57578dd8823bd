"""Checks what the compose file promises beyond its schema.

The schema says the file is a valid compose file; this says it is the
deployment the README describes: the cache on a Redis that evicts, the tasks
on a Redis that never evicts and persists every write, and the seed's three
roles (API, workers, beat) as separate services. Run by scripts/test with the
tools virtualenv's Python (ruamel.yaml comes with check-jsonschema).

Usage: python scripts/check_deploy.py deploy/docker-compose.yml
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import urlparse

from ruamel.yaml import YAML


class DeployError(Exception):
    """The file is valid compose but not the deployment the README describes."""


def require(condition: bool, message: str) -> None:
    """Like `assert`, but not stripped by `python -O`."""
    if not condition:
        raise DeployError(message)


def redis_args(service: dict[str, Any]) -> dict[str, str]:
    """The `--flag value` pairs of a redis-server command line."""
    command = [str(part) for part in service.get("command", [])]
    require(
        bool(command) and command[0] == "redis-server", f"not redis-server: {command!r}"
    )
    return {
        command[i].removeprefix("--"): command[i + 1]
        for i in range(1, len(command) - 1)
        if command[i].startswith("--")
    }


def service_of(url: str, services: dict[str, Any]) -> dict[str, Any]:
    """The service a redis:// URL names by its host."""
    host = urlparse(url).hostname or ""
    require(host in services, f"{url} names no service of the file")
    service: dict[str, Any] = services[host]
    return service


def check(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        doc: dict[str, Any] = YAML(typ="safe").load(f)
    services: dict[str, Any] = doc["services"]
    checks = 0

    roles = {
        name: [str(c) for c in s.get("command", [])][:1]
        for name, s in services.items()
        if "build" in s
    }
    for role in ("serve", "worker", "scheduler"):
        require([role] in roles.values(), f"no service runs `koo {role}`: {roles}")
        checks += 1

    for name, svc in services.items():
        if "build" not in svc:
            continue
        env = svc.get("environment", {})
        cache = redis_args(service_of(env["REDIS_URL"], services))
        require(
            cache.get("maxmemory-policy") == "allkeys-lru",
            (f"{name}: the cache Redis must evict (allkeys-lru), has {cache}"),
        )
        tasks = redis_args(service_of(env["TASK_BROKER_URL"], services))
        require(
            tasks.get("maxmemory-policy") == "noeviction",
            (f"{name}: the task Redis must never evict, has {tasks}"),
        )
        require(tasks.get("appendonly") == "yes", f"{name}: the task Redis needs AOF")
        require(
            env["REDIS_URL"] != env["TASK_BROKER_URL"],
            (f"{name}: cache and tasks share one Redis"),
        )
        checks += 4
    print(f"deploy: {checks} checks passed on {path}")
    return 0


SECRET_FILES = ("KOO_TLS_CERT", "KOO_TLS_KEY", "KOO_TLS_CLIENT_CA", "KOO_AUTH_FILE")


def check_secure(path: str) -> int:
    """The secure overlay: TLS, mTLS and a keys file, each a mounted secret,
    and a probe that does not need TLS."""
    with open(path, encoding="utf-8") as f:
        doc: dict[str, Any] = YAML(typ="safe").load(f)
    services: dict[str, Any] = doc["services"]
    secrets: dict[str, Any] = doc.get("secrets", {})
    require("koo" in services, "the overlay does not configure the koo service")
    koo: dict[str, Any] = services["koo"]
    env: dict[str, str] = koo.get("environment", {})
    mounted = [str(s) for s in koo.get("secrets", [])]
    checks = 0
    for var in SECRET_FILES:
        value = env.get(var, "")
        require(value.startswith("/run/secrets/"), f"{var} is not a mounted secret: {value!r}")
        name = value.removeprefix("/run/secrets/")
        require(name in mounted, f"{var}: secret {name} is not mounted in koo")
        require(name in secrets and "file" in secrets[name], f"{var}: secret {name} has no file")
        checks += 3
    listen = env.get("KOO_HEALTH_LISTEN", "")
    probe = [str(p) for p in koo.get("healthcheck", {}).get("test", [])]
    require(bool(listen), "TLS on and no plaintext health listener for the probe")
    require(probe[-2:] == ["--addr", listen], f"the probe does not use {listen}: {probe}")
    checks += 2
    print(f"deploy: {checks} checks passed on {path}")
    return 0


if __name__ == "__main__":
    try:
        target = sys.argv[1] if len(sys.argv) > 1 else "deploy/docker-compose.yml"
        if target.endswith(".secure.yml"):
            sys.exit(check_secure(target))
        sys.exit(check(target))
    except DeployError as e:
        print(f"deploy: {e}", file=sys.stderr)
        sys.exit(1)
