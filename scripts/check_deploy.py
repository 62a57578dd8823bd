"""Checks what the compose file promises beyond its schema.

The schema says the file is a valid compose file; this says it is the
deployment the README describes: the cache on a Redis that evicts, the tasks
on a Redis that never evicts and persists every write, and the seed's three
roles (API, workers, beat) as separate services, each scraped by the
prometheus service at its metrics port (KOO_HTTP_LISTEN: the workers and the
scheduler count what they did themselves) and shown by a grafana provisioned
with that Prometheus and the dashboards of deploy/grafana/. Run by
scripts/test with the tools virtualenv's Python (ruamel.yaml and jsonschema
come with check-jsonschema).

Usage: python scripts/check_deploy.py deploy/docker-compose.yml
       python scripts/check_deploy.py deploy/docker-compose.secure.yml
       python scripts/check_deploy.py deploy/kubernetes   (see deploy_k8s.py)
       python scripts/check_deploy.py deploy/Dockerfile   (its build context)
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
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
        role = [str(c) for c in svc.get("command", [])][:1]
        probe = svc.get("healthcheck", {})
        # the image's HEALTHCHECK is `koo health`, a gRPC call only `serve` answers
        require(
            role == ["serve"] or probe.get("disable") is True,
            f"{name} (koo {role}): the image's `koo health` probe would mark it unhealthy; disable it",
        )
        checks += 1
    for name in ("prometheus", "grafana"):
        for port in services.get(name, {}).get("ports", []):
            require(
                str(port).startswith("127.0.0.1:"),
                f"{name} publishes {port} beyond this host, without authentication",
            )
            checks += 1
    checks += check_monitoring(path, services)
    print(f"deploy: {checks} checks passed on {path}")
    return 0


def mounted(service: dict[str, Any], target: str, base: Path) -> Path:
    """The host path a service mounts at `target` (short syntax)."""
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            return base / source
    raise DeployError(f"nothing is mounted at {target}: {service.get('volumes')}")


def scrape_targets(config: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(scheme, metrics path, host, port) of every scrape target the config
    names."""
    targets = []
    for job in config.get("scrape_configs", []):
        scheme = job.get("scheme", "http")
        path = job.get("metrics_path", "/metrics")
        for sd in job.get("dns_sd_configs", []):
            targets += [(scheme, path, str(n), int(sd["port"])) for n in sd.get("names", [])]
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                host, _, port = str(t).rpartition(":")
                targets.append((scheme, path, host, int(port)))
    return targets


ROLES = ("serve", "worker", "scheduler")


