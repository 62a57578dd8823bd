#!/usr/bin/env bash
# Generates the Python gRPC stubs for koo's protos into ./gen.
#
# Usage: ./generate.sh            (uses $PYTHON, else python3)
#        PYTHON=.venv/bin/python ./generate.sh
#
# Every .proto under ../../proto is compiled, because they import each other
# (worker -> tasks -> cache). The generated modules import one another as
# `from koo.tasks.v1 import task_service_pb2`, so `gen/` must be on sys.path;
# koo_worker.py does that itself. protoc writes no __init__.py files: the
# `koo`, `koo.tasks`, ... packages are Python 3 namespace packages.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="$here/gen"
python="${PYTHON:-python3}"

# Start from a clean tree so stubs of deleted protos do not linger.
rm -rf "$out"
mkdir -p "$out"

# Paths relative to the proto root, so the generated module paths are
# koo/<pkg>/v1/<file>_pb2.py.
mapfile -t protos < <(cd "$proto_root" && find koo -name '*.proto' | sort)
if [ "${#protos[@]}" -eq 0 ]; then
  echo "generate.sh: no .proto files under $proto_root" >&2
  exit 1
fi

# grpc_tools ships the well-known types (google/protobuf/*.proto) and adds
# their include path itself.
(cd "$proto_root" && "$python" -m grpc_tools.protoc \
  -I . \
  --python_out="$out" \
  --grpc_python_out="$out" \
  --pyi_out="$out" \
  "${protos[@]}")

echo "generate.sh: generated ${#protos[@]} protos into $out" >&2
