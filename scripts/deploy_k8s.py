"""Checks what deploy/kubernetes/ promises beyond the Kubernetes schemas.

kubernetes-validate says each core object is valid for the Kubernetes version
scripts/test names; this says the objects fit together as the deployment the
README describes, and checks the custom resources (the ServiceMonitor and
the PodMonitor), which no Kubernetes schema covers, against a schema of the
prometheus-operator CRD fields used here (unknown fields are errors, as in
the strict core check):

- kustomization.yaml lists every manifest of the directory, and only those;
- a Deployment per role (`koo serve`, `koo worker`, `koo scheduler`), each
  non-root, read-only root fs, no privilege escalation, every capability
  dropped, resource requests and limits, a PodDisruptionBudget and a
  NetworkPolicy selecting its pods, and a termination grace longer than
  koo's own shutdown grace for that role (read from src/ and the env);
- `koo serve`: gRPC liveness (service `liveness`, which Redis outages do
  not fail) and readiness (`""`, every backend) probes on the plaintext
  health port (KOO_HEALTH_LISTEN) when TLS is on, KOO_LISTEN and KOO_HTTP_LISTEN on
  all interfaces at the named container ports, every file koo reads inside a
  mounted Secret that has that key;
- `koo worker`, `koo scheduler`: KOO_HTTP_LISTEN on all interfaces at the
  container port `http`, their only port;
- every Secret and ConfigMap named exists (with the key named); the Service
  selects the serve pods; the ServiceMonitor selects the Service, scrapes its
  port `http` at /metrics, over https when koo serves TLS; the PodMonitor
  selects the worker and scheduler pods (not the serve pods, which the
  ServiceMonitor scrapes), scrapes their port `http` at /metrics in plain
  http (they have no TLS or keys settings), its job label is a label of
  theirs;
- port `http` (/metrics) of every role is admitted from the monitoring
  namespace only, and the worker and scheduler pods admit nothing else.

Used by scripts/check_deploy.py (`check_deploy.py deploy/kubernetes`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent

Obj = dict[str, Any]


class K8sError(Exception):
    """The manifests are valid objects but not the deployment described."""


def require(condition: bool, message: str) -> None:
    """Like `assert`, but not stripped by `python -O`."""
    if not condition:
        raise K8sError(message)


_SECRET_KEY_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "key"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "key": {"type": "string", "minLength": 1},
        "optional": {"type": "boolean"},
    },
}
_SECRET_OR_CONFIGMAP = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"secret": _SECRET_KEY_SELECTOR, "configMap": _SECRET_KEY_SELECTOR},
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
# A metav1.LabelSelector, as both CRDs take it.
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string", "minLength": 1},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
# A ServiceMonitor's `endpoints[]` and a PodMonitor's `podMetricsEndpoints[]`
# share these fields (the CRDs' Endpoint and PodMetricsEndpoint).
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "tlsConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ca": _SECRET_OR_CONFIGMAP,
                "cert": _SECRET_OR_CONFIGMAP,
                "keySecret": _SECRET_KEY_SELECTOR,
                "serverName": {"type": "string"},
                "insecureSkipVerify": {"type": "boolean"},
            },
        },
        "authorization": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": _SECRET_KEY_SELECTOR,
            },
        },
    },
}


def monitor_schema(kind: str, endpoints: str) -> Obj:
    """The fields of a monitoring.coreos.com/v1 `kind` (prometheus-operator's
    CRD) that deploy/kubernetes uses, with the CRD's types and enums, its
    endpoints under the key `endpoints`; any other field is an error here, so
    a typo cannot pass unnoticed."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "namespace": {"type": "string"},
                    "labels": _LABELS,
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


SERVICE_MONITOR_SCHEMA = monitor_schema("ServiceMonitor", "endpoints")
POD_MONITOR_SCHEMA = monitor_schema("PodMonitor", "podMetricsEndpoints")