def metrics_ports(services: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """The role and metrics port of every koo service (KOO_HTTP_LISTEN, on
    all interfaces so that the prometheus service reaches it)."""
    ports = {}
    for name, svc in services.items():
        role = [str(c) for c in svc.get("command", [])][:1]
        if "build" not in svc or not role or role[0] not in ROLES:
            continue
        http = str(svc.get("environment", {}).get("KOO_HTTP_LISTEN", ""))
        host, _, port = http.rpartition(":")
        require(
            host == "0.0.0.0" and port.isdigit(),
            f"{name} (koo {role[0]}): KOO_HTTP_LISTEN={http!r} is not reachable from prometheus",
        )
        ports[name] = (role[0], int(port))
    return ports


def load_prometheus(services: dict[str, Any], base: Path) -> tuple[Path, dict[str, Any]]:
    """The configuration the prometheus service mounts, and its path."""
    prom_config = mounted(services["prometheus"], "/etc/prometheus/prometheus.yml", base)
    with open(prom_config, encoding="utf-8") as f:
        config: dict[str, Any] = YAML(typ="safe").load(f)
    return prom_config, config


def check_scraped(
    prom_config: Path,
    config: dict[str, Any],
    ports: dict[str, tuple[str, int]],
    serve_scheme: str,
) -> int:
    """Prometheus scrapes every koo service at its metrics port: `koo serve`
    with `serve_scheme`, `koo worker` and `koo scheduler` in plain http
    (they have no TLS settings); the latter two publish no port."""
    targets = scrape_targets(config)
    for name, (role, port) in ports.items():
        scheme = serve_scheme if role == "serve" else "http"
        require(
            (scheme, "/metrics", name, port) in targets,
            f"{prom_config} does not scrape {scheme}://{name}:{port}/metrics (koo {role}): {targets}",
        )
    for role in ROLES:
        require(role in {r for r, _ in ports.values()}, f"no koo {role} service has a metrics port: {ports}")
    return len(ports) + len(ROLES)


def check_monitoring(path: str, services: dict[str, Any]) -> int:
    """Prometheus scrapes the metrics listener of every koo service; Grafana
    reads that Prometheus and loads deploy/grafana/koo-dashboard.json."""
    base = Path(path).parent
    require("prometheus" in services, "no prometheus service")
    require("grafana" in services, "no grafana service")
    prom_config, config = load_prometheus(services, base)
    ports = metrics_ports(services)
    checks = check_scraped(prom_config, config, ports, "http")
    for name, (role, _) in ports.items():
        published = services[name].get("ports", [])
        require(
            role == "serve" or not published,
            f"{name}: koo {role}'s plaintext /metrics must not be published: {published}",
        )
    provisioning = mounted(services["grafana"], "/etc/grafana/provisioning", base)
    sources = [
        d
        for f in sorted((provisioning / "datasources").glob("*.yml"))
        for d in YAML(typ="safe").load(f.read_text()).get("datasources", [])
    ]
    require(
        any(d["type"] == "prometheus" and urlparse(d["url"]).hostname == "prometheus" for d in sources),
        f"grafana has no datasource for the prometheus service: {sources}",
    )
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.yml"))
        for p in YAML(typ="safe").load(f.read_text()).get("providers", [])
    ]
    dashboards = [mounted(services["grafana"], p["options"]["path"], base) for p in providers]
    require(
        any(os.path.isfile(d / "koo-dashboard.json") for d in dashboards),
        f"no dashboard provider loads koo-dashboard.json: {dashboards}",
    )
    uids = {str(d.get("uid")) for d in sources}
    for d in dashboards:
        for f in sorted(d.glob("*.json")):
            check_datasources(f, uids)
    return checks + 4


def datasource_refs(node: Any) -> list[str]:
    """The uid (or name) of every `datasource` a dashboard's panels and
    targets name, outside its variables."""
    if isinstance(node, list):
        return [r for v in node for r in datasource_refs(v)]
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        if key == "datasource" and value:
            found.append(str(value.get("uid") if isinstance(value, dict) else value))
        elif key != "templating":
            found += datasource_refs(value)
    return found


