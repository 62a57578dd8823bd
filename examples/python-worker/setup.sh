#!/usr/bin/env bash
# Creates the example worker's virtualenv: the koo SDK from this repo
# (sdks/python, installed as `pip install` would from a checkout: not
# editable) and the example's own requirements (pypdf).
#
# Usage: ./setup.sh
#   KOO_PY_VENV=/some/dir ./setup.sh   (put the venv elsewhere)
#
# Idempotent and fast once done: pip installs requirements.txt only when it
# changed since the last successful install (a stamp file in the venv holds
# its hash); the SDK is reinstalled every time (a few seconds, no network
# once its dependencies are in), so the venv runs the tree's SDK.
# The last line printed is the venv's python, for scripts:
#   PY="$(./setup.sh | tail -n1)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sdk="$(cd "$here/../../sdks/python" && pwd)"
venv="${KOO_PY_VENV:-$here/.venv}"
py="$venv/bin/python"
stamp="$venv/.koo-requirements.sha256"
pip=("$py" -m pip --quiet --disable-pip-version-check)

if [ ! -x "$py" ]; then
  echo "setup.sh: creating virtualenv at $venv" >&2
  python3 -m venv "$venv"
fi

# The SDK is built from a copy, so that nothing (build/, *.egg-info) is left
# in sdks/python.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -r "$sdk/pyproject.toml" "$sdk/README.md" "$sdk/src" "$build/"

want="$(cat "$here/requirements.txt" "$sdk/pyproject.toml" | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup.sh: installing requirements and the SDK's dependencies" >&2
  "${pip[@]}" install --upgrade pip setuptools >&2
  "${pip[@]}" install -r "$here/requirements.txt" >&2
  # The SDK with its dependencies (grpcio, protobuf) from PyPI.
  "${pip[@]}" install "$build" >&2
  echo "$want" > "$stamp"
fi

# The SDK from the tree, every time (its dependencies are already in).
"${pip[@]}" install --no-deps --no-build-isolation --force-reinstall "$build" >&2

echo "$py"