def load_dir(directory: Path) -> list[Obj]:
    """Every object of the manifests kustomization.yaml lists, checking that
    it lists exactly the directory's manifests."""
    yaml = YAML(typ="safe")
    kustomization: Obj = yaml.load((directory / "kustomization.yaml").read_text())
    listed = [str(r) for r in kustomization.get("resources", [])]
    present = sorted(
        p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    require(
        sorted(listed) == present,
        f"kustomization.yaml resources {sorted(listed)} != the manifests {present}",
    )
    objects: list[Obj] = []
    for name in listed:
        for doc in yaml.load_all((directory / name).read_text()):
            if doc is not None:
                doc["_file"] = name
                objects.append(doc)
    return objects


def seconds(text: str) -> float:
    """A koo duration (`500ms`, `30s`, `10m`, `2h`, or bare seconds)."""
    m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", text.strip())
    require(m is not None, f"not a duration: {text!r}")
    assert m is not None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


def koo_constant(name: str) -> float:
    """A `Duration::from_secs(N)` constant of src/app.rs (the stop grace of
    `koo worker` and `koo scheduler`), so that the manifests follow koo."""
    source = (ROOT / "src" / "app.rs").read_text()
    m = re.search(rf"const {name}: Duration = Duration::from_secs\((\d+)\)", source)
    require(m is not None, f"src/app.rs no longer defines {name} as from_secs")
    assert m is not None
    return float(m.group(1))


def koo_liveness() -> str:
    """The health service name koo keeps SERVING for liveness probes
    (`LIVENESS` in src/health.rs)."""
    source = (ROOT / "src" / "health.rs").read_text()
    m = re.search(r'pub const LIVENESS: &str = "([^"]+)";', source)
    require(m is not None, "src/health.rs no longer defines LIVENESS")
    assert m is not None
    return m.group(1)


def default_of(variable: str) -> float:
    """The default of a duration setting of `koo serve`, from src/config/."""
    for path in (ROOT / "src" / "config").glob("*.rs"):
        m = re.search(
            rf'env = "{variable}"[^\n]*\n?[^\n]*default_value = "([^"]+)"', path.read_text()
        )
        if m:
            return seconds(m.group(1))
    raise K8sError(f"no default for {variable} in src/config/")


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In) selects
    `labels`."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        require(expr["operator"] == "In", f"unsupported selector operator {expr}")
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


