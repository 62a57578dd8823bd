#!/usr/bin/env bash
# Creates the example worker's virtualenv and generates the gRPC stubs.
#
# Usage: ./setup.sh
#   KOO_PY_VENV=/some/dir ./setup.sh   (put the venv elsewhere)
#
# Idempotent and fast once done: pip runs only when requirements.txt changed
# since the last successful install (a stamp file in the venv holds its
# hash); the stubs are always regenerated (it takes about a second).
# The last line printed is the venv's python, for scripts:
#   PY="$(./setup.sh | tail -n1)"
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KOO_PY_VENV:-$here/.venv}"
py="$venv/bin/python"
stamp="$venv/.koo-requirements.sha256"

if [ ! -x "$py" ]; then
  echo "setup.sh: creating virtualenv at $venv" >&2
  python3 -m venv "$venv"
fi

want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup.sh: installing requirements" >&2
  "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$py" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
  echo "$want" > "$stamp"
else
  echo "setup.sh: requirements already installed" >&2
fi

PYTHON="$py" "$here/generate.sh"

echo "$py"
