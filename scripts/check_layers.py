#!/usr/bin/env python3
"""Keeps koo's arrows pointing down: each top-level module of src/ may use
only the modules of the layers below its own (and its own layer's leaves,
where LAYERS says so).

    scripts/check_layers.py            # check (exit 1 on an arrow up)
    scripts/check_layers.py --graph    # every module's uses, for the docs

A use is a `crate::<module>` path in code (not in comments, not in
`#[cfg(test)]` modules, whose fixtures may build anything). The layers, top
first, are the picture in docs/design/architecture.md; change both together.
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Top first. A module may use any module in a lower layer; within a layer,
# only the uses listed in SIDEWAYS.
LAYERS = [
    ["telemetry"],  # logging set-up, from config's log format (main calls it)
    ["config"],  # the command line: flags and variables into the settings below
    ["cli"],  # the client commands (koo cache|task|cron|ps|top): pb only
    ["server"],  # listener, router, shutdown order: serves what app built
    ["app"],  # the composition root: stores, engine, hub, loops; Settings
    ["grpc"],  # adapters: proto <-> domain, errors -> Status, spans
    ["auth", "transport", "reload"],  # who calls, over what
    ["health"],  # grpc.health.v1 statuses from the backends' state
    ["schedule", "watch"],  # domain services over the engine
    ["tasks", "cache"],  # the task engine, the cache
    ["trace"],  # OpenTelemetry spans, and the trace context tasks carry
    ["persist"],  # KOO_DATA_DIR: the embedded store's files
    ["store"],  # one trait per store; redis/ and memory/
    ["keys"],  # every Redis key name
    ["domain", "pb"],  # the shared vocabulary; generated protobuf
    ["quote", "glob", "percent", "repeats"],  # leaves
]

# Uses within a layer that are allowed, with the reason.
SIDEWAYS = {
    ("auth", "transport"): "the caller's identity comes from the connection's peer",
    ("auth", "reload"): "the keys file is re-read when it changes",
    ("transport", "reload"): "certificates are re-read when they change",
    ("tasks", "cache"): "built-in upkeep handlers and cache targets run on the cache",
}


def code_of(text: str) -> str:
    """The text without comments and without `#[cfg(test)]` modules."""
    lines = []
    skip_depth = None
    pending_test = False
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if skip_depth is None and stripped == "#[cfg(test)]":
            pending_test = True
            continue
        code = re.sub(r"//.*", "", line)
        if pending_test and re.match(r"\s*(pub(\(\w+\))?\s+)?mod\s+\w+\s*\{", code):
            skip_depth = depth
        pending_test = False
        opens, closes = code.count("{"), code.count("}")
        if skip_depth is not None:
            depth += opens - closes
            if depth <= skip_depth:
                skip_depth = None
            continue
        depth += opens - closes
        lines.append(code)
    return "\n".join(lines)


def graph() -> dict[str, dict[str, int]]:
    uses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path in (ROOT / "src").rglob("*.rs"):
        rel = path.relative_to(ROOT / "src")
        top = rel.parts[0].removesuffix(".rs")
        if top in ("lib", "main"):
            continue
        for m in re.finditer(r"crate::([a-z_]+)", code_of(path.read_text())):
            if m.group(1) != top:
                uses[top][m.group(1)] += 1
    return uses


def main() -> int:
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    uses = graph()
    if "--graph" in sys.argv:
        for module in sorted(uses, key=lambda m: layer_of.get(m, -1)):
            print(f"{module:10} -> {', '.join(sorted(uses[module]))}")
    bad = []
    for module, targets in sorted(uses.items()):
        if module not in layer_of:
            bad.append(f"{module}: not in any layer of scripts/check_layers.py")
            continue
        for target in sorted(targets):
            if target not in layer_of:
                bad.append(f"{target}: not in any layer of scripts/check_layers.py")
            elif layer_of[target] <= layer_of[module] and (module, target) not in SIDEWAYS:
                bad.append(f"{module} uses {target}: an arrow up (or sideways) the layers")
    for line in sorted(set(bad)):
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
