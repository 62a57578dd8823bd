#!/usr/bin/env bash
# Generates the koo package's gRPC stubs from ../../proto into src/ (or $1).
#
# Usage: ./generate.sh            (uses $PYTHON, else python3; needs the
#                                  grpcio-tools and mypy-protobuf versions
#                                  pinned in requirements-dev.txt)
#        ./generate.sh /tmp/out   (scripts/test diffs that against src/)
#
# The stubs are checked in, so `pip install sdks/python` needs neither protoc
# nor grpcio-tools; scripts/test regenerates them into a temporary directory
# and fails when they differ from the checked-in ones.
# protoc's package paths (koo/cache/v1/...) land inside the `koo` package, so
# the generated imports (`from koo.cache.v1 import cache_service_pb2`) work
# as they are.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="${1:-$here/src}"
python="${PYTHON:-python3}"
bin="$(dirname "$python")"

mapfile -t protos < <(cd "$proto_root" && find koo -name '*.proto' | sort)
# Remove earlier stubs (not the SDK's own modules) so deleted protos do not linger.
for p in "${protos[@]}"; do rm -rf "${out:?}/$(dirname "$p")"; done
mkdir -p "$out"

(cd "$proto_root" && PATH="$bin:$PATH" "$python" -m grpc_tools.protoc \
  -I . \
  --python_out="$out" \
  --grpc_python_out="$out" \
  --mypy_out="$out" \
  --mypy_grpc_out="$out" \
  "${protos[@]}")

# Regular packages (not namespace ones), so setuptools packs them.
for p in "${protos[@]}"; do
  d="$(dirname "$p")"
  while [ "$d" != "koo" ] && [ "$d" != "." ]; do
    touch "$out/$d/__init__.py"
    d="$(dirname "$d")"
  done
done

# `python -m koo.worker module:worker` (the code is in koo/_worker_main.py).
printf '"""Runs a koo worker: python -m koo.worker module:worker."""\n\nfrom koo._worker_main import main\n\nmain()\n' >"$out/koo/worker/__main__.py"
