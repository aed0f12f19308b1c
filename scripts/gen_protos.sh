#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC code from protos/dpfed/v1/*.proto.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root, i.e. in place)
# tests/unit/test_protos_fresh.py runs it into a temporary folder and fails when the committed
# files differ, so CI catches a .proto edited without regenerating.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export PATH="$(dirname "$PY"):$PATH"  # protoc-gen-mypy lives beside the interpreter
cd "$ROOT"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  protos/dpfed/v1/dpfed.proto