class Manifests:
    """The objects of deploy/kubernetes, by kind."""

    def __init__(self, objects: list[Obj]) -> None:
        self.objects = objects
        self.checks = 0

    def of(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") == kind]

    def named(self, kind: str, name: str) -> Obj:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        require(len(found) == 1, f"no {kind} named {name!r}")
        return found[0]

    def ok(self, condition: bool, message: str) -> None:
        require(condition, message)
        self.checks += 1

    def secret_has(self, name: str, key: str, where: str) -> None:
        secret = self.named("Secret", name)
        keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
        self.ok(key in keys, f"{where}: Secret {name} has no key {key!r} (has {sorted(keys)})")


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def check_pod(m: Manifests, deployment: Obj) -> tuple[Obj, Obj]:
    """The pod-level promises of one Deployment; its pod spec and container."""
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    m.ok(selects(spec["selector"], labels), f"{name}: its selector misses its pods")
    m.ok(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: not runAsNonRoot")
    m.ok(pod.get("automountServiceAccountToken") is False, f"{name}: mounts an API token")
    require(len(pod["containers"]) == 1, f"{name}: one container expected")
    c = pod["containers"][0]
    sc = c.get("securityContext", {})
    m.ok(sc.get("readOnlyRootFilesystem") is True, f"{name}: root fs not read-only")
    m.ok(sc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation allowed")
    m.ok(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities not dropped")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            m.ok(r in res.get(part, {}), f"{name}: no {part}.{r}")
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            m.secret_has(ref["name"], ref["key"], f"{name} env {e['name']}")
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            m.named("ConfigMap", src["configMapRef"]["name"])
    for vol in pod.get("volumes", []):
        if "secret" in vol:
            m.named("Secret", vol["secret"]["secretName"])
    pdbs = [p for p in m.of("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    m.ok(len(pdbs) == 1, f"{name}: {len(pdbs)} PodDisruptionBudgets select its pods")
    policies = [p for p in m.of("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    m.ok(bool(policies), f"{name}: no NetworkPolicy selects its pods")
    return pod, c


def port_of(address: str, variable: str) -> int:
    host, _, port = address.rpartition(":")
    require(host == "0.0.0.0", f"{variable}={address}: not on all interfaces in a pod")
    return int(port)


def check_serve(m: Manifests, deployment: Obj) -> None:
    """`koo serve`: listeners, probes, mounted files, grace, Service."""
    name = deployment["metadata"]["name"]
    pod, c = check_pod(m, deployment)
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    m.ok(port_of(env["KOO_LISTEN"], "KOO_LISTEN") == ports.get("grpc"), f"{name}: KOO_LISTEN is not port grpc")
    m.ok(
        port_of(env.get("KOO_HTTP_LISTEN", ""), "KOO_HTTP_LISTEN") == ports.get("http"),
        f"{name}: KOO_HTTP_LISTEN is not port http (the ServiceMonitor scrapes it)",
    )
    tls = "KOO_TLS_CERT" in env
    probe_port = port_of(env["KOO_HEALTH_LISTEN"], "KOO_HEALTH_LISTEN") if tls else ports["grpc"]
    wanted = {"livenessProbe": koo_liveness(), "readinessProbe": ""}
    for probe, service in wanted.items():
        grpc = c.get(probe, {}).get("grpc")
        m.ok(grpc is not None, f"{name}: no gRPC {probe}")
        m.ok(
            grpc.get("service", "") == service,
            f"{name}: {probe} asks service {grpc.get('service')!r}, not {service!r}",
        )
        m.ok(
            grpc["port"] in (probe_port, "health" if tls else "grpc"),
            f"{name}: {probe} asks port {grpc['port']}, not the "
            + ("plaintext health listener (TLS is on)" if tls else "gRPC port"),
        )
    mounts = {v["mountPath"].rstrip("/"): v["name"] for v in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for var in ("KOO_TLS_CERT", "KOO_TLS_KEY", "KOO_TLS_CLIENT_CA", "KOO_AUTH_FILE"):
        if var not in env:
            continue
        directory, _, file = env[var].rpartition("/")
        m.ok(directory in mounts, f"{name}: {var}={env[var]} is in no mounted volume")
        secret = volumes[mounts[directory]].get("secret")
        m.ok(secret is not None, f"{name}: {var} is not read from a Secret")
        m.secret_has(secret["secretName"], file, f"{name} {var}")
    need = seconds(env.get("KOO_SHUTDOWN_DRAIN") or str(default_of("KOO_SHUTDOWN_DRAIN")))
    need += seconds(env.get("KOO_SHUTDOWN_GRACE") or str(default_of("KOO_SHUTDOWN_GRACE")))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    m.ok(grace > need, f"{name}: terminationGracePeriodSeconds {grace} <= koo's drain + grace {need}")

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in m.of("Service") if selects({"matchLabels": s["spec"]["selector"]}, labels)]
    m.ok(len(services) == 1, f"{name}: {len(services)} Services select its pods")
    service = services[0]
    for p in service["spec"]["ports"]:
        m.ok(p["targetPort"] in ports, f"Service port {p['name']}: no container port {p['targetPort']}")
    check_service_monitor(m, service, tls)


def the_monitor(m: Manifests, kind: str, schema: Obj) -> Obj:
    """The one object of `kind`, valid against `schema`."""
    monitors = m.of(kind)
    m.ok(len(monitors) == 1, f"{len(monitors)} {kind}s, one expected")
    monitor = {k: v for k, v in monitors[0].items() if k != "_file"}
    try:
        jsonschema.validate(monitor, schema)
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise K8sError(f"{kind} {path or '(root)'}: {e.message}") from None
    m.checks += 1
    return monitor


def check_service_monitor(m: Manifests, service: Obj, tls: bool) -> None:
    sm = the_monitor(m, "ServiceMonitor", SERVICE_MONITOR_SCHEMA)
    m.ok(selects(sm["spec"]["selector"], service["metadata"]["labels"]), "the ServiceMonitor misses the Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        m.ok(ep.get("port") == "http" and "http" in service_ports, f"ServiceMonitor port {ep.get('port')}: not the Service's http")
        m.ok(ep.get("path", "/metrics") == "/metrics", f"ServiceMonitor path {ep.get('path')}")
        scheme = ep.get("scheme", "http")
        m.ok(scheme == ("https" if tls else "http"), f"ServiceMonitor scheme {scheme}, koo serves TLS={tls}")
        tls_config = ep.get("tlsConfig", {})
        refs = [tls_config.get(k, {}).get("secret") for k in ("ca", "cert")]
        refs += [tls_config.get("keySecret"), ep.get("authorization", {}).get("credentials")]
        for ref in refs:
            if ref:
                m.secret_has(ref["name"], ref["key"], "ServiceMonitor")


def check_process(m: Manifests, deployment: Obj, role: str, constant: str) -> Obj:
    """`koo worker` or `koo scheduler`: grace, and /metrics at port `http`
    (its only port); its container."""
    pod, c = check_pod(m, deployment)
    need = koo_constant(constant)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    m.ok(grace > need, f"koo {role}: terminationGracePeriodSeconds {grace} <= koo's {constant} {need}")
    env = env_of(c)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    m.ok(list(ports) == ["http"], f"koo {role}: container ports {sorted(ports)}, only http expected")
    m.ok(
        port_of(env.get("KOO_HTTP_LISTEN", ""), "KOO_HTTP_LISTEN") == ports["http"],
        f"koo {role}: KOO_HTTP_LISTEN={env.get('KOO_HTTP_LISTEN')!r} is not port http "
        f"({ports['http']}, which the PodMonitor scrapes)",
    )
    return c


def check_pod_monitor(m: Manifests, deployments: dict[str, Obj]) -> None:
    """The PodMonitor scrapes the worker and scheduler pods' port `http` at
    /metrics in plain http, and not the serve pods (the ServiceMonitor's)."""
    pm = the_monitor(m, "PodMonitor", POD_MONITOR_SCHEMA)
    spec = pm["spec"]
    for role, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        wanted = role in ("worker", "scheduler")
        m.ok(
            selects(spec["selector"], labels) == wanted,
            f"the PodMonitor {'misses' if wanted else 'selects'} the koo {role} pods",
        )
        if not wanted:
            continue
        if "jobLabel" in spec:
            m.ok(
                spec["jobLabel"] in labels,
                f"PodMonitor jobLabel {spec['jobLabel']}: not a label of koo {role}'s pods",
            )
        c = d["spec"]["template"]["spec"]["containers"][0]
        names = {p["name"] for p in c.get("ports", [])}
        for ep in spec["podMetricsEndpoints"]:
            m.ok(
                ep.get("port") == "http" and "http" in names,
                f"PodMonitor port {ep.get('port')}: not koo {role}'s http",
            )
    for ep in spec["podMetricsEndpoints"]:
        m.ok(ep.get("path", "/metrics") == "/metrics", f"PodMonitor path {ep.get('path')}")
        plain = ep.get("scheme", "http") == "http" and not ep.get("tlsConfig") and not ep.get("authorization")
        m.ok(plain, f"PodMonitor: {ep}: koo worker and koo scheduler serve plain http without keys")


MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def check_ingress(m: Manifests, role: str, labels: dict[str, str]) -> None:
    """Port `http` (/metrics) is admitted from the monitoring namespace only
    (a rule without `from` admits every source); the worker and scheduler
    pods admit nothing else."""
    policies = [p for p in m.of("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    only_metrics = role != "serve"
    for policy in policies:
        name = policy["metadata"]["name"]
        spec = policy["spec"]
        m.ok(
            "Ingress" in spec.get("policyTypes", []),
            f"NetworkPolicy {name}: no Ingress policy type (all ingress allowed)",
        )
        rules = spec.get("ingress", [])
        if only_metrics:
            m.ok(bool(rules), f"NetworkPolicy {name}: admits no scraper of koo {role}'s http port")
        for rule in rules:
            ports = [str(p.get("port")) for p in rule.get("ports", [])]
            if only_metrics:
                m.ok(
                    ports == ["http"],
                    f"NetworkPolicy {name}: koo {role} admits ports {ports or 'all'}, only http expected",
                )
            if "http" in ports or not ports:
                m.ok(
                    rule.get("from") == [MONITORING],
                    f"NetworkPolicy {name}: koo {role}'s http port admitted from "
                    f"{rule.get('from', 'anywhere')}",
                )


def check_k8s(directory: str) -> int:
    m = Manifests(load_dir(Path(directory)))
    m.checks += 1
    deployments = {
        str(d["spec"]["template"]["spec"]["containers"][0].get("args", ["serve"])[0]): d
        for d in m.of("Deployment")
    }
    for role in ("serve", "worker", "scheduler"):
        require(role in deployments, f"no Deployment runs `koo {role}`: {sorted(deployments)}")
    check_serve(m, deployments["serve"])
    for role, constant in (("worker", "WORKER_STOP_GRACE"), ("scheduler", "SCHEDULER_STOP_GRACE")):
        check_process(m, deployments[role], role, constant)
    check_pod_monitor(m, deployments)
    for role, d in deployments.items():
        check_ingress(m, role, d["spec"]["template"]["metadata"]["labels"])
    print(f"deploy: {m.checks} checks passed on {directory} ({len(m.objects)} objects)")
    return 0
