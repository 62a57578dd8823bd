#!/usr/bin/env bash
# Creates the SDK's test virtualenv and installs the package into it.
#
# Usage: sdks/python/setup.sh            (venv in sdks/python/.venv)
#        KOO_SDK_VENV=/dir sdks/python/setup.sh
#
# Idempotent: pip installs requirements-dev.txt only when it changed since the
# last successful install (a stamp in the venv holds its hash). The package
# itself is reinstalled every time, from the source tree and not editable, so
# the tests see what `pip install sdks/python` installs (py.typed, the .pyi
# stubs); that takes a couple of seconds. The last line printed is the venv's
# python, for scripts: PY="$(sdks/python/setup.sh | tail -n1)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KOO_SDK_VENV:-$here/.venv}"
py="$venv/bin/python"
stamp="$venv/.koo-sdk-requirements.sha256"

if [ ! -x "$py" ]; then
  echo "setup.sh: creating virtualenv at $venv" >&2
  python3 -m venv "$venv"
fi

want="$(sha256sum "$here/requirements-dev.txt" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup.sh: installing requirements" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$py" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-dev.txt" >&2
  echo "$want" > "$stamp"
fi

# A build directory outside the tree, so nothing is left in sdks/python.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -r "$here/pyproject.toml" "$here/README.md" "$here/src" "$build/"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall "$build" >&2

echo "$py"
