#!/usr/bin/env sh
# Generates the lab.v1 Python stubs from the repository's .proto into gen/,
# or into the directory given as the first argument (client.py --stubs DIR).
# They are not committed: they are generated from the one source of truth.
# Run it with the virtualenv's python first on PATH, or set PYTHON.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/gen}
# Only the generated package is replaced, so any DIR is safe to name.
rm -rf "$out/lab"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc \
    --proto_path="$here/../../proto" \
    --python_out="$out" --grpc_python_out="$out" \
    lab/v1/backend.proto
