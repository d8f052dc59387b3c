#!/usr/bin/env bash
# Regenerates the Python stubs beside the .proto. The generator is pinned to an
# older grpcio-tools on purpose: generated code refuses to import under a grpcio
# or protobuf runtime older than the one that generated it, and the stubs must
# import on every runtime we support (the GPU image has grpcio 1.84, protobuf 7.36).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${GRPC_TOOLS_VENV:-$here/../.cache/grpc-tools-1.80.0}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio-tools==1.80.0"
fi
cd "$here"
"$venv/bin/python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  qwen2vl_flux/v1/qwen2vl_flux.proto