def check_datasources(path: Path, uids: set[str]) -> None:
    """Every datasource a provisioned dashboard names is one Grafana has: a
    provisioned uid, or a variable of the dashboard's own of type datasource.
    (A dashboard exported "for sharing" names `${DS_PROMETHEUS}`, an input
    that only the import dialog fills in, never provisioning.)"""
    with open(path, encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    variables = {
        str(v["name"])
        for v in dashboard.get("templating", {}).get("list", [])
        if v.get("type") == "datasource"
    }
    for ref in datasource_refs(dashboard):
        variable = ref.startswith("$") and ref.strip("${}") in variables
        require(
            ref in uids or variable or ref == "-- Grafana --",
            f"{path}: datasource {ref!r} is neither a provisioned uid {sorted(uids)} "
            "nor a datasource variable of the dashboard",
        )


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
    checks += check_secure_prometheus(path, services, secrets)
    for name in ("worker", "scheduler"):
        overlay = services.get(name, {})
        require(
            not overlay.get("ports"),
            f"the overlay publishes {name}'s plaintext /metrics: {overlay.get('ports')}",
        )
        checks += 1
    print(f"deploy: {checks} checks passed on {path}")
    return 0


def check_secure_prometheus(
    path: str, services: dict[str, Any], secrets: dict[str, Any]
) -> int:
    """Under TLS, Prometheus scrapes `koo serve` over https with every file
    its configuration names mounted as a secret of its service, and still
    scrapes the worker and scheduler (over http) of the base file that the
    overlay is layered on."""
    require("prometheus" in services, "the overlay does not configure prometheus")
    prometheus: dict[str, Any] = services["prometheus"]
    config_path, config = load_prometheus(services, Path(path).parent)
    with open(Path(path).parent / "docker-compose.yml", encoding="utf-8") as f:
        base_services: dict[str, Any] = YAML(typ="safe").load(f)["services"]
    scraped = check_scraped(config_path, config, metrics_ports(base_services), "https")
    koo_jobs = [j for j in config["scrape_configs"] if j["job_name"] == "koo"]
    require(len(koo_jobs) == 1 and koo_jobs[0].get("scheme") == "https", f"{config_path}: koo not scraped over https")
    job = koo_jobs[0]
    files = [v for k, v in job.get("tls_config", {}).items() if k.endswith("_file")]
    files.append(job.get("authorization", {}).get("credentials_file", ""))
    mounted_secrets = [str(s) for s in prometheus.get("secrets", [])]
    for file in files:
        name = file.removeprefix("/run/secrets/")
        require(file.startswith("/run/secrets/"), f"{config_path}: {file!r} is not a mounted secret")
        require(name in mounted_secrets, f"prometheus: secret {name} is not mounted")
        require(name in secrets and "file" in secrets[name], f"prometheus: secret {name} has no file")
    return 1 + len(files) + scraped


# `include_bytes!("...")` / `include_str!("...")`, and `concat!("...", $x)`'s
# first part (a directory the macro reads files of).
INCLUDE = re.compile(r'include_(?:bytes|str)!\((?:concat!\()?"([^"]+)"')


def build_inputs(root: Path) -> list[str]:
    """The files and directories outside `src/` that the binary's own
    (non-test) code reads at compile time, relative to the repository."""
    out: set[str] = set()
    for rs in sorted((root / "src").rglob("*.rs")):
        text = rs.read_text()
        # a file's unit tests come last, after its `#[cfg(test)]`
        code = text.split("#[cfg(test)]", 1)[0]
        for m in INCLUDE.finditer(code):
            if "OUT_DIR" in m.group(0):
                continue
            path = os.path.normpath(rs.parent / m.group(1))
            out.add(os.path.relpath(path, root))
    return sorted(p for p in out if not p.startswith("src" + os.sep))


def check_dockerfile(path: str) -> int:
    """The build stage copies everything the binary is compiled from: an
    include outside `src/` that the Dockerfile does not copy fails the
    image's build (as `web/dist` once did), and no `docker build` runs here
    to find it."""
    root = Path(path).resolve().parent.parent
    copied: list[str] = []
    for line in Path(path).read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        copied.extend(w.rstrip("/") for w in words[1:-1])
    for needed in ("Cargo.toml", "Cargo.lock", "build.rs", "proto", "src"):
        require(needed in copied, f"{path}: the build stage does not copy {needed}")
    inputs = build_inputs(root)
    for needed in inputs:
        require(
            any(needed == c or needed.startswith(c + "/") for c in copied),
            f"{path}: the binary includes {needed} but the build stage copies only {copied}",
        )
    print(f"{path}: the build stage copies what the binary includes from outside src/: {inputs}")
    return 0


if __name__ == "__main__":
    try:
        target = sys.argv[1] if len(sys.argv) > 1 else "deploy/docker-compose.yml"
        if os.path.isdir(target):
            from deploy_k8s import K8sError, check_k8s

            try:
                sys.exit(check_k8s(target))
            except K8sError as e:
                raise DeployError(str(e)) from None
        if target.endswith("Dockerfile"):
            sys.exit(check_dockerfile(target))
        if target.endswith(".secure.yml"):
            sys.exit(check_secure(target))
        sys.exit(check(target))
    except DeployError as e:
        print(f"deploy: {e}", file=sys.stderr)
        sys.exit(1)
