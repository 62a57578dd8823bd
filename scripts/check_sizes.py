#!/usr/bin/env python3
"""Keeps koo's rooms small: no file in src/ over 700 lines and no function
over 80 lines, unless scripts/sizes-allowed.txt names it with a reason.

    scripts/check_sizes.py            # check (exit 1 on a new offender)
    scripts/check_sizes.py --report   # the largest files and functions

A function's length runs from its `fn` line to its closing brace. Functions
inside `#[cfg(test)]` modules are scenarios, not rooms: they are reported but
not held to the bound. The brace matching skips strings, characters and
comments well enough for rustfmt-formatted code; it is a guard, not a parser.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE = 700
MAX_FN = 80
ALLOWED = ROOT / "scripts" / "sizes-allowed.txt"

FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")


def strip(line: str, in_block: bool) -> tuple[str, bool]:
    """The line's code without strings, chars and comments; whether a block
    comment is still open after it."""
    out = []
    i = 0
    while i < len(line):
        if in_block:
            end = line.find("*/", i)
            if end < 0:
                return "".join(out), True
            i = end + 2
            in_block = False
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            in_block = True
            i += 2
            continue
        if c == '"' or (c == "r" and re.match(r'r#*"', line[i:])):
            m = re.match(r'r(#*)"', line[i:])
            if m:
                close = '"' + m.group(1)
                end = line.find(close, i + len(m.group(0)))
                i = len(line) if end < 0 else end + len(close)
                continue
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c == "'":
            m = re.match(r"'(\\.|[^\\'])'", line[i:])
            if m:
                i += len(m.group(0))
                continue
        out.append(c)
        i += 1
    return "".join(out), in_block


def functions(path: Path):
    """(name, first line, length, in tests) of every fn with a body."""
    lines = path.read_text().splitlines()
    code = []
    in_block = False
    for line in lines:
        text, in_block = strip(line, in_block)
        code.append(text)
    test_from = None
    for n, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and n + 1 < len(lines) and "mod " in lines[n + 1]:
            test_from = n
            break
    found = []
    for n, line in enumerate(code):
        m = FN.match(line)
        if not m:
            continue
        depth = 0
        opened = False
        for k in range(n, len(code)):
            for ch in code[k]:
                if ch == "{":
                    depth += 1
                    opened = True
                elif ch == "}":
                    depth -= 1
                elif ch == ";" and not opened and depth == 0:
                    break
            else:
                if opened and depth == 0:
                    found.append((m.group(1), n + 1, k - n + 1, test_from is not None and n > test_from))
                    break
                continue
            break
    return found


def allowed() -> dict[str, str]:
    out = {}
    if ALLOWED.exists():
        for line in ALLOWED.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            what, _, why = line.partition(" ")
            if not why.strip():
                sys.exit(f"{ALLOWED.name}: {what} has no reason")
            out[what] = why.strip()
    return out


def main() -> int:
    report = "--report" in sys.argv
    files = sorted((ROOT / "src").rglob("*.rs"))
    sizes = [(len(p.read_text().splitlines()), p.relative_to(ROOT).as_posix()) for p in files]
    fns = []
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        fns += [(length, f"{rel}::{name}", line, test) for name, line, length, test in functions(p)]
    ok = allowed()
    bad = [f"{path}: {n} lines (over {MAX_FILE})" for n, path in sizes if n > MAX_FILE and path not in ok]
    bad += [
        f"{what} (line {line}): {n} lines (over {MAX_FN})"
        for n, what, line, test in fns
        if n > MAX_FN and not test and what not in ok
    ]
    stale = [what for what in ok if what not in {p for _, p in sizes} | {w for _, w, _, _ in fns}]
    if report:
        print("largest files:")
        for n, path in sorted(sizes, reverse=True)[:12]:
            print(f"  {n:5}  {path}")
        print("longest functions (outside tests):")
        for n, what, line, _ in sorted((f for f in fns if not f[3]), reverse=True)[:12]:
            print(f"  {n:5}  {what} (line {line})")
        print(f"{len(files)} files, {sum(n for n, _ in sizes)} lines; {len(fns)} functions")
    for what in stale:
        print(f"{ALLOWED.name}: {what} no longer exists; remove it")
    for line in bad:
        print(f"too large: {line}; split it, or name it in {ALLOWED.name} with a reason")
    return 1 if bad or stale else 0


if __name__ == "__main__":
    sys.exit(main())
