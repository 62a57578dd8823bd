#!/usr/bin/env python3
"""Splits a `perf script` dump of koo (cpu-clock samples with call graphs)
into the components of docs/perf/cache-get.md, and writes folded stacks
for inferno-flamegraph.

    perf script -i koo.data > koo.script
    scripts/perf-components.py koo.script [folded-out]

A sample goes to the component of its innermost frame that names one
(allocator, std and core frames are attributed to their caller); kernel
samples go to `syscalls` by the system call they are in. The allocator's
share is also reported on its own, across components.
"""
import collections
import re
import sys

# (component, prefixes of a demangled frame), innermost match wins
COMPONENTS = [
    ("cache domain", ("koo::cache::", "koo::store::", "koo::keys::", "koo::grpc::cache::",
                      "<koo::grpc::cache::", "<koo::store::", "<koo::cache::")),
    ("metrics (gRPC + cache histograms)", ("koo::grpc::metrics", "<koo::grpc::metrics",
                                           "koo::cache::histogram", "koo::cache::metrics")),
    ("tower layers (auth, shed, peer, span, trace)", ("koo::auth", "<koo::auth", "koo::grpc::shed",
        "<koo::grpc::shed", "koo::transport", "<koo::transport", "koo::grpc::span",
        "<koo::grpc::span", "koo::trace", "<koo::trace", "koo::grpc::deadline", "tower::",
        "<tower::", "tonic_web", "<tonic_web", "tower_http", "<tower_http", "tracing",
        "<tracing", "axum", "<axum")),
    ("prost (encode/decode)", ("prost::", "<prost::", "tonic_prost", "<tonic_prost",
                               "<koo::pb::", "koo::pb::")),
    ("tonic", ("tonic::", "<tonic::")),
    ("HTTP/2 (h2 + hyper)", ("h2::", "<h2::", "hyper::", "<hyper::", "hyper_util", "<hyper_util",
                             "http::", "<http::", "bytes::", "<bytes::")),
    ("redis client", ("redis::", "<redis::", "combine::", "<combine::", "arc_swap", "<arc_swap")),
    ("tokio scheduling", ("tokio::", "<tokio::", "futures_util", "<futures_util",
                          "futures_channel", "<futures_channel", "std::thread", "<std::thread")),
]
ALLOCATOR = re.compile(r"(_rjem_|je_|tcache|arena_|extent_|pac_|emap|rtree|sdallocx|malloc|free\b)")


def samples(path):
    frames = []
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line.strip():
            if frames:
                yield frames
            frames = []
            continue
        if line.startswith("\t") or line.startswith(" "):
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                sym, _, dso = parts[1].rpartition(" (")
                frames.append((re.sub(r"\+0x[0-9a-f]+$", "", sym), dso.rstrip(")")))
    if frames:
        yield frames


def classify(frames):
    if any("kernel" in d for _, d in frames):
        user = [s for s, d in frames if "kernel" not in d]
        call = user[0] if user else "kernel"
        for s in user:
            if s.startswith(("h2::", "<h2::", "hyper", "<hyper", "tonic", "<tonic")):
                return "syscalls: gRPC socket", call
            if "redis" in s:
                return "syscalls: Redis socket", call
        return "syscalls: runtime (epoll, futex, wake-ups)", call
    for sym, _ in frames:
        for name, prefixes in COMPONENTS:
            if sym.startswith(prefixes):
                return name, None
    return "other", frames[0][0] if frames else "?"


def main():
    path = sys.argv[1]
    folded = collections.Counter()
    by = collections.Counter()
    sys_by = collections.Counter()
    other = collections.Counter()
    alloc = 0
    total = 0
    for frames in samples(path):
        total += 1
        comp, detail = classify(frames)
        by[comp] += 1
        if comp.startswith("syscalls"):
            sys_by[detail] += 1
        elif comp == "other":
            other[detail] += 1
        if frames and ALLOCATOR.search(frames[0][0]):
            alloc += 1
        stack = [s for s, _ in reversed(frames) if s != "[unknown]"]
        folded[";".join(stack).replace(" ", "_") or "?"] += 1
    print(f"{total} samples")
    print("| component | share |\n|---|---:|")
    for comp, n in by.most_common():
        print(f"| {comp} | {100 * n / total:.1f} % |")
    print(f"| (allocator, across components) | {100 * alloc / total:.1f} % |")
    print("\nsyscalls:", ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in sys_by.most_common(8)))
    print("other:", ", ".join(f"{k[:60]} {100 * v / total:.1f} %" for k, v in other.most_common(8)))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            for stack, n in folded.items():
                f.write(f"{stack} {n}\n")


main()
